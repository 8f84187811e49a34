"""The blocks of ``UNet2DConditionModel``: the cross-attention presets of the staged blocks
(:mod:`fastunet.models.blocks`), and :data:`UNET_2D_CONDITION_BLOCKS`, the family's registry.

Each cross-attention block runs ``resnet -> Transformer2DModel`` per layer; the transformer stage
(``attentions.<i>``) comes from :func:`transformer_stage`, which the 3-D and motion families reuse:

* :class:`CrossAttnDownBlock2D` = ``DownBlock`` + transformers; ``additional_residuals`` (T2I-Adapter)
  is added after the last layer.
* :class:`CrossAttnUpBlock2D`   = ``UpBlock`` + transformers; FreeU through ``UpBlock.set_freeu``.
* :class:`UNetMidBlock2DCrossAttn` = ``MidBlock`` + transformers: ``resnet, (transformer, resnet) * n``.

The encoder states, masks and ``cross_attention_kwargs`` reach the transformers through the block
context; the constructors are diffusers'.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from ..layers.normalization import auto_groups
from ..layers.transformer_2d import Transformer2DModel
from .blocks import BlockRegistry, DownBlock, MidBlock, Stage, UpBlock, keyword_builder, run_transformer
from .unet_2d_blocks import COMMON_KEYS, DOWN_BLOCKS_2D, RENAMES, UP_BLOCKS_2D, UP_KEYS, UNetMidBlock2D

# diffusers block types fastunet does not implement (as opposed to misspelt ones)
UNSUPPORTED_2D_TYPES = (
    "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnUpBlock2D", "UNetMidBlock2DSimpleCrossAttn",
    "KDownBlock2D", "KCrossAttnDownBlock2D", "KUpBlock2D", "KCrossAttnUpBlock2D",
)


def layers_per_attention(transformer_layers_per_block: int | Sequence[int], num_layers: int) -> list[int]:
    """Transformer depth of each of a block's ``num_layers`` attentions."""
    if isinstance(transformer_layers_per_block, int):
        return [transformer_layers_per_block] * num_layers
    depths = list(transformer_layers_per_block)
    if len(depths) < num_layers or not all(isinstance(d, int) for d in depths):
        raise ValueError(f"transformer_layers_per_block must be an int or {num_layers} ints (one per layer); "
                         f"got {transformer_layers_per_block!r}")
    return depths[:num_layers]


def check_cross_attention_args(block: str, cross_attention_dim, dual_cross_attention: bool = False,
                               attention_type: str = "default") -> None:
    """Raise for a cross-attention block without ``cross_attention_dim`` or with options fastunet lacks."""
    if cross_attention_dim is None:
        raise ValueError(f"{block} needs cross_attention_dim (the width of encoder_hidden_states); got None")
    if dual_cross_attention:
        raise NotImplementedError(f"{block}: dual_cross_attention=True (DualTransformer2DModel) is not supported "
                                  "by fastunet")
    if attention_type != "default":
        raise NotImplementedError(f"{block}: attention_type={attention_type!r} is not supported by fastunet "
                                  "(only 'default')")


def transformer_stage(block: str, num_attention_heads: int, transformer_layers_per_block: int | Sequence[int],
                      num_layers: int, cross_attention_dim: int, norm_num_groups: int,
                      use_linear_projection: bool = False, only_cross_attention: bool = False,
                      upcast_attention: bool = False, dual_cross_attention: bool = False,
                      attention_type: str = "default") -> Stage:
    """The ``attentions`` stage: a ``Transformer2DModel`` per layer with ``num_attention_heads`` heads of
    ``channels // num_attention_heads`` features, each layer's depth from ``transformer_layers_per_block``.
    Unsupported cross-attention options of ``block`` raise."""
    check_cross_attention_args(block, cross_attention_dim, dual_cross_attention, attention_type)
    depths = layers_per_attention(transformer_layers_per_block, num_layers)

    def build(index: int, channels: int) -> Transformer2DModel:
        return Transformer2DModel(num_attention_heads, channels // num_attention_heads, in_channels=channels,
                                  num_layers=depths[index], cross_attention_dim=cross_attention_dim,
                                  norm_num_groups=norm_num_groups, use_linear_projection=use_linear_projection,
                                  only_cross_attention=only_cross_attention, upcast_attention=upcast_attention)

    return Stage("attentions", build, run_transformer, cross_attention=True)


class CrossAttnDownBlock2D(DownBlock):
    """``num_layers`` x (resnet, Transformer2DModel), then a stride-2 conv: ``(B, in_channels, H, W)
    -> ((B, out_channels, H/2, W/2), skips)``."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 1, transformer_layers_per_block: int | Sequence[int] = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int = 32, resnet_pre_norm: bool = True, num_attention_heads: int = 1,
                 cross_attention_dim: int = 1280, output_scale_factor: float = 1.0, downsample_padding: int = 1,
                 add_downsample: bool = True, dual_cross_attention: bool = False,
                 use_linear_projection: bool = False, only_cross_attention: bool = False,
                 upcast_attention: bool = False, attention_type: str = "default"):
        stage = transformer_stage(type(self).__name__, num_attention_heads, transformer_layers_per_block,
                                  num_layers, cross_attention_dim, resnet_groups, use_linear_projection,
                                  only_cross_attention, upcast_attention, dual_cross_attention, attention_type)
        super().__init__(in_channels, out_channels, temb_channels, dropout=dropout, num_layers=num_layers,
                         resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                         resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups, resnet_pre_norm=resnet_pre_norm,
                         output_scale_factor=output_scale_factor, add_downsample=add_downsample,
                         downsample_padding=downsample_padding, stages=(stage,))
        self.num_attention_heads = num_attention_heads


class CrossAttnUpBlock2D(UpBlock):
    """``num_layers`` x (resnet over ``cat([h, skip])``, Transformer2DModel), then nearest 2x + conv."""

    supports_freeu = True

    def __init__(self, in_channels: int, out_channels: int, prev_output_channel: int, temb_channels: int,
                 resolution_idx: int | None = None, dropout: float = 0.0, num_layers: int = 1,
                 transformer_layers_per_block: int | Sequence[int] = 1, resnet_eps: float = 1e-6,
                 resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 resnet_pre_norm: bool = True, num_attention_heads: int = 1, cross_attention_dim: int = 1280,
                 output_scale_factor: float = 1.0, add_upsample: bool = True, dual_cross_attention: bool = False,
                 use_linear_projection: bool = False, only_cross_attention: bool = False,
                 upcast_attention: bool = False, attention_type: str = "default"):
        stage = transformer_stage(type(self).__name__, num_attention_heads, transformer_layers_per_block,
                                  num_layers, cross_attention_dim, resnet_groups, use_linear_projection,
                                  only_cross_attention, upcast_attention, dual_cross_attention, attention_type)
        super().__init__(in_channels, prev_output_channel, out_channels, temb_channels,
                         resolution_idx=resolution_idx, dropout=dropout, num_layers=num_layers,
                         resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                         resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups, resnet_pre_norm=resnet_pre_norm,
                         output_scale_factor=output_scale_factor, add_upsample=add_upsample, stages=(stage,))
        self.num_attention_heads = num_attention_heads


class UNetMidBlock2DCrossAttn(MidBlock):
    """``resnet, (Transformer2DModel, resnet) * num_layers`` at the lowest resolution."""

    def __init__(self, in_channels: int, temb_channels: int, out_channels: int | None = None,
                 dropout: float = 0.0, num_layers: int = 1, transformer_layers_per_block: int | Sequence[int] = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int | None = 32, resnet_groups_out: int | None = None, resnet_pre_norm: bool = True,
                 num_attention_heads: int = 1, output_scale_factor: float = 1.0, cross_attention_dim: int = 1280,
                 dual_cross_attention: bool = False, use_linear_projection: bool = False,
                 upcast_attention: bool = False, attention_type: str = "default"):
        resnet_groups = resnet_groups if resnet_groups is not None else auto_groups(in_channels)
        resnet_groups_out = resnet_groups_out or resnet_groups
        stage = transformer_stage(type(self).__name__, num_attention_heads, transformer_layers_per_block,
                                  num_layers, cross_attention_dim, resnet_groups_out, use_linear_projection,
                                  False, upcast_attention, dual_cross_attention, attention_type)
        super().__init__(in_channels, temb_channels, dropout=dropout, num_layers=num_layers, resnet_eps=resnet_eps,
                         resnet_time_scale_shift=resnet_time_scale_shift, resnet_act_fn=resnet_act_fn,
                         resnet_groups=resnet_groups, resnet_pre_norm=resnet_pre_norm,
                         output_scale_factor=output_scale_factor, out_channels=out_channels,
                         resnet_groups_out=resnet_groups_out, stages=(stage,))
        self.num_attention_heads = num_attention_heads


# -- registry ----------------------------------------------------------------------------------------

CROSS_ATTENTION_KEYS = ("transformer_layers_per_block", "num_attention_heads", "cross_attention_dim",
                        "dual_cross_attention", "use_linear_projection", "only_cross_attention", "upcast_attention",
                        "attention_type", "resnet_groups")

_MID_KEYS = ("in_channels", "temb_channels", "dropout", "resnet_eps", "resnet_act_fn", "resnet_groups",
             "resnet_time_scale_shift", "output_scale_factor")


def _mid_2d(**kw) -> nn.Module:
    # diffusers' get_mid_block builds this one without attention
    return keyword_builder(UNetMidBlock2D, _MID_KEYS, num_layers=0, add_attention=False)(**kw)


UNET_2D_CONDITION_BLOCKS = BlockRegistry(
    "UNet2DConditionModel",
    down={**DOWN_BLOCKS_2D, "CrossAttnDownBlock2D": keyword_builder(
        CrossAttnDownBlock2D, COMMON_KEYS + ("add_downsample", "downsample_padding") + CROSS_ATTENTION_KEYS,
        RENAMES)},
    up={**UP_BLOCKS_2D, "CrossAttnUpBlock2D": keyword_builder(
        CrossAttnUpBlock2D, COMMON_KEYS + UP_KEYS + CROSS_ATTENTION_KEYS, RENAMES)},
    mid={"UNetMidBlock2DCrossAttn": keyword_builder(
             UNetMidBlock2DCrossAttn, _MID_KEYS + ("transformer_layers_per_block", "num_attention_heads",
                                                   "cross_attention_dim", "dual_cross_attention",
                                                   "use_linear_projection", "upcast_attention", "attention_type")),
         "UNetMidBlock2D": _mid_2d},
    strip_prefix="UNetRes", unsupported=UNSUPPORTED_2D_TYPES)


__all__ = [
    "CrossAttnDownBlock2D",
    "CrossAttnUpBlock2D",
    "UNET_2D_CONDITION_BLOCKS",
    "UNetMidBlock2DCrossAttn",
    "check_cross_attention_args",
    "layers_per_attention",
    "transformer_stage",
]
