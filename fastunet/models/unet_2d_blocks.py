"""The blocks of ``UNet2DModel``: presets of the staged blocks in :mod:`fastunet.models.blocks`.

Each diffusers class name is a thin subclass that fixes a preset -- ``AttnDownBlock2D`` is a
:class:`~fastunet.models.blocks.DownBlock` whose layers run ``resnet -> self-attention`` -- and
:data:`UNET_2D_BLOCKS` maps diffusers' block-type strings (and ``get_*_block`` keyword arguments) to
them. The attention presets take ``attention_head_dim`` (``None``: one head over all channels) and
``attention_norm_groups`` (``None``: ``resnet_groups``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import torch.nn as nn

from ..layers.normalization import auto_groups
from .blocks import (
    SKIP_CHANNELS,
    BlockRegistry,
    DownBlock,
    MidBlock,
    UpBlock,
    keyword_builder,
    self_attention_stage,
)


def _arguments(cls: type, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments ``cls(*args, **kwargs)`` would bind, defaults included, by name."""
    bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k != "self"}


def _with_self_attention(base: type, args: tuple, kwargs: dict[str, Any], head_dim: int | None,
                         norm_groups: int | None) -> dict[str, Any]:
    """``base``'s arguments with a self-attention stage after each resnet."""
    arguments = _arguments(base, args, kwargs)
    groups = norm_groups if norm_groups is not None else arguments["resnet_groups"]
    stage = self_attention_stage(head_dim, groups, arguments["resnet_eps"], arguments["output_scale_factor"])
    return {**arguments, "stages": (stage,)}


_SKIP_PRESET = dict(skip=True, resnet_groups=None, output_scale_factor=math.sqrt(2.0))
# the NCSN++ blocks' attention norms have 32 groups whatever the resnets use
_SKIP_ATTENTION_GROUPS = 32


class DownBlock2D(DownBlock):
    """Resnets, then a stride-2 conv."""


class AttnDownBlock2D(DownBlock):
    """Resnets each followed by self-attention, then a conv (or resnet) downsampler."""

    def __init__(self, *args, attention_head_dim: int | None = 1, attention_norm_groups: int | None = None, **kwargs):
        super().__init__(**_with_self_attention(DownBlock, args, kwargs, attention_head_dim, attention_norm_groups))


class ResnetDownsampleBlock2D(DownBlock):
    """Resnets, then a downsampling resnet (BigGAN style)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "downsample_type": "resnet"})


class SkipDownBlock2D(DownBlock):
    """NCSN++: resnets, then a FIR downsampling resnet plus the projected skip image."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**_SKIP_PRESET, **kwargs, "skip": True})


class AttnSkipDownBlock2D(DownBlock):
    """NCSN++ skip block with self-attention after each resnet."""

    def __init__(self, *args, attention_head_dim: int | None = 1, **kwargs):
        super().__init__(**_with_self_attention(DownBlock, args, {**_SKIP_PRESET, **kwargs, "skip": True},
                                                attention_head_dim, _SKIP_ATTENTION_GROUPS))


class UpBlock2D(UpBlock):
    """Resnets over concatenated skip connections, then nearest 2x + conv."""

    supports_freeu = True


class AttnUpBlock2D(UpBlock):
    """Resnets each followed by self-attention, then a conv (or resnet) upsampler."""

    def __init__(self, *args, attention_head_dim: int | None = 1, attention_norm_groups: int | None = None, **kwargs):
        super().__init__(**_with_self_attention(UpBlock, args, kwargs, attention_head_dim, attention_norm_groups))


class ResnetUpsampleBlock2D(UpBlock):
    """Resnets, then an upsampling resnet (BigGAN style)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "upsample_type": "resnet"})


class SkipUpBlock2D(UpBlock):
    """NCSN++: resnets, then the skip-image update and a FIR upsampling resnet."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**_SKIP_PRESET, **kwargs, "skip": True})


def _attn_skip_up_input_groups(resnet_in_channels: int, res_skip_channels: int) -> int:
    # diffusers computes min(resnet_in + res_skip // 4, 32) here (only the skip width is divided);
    # kept so that outputs match its checkpoints
    return min(resnet_in_channels + res_skip_channels // 4, 32)


class AttnSkipUpBlock2D(UpBlock):
    """NCSN++ skip block with one self-attention after the last resnet."""

    def __init__(self, *args, attention_head_dim: int | None = 1, **kwargs):
        preset = {**_SKIP_PRESET, **kwargs, "skip": True, "attention_per_layer": False,
                  "input_groups": _attn_skip_up_input_groups}
        super().__init__(**_with_self_attention(UpBlock, args, preset, attention_head_dim, _SKIP_ATTENTION_GROUPS))


class UNetMidBlock2D(MidBlock):
    """``resnet, (self-attention, resnet) * num_layers`` at the lowest resolution.

    The attention's norm has ``attn_groups`` groups (``None``: ``resnet_groups`` with the "default"
    time embedding, no norm with "scale_shift"); ``add_attention=False`` leaves the slots empty, as
    diffusers does.
    """

    def __init__(self, in_channels: int, temb_channels: int | None, dropout: float = 0.0, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int | None = 32, attn_groups: int | None = None, resnet_pre_norm: bool = True,
                 add_attention: bool = True, attention_head_dim: int | None = 1, output_scale_factor: float = 1.0):
        groups = resnet_groups if resnet_groups is not None else auto_groups(in_channels)
        if attn_groups is None:
            attn_groups = groups if resnet_time_scale_shift == "default" else None
        stage = self_attention_stage(attention_head_dim, attn_groups, resnet_eps, output_scale_factor)
        if not add_attention:
            stage = dataclasses.replace(stage, build=lambda index, channels: None)
        super().__init__(in_channels, temb_channels, dropout=dropout, num_layers=num_layers, resnet_eps=resnet_eps,
                         resnet_time_scale_shift=resnet_time_scale_shift, resnet_act_fn=resnet_act_fn,
                         resnet_groups=groups, resnet_pre_norm=resnet_pre_norm,
                         output_scale_factor=output_scale_factor, stages=(stage,))
        self.add_attention = add_attention


# -- the registry ------------------------------------------------------------------------------------

COMMON_KEYS = ("num_layers", "in_channels", "out_channels", "temb_channels", "dropout", "resnet_eps",
               "resnet_act_fn", "resnet_time_scale_shift")
RENAMES = {"resnet_skip_time_act": "skip_time_act", "resnet_out_scale_factor": "output_scale_factor"}


def _builder(cls: type, *keys: str) -> Any:
    return keyword_builder(cls, COMMON_KEYS + keys, RENAMES)


def _attn_down(**kw) -> nn.Module:
    # diffusers' AttnDownBlock2D has no add_downsample: it is folded into downsample_type
    kind = (kw.get("downsample_type") or "conv") if kw["add_downsample"] else None
    return _builder(AttnDownBlock2D, "resnet_groups", "downsample_padding", "attention_head_dim",
                    "downsample_type")(**{**kw, "downsample_type": kind})


def _attn_up(**kw) -> nn.Module:
    kind = (kw.get("upsample_type") or "conv") if kw["add_upsample"] else None
    return _builder(AttnUpBlock2D, "prev_output_channel", "resolution_idx", "resnet_groups", "attention_head_dim",
                    "upsample_type")(**{**kw, "upsample_type": kind})


UP_KEYS = ("prev_output_channel", "resolution_idx", "add_upsample")

DOWN_BLOCKS_2D = {
    "DownBlock2D": _builder(DownBlock2D, "add_downsample", "resnet_groups", "downsample_padding"),
    "ResnetDownsampleBlock2D": _builder(ResnetDownsampleBlock2D, "add_downsample", "resnet_groups",
                                        "resnet_skip_time_act", "resnet_out_scale_factor"),
    "AttnDownBlock2D": _attn_down,
    "SkipDownBlock2D": _builder(SkipDownBlock2D, "add_downsample", "downsample_padding"),
    "AttnSkipDownBlock2D": _builder(AttnSkipDownBlock2D, "add_downsample", "attention_head_dim"),
}

UP_BLOCKS_2D = {
    "UpBlock2D": _builder(UpBlock2D, *UP_KEYS, "resnet_groups"),
    "ResnetUpsampleBlock2D": _builder(ResnetUpsampleBlock2D, *UP_KEYS, "resnet_groups", "resnet_skip_time_act",
                                      "resnet_out_scale_factor"),
    "AttnUpBlock2D": _attn_up,
    "SkipUpBlock2D": _builder(SkipUpBlock2D, *UP_KEYS),
    "AttnSkipUpBlock2D": _builder(AttnSkipUpBlock2D, *UP_KEYS, "attention_head_dim"),
}

#: The block types of ``UNet2DModel`` (diffusers also accepts them with a ``"UNetRes"`` prefix).
UNET_2D_BLOCKS = BlockRegistry("UNet2DModel", DOWN_BLOCKS_2D, UP_BLOCKS_2D, strip_prefix="UNetRes")


def head_dim_argument(kwargs: dict[str, Any]) -> dict[str, Any]:
    """diffusers' ``get_*_block``: ``attention_head_dim=None`` falls back to ``num_attention_heads``."""
    if kwargs.get("attention_head_dim") is None:
        return {**kwargs, "attention_head_dim": kwargs.get("num_attention_heads")}
    return kwargs


def get_down_block(down_block_type: str, num_layers: int, in_channels: int, out_channels: int,
                   temb_channels: int | None, add_downsample: bool, resnet_eps: float, resnet_act_fn: str,
                   *, registry: BlockRegistry = UNET_2D_BLOCKS, **kwargs) -> nn.Module:
    """Build the down block named ``down_block_type`` with diffusers' ``get_down_block`` arguments
    (``resnet_groups``, ``attention_head_dim`` (``None``: ``num_attention_heads``), ``downsample_padding``,
    ``resnet_time_scale_shift``, ``downsample_type``, ``dropout``, ``resnet_skip_time_act``,
    ``resnet_out_scale_factor``, ...); each type takes the ones its diffusers class takes."""
    return registry.down(down_block_type, **head_dim_argument(kwargs), num_layers=num_layers,
                         in_channels=in_channels, out_channels=out_channels, temb_channels=temb_channels,
                         add_downsample=add_downsample, resnet_eps=resnet_eps, resnet_act_fn=resnet_act_fn)


def get_up_block(up_block_type: str, num_layers: int, in_channels: int, out_channels: int,
                 prev_output_channel: int, temb_channels: int | None, add_upsample: bool, resnet_eps: float,
                 resnet_act_fn: str, *, registry: BlockRegistry = UNET_2D_BLOCKS, **kwargs) -> nn.Module:
    """Build the up block named ``up_block_type`` with diffusers' ``get_up_block`` arguments (see
    :func:`get_down_block`; ``resolution_idx`` and ``upsample_type`` instead of the downsampling ones)."""
    return registry.up(up_block_type, **head_dim_argument(kwargs), num_layers=num_layers, in_channels=in_channels,
                       out_channels=out_channels, prev_output_channel=prev_output_channel,
                       temb_channels=temb_channels, add_upsample=add_upsample, resnet_eps=resnet_eps,
                       resnet_act_fn=resnet_act_fn)


__all__ = [
    "AttnDownBlock2D",
    "AttnSkipDownBlock2D",
    "AttnSkipUpBlock2D",
    "AttnUpBlock2D",
    "DOWN_BLOCKS_2D",
    "DownBlock",
    "DownBlock2D",
    "ResnetDownsampleBlock2D",
    "ResnetUpsampleBlock2D",
    "SKIP_CHANNELS",
    "SkipDownBlock2D",
    "SkipUpBlock2D",
    "UNET_2D_BLOCKS",
    "UNetMidBlock2D",
    "UP_BLOCKS_2D",
    "UpBlock",
    "UpBlock2D",
    "get_down_block",
    "get_up_block",
]
