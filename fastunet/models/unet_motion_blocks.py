"""The blocks of ``UNetMotionModel`` (AnimateDiff): presets of the staged blocks.

Each layer runs ``resnet -> attention -> motion_module`` on ``(B * F, C, H, W)``: the resnet and the
spatial ``Transformer2DModel`` frame by frame (the SD UNet's own layers, loaded from a
``UNet2DConditionModel``), then an ``AnimateDiffTransformer3D`` over the frames of each pixel. As in
diffusers:

* a motion module has ``temporal_num_attention_heads`` heads of ``channels // heads`` features,
  ``temporal_transformer_layers_per_block`` blocks deep, GEGLU feed-forwards, no attention biases and a
  sinusoidal frame table of ``temporal_max_seq_length`` positions; the spatial transformers have
  ``num_attention_heads`` heads of ``channels // num_attention_heads`` features;
* stages register as diffusers' (``attentions, resnets, motion_modules``; ``resnets, motion_modules``
  for the plain blocks), so ``attn_processors`` lists the processors in the same order;
* the mid block runs ``resnets[0]``, then ``(attention, motion_module, resnet) * num_layers`` -- the
  staged ``MidBlock``'s own order;
* FreeU acts in both up blocks.

:data:`UNET_MOTION_BLOCKS` maps diffusers' block-type strings to these presets; without a motion mid
block the UNet uses ``UNetMidBlock2DCrossAttn`` (also in the registry).
"""

from __future__ import annotations

from typing import Sequence

from ..layers.normalization import auto_groups
from ..layers.transformer_temporal import AnimateDiffTransformer3D
from .blocks import BlockRegistry, DownBlock, MidBlock, Stage, UpBlock, keyword_builder, run_motion_module
from .unet_2d_condition_blocks import UNetMidBlock2DCrossAttn, transformer_stage

#: the order diffusers registers a motion block's stages in (the order of ``attn_processors``)
STAGE_ORDER_MOTION = ("attentions", "resnets", "motion_modules")


def _per_layer(value: int | Sequence[int], num_layers: int, name: str) -> list[int]:
    """An int repeated for each of ``num_layers`` layers, or exactly ``num_layers`` ints."""
    if isinstance(value, int):
        return [value] * num_layers
    values = list(value)
    if len(values) != num_layers or not all(isinstance(v, int) for v in values):
        raise ValueError(f"{name} must be an int or {num_layers} ints (one per layer); got {value!r}")
    return values


def motion_module(channels: int, num_attention_heads: int, num_layers: int, norm_num_groups: int,
                  max_seq_length: int, cross_attention_dim: int | None = None,
                  double_self_attention: bool = True) -> AnimateDiffTransformer3D:
    """One AnimateDiff motion module over ``channels`` features, built with diffusers' arguments."""
    if not isinstance(num_attention_heads, int) or num_attention_heads < 1 or channels % num_attention_heads:
        raise ValueError(f"motion module heads must be a positive int dividing the {channels} channels; "
                         f"got {num_attention_heads!r}")
    return AnimateDiffTransformer3D(
        num_attention_heads=num_attention_heads, attention_head_dim=channels // num_attention_heads,
        in_channels=channels, num_layers=num_layers, norm_num_groups=norm_num_groups,
        cross_attention_dim=cross_attention_dim, attention_bias=False, activation_fn="geglu",
        double_self_attention=double_self_attention, positional_embeddings="sinusoidal",
        num_positional_embeddings=max_seq_length)


def motion_stage(num_layers: int, num_attention_heads: int | Sequence[int],
                 transformer_layers_per_block: int | Sequence[int], norm_num_groups: int, max_seq_length: int,
                 cross_attention_dim: int | None = None, double_self_attention: bool = True) -> Stage:
    """``motion_modules``: an ``AnimateDiffTransformer3D`` per layer, heads and depth per layer."""
    heads = _per_layer(num_attention_heads, num_layers, "temporal_num_attention_heads")
    depths = _per_layer(transformer_layers_per_block, num_layers, "temporal_transformer_layers_per_block")

    def build(index: int, channels: int) -> AnimateDiffTransformer3D:
        return motion_module(channels, heads[index], depths[index], norm_num_groups, max_seq_length,
                             cross_attention_dim, double_self_attention)

    return Stage("motion_modules", build, run_motion_module)


def _spatial_stage(block: str, num_layers: int, num_attention_heads: int,
                   transformer_layers_per_block: int | Sequence[int], cross_attention_dim: int, groups: int,
                   use_linear_projection: bool, only_cross_attention: bool, upcast_attention: bool,
                   dual_cross_attention: bool, attention_type: str) -> Stage:
    _per_layer(transformer_layers_per_block, num_layers, "transformer_layers_per_block")
    return transformer_stage(block, num_attention_heads, transformer_layers_per_block, num_layers,
                             cross_attention_dim, groups, use_linear_projection, only_cross_attention,
                             upcast_attention, dual_cross_attention, attention_type)


class DownBlockMotion(DownBlock):
    """``num_layers`` x (resnet, motion module), then a stride-2 conv."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default",
                 resnet_act_fn: str = "swish", resnet_groups: int = 32, resnet_pre_norm: bool = True,
                 output_scale_factor: float = 1.0, add_downsample: bool = True, downsample_padding: int = 1,
                 temporal_num_attention_heads: int | Sequence[int] = 1,
                 temporal_cross_attention_dim: int | None = None, temporal_max_seq_length: int = 32,
                 temporal_transformer_layers_per_block: int | Sequence[int] = 1,
                 temporal_double_self_attention: bool = True):
        stage = motion_stage(num_layers, temporal_num_attention_heads, temporal_transformer_layers_per_block,
                             resnet_groups, temporal_max_seq_length, temporal_cross_attention_dim,
                             temporal_double_self_attention)
        super().__init__(in_channels, out_channels, temb_channels, dropout=dropout, num_layers=num_layers,
                         resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                         resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups, resnet_pre_norm=resnet_pre_norm,
                         output_scale_factor=output_scale_factor, add_downsample=add_downsample,
                         downsample_padding=downsample_padding, stages=(stage,),
                         register_order=STAGE_ORDER_MOTION[1:])


class CrossAttnDownBlockMotion(DownBlock):
    """``num_layers`` x (resnet, Transformer2DModel, motion module), then a stride-2 conv."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 1, transformer_layers_per_block: int | Sequence[int] = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int = 32, resnet_pre_norm: bool = True, num_attention_heads: int = 1,
                 cross_attention_dim: int = 1280, output_scale_factor: float = 1.0, downsample_padding: int = 1,
                 add_downsample: bool = True, dual_cross_attention: bool = False,
                 use_linear_projection: bool = False, only_cross_attention: bool = False,
                 upcast_attention: bool = False, attention_type: str = "default",
                 temporal_cross_attention_dim: int | None = None, temporal_num_attention_heads: int = 8,
                 temporal_max_seq_length: int = 32, temporal_transformer_layers_per_block: int | Sequence[int] = 1,
                 temporal_double_self_attention: bool = True):
        stages = (_spatial_stage(type(self).__name__, num_layers, num_attention_heads, transformer_layers_per_block,
                                 cross_attention_dim, resnet_groups, use_linear_projection, only_cross_attention,
                                 upcast_attention, dual_cross_attention, attention_type),
                  motion_stage(num_layers, temporal_num_attention_heads, temporal_transformer_layers_per_block,
                               resnet_groups, temporal_max_seq_length, temporal_cross_attention_dim,
                               temporal_double_self_attention))
        super().__init__(in_channels, out_channels, temb_channels, dropout=dropout, num_layers=num_layers,
                         resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                         resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups, resnet_pre_norm=resnet_pre_norm,
                         output_scale_factor=output_scale_factor, add_downsample=add_downsample,
                         downsample_padding=downsample_padding, stages=stages, register_order=STAGE_ORDER_MOTION)
        self.num_attention_heads = num_attention_heads


class UpBlockMotion(UpBlock):
    """``num_layers`` x (resnet over ``cat([h, skip])``, motion module), then nearest 2x + conv."""

    supports_freeu = True

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 resolution_idx: int | None = None, dropout: float = 0.0, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int = 32, resnet_pre_norm: bool = True, output_scale_factor: float = 1.0,
                 add_upsample: bool = True, temporal_cross_attention_dim: int | None = None,
                 temporal_num_attention_heads: int = 8, temporal_max_seq_length: int = 32,
                 temporal_transformer_layers_per_block: int | Sequence[int] = 1):
        stage = motion_stage(num_layers, temporal_num_attention_heads, temporal_transformer_layers_per_block,
                             resnet_groups, temporal_max_seq_length, temporal_cross_attention_dim)
        super().__init__(in_channels, prev_output_channel, out_channels, temb_channels,
                         resolution_idx=resolution_idx, dropout=dropout, num_layers=num_layers,
                         resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                         resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups, resnet_pre_norm=resnet_pre_norm,
                         output_scale_factor=output_scale_factor, add_upsample=add_upsample, stages=(stage,),
                         register_order=STAGE_ORDER_MOTION[1:])


class CrossAttnUpBlockMotion(UpBlock):
    """``num_layers`` x (resnet over ``cat([h, skip])``, Transformer2DModel, motion module), then nearest
    2x + conv."""

    supports_freeu = True

    def __init__(self, in_channels: int, out_channels: int, prev_output_channel: int, temb_channels: int,
                 resolution_idx: int | None = None, dropout: float = 0.0, num_layers: int = 1,
                 transformer_layers_per_block: int | Sequence[int] = 1, resnet_eps: float = 1e-6,
                 resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 resnet_pre_norm: bool = True, num_attention_heads: int = 1, cross_attention_dim: int = 1280,
                 output_scale_factor: float = 1.0, add_upsample: bool = True, dual_cross_attention: bool = False,
                 use_linear_projection: bool = False, only_cross_attention: bool = False,
                 upcast_attention: bool = False, attention_type: str = "default",
                 temporal_cross_attention_dim: int | None = None, temporal_num_attention_heads: int = 8,
                 temporal_max_seq_length: int = 32, temporal_transformer_layers_per_block: int | Sequence[int] = 1):
        stages = (_spatial_stage(type(self).__name__, num_layers, num_attention_heads, transformer_layers_per_block,
                                 cross_attention_dim, resnet_groups, use_linear_projection, only_cross_attention,
                                 upcast_attention, dual_cross_attention, attention_type),
                  motion_stage(num_layers, temporal_num_attention_heads, temporal_transformer_layers_per_block,
                               resnet_groups, temporal_max_seq_length, temporal_cross_attention_dim))
        super().__init__(in_channels, prev_output_channel, out_channels, temb_channels,
                         resolution_idx=resolution_idx, dropout=dropout, num_layers=num_layers,
                         resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                         resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups, resnet_pre_norm=resnet_pre_norm,
                         output_scale_factor=output_scale_factor, add_upsample=add_upsample, stages=stages,
                         register_order=STAGE_ORDER_MOTION)
        self.num_attention_heads = num_attention_heads


class UNetMidBlockCrossAttnMotion(MidBlock):
    """``resnet, (Transformer2DModel, motion module, resnet) * num_layers`` at the lowest resolution."""

    def __init__(self, in_channels: int, temb_channels: int, dropout: float = 0.0, num_layers: int = 1,
                 transformer_layers_per_block: int | Sequence[int] = 1, resnet_eps: float = 1e-6,
                 resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int | None = 32, resnet_pre_norm: bool = True, num_attention_heads: int = 1,
                 output_scale_factor: float = 1.0, cross_attention_dim: int = 1280,
                 dual_cross_attention: bool = False, use_linear_projection: bool = False,
                 upcast_attention: bool = False, attention_type: str = "default",
                 temporal_num_attention_heads: int = 1, temporal_cross_attention_dim: int | None = None,
                 temporal_max_seq_length: int = 32, temporal_transformer_layers_per_block: int | Sequence[int] = 1):
        groups = resnet_groups if resnet_groups is not None else auto_groups(in_channels)
        stages = (_spatial_stage(type(self).__name__, num_layers, num_attention_heads, transformer_layers_per_block,
                                 cross_attention_dim, groups, use_linear_projection, False, upcast_attention,
                                 dual_cross_attention, attention_type),
                  motion_stage(num_layers, temporal_num_attention_heads, temporal_transformer_layers_per_block,
                               groups, temporal_max_seq_length, temporal_cross_attention_dim))
        super().__init__(in_channels, temb_channels, dropout=dropout, num_layers=num_layers, resnet_eps=resnet_eps,
                         resnet_time_scale_shift=resnet_time_scale_shift, resnet_act_fn=resnet_act_fn,
                         resnet_groups=groups, resnet_pre_norm=resnet_pre_norm,
                         output_scale_factor=output_scale_factor, stages=stages, register_order=STAGE_ORDER_MOTION)
        self.num_attention_heads = num_attention_heads


# -- registry ----------------------------------------------------------------------------------------

_COMMON = ("num_layers", "in_channels", "out_channels", "temb_channels", "resnet_eps", "resnet_act_fn",
           "resnet_groups", "resnet_time_scale_shift", "dropout")
_DOWN = ("add_downsample", "downsample_padding")
_UP = ("prev_output_channel", "add_upsample", "resolution_idx")
_CROSS = ("transformer_layers_per_block", "cross_attention_dim", "num_attention_heads", "dual_cross_attention",
          "use_linear_projection", "only_cross_attention", "upcast_attention", "attention_type")
_TEMPORAL = ("temporal_num_attention_heads", "temporal_cross_attention_dim", "temporal_max_seq_length",
             "temporal_transformer_layers_per_block")
_MID = ("in_channels", "temb_channels", "dropout", "num_layers", "transformer_layers_per_block", "resnet_eps",
        "resnet_act_fn", "resnet_groups", "resnet_time_scale_shift", "output_scale_factor", "cross_attention_dim",
        "num_attention_heads", "dual_cross_attention", "use_linear_projection", "upcast_attention",
        "attention_type")

UNET_MOTION_BLOCKS = BlockRegistry(
    "UNetMotionModel",
    down={"DownBlockMotion": keyword_builder(DownBlockMotion, _COMMON + _DOWN + _TEMPORAL),
          "CrossAttnDownBlockMotion": keyword_builder(CrossAttnDownBlockMotion, _COMMON + _DOWN + _CROSS + _TEMPORAL)},
    up={"UpBlockMotion": keyword_builder(UpBlockMotion, _COMMON + _UP + _TEMPORAL),
        "CrossAttnUpBlockMotion": keyword_builder(CrossAttnUpBlockMotion, _COMMON + _UP + _CROSS + _TEMPORAL)},
    mid={"UNetMidBlockCrossAttnMotion": keyword_builder(UNetMidBlockCrossAttnMotion, _MID + _TEMPORAL),
         "UNetMidBlock2DCrossAttn": keyword_builder(UNetMidBlock2DCrossAttn, _MID)})


__all__ = [
    "CrossAttnDownBlockMotion",
    "CrossAttnUpBlockMotion",
    "DownBlockMotion",
    "STAGE_ORDER_MOTION",
    "UNET_MOTION_BLOCKS",
    "UNetMidBlockCrossAttnMotion",
    "UpBlockMotion",
    "motion_module",
    "motion_stage",
]
