"""The temporal transformers of the video UNets: ``TransformerTemporalModel`` (UNet3DConditionModel,
I2VGen-XL) and ``AnimateDiffTransformer3D`` (the motion modules of UNetMotionModel), one
implementation with diffusers' constructor arguments and parameter names.

Attention runs across the ``F`` frames of every pixel: on ``x`` ``(B*F, C, H, W)``, seen as
``(B, C, F, H, W)``::

    h = GroupNorm(x)                          # fastunet.kernels.group_norm_act, eps 1e-6
    t = proj_in(h as (B*H*W, F, C))           # one token sequence of F frames per pixel
    for block in transformer_blocks:          # BasicTransformerBlock; with positional_embeddings=
        t = block(t, context)                 # "sinusoidal" each attention input gets the frame code
    out = proj_out(t) as (B*F, C, H, W) + x

Layouts. diffusers copies the full tensor three times to move between the frame-major input and the
pixel-major tokens. This layer makes none of these copies: the GroupNorm is given the input as a
strided ``(B, C, F, H, W)`` view and writes its output in ``(B, H, W, F, C)`` memory order
(``norm_act``'s ``out_layout``), so the tokens are a view of it; the attention kernel reads q/k/v as
strided views of the projections; and ``proj_out``'s tokens, seen frame-major through a view, are
added to the input, the sum coming out in the input's ``(B*F, C, H, W)`` layout. (While
``group_norm_act`` lacks ``out_layout``, ``norm_act`` makes the one copy that stands in for it.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..configuration import register_to_config, reject_unsupported
from ..modeling import ModelMixin
from ..outputs import ModelOutput
from .attention import BasicTransformerBlock
from .normalization import check_groups, norm_act
from .utils import frames_per_sample, maybe_checkpoint

# memory order of the GroupNorm's (B, C, F, H, W) output: (B, H, W, F, C), i.e. the tokens
_TOKEN_LAYOUT = (0, 3, 4, 2, 1)


@dataclass
class TransformerTemporalModelOutput(ModelOutput):
    """``sample``: ``(B*F, C, H, W)``. Also reads as ``out[0]``, ``out["sample"]``, ``out.to_tuple()``."""

    sample: torch.Tensor


class TransformerTemporalModel(ModelMixin):
    """Transformer over the frame axis of ``(B*F, in_channels, H, W)`` feature maps (see the module
    docstring), with diffusers' constructor arguments and parameter names (``norm``, ``proj_in``,
    ``transformer_blocks``, ``proj_out``).

    ``sample_size`` is accepted for compatibility and unused, as in diffusers; ``out_channels`` must be
    None or ``in_channels`` (diffusers ignores it: the output always has ``in_channels``).
    ``positional_embeddings="sinusoidal"`` with ``num_positional_embeddings`` adds frame codes in every
    block; more frames than that raise ``ValueError``.
    """

    # diffusers' class says False; fastunet's blocks implement checkpointing (same gradients, tested)
    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["norm"]

    @register_to_config
    def __init__(self, num_attention_heads: int = 16, attention_head_dim: int = 88, in_channels: int | None = None,
                 out_channels: int | None = None, num_layers: int = 1, dropout: float = 0.0,
                 norm_num_groups: int = 32, cross_attention_dim: int | None = None, attention_bias: bool = False,
                 sample_size: int | None = None, activation_fn: str = "geglu", norm_elementwise_affine: bool = True,
                 double_self_attention: bool = True, positional_embeddings: str | None = None,
                 num_positional_embeddings: int | None = None):
        super().__init__()
        owner = type(self).__name__
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"{owner}: in_channels must be a positive int; got {in_channels!r}")
        if out_channels is not None and out_channels != in_channels:
            raise ValueError(f"{owner}: out_channels must be None or in_channels ({in_channels}), the output "
                             f"being added to the input; got {out_channels}")
        reject_unsupported(owner, "positional_embeddings", positional_embeddings, (None, "sinusoidal"))
        check_groups(in_channels, norm_num_groups, f"{owner} norm_num_groups")
        self.num_attention_heads = num_attention_heads
        self.attention_head_dim = attention_head_dim
        self.in_channels = in_channels
        self.num_positional_embeddings = num_positional_embeddings if positional_embeddings else None
        inner_dim = num_attention_heads * attention_head_dim

        self.norm = nn.GroupNorm(num_groups=norm_num_groups, num_channels=in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(in_channels, inner_dim)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner_dim, num_attention_heads, attention_head_dim, dropout=dropout,
                                  cross_attention_dim=cross_attention_dim, activation_fn=activation_fn,
                                  attention_bias=attention_bias, double_self_attention=double_self_attention,
                                  norm_elementwise_affine=norm_elementwise_affine,
                                  positional_embeddings=positional_embeddings,
                                  num_positional_embeddings=num_positional_embeddings)
            for _ in range(num_layers)
        ])
        self.proj_out = nn.Linear(inner_dim, in_channels)
        self.gradient_checkpointing = False

    def _transform(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                   timestep: torch.Tensor | None, class_labels: torch.Tensor | None, num_frames: int,
                   cross_attention_kwargs: dict[str, Any] | None) -> torch.Tensor:
        """The computation both public classes share: ``(B*F, C, H, W) -> (B*F, C, H, W)``."""
        owner = type(self).__name__
        batch = frames_per_sample(hidden_states, num_frames, self.in_channels, owner)
        if self.num_positional_embeddings is not None and num_frames > self.num_positional_embeddings:
            raise ValueError(f"{owner}: num_frames={num_frames} is more than the num_positional_embeddings="
                             f"{self.num_positional_embeddings} positions of its sinusoidal frame table")
        _, channels, height, width = hidden_states.shape
        pixels = batch * height * width
        if encoder_hidden_states is not None and (encoder_hidden_states.dim() != 3
                                                  or encoder_hidden_states.shape[0] != pixels):
            raise ValueError(f"{owner}: encoder_hidden_states must be (B*H*W, tokens, dim) with B*H*W = "
                             f"{batch}*{height}*{width} = {pixels}, one context per pixel sequence; "
                             f"got shape {tuple(encoder_hidden_states.shape)}")

        frames = hidden_states.view(batch, num_frames, channels, height, width)  # (B, F, C, H, W), a view
        normed = norm_act(self.norm, frames.transpose(1, 2), out_layout=_TOKEN_LAYOUT)
        tokens = self.proj_in(normed.permute(_TOKEN_LAYOUT).reshape(pixels, num_frames, channels))  # view in

        for block in self.transformer_blocks:
            tokens = maybe_checkpoint(self.gradient_checkpointing, block, tokens,
                                      encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                                      cross_attention_kwargs=cross_attention_kwargs, class_labels=class_labels)

        tokens = self.proj_out(tokens).view(batch, height, width, num_frames, channels)
        # The input comes first, so the sum takes its (B, F, C, H, W) memory order (where the operands'
        # layouts differ, an elementwise op lays its output out like the first) and the tokens are read
        # through a view.
        output = frames + tokens.permute(0, 3, 4, 1, 2)
        return output.reshape(batch * num_frames, channels, height, width)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                timestep: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
                num_frames: int = 1, cross_attention_kwargs: dict[str, Any] | None = None,
                return_dict: bool = True) -> TransformerTemporalModelOutput | tuple[torch.Tensor]:
        """hidden_states ``(B*num_frames, in_channels, H, W)`` (a sample's frames consecutive),
        encoder_hidden_states ``(B*H*W, tokens, cross_attention_dim)`` or None -> the same shape as
        ``hidden_states``, in its memory layout. ``timestep`` and ``class_labels`` are passed to the
        blocks for signature compatibility (unused by their LayerNorms)."""
        output = self._transform(hidden_states, encoder_hidden_states, timestep, class_labels, num_frames,
                                 cross_attention_kwargs)
        return TransformerTemporalModelOutput(sample=output) if return_dict else (output,)


class AnimateDiffTransformer3D(TransformerTemporalModel):
    """The motion module of AnimateDiff (diffusers' ``AnimateDiffTransformer3D``): the same layer as
    :class:`TransformerTemporalModel`, with the same constructor and defaults; its forward returns the
    tensor itself. UNetMotionModel builds it with ``positional_embeddings="sinusoidal"``."""

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                timestep: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
                num_frames: int = 1, cross_attention_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        """``(B*num_frames, in_channels, H, W)`` -> the same shape (see :meth:`TransformerTemporalModel.forward`)."""
        return self._transform(hidden_states, encoder_hidden_states, timestep, class_labels, num_frames,
                               cross_attention_kwargs)


__all__ = ["AnimateDiffTransformer3D", "TransformerTemporalModel", "TransformerTemporalModelOutput"]
