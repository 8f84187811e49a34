"""The cross-attention blocks of the Stable Diffusion UNets, as presets of the generic blocks in
:mod:`fastunet.models.unet_2d_blocks`, plus their registry entries and ``get_mid_block``.

Each block is the generic block with a :class:`~fastunet.layers.transformer_2d.Transformer2DModel`
after every resnet (``attentions.<i>``), built by :func:`transformer_factory`:

* :class:`CrossAttnDownBlock2D` = ``DownBlock`` + transformers; ``additional_residuals`` (T2I-Adapter)
  is added after the last resnet/transformer pair.
* :class:`CrossAttnUpBlock2D`   = ``UpBlock`` + transformers; FreeU through ``UpBlock.set_freeu``.
* :class:`UNetMidBlock2DCrossAttn` = ``UNetMidBlock2D`` + transformers: ``resnet, (transformer, resnet) * n``.

Their constructors and ``forward`` signatures are diffusers' (``encoder_hidden_states``,
``attention_mask``, ``cross_attention_kwargs``, ``encoder_attention_mask``); the forwards gather these
into the generic blocks' ``attention_kwargs``. Importing this module registers
``"CrossAttnDownBlock2D"`` and ``"CrossAttnUpBlock2D"`` with ``unet_2d_blocks.get_down_block`` /
``get_up_block``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from ..layers.transformer_2d import Transformer2DModel
from . import unet_2d_blocks
from .unet_2d_blocks import DownBlock, UNetMidBlock2D, UpBlock

# diffusers block types fastunet does not implement (as opposed to misspelt ones)
_UNSUPPORTED_TYPES = frozenset({
    "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnUpBlock2D", "UNetMidBlock2DSimpleCrossAttn",
    "KDownBlock2D", "KCrossAttnDownBlock2D", "KUpBlock2D", "KCrossAttnUpBlock2D",
})


def _layers_per_attention(transformer_layers_per_block: int | Sequence[int], num_layers: int) -> list[int]:
    """Transformer depth of each of a block's ``num_layers`` attentions."""
    if isinstance(transformer_layers_per_block, int):
        return [transformer_layers_per_block] * num_layers
    depths = list(transformer_layers_per_block)
    if len(depths) < num_layers or not all(isinstance(d, int) for d in depths):
        raise ValueError(f"transformer_layers_per_block must be an int or {num_layers} ints (one per layer); "
                         f"got {transformer_layers_per_block!r}")
    return depths[:num_layers]


def _check_cross_attention_args(block: str, cross_attention_dim, dual_cross_attention: bool,
                                attention_type: str) -> None:
    if cross_attention_dim is None:
        raise ValueError(f"{block} needs cross_attention_dim (the width of encoder_hidden_states); got None")
    if dual_cross_attention:
        raise NotImplementedError(f"{block}: dual_cross_attention=True (DualTransformer2DModel) is not supported "
                                  "by fastunet")
    if attention_type != "default":
        raise NotImplementedError(f"{block}: attention_type={attention_type!r} is not supported by fastunet "
                                  "(only 'default')")


def transformer_factory(block: str, num_attention_heads: int,
                        transformer_layers_per_block: int | Sequence[int], num_layers: int,
                        cross_attention_dim: int, norm_num_groups: int, use_linear_projection: bool = False,
                        only_cross_attention: bool = False, upcast_attention: bool = False,
                        dual_cross_attention: bool = False, attention_type: str = "default"):
    """An attention factory for the generic blocks: ``(layer_index, channels) -> Transformer2DModel``
    with ``num_attention_heads`` heads of ``channels // num_attention_heads`` features and the layer's
    depth from ``transformer_layers_per_block``. Unsupported cross-attention options of ``block`` raise."""
    _check_cross_attention_args(block, cross_attention_dim, dual_cross_attention, attention_type)
    depths = _layers_per_attention(transformer_layers_per_block, num_layers)

    def build(index: int, channels: int) -> Transformer2DModel:
        return Transformer2DModel(num_attention_heads, channels // num_attention_heads, in_channels=channels,
                                  num_layers=depths[index], cross_attention_dim=cross_attention_dim,
                                  norm_num_groups=norm_num_groups, use_linear_projection=use_linear_projection,
                                  only_cross_attention=only_cross_attention, upcast_attention=upcast_attention)

    return build


def _attention_kwargs(encoder_hidden_states, attention_mask, cross_attention_kwargs,
                      encoder_attention_mask) -> dict[str, Any]:
    return dict(encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                cross_attention_kwargs=cross_attention_kwargs, encoder_attention_mask=encoder_attention_mask,
                return_dict=False)


class CrossAttnDownBlock2D(DownBlock):
    """``num_layers`` x (resnet, Transformer2DModel), then a stride-2 conv: ``(B, in_channels, H, W)
    -> ((B, out_channels, H/2, W/2), skips)``."""

    has_cross_attention = True

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 1, transformer_layers_per_block: int | Sequence[int] = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int = 32, resnet_pre_norm: bool = True, num_attention_heads: int = 1,
                 cross_attention_dim: int = 1280, output_scale_factor: float = 1.0, downsample_padding: int = 1,
                 add_downsample: bool = True, dual_cross_attention: bool = False,
                 use_linear_projection: bool = False, only_cross_attention: bool = False,
                 upcast_attention: bool = False, attention_type: str = "default"):
        factory = transformer_factory(type(self).__name__, num_attention_heads, transformer_layers_per_block,
                                      num_layers, cross_attention_dim, resnet_groups, use_linear_projection,
                                      only_cross_attention, upcast_attention, dual_cross_attention, attention_type)
        super().__init__(in_channels, out_channels, temb_channels, dropout=dropout, num_layers=num_layers,
                         resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                         resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups, resnet_pre_norm=resnet_pre_norm,
                         output_scale_factor=output_scale_factor, add_downsample=add_downsample,
                         downsample_padding=downsample_padding, attention=factory)
        self.num_attention_heads = num_attention_heads

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None,
                encoder_attention_mask: torch.Tensor | None = None,
                additional_residuals: torch.Tensor | None = None):
        """-> ``(hidden_states, res_hidden_states)``; masks are additive biases ``(B, 1, tokens)``."""
        return super().forward(hidden_states, temb, additional_residuals=additional_residuals,
                               attention_kwargs=_attention_kwargs(encoder_hidden_states, attention_mask,
                                                                  cross_attention_kwargs, encoder_attention_mask))


class CrossAttnUpBlock2D(UpBlock):
    """``num_layers`` x (resnet over ``cat([h, skip])``, Transformer2DModel), then nearest 2x + conv."""

    has_cross_attention = True

    def __init__(self, in_channels: int, out_channels: int, prev_output_channel: int, temb_channels: int,
                 resolution_idx: int | None = None, dropout: float = 0.0, num_layers: int = 1,
                 transformer_layers_per_block: int | Sequence[int] = 1, resnet_eps: float = 1e-6,
                 resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 resnet_pre_norm: bool = True, num_attention_heads: int = 1, cross_attention_dim: int = 1280,
                 output_scale_factor: float = 1.0, add_upsample: bool = True, dual_cross_attention: bool = False,
                 use_linear_projection: bool = False, only_cross_attention: bool = False,
                 upcast_attention: bool = False, attention_type: str = "default"):
        factory = transformer_factory(type(self).__name__, num_attention_heads, transformer_layers_per_block,
                                      num_layers, cross_attention_dim, resnet_groups, use_linear_projection,
                                      only_cross_attention, upcast_attention, dual_cross_attention, attention_type)
        super().__init__(in_channels, prev_output_channel, out_channels, temb_channels,
                         resolution_idx=resolution_idx, dropout=dropout, num_layers=num_layers,
                         resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                         resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups, resnet_pre_norm=resnet_pre_norm,
                         output_scale_factor=output_scale_factor, add_upsample=add_upsample, attention=factory)
        self.num_attention_heads = num_attention_heads

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None, upsample_size=None,
                attention_mask: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None):
        """Consumes the last ``len(resnets)`` skips -> ``hidden_states``."""
        return super().forward(hidden_states, res_hidden_states_tuple, temb, upsample_size,
                               attention_kwargs=_attention_kwargs(encoder_hidden_states, attention_mask,
                                                                  cross_attention_kwargs, encoder_attention_mask))


class UNetMidBlock2DCrossAttn(UNetMidBlock2D):
    """``resnet, (Transformer2DModel, resnet) * num_layers`` at the lowest resolution."""

    has_cross_attention = True

    def __init__(self, in_channels: int, temb_channels: int, out_channels: int | None = None,
                 dropout: float = 0.0, num_layers: int = 1, transformer_layers_per_block: int | Sequence[int] = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int | None = 32, resnet_groups_out: int | None = None, resnet_pre_norm: bool = True,
                 num_attention_heads: int = 1, output_scale_factor: float = 1.0, cross_attention_dim: int = 1280,
                 dual_cross_attention: bool = False, use_linear_projection: bool = False,
                 upcast_attention: bool = False, attention_type: str = "default"):
        resnet_groups = resnet_groups if resnet_groups is not None else min(in_channels // 4, 32)
        resnet_groups_out = resnet_groups_out or resnet_groups
        factory = transformer_factory(type(self).__name__, num_attention_heads, transformer_layers_per_block,
                                      num_layers, cross_attention_dim, resnet_groups_out, use_linear_projection,
                                      False, upcast_attention, dual_cross_attention, attention_type)
        super().__init__(in_channels, temb_channels, dropout=dropout, num_layers=num_layers, resnet_eps=resnet_eps,
                         resnet_time_scale_shift=resnet_time_scale_shift, resnet_act_fn=resnet_act_fn,
                         resnet_groups=resnet_groups, resnet_pre_norm=resnet_pre_norm,
                         output_scale_factor=output_scale_factor, out_channels=out_channels,
                         resnet_groups_out=resnet_groups_out, attention=factory)
        self.num_attention_heads = num_attention_heads

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None,
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(hidden_states, temb,
                               attention_kwargs=_attention_kwargs(encoder_hidden_states, attention_mask,
                                                                  cross_attention_kwargs, encoder_attention_mask))


# -- registry ----------------------------------------------------------------------------------------

_CROSS_ATTENTION_ARGS = ("transformer_layers_per_block", "num_attention_heads", "cross_attention_dim",
                         "dual_cross_attention", "use_linear_projection", "only_cross_attention", "upcast_attention",
                         "attention_type", "resnet_groups", "resnet_time_scale_shift", "dropout")


def _build_cross_attn_down(**kw) -> CrossAttnDownBlock2D:
    keys = ("num_layers", "in_channels", "out_channels", "temb_channels", "add_downsample", "resnet_eps",
            "resnet_act_fn", "downsample_padding") + _CROSS_ATTENTION_ARGS
    return CrossAttnDownBlock2D(**{k: kw[k] for k in keys if k in kw})


def _build_cross_attn_up(**kw) -> CrossAttnUpBlock2D:
    keys = ("num_layers", "in_channels", "out_channels", "prev_output_channel", "temb_channels", "resolution_idx",
            "add_upsample", "resnet_eps", "resnet_act_fn") + _CROSS_ATTENTION_ARGS
    return CrossAttnUpBlock2D(**{k: kw[k] for k in keys if k in kw})


unet_2d_blocks.register_down_block("CrossAttnDownBlock2D", _build_cross_attn_down)
unet_2d_blocks.register_up_block("CrossAttnUpBlock2D", _build_cross_attn_up)


def _check_supported(block_type) -> None:
    name = block_type
    if isinstance(name, str) and name.startswith("UNetRes"):
        name = name[len("UNetRes"):]
    if name in _UNSUPPORTED_TYPES:
        raise NotImplementedError(f"block type {block_type!r} is not supported by fastunet")


def get_down_block(down_block_type: str, **kwargs) -> nn.Module:
    """diffusers' ``get_down_block``: the registered down block named ``down_block_type``."""
    _check_supported(down_block_type)
    return unet_2d_blocks.get_down_block(down_block_type, **kwargs)


def get_up_block(up_block_type: str, **kwargs) -> nn.Module:
    """diffusers' ``get_up_block``: the registered up block named ``up_block_type``."""
    _check_supported(up_block_type)
    return unet_2d_blocks.get_up_block(up_block_type, **kwargs)


def get_mid_block(mid_block_type: str | None, temb_channels: int, in_channels: int, resnet_eps: float,
                  resnet_act_fn: str, resnet_groups: int | None, output_scale_factor: float = 1.0,
                  transformer_layers_per_block: int | Sequence[int] = 1, num_attention_heads: int | None = None,
                  cross_attention_dim: int | None = None, dual_cross_attention: bool = False,
                  use_linear_projection: bool = False, upcast_attention: bool = False,
                  resnet_time_scale_shift: str = "default", attention_type: str = "default", dropout: float = 0.0,
                  **unused) -> nn.Module | None:
    """diffusers' ``get_mid_block`` for ``"UNetMidBlock2DCrossAttn"``, ``"UNetMidBlock2D"`` (resnets only)
    and ``None`` (no mid block). Arguments other blocks would take (``attention_head_dim``,
    ``mid_block_only_cross_attention``, ...) are accepted and, as in diffusers, unused by these two."""
    if mid_block_type is None:
        return None
    _check_supported(mid_block_type)
    if mid_block_type == "UNetMidBlock2DCrossAttn":
        return UNetMidBlock2DCrossAttn(
            in_channels, temb_channels, dropout=dropout, transformer_layers_per_block=transformer_layers_per_block,
            resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift, resnet_act_fn=resnet_act_fn,
            resnet_groups=resnet_groups, num_attention_heads=num_attention_heads,
            output_scale_factor=output_scale_factor, cross_attention_dim=cross_attention_dim,
            dual_cross_attention=dual_cross_attention, use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention, attention_type=attention_type)
    if mid_block_type == "UNetMidBlock2D":
        return UNetMidBlock2D(in_channels, temb_channels, dropout=dropout, num_layers=0, resnet_eps=resnet_eps,
                              resnet_act_fn=resnet_act_fn, output_scale_factor=output_scale_factor,
                              resnet_groups=resnet_groups, resnet_time_scale_shift=resnet_time_scale_shift,
                              add_attention=False)
    raise ValueError(f"unknown mid_block_type {mid_block_type!r}; expected 'UNetMidBlock2DCrossAttn', "
                     "'UNetMidBlock2D' or None")


__all__ = [
    "CrossAttnDownBlock2D",
    "CrossAttnUpBlock2D",
    "UNetMidBlock2DCrossAttn",
    "get_down_block",
    "get_mid_block",
    "get_up_block",
    "transformer_factory",
]
