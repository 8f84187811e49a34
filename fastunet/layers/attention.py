"""The transformer layers shared by the spatial and the temporal transformers: ``FeedForward`` (with its
GELU / GEGLU / approximate-GELU input projections), ``BasicTransformerBlock`` and the mask helper, with
diffusers' parameter names.

``BasicTransformerBlock`` on tokens ``h`` ``(B, N, dim)``::

    h = h + attn1(norm1(h) [+ pe])          # self-attention (cross-attention if only_cross_attention)
    h = h + attn2(norm2(h) [+ pe], context) # cross-attention (self-attention if double_self_attention)
    h = h + ff(norm3(h))                    # GEGLU/GELU MLP, optionally chunked along batch or tokens

``pe`` is the sinusoidal position table (``positional_embeddings="sinusoidal"``, the temporal
transformers': positions are frames), added to both normalised inputs of the attentions.

Attention goes through :class:`fastunet.layers.attention_processor.Attention` and its processors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configuration import reject_unsupported
from .attention_processor import Attention
from .embeddings import SinusoidalPositionalEmbedding


def mask_to_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Turn a ``(B, tokens)`` keep-mask (1 keep, 0 discard) into an additive ``(B, 1, tokens)`` bias
    (0 keep, -10000 discard), as diffusers does. ``None`` and already-converted biases (3-D) pass
    through unchanged."""
    if mask is None or mask.dim() != 2:
        return mask
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


# --------------------------------------------------------------------------------------------------
# Feed-forward
# --------------------------------------------------------------------------------------------------


class GELU(nn.Module):
    """``gelu(proj(x))``; ``approximate="tanh"`` for the tanh approximation."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none", bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)
        self.approximate = approximate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(hidden_states), approximate=self.approximate)


class GEGLU(nn.Module):
    """Gated GELU: ``proj`` maps to ``2 * dim_out`` features ``[value, gate]``; returns ``value * gelu(gate)``."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(hidden_states).chunk(2, dim=-1)
        return value * F.gelu(gate)


class ApproximateGELU(nn.Module):
    """``x * sigmoid(1.702 x)`` of ``proj(x)`` (diffusers' ``"geglu-approximate"``)."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.proj(hidden_states)
        return hidden_states * torch.sigmoid(1.702 * hidden_states)


_FEED_FORWARD_ACTIVATIONS = {
    "geglu": GEGLU,
    "gelu": GELU,
    "gelu-approximate": lambda dim_in, dim_out, bias: GELU(dim_in, dim_out, approximate="tanh", bias=bias),
    "geglu-approximate": ApproximateGELU,
}


class FeedForward(nn.Module):
    """Transformer MLP ``(..., dim) -> (..., dim_out)``: ``net = [activation-with-projection, Dropout,
    Linear(inner_dim, dim_out)(, Dropout)]`` (state-dict names ``net.0.proj``, ``net.2``)."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, dropout: float = 0.0,
                 activation_fn: str = "geglu", final_dropout: bool = False, inner_dim: int | None = None,
                 bias: bool = True):
        super().__init__()
        if activation_fn not in _FEED_FORWARD_ACTIVATIONS:
            raise NotImplementedError(
                f"activation_fn must be one of {sorted(_FEED_FORWARD_ACTIVATIONS)}; got {activation_fn!r}")
        inner_dim = int(dim * mult) if inner_dim is None else inner_dim
        dim_out = dim if dim_out is None else dim_out
        layers = [_FEED_FORWARD_ACTIVATIONS[activation_fn](dim, inner_dim, bias=bias), nn.Dropout(dropout),
                  nn.Linear(inner_dim, dim_out, bias=bias)]
        if final_dropout:
            layers.append(nn.Dropout(dropout))
        self.net = nn.ModuleList(layers)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            hidden_states = layer(hidden_states)
        return hidden_states


# --------------------------------------------------------------------------------------------------
# BasicTransformerBlock
# --------------------------------------------------------------------------------------------------


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block on tokens ``(B, N, dim)``: self-attention, cross-attention
    (present when ``cross_attention_dim`` or ``double_self_attention`` is set) and a feed-forward,
    each added to the residual stream.

    ``only_cross_attention`` makes ``attn1`` attend to ``encoder_hidden_states`` too;
    ``double_self_attention`` makes ``attn2`` a second self-attention. ``positional_embeddings=
    "sinusoidal"`` adds ``pos_embed`` (a table of ``num_positional_embeddings`` positions) to the
    normalised inputs of both attentions; longer sequences raise ``ValueError``. ``set_chunk_feed_forward``
    runs the feed-forward on slices of ``chunk_size`` along ``dim`` (0 batch, 1 tokens): same result,
    less peak memory.
    """

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, dropout: float = 0.0,
                 cross_attention_dim: int | None = None, activation_fn: str = "geglu",
                 num_embeds_ada_norm: int | None = None, attention_bias: bool = False,
                 only_cross_attention: bool = False, double_self_attention: bool = False,
                 upcast_attention: bool = False, norm_elementwise_affine: bool = True,
                 norm_type: str = "layer_norm", norm_eps: float = 1e-5, final_dropout: bool = False,
                 attention_type: str = "default", positional_embeddings: str | None = None,
                 num_positional_embeddings: int | None = None,
                 ada_norm_continous_conditioning_embedding_dim: int | None = None,
                 ada_norm_bias: int | None = None, ff_inner_dim: int | None = None, ff_bias: bool = True,
                 attention_out_bias: bool = True):
        super().__init__()
        reject_unsupported("Transformer2DModel", "norm_type", norm_type, ("layer_norm",))
        reject_unsupported("Transformer2DModel", "num_embeds_ada_norm", num_embeds_ada_norm, (None,))
        reject_unsupported("Transformer2DModel", "attention_type", attention_type, ("default",))
        reject_unsupported("BasicTransformerBlock", "positional_embeddings", positional_embeddings,
                           (None, "sinusoidal"))
        if positional_embeddings is not None and (
                isinstance(num_positional_embeddings, bool) or not isinstance(num_positional_embeddings, int)
                or num_positional_embeddings < 1):
            raise ValueError(f"positional_embeddings={positional_embeddings!r} needs num_positional_embeddings, "
                             f"the longest sequence, as a positive int; got {num_positional_embeddings!r}")
        self.dim = dim
        self.num_attention_heads = num_attention_heads
        self.attention_head_dim = attention_head_dim
        self.cross_attention_dim = cross_attention_dim
        self.only_cross_attention = only_cross_attention
        self.double_self_attention = double_self_attention
        self.norm_type = norm_type
        self.positional_embeddings = positional_embeddings
        self.num_positional_embeddings = num_positional_embeddings

        self.pos_embed = (SinusoidalPositionalEmbedding(dim, max_seq_length=num_positional_embeddings)
                          if positional_embeddings == "sinusoidal" else None)
        attention_args = dict(query_dim=dim, heads=num_attention_heads, dim_head=attention_head_dim,
                              dropout=dropout, bias=attention_bias, upcast_attention=upcast_attention,
                              out_bias=attention_out_bias)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.attn1 = Attention(cross_attention_dim=cross_attention_dim if only_cross_attention else None,
                               **attention_args)
        if cross_attention_dim is not None or double_self_attention:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
            self.attn2 = Attention(cross_attention_dim=None if double_self_attention else cross_attention_dim,
                                   **attention_args)
        else:
            self.norm2 = None
            self.attn2 = None
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn=activation_fn, final_dropout=final_dropout,
                              inner_dim=ff_inner_dim, bias=ff_bias)

        self._chunk_size: int | None = None
        self._chunk_dim: int = 0

    def set_chunk_feed_forward(self, chunk_size: int | None, dim: int = 0) -> None:
        """Run the feed-forward on slices of ``chunk_size`` along ``dim`` (0: batch, 1: tokens);
        ``None`` turns chunking off."""
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")
        if dim not in (0, 1):
            raise ValueError(f"dim must be 0 (batch) or 1 (tokens); got {dim!r}")
        self._chunk_size = chunk_size
        self._chunk_dim = dim

    def _feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._chunk_size is None:
            return self.ff(hidden_states)
        length = hidden_states.shape[self._chunk_dim]
        if length % self._chunk_size != 0:
            raise ValueError(
                f"feed-forward chunking along dim {self._chunk_dim}: its size {length} must be a multiple of "
                f"chunk_size {self._chunk_size}; pick another chunk_size in enable_forward_chunking")
        return torch.cat([self.ff(part) for part in hidden_states.split(self._chunk_size, self._chunk_dim)],
                         dim=self._chunk_dim)

    def _with_positions(self, normed: torch.Tensor) -> torch.Tensor:
        """``normed + pe`` for a LayerNorm output, added in place: the buffer is this block's own and
        LayerNorm's backward does not read it. (Out of place when the dtypes differ, to promote as
        ``+`` does.)"""
        if self.pos_embed is None:
            return normed
        pe = self.pos_embed.positions(normed.shape[1])
        return normed.add_(pe) if pe.dtype == normed.dtype else normed + pe

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, timestep: torch.Tensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None, class_labels: torch.Tensor | None = None,
                added_cond_kwargs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``hidden_states`` ``(B, N, dim)``, ``encoder_hidden_states`` ``(B, M, cross_attention_dim)``,
        masks as additive biases ``(B, 1, N)`` / ``(B, 1, M)``; ``timestep``, ``class_labels`` and
        ``added_cond_kwargs`` are accepted for signature compatibility (unused by ``layer_norm``)."""
        kwargs = dict(cross_attention_kwargs or {})
        if kwargs.pop("gligen", None) is not None:
            raise NotImplementedError("GLIGEN (cross_attention_kwargs['gligen']) is not supported by fastunet")

        hidden_states = hidden_states + self.attn1(
            self._with_positions(self.norm1(hidden_states)),
            encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
            attention_mask=attention_mask, **kwargs)
        if self.attn2 is not None:
            hidden_states = hidden_states + self.attn2(
                self._with_positions(self.norm2(hidden_states)), encoder_hidden_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask, **kwargs)
        return hidden_states + self._feed_forward(self.norm3(hidden_states))
