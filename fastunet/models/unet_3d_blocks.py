"""The blocks of ``UNet3DConditionModel`` (ModelScope / zeroscope): presets of the staged blocks.

Each layer runs ``resnet -> temp_conv -> attention -> temp_attention`` on ``(B * F, C, H, W)``:
the resnet and the spatial ``Transformer2DModel`` frame by frame, the ``TemporalConvLayer`` and the
``TransformerTemporalModel`` over the frames of each pixel. As in diffusers:

* the spatial transformers have ``channels // num_attention_heads`` heads of ``num_attention_heads``
  features (diffusers passes the two the other way round here), one layer deep, and they see the
  encoder states but no attention masks;
* the temporal convolutions use dropout 0.1; everything normalises with ``resnet_groups`` groups;
* FreeU acts in both up blocks.

:data:`UNET_3D_BLOCKS` maps diffusers' block-type strings to these presets.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..layers.normalization import auto_groups
from ..layers.resnet import TemporalConvLayer
from ..layers.transformer_2d import Transformer2DModel
from ..layers.transformer_temporal import TransformerTemporalModel
from .blocks import (
    BlockContext,
    BlockRegistry,
    DownBlock,
    MidBlock,
    Stage,
    UpBlock,
    keyword_builder,
    run_temporal_conv,
    run_temporal_transformer,
)
from .unet_2d_condition_blocks import check_cross_attention_args

#: the order diffusers registers a 3-D block's stages in (the order of ``attn_processors``)
STAGE_ORDER_3D = ("resnets", "temp_convs", "attentions", "temp_attentions")
# diffusers fixes the temporal convolutions' dropout at 0.1
TEMPORAL_CONV_DROPOUT = 0.1


def run_frame_transformer(transformer: nn.Module, hidden_states: torch.Tensor, context: BlockContext) -> torch.Tensor:
    """A spatial transformer on every frame; the 3-D blocks pass it no attention masks."""
    return transformer(hidden_states, encoder_hidden_states=context.encoder_hidden_states,
                       cross_attention_kwargs=context.cross_attention_kwargs, return_dict=False)[0]


def temporal_conv_stage(groups: int) -> Stage:
    """``temp_convs``: a ``TemporalConvLayer`` after every resnet."""
    return Stage("temp_convs", lambda index, channels: TemporalConvLayer(
        channels, channels, dropout=TEMPORAL_CONV_DROPOUT, norm_num_groups=groups), run_temporal_conv, per_resnet=True)


def attention_stages_3d(block: str, num_attention_heads: int, cross_attention_dim: int, groups: int,
                        use_linear_projection: bool = True, only_cross_attention: bool = False,
                        upcast_attention: bool = False, dual_cross_attention: bool = False) -> tuple[Stage, Stage]:
    """``attentions`` (spatial, cross-attention) and ``temp_attentions`` (over the frames)."""
    check_cross_attention_args(block, cross_attention_dim, dual_cross_attention)

    def spatial(index: int, channels: int) -> Transformer2DModel:
        return Transformer2DModel(channels // num_attention_heads, num_attention_heads, in_channels=channels,
                                  num_layers=1, cross_attention_dim=cross_attention_dim, norm_num_groups=groups,
                                  use_linear_projection=use_linear_projection,
                                  only_cross_attention=only_cross_attention, upcast_attention=upcast_attention)

    def temporal(index: int, channels: int) -> TransformerTemporalModel:
        return TransformerTemporalModel(channels // num_attention_heads, num_attention_heads, in_channels=channels,
                                        num_layers=1, cross_attention_dim=cross_attention_dim,
                                        norm_num_groups=groups)

    return (Stage("attentions", spatial, run_frame_transformer, cross_attention=True),
            Stage("temp_attentions", temporal, run_temporal_transformer))


class DownBlock3D(DownBlock):
    """``num_layers`` x (resnet, temporal conv), then a stride-2 conv."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default",
                 resnet_act_fn: str = "swish", resnet_groups: int = 32, resnet_pre_norm: bool = True,
                 output_scale_factor: float = 1.0, add_downsample: bool = True, downsample_padding: int = 1):
        super().__init__(in_channels, out_channels, temb_channels, dropout=dropout, num_layers=num_layers,
                         resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                         resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups, resnet_pre_norm=resnet_pre_norm,
                         output_scale_factor=output_scale_factor, add_downsample=add_downsample,
                         downsample_padding=downsample_padding, stages=(temporal_conv_stage(resnet_groups),),
                         register_order=STAGE_ORDER_3D[:2])


class CrossAttnDownBlock3D(DownBlock):
    """``num_layers`` x (resnet, temporal conv, spatial transformer, temporal transformer), then a
    stride-2 conv."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default",
                 resnet_act_fn: str = "swish", resnet_groups: int = 32, resnet_pre_norm: bool = True,
                 num_attention_heads: int = 1, cross_attention_dim: int = 1280, output_scale_factor: float = 1.0,
                 downsample_padding: int = 1, add_downsample: bool = True, dual_cross_attention: bool = False,
                 use_linear_projection: bool = False, only_cross_attention: bool = False,
                 upcast_attention: bool = False):
        stages = (temporal_conv_stage(resnet_groups),
                  *attention_stages_3d(type(self).__name__, num_attention_heads, cross_attention_dim, resnet_groups,
                                       use_linear_projection, only_cross_attention, upcast_attention,
                                       dual_cross_attention))
        super().__init__(in_channels, out_channels, temb_channels, dropout=dropout, num_layers=num_layers,
                         resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                         resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups, resnet_pre_norm=resnet_pre_norm,
                         output_scale_factor=output_scale_factor, add_downsample=add_downsample,
                         downsample_padding=downsample_padding, stages=stages, register_order=STAGE_ORDER_3D)
        self.num_attention_heads = num_attention_heads


class UpBlock3D(UpBlock):
    """``num_layers`` x (resnet over ``cat([h, skip])``, temporal conv), then nearest 2x + conv."""

    supports_freeu = True

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 dropout: float = 0.0, num_layers: int = 1, resnet_eps: float = 1e-6,
                 resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 resnet_pre_norm: bool = True, output_scale_factor: float = 1.0, add_upsample: bool = True,
                 resolution_idx: int | None = None):
        super().__init__(in_channels, prev_output_channel, out_channels, temb_channels,
                         resolution_idx=resolution_idx, dropout=dropout, num_layers=num_layers,
                         resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                         resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups, resnet_pre_norm=resnet_pre_norm,
                         output_scale_factor=output_scale_factor, add_upsample=add_upsample,
                         stages=(temporal_conv_stage(resnet_groups),), register_order=STAGE_ORDER_3D[:2])


class CrossAttnUpBlock3D(UpBlock):
    """``num_layers`` x (resnet over ``cat([h, skip])``, temporal conv, spatial transformer, temporal
    transformer), then nearest 2x + conv."""

    supports_freeu = True

    def __init__(self, in_channels: int, out_channels: int, prev_output_channel: int, temb_channels: int,
                 dropout: float = 0.0, num_layers: int = 1, resnet_eps: float = 1e-6,
                 resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 resnet_pre_norm: bool = True, num_attention_heads: int = 1, cross_attention_dim: int = 1280,
                 output_scale_factor: float = 1.0, add_upsample: bool = True, dual_cross_attention: bool = False,
                 use_linear_projection: bool = False, only_cross_attention: bool = False,
                 upcast_attention: bool = False, resolution_idx: int | None = None):
        stages = (temporal_conv_stage(resnet_groups),
                  *attention_stages_3d(type(self).__name__, num_attention_heads, cross_attention_dim, resnet_groups,
                                       use_linear_projection, only_cross_attention, upcast_attention,
                                       dual_cross_attention))
        super().__init__(in_channels, prev_output_channel, out_channels, temb_channels,
                         resolution_idx=resolution_idx, dropout=dropout, num_layers=num_layers,
                         resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                         resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups, resnet_pre_norm=resnet_pre_norm,
                         output_scale_factor=output_scale_factor, add_upsample=add_upsample, stages=stages,
                         register_order=STAGE_ORDER_3D)
        self.num_attention_heads = num_attention_heads


class UNetMidBlock3DCrossAttn(MidBlock):
    """``resnet, temp_conv, (spatial transformer, temporal transformer, resnet, temp_conv) * num_layers``."""

    def __init__(self, in_channels: int, temb_channels: int, dropout: float = 0.0, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int | None = 32, resnet_pre_norm: bool = True, num_attention_heads: int = 1,
                 output_scale_factor: float = 1.0, cross_attention_dim: int = 1280,
                 dual_cross_attention: bool = False, use_linear_projection: bool = True,
                 upcast_attention: bool = False):
        groups = resnet_groups if resnet_groups is not None else auto_groups(in_channels)
        stages = (temporal_conv_stage(groups),
                  *attention_stages_3d(type(self).__name__, num_attention_heads, cross_attention_dim, groups,
                                       use_linear_projection, False, upcast_attention, dual_cross_attention))
        super().__init__(in_channels, temb_channels, dropout=dropout, num_layers=num_layers, resnet_eps=resnet_eps,
                         resnet_time_scale_shift=resnet_time_scale_shift, resnet_act_fn=resnet_act_fn,
                         resnet_groups=groups, resnet_pre_norm=resnet_pre_norm,
                         output_scale_factor=output_scale_factor, stages=stages, register_order=STAGE_ORDER_3D)
        self.num_attention_heads = num_attention_heads


# -- registry ----------------------------------------------------------------------------------------

_COMMON = ("num_layers", "in_channels", "out_channels", "temb_channels", "resnet_eps", "resnet_act_fn",
           "resnet_groups", "resnet_time_scale_shift", "dropout")
_CROSS = ("cross_attention_dim", "num_attention_heads", "dual_cross_attention", "use_linear_projection",
          "only_cross_attention", "upcast_attention")
_UP = ("prev_output_channel", "add_upsample", "resolution_idx")
# diffusers' 3-D get_down_block / get_up_block project linearly unless told otherwise
_GET_BLOCK_DEFAULTS = {"use_linear_projection": True}

UNET_3D_BLOCKS = BlockRegistry(
    "UNet3DConditionModel",
    down={"DownBlock3D": keyword_builder(DownBlock3D, _COMMON + ("add_downsample", "downsample_padding")),
          "CrossAttnDownBlock3D": keyword_builder(CrossAttnDownBlock3D,
                                                  _COMMON + ("add_downsample", "downsample_padding") + _CROSS,
                                                  defaults=_GET_BLOCK_DEFAULTS)},
    up={"UpBlock3D": keyword_builder(UpBlock3D, _COMMON + _UP),
        "CrossAttnUpBlock3D": keyword_builder(CrossAttnUpBlock3D, _COMMON + _UP + _CROSS,
                                              defaults=_GET_BLOCK_DEFAULTS)},
    mid={"UNetMidBlock3DCrossAttn": keyword_builder(
        UNetMidBlock3DCrossAttn, ("in_channels", "temb_channels", "dropout", "num_layers", "resnet_eps",
                                  "resnet_act_fn", "resnet_groups", "resnet_time_scale_shift", "output_scale_factor",
                                  "cross_attention_dim", "num_attention_heads", "dual_cross_attention",
                                  "use_linear_projection", "upcast_attention"))},
    unsupported=("DownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal", "UpBlockSpatioTemporal",
                 "CrossAttnUpBlockSpatioTemporal", "UNetMidBlockSpatioTemporal"))


__all__ = [
    "CrossAttnDownBlock3D",
    "CrossAttnUpBlock3D",
    "DownBlock3D",
    "UNET_3D_BLOCKS",
    "UNetMidBlock3DCrossAttn",
    "UpBlock3D",
    "attention_stages_3d",
    "temporal_conv_stage",
]
