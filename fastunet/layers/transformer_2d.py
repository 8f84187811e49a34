"""The spatial transformer of the Stable Diffusion UNets, ``Transformer2DModel`` (continuous inputs),
with diffusers' parameter names; its ``BasicTransformerBlock`` lives in :mod:`fastunet.layers.attention`.

Data flow of ``Transformer2DModel`` on ``x`` ``(B, C, H, W)``::

    h = GroupNorm(x)                       # fastunet.kernels.group_norm_act(activation=None), eps 1e-6
    h = proj_in(h)  -> (B, H*W, inner)     # 1x1 conv before the flattening (fused with the norm:
                                           # norm_act_conv), or Linear after it
    for block in transformer_blocks:       # BasicTransformerBlock, pre-LayerNorm residual sub-layers:
        h = h + attn1(norm1(h))            #   self-attention (cross-attention if only_cross_attention)
        h = h + attn2(norm2(h), context)   #   cross-attention (self-attention if double_self_attention)
        h = h + ff(norm3(h))               #   GEGLU/GELU MLP, optionally chunked along batch or tokens
    out = proj_out(h) -> (B, C, H, W) + x

Attention goes through :class:`fastunet.layers.attention_processor.Attention` and its processors, so
``cross_attention_kwargs`` and attention masks reach them exactly as in diffusers. Only the
continuous-input, ``layer_norm`` flavour used by the SD 1.x/2.x/XL UNets is implemented; the other
diffusers flavours (vector-quantised or patched inputs, AdaLayerNorm, GLIGEN) raise
``NotImplementedError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..configuration import register_to_config, reject_unsupported
from ..modeling import ModelMixin
from ..outputs import ModelOutput
from .attention import BasicTransformerBlock, mask_to_bias
from .normalization import norm_act, norm_act_conv
from .utils import maybe_checkpoint


# --------------------------------------------------------------------------------------------------
# Transformer2DModel
# --------------------------------------------------------------------------------------------------


@dataclass
class Transformer2DModelOutput(ModelOutput):
    """``sample``: ``(B, C, H, W)``. Like diffusers' outputs it also reads as ``out[0]``,
    ``out["sample"]`` and ``out.to_tuple()``."""

    sample: torch.Tensor


class Transformer2DModel(ModelMixin):
    """Spatial transformer over continuous feature maps ``(B, in_channels, H, W)`` (see the module
    docstring), with diffusers' constructor arguments and parameter names (``norm``, ``proj_in``,
    ``transformer_blocks``, ``proj_out``)."""

    _supports_gradient_checkpointing = True
    _no_split_modules = ["BasicTransformerBlock"]
    _skip_layerwise_casting_patterns = ["latent_image_embedding", "norm"]

    @register_to_config
    def __init__(self, num_attention_heads: int = 16, attention_head_dim: int = 88, in_channels: int | None = None,
                 out_channels: int | None = None, num_layers: int = 1, dropout: float = 0.0,
                 norm_num_groups: int = 32, cross_attention_dim: int | None = None, attention_bias: bool = False,
                 sample_size: int | None = None, num_vector_embeds: int | None = None,
                 patch_size: int | None = None, activation_fn: str = "geglu",
                 num_embeds_ada_norm: int | None = None, use_linear_projection: bool = False,
                 only_cross_attention: bool = False, double_self_attention: bool = False,
                 upcast_attention: bool = False, norm_type: str = "layer_norm",
                 norm_elementwise_affine: bool = True, norm_eps: float = 1e-5, attention_type: str = "default",
                 caption_channels: int | None = None, interpolation_scale: float | None = None,
                 use_additional_conditions: bool | None = None):
        super().__init__()
        if in_channels is None:
            raise NotImplementedError("fastunet's Transformer2DModel takes continuous inputs only: set in_channels")
        reject_unsupported("Transformer2DModel", "num_vector_embeds", num_vector_embeds, (None,))
        reject_unsupported("Transformer2DModel", "patch_size", patch_size, (None,))
        reject_unsupported("Transformer2DModel", "caption_channels", caption_channels, (None,))
        if out_channels is not None and out_channels != in_channels:
            raise ValueError(f"out_channels must equal in_channels ({in_channels}) for the residual; "
                             f"got {out_channels}")
        if in_channels % norm_num_groups != 0:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by norm_num_groups ({norm_num_groups})")
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.num_attention_heads = num_attention_heads
        self.attention_head_dim = attention_head_dim
        self.inner_dim = inner_dim = num_attention_heads * attention_head_dim
        self.use_linear_projection = use_linear_projection
        self.gradient_checkpointing = False

        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(
                inner_dim, num_attention_heads, attention_head_dim, dropout=dropout,
                cross_attention_dim=cross_attention_dim, activation_fn=activation_fn,
                num_embeds_ada_norm=num_embeds_ada_norm, attention_bias=attention_bias,
                only_cross_attention=only_cross_attention, double_self_attention=double_self_attention,
                upcast_attention=upcast_attention, norm_type=norm_type,
                norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps, attention_type=attention_type)
            for _ in range(num_layers)
        ])
        if use_linear_projection:
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                timestep: torch.Tensor | None = None, added_cond_kwargs: dict[str, torch.Tensor] | None = None,
                class_labels: torch.Tensor | None = None, cross_attention_kwargs: dict[str, Any] | None = None,
                attention_mask: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                return_dict: bool = True):
        """``hidden_states`` ``(B, in_channels, H, W)`` -> same shape. Masks may be keep-masks
        ``(B, tokens)`` (1 keep, 0 discard) or additive biases ``(B, 1, tokens)``."""
        if hidden_states.dim() != 4 or hidden_states.shape[1] != self.in_channels:
            raise ValueError(f"hidden_states must be (B, {self.in_channels}, H, W); got {tuple(hidden_states.shape)}")
        attention_mask = mask_to_bias(attention_mask, hidden_states.dtype)
        encoder_attention_mask = mask_to_bias(encoder_attention_mask, hidden_states.dtype)
        batch, _, height, width = hidden_states.shape
        residual = hidden_states

        if self.use_linear_projection:
            h = norm_act(self.norm, hidden_states)
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(batch, height * width, h.shape[1]))
        else:  # the normalised map is recomputed in backward rather than kept for proj_in's weight gradient
            h = norm_act_conv(self.norm, hidden_states, self.proj_in)
            # one copy into token order here: as a view of the NCHW map the token stream would be
            # strided, and every LayerNorm on it (forward, recompute, backward) would copy it again
            h = h.permute(0, 2, 3, 1).reshape(batch, height * width, h.shape[1]).contiguous()

        for block in self.transformer_blocks:
            h = maybe_checkpoint(self.gradient_checkpointing, block, h, attention_mask=attention_mask,
                                 encoder_hidden_states=encoder_hidden_states,
                                 encoder_attention_mask=encoder_attention_mask,
                                 cross_attention_kwargs=cross_attention_kwargs)

        if self.use_linear_projection:
            h = self.proj_out(h)
        h = h.reshape(batch, height, width, h.shape[-1]).permute(0, 3, 1, 2).contiguous()
        if not self.use_linear_projection:
            h = self.proj_out(h)
        output = h + residual
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)
