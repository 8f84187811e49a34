"""Timestep embeddings: sinusoidal (``Timesteps``), Gaussian Fourier, and the MLP that follows them;
the fixed sinusoidal position table of the temporal transformers (``SinusoidalPositionalEmbedding``); and
IP-Adapter's image projections (``ImageProjection``, ``MultiIPAdapterImageProjection``)."""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
import torch.nn as nn

from .activations import get_activation


def get_timestep_embedding(timesteps: torch.Tensor, embedding_dim: int, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1, scale: float = 1,
                           max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of a 1-D tensor of (possibly fractional) timesteps -> ``(N, embedding_dim)``.

    Frequencies are ``max_period ** (-i / (half - downscale_freq_shift))`` for ``i < half``; the
    output is ``[sin, cos]`` (``[cos, sin]`` with ``flip_sin_to_cos``), zero-padded to odd widths.
    """
    if timesteps.dim() != 1:
        raise ValueError(f"timesteps must be 1-D (N,); got shape {tuple(timesteps.shape)}")
    half = embedding_dim // 2
    index = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(index * (-math.log(max_period) / (half - downscale_freq_shift)))
    angles = scale * (timesteps[:, None].float() * freqs[None, :])
    parts = [torch.cos(angles), torch.sin(angles)] if flip_sin_to_cos else [torch.sin(angles), torch.cos(angles)]
    emb = torch.cat(parts, dim=-1)
    if embedding_dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class Timesteps(nn.Module):
    """Parameter-free sinusoidal timestep embedding: ``(N,)`` -> ``(N, num_channels)``."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: int = 1):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return get_timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos,
                                      self.downscale_freq_shift, self.scale)


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of (log) noise levels: ``(N,)`` -> ``(N, 2 * embedding_size)``.

    The frozen frequencies live in the parameter ``weight`` (the name diffusers checkpoints use).
    ``set_W_to_weight`` is accepted for signature compatibility; it only changes how diffusers
    draws the random initial values.
    """

    def __init__(self, embedding_size: int = 256, scale: float = 1.0, set_W_to_weight: bool = True,
                 log: bool = True, flip_sin_to_cos: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)
        self.log = log
        self.flip_sin_to_cos = flip_sin_to_cos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.log:
            x = torch.log(x)
        phase = x[:, None] * self.weight[None, :] * (2 * math.pi)
        parts = [torch.cos(phase), torch.sin(phase)] if self.flip_sin_to_cos else [torch.sin(phase), torch.cos(phase)]
        return torch.cat(parts, dim=-1)


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on a timestep embedding: ``linear_1 -> act -> linear_2 [-> post_act]``.

    ``cond_proj_dim`` adds ``cond_proj`` (no bias), whose projection of ``condition`` is added to the
    input first (LCM's ``timestep_cond``).
    """

    def __init__(self, in_channels: int, time_embed_dim: int, act_fn: str = "silu", out_dim: int | None = None,
                 post_act_fn: str | None = None, cond_proj_dim: int | None = None, sample_proj_bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim, sample_proj_bias)
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim is not None else None
        self.act = get_activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, out_dim if out_dim is not None else time_embed_dim, sample_proj_bias)
        self.post_act = get_activation(post_act_fn)

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            sample = sample + self.cond_proj(condition)
        sample = self.linear_1(sample)
        if self.act is not None:
            sample = self.act(sample)
        sample = self.linear_2(sample)
        if self.post_act is not None:
            sample = self.post_act(sample)
        return sample


class SinusoidalPositionalEmbedding(nn.Module):
    """Adds fixed sine/cosine position codes along a sequence: ``(B, N, embed_dim) -> x + pe[:, :N]``.

    The table ``pe`` ``(1, max_seq_length, embed_dim)`` is a persistent buffer (so it is in the state
    dict, as in diffusers' checkpoints): position ``n`` has ``sin(n * w_i)`` in feature ``2i`` and
    ``cos(n * w_i)`` in feature ``2i + 1``, with ``w_i = 10000 ** (-2i / embed_dim)``. ``embed_dim``
    must be even. A sequence longer than ``max_seq_length`` raises ``ValueError``.
    """

    def __init__(self, embed_dim: int, max_seq_length: int = 32):
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("max_seq_length", max_seq_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SinusoidalPositionalEmbedding: {name} must be a positive int; got {value!r}")
        if embed_dim % 2 != 0:
            raise ValueError(f"SinusoidalPositionalEmbedding interleaves sin/cos pairs: embed_dim must be even; "
                             f"got {embed_dim}")
        position = torch.arange(max_seq_length, dtype=torch.float32)[:, None]
        freqs = torch.exp(torch.arange(0, embed_dim, 2, dtype=torch.float32) * (-math.log(10000.0) / embed_dim))
        angles = position * freqs
        pe = torch.stack((torch.sin(angles), torch.cos(angles)), dim=-1).reshape(1, max_seq_length, embed_dim)
        self.register_buffer("pe", pe)

    @property
    def max_seq_length(self) -> int:
        return self.pe.shape[1]

    def positions(self, length: int) -> torch.Tensor:
        """The codes of the first ``length`` positions, a ``(1, length, embed_dim)`` view of ``pe``."""
        if length > self.max_seq_length:
            raise ValueError(f"a sequence of {length} positions is longer than the sinusoidal table's "
                             f"{self.max_seq_length} (num_positional_embeddings / max_seq_length)")
        return self.pe[:, :length]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, N, embed_dim)`` -> ``x + pe[:, :N]``."""
        if x.dim() != 3 or x.shape[-1] != self.pe.shape[-1]:
            raise ValueError(f"SinusoidalPositionalEmbedding expects (B, N, {self.pe.shape[-1]}); "
                             f"got shape {tuple(x.shape)}")
        return x + self.positions(x.shape[1])


def timesteps_to_tensor(timestep, batch_size: int, device: torch.device,
                        scalar_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Turn an int, a float, a 0-d or a 1-d tensor into a ``(batch_size,)`` tensor on ``device``.

    A Python or NumPy number becomes a tensor of ``scalar_dtype`` (``None``: int64 for ints, float32 for
    floats; ``UNet2DModel`` passes int64 because diffusers' ``UNet2DModel`` truncates Python floats).
    A 1-element 1-d tensor is broadcast over the batch; a 1-d tensor of another length must equal
    ``batch_size``.
    """
    if isinstance(timestep, torch.Tensor):
        t = timestep.to(device)
    elif isinstance(timestep, bool) or not isinstance(timestep, numbers.Real):
        raise TypeError(f"timestep must be an int, a float or a tensor; got {type(timestep).__name__}")
    else:
        # numbers.Real also takes NumPy scalars (np.int64 from a scheduler's array), as diffusers does
        integral = isinstance(timestep, numbers.Integral)
        dtype = scalar_dtype or (torch.int64 if integral else torch.float32)
        t = torch.tensor([int(timestep) if integral else float(timestep)], dtype=dtype, device=device)
    if t.dim() == 0:
        t = t[None]
    if t.dim() != 1:
        raise ValueError(f"timestep must be a scalar or a 1-d tensor; got shape {tuple(t.shape)}")
    if t.shape[0] == 1 and batch_size != 1:
        t = t.expand(batch_size)
    elif t.shape[0] != batch_size:
        raise ValueError(f"timestep has {t.shape[0]} entries but the batch has {batch_size} samples")
    return t


class ImageProjection(nn.Module):
    """IP-Adapter's image projection: a CLIP image embedding ``(N, image_embed_dim)`` -> ``num_image_text_embeds``
    tokens ``(N, num_image_text_embeds, cross_attention_dim)``, through one linear layer and a LayerNorm."""

    def __init__(self, image_embed_dim: int = 768, cross_attention_dim: int = 768, num_image_text_embeds: int = 32):
        super().__init__()
        self.num_image_text_embeds = num_image_text_embeds
        self.image_embeds = nn.Linear(image_embed_dim, num_image_text_embeds * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        if image_embeds.shape[-1] != self.image_embeds.in_features:
            raise ValueError(f"image_embeds must be (N, {self.image_embeds.in_features}); "
                             f"got {tuple(image_embeds.shape)}")
        tokens = self.image_embeds(image_embeds.to(self.image_embeds.weight.dtype))
        return self.norm(tokens.reshape(image_embeds.shape[0], self.num_image_text_embeds, -1))


class MultiIPAdapterImageProjection(nn.Module):
    """One image projection per loaded IP-Adapter (``image_projection_layers``).

    ``forward(image_embeds)`` takes a list with one ``(B, I, ...)`` tensor per adapter (``I`` images each)
    and returns a list of ``(B, I, tokens, cross_attention_dim)`` tensors.
    """

    def __init__(self, IPAdapterImageProjectionLayers: Sequence[nn.Module]):  # noqa: N803 (diffusers' name)
        super().__init__()
        self.image_projection_layers = nn.ModuleList(IPAdapterImageProjectionLayers)

    @property
    def num_ip_adapters(self) -> int:
        return len(self.image_projection_layers)

    def forward(self, image_embeds: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if torch.is_tensor(image_embeds):
            raise TypeError("image_embeds must be a list with one (batch, images, embed_dim) tensor per IP-Adapter; "
                            f"got a tensor of shape {tuple(image_embeds.shape)}")
        if len(image_embeds) != len(self.image_projection_layers):
            raise ValueError(f"image_embeds must have one entry per IP-Adapter ({len(self.image_projection_layers)});"
                             f" got {len(image_embeds)}")
        projected = []
        for embeds, projection in zip(image_embeds, self.image_projection_layers):
            batch, images = embeds.shape[:2]
            tokens = projection(embeds.reshape(batch * images, *embeds.shape[2:]))
            projected.append(tokens.reshape(batch, images, *tokens.shape[1:]))
        return projected
