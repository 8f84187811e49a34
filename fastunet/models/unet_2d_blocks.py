"""The down, mid and up blocks of the 2-D UNets: one parameterised class each, diffusers' names on top.

Generic blocks
--------------
:class:`DownBlock`, :class:`UpBlock` and :class:`UNetMidBlock2D` build diffusers' sub-modules with
diffusers' names -- ``resnets``, ``attentions``, ``downsamplers``/``upsamplers`` and, for the NCSN++
"skip" variants, ``resnet_down``/``resnet_up``, ``skip_conv``, ``skip_norm``, ``upsampler`` -- so
state dicts load strict. The diffusers class names are thin subclasses that only fix presets
(``AttnDownBlock2D`` = ``DownBlock(attention="self")``), and :func:`get_down_block` /
:func:`get_up_block` map diffusers' block-type strings (and ``get_*_block`` keyword arguments) to them.

Reusing them for other UNets (e.g. cross-attention blocks)
-----------------------------------------------------------
* ``attention``: ``None`` (no attention), ``"self"`` (diffusers' spatial self-attention layer:
  group norm, residual, ``attention_head_dim`` wide heads), or a factory
  ``attention(layer_index, channels) -> nn.Module`` building the module stored at
  ``attentions.<layer_index>`` (e.g. a ``Transformer2DModel``). Attention layers are applied after
  each resnet (``attention_per_layer=True``) or once after the last one (``False``, one factory call
  with index 0).
* ``forward(..., attention_kwargs=dict)``: every attention is called as
  ``attn(hidden_states, **attention_kwargs)`` (e.g. ``encoder_hidden_states``, ``attention_mask``,
  ``cross_attention_kwargs``, ``encoder_attention_mask``, ``return_dict=False``); a tuple result
  contributes its first element.
* ``DownBlock.forward(..., additional_residuals=t)``: ``t`` is added to the hidden states after the
  last resnet/attention pair, before they are recorded as a skip connection and before downsampling
  (where diffusers' cross-attention down blocks add T2I-Adapter residuals).
* ``UpBlock.set_freeu(fn)``: ``fn(hidden_states, res_hidden_states) -> (hidden_states, res_hidden_states)``
  runs on each pair before they are concatenated (FreeU; bind ``block.resolution_idx`` into ``fn``;
  diffusers applies FreeU only in ``UpBlock2D`` and ``CrossAttnUpBlock2D``). ``None`` turns it off.
* ``register_down_block(name, builder)`` / ``register_up_block``: add a block-type string; ``builder``
  receives all of ``get_*_block``'s keyword arguments.
* Blocks carry ``gradient_checkpointing`` (resnets are recomputed in backward when set),
  ``has_cross_attention`` (False here) and, for up blocks, ``resolution_idx``.

Block outputs: ``DownBlock`` returns ``(hidden_states, res_hidden_states)`` -- plus the downsampled
skip image for skip blocks; ``UpBlock`` returns ``hidden_states`` -- or ``(hidden_states, skip_sample)``
for skip blocks; the mid block returns ``hidden_states``. All are ``(B, C, H, W)``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Union

import torch
import torch.nn as nn

from ..layers.attention_processor import Attention
from ..layers.normalization import auto_groups, check_groups, norm_act
from ..layers.resampling import Downsample2D, FirDownsample2D, FirUpsample2D, Upsample2D
from ..layers.resnet import ResnetBlock2D
from ..layers.utils import maybe_checkpoint

#: ``(layer_index, channels) -> attention module``
AttentionFactory = Callable[[int, int], nn.Module]
AttentionSpec = Union[None, Literal["self"], AttentionFactory]
FreeUFn = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]

# the NCSN++ skip path carries an RGB image pyramid (diffusers fixes it at 3 channels)
SKIP_CHANNELS = 3


def _auto_groups(channels: int) -> int:
    """GroupNorm groups when none are configured: a quarter of the channels, at most 32."""
    return min(channels // 4, 32)


def self_attention(channels: int, head_dim: int | None, norm_groups: int | None, eps: float,
                   rescale_output_factor: float) -> Attention:
    """diffusers' spatial self-attention layer of the 2-D UNets (``_from_deprecated_attn_block``)."""
    head_dim = channels if head_dim is None else head_dim
    if not isinstance(head_dim, int) or not 0 < head_dim <= channels:
        raise ValueError(f"attention_head_dim must be an int in [1, {channels}] for {channels} channels; "
                         f"got {head_dim!r}")
    if norm_groups is not None:
        check_groups(channels, norm_groups, "attention group_norm")
    return Attention(channels, heads=channels // head_dim, dim_head=head_dim,
                     rescale_output_factor=rescale_output_factor, eps=eps, norm_num_groups=norm_groups,
                     residual_connection=True, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True)


def _attend(attn: nn.Module, hidden_states: torch.Tensor, attention_kwargs: dict[str, Any] | None) -> torch.Tensor:
    out = attn(hidden_states, **(attention_kwargs or {}))
    return out[0] if isinstance(out, tuple) else out


class _Block(nn.Module):
    """What down, up and mid blocks share: attention construction and resnet calls."""

    has_cross_attention = False

    def _build_attentions(self, attention: AttentionSpec, count: int, channels: int, *, head_dim: int | None,
                          norm_groups: int | None, eps: float, rescale: float) -> nn.ModuleList | None:
        if attention is None:
            return None
        if attention == "self":
            return nn.ModuleList(self_attention(channels, head_dim, norm_groups, eps, rescale) for _ in range(count))
        if not callable(attention):
            raise TypeError(f"attention must be None, 'self' or a callable (layer_index, channels) -> nn.Module; "
                            f"got {attention!r}")
        return nn.ModuleList(attention(i, channels) for i in range(count))

    def _resnet(self, resnet: nn.Module, hidden_states: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        return maybe_checkpoint(self.gradient_checkpointing, resnet, hidden_states, temb)


class DownBlock(_Block):
    """``num_layers`` resnets (each optionally followed by attention), then a 2x downsampler.

    downsample_type: ``"conv"`` (stride-2 conv, ``downsamplers.0.conv``), ``"resnet"`` (a
    ``ResnetBlock2D(down=True)`` at ``downsamplers.0``) or ``None``; ``add_downsample=False`` also
    turns it off. ``skip=True`` builds the NCSN++ variant instead: the block also carries a
    3-channel skip image, FIR-downsampled and added through ``skip_conv`` after ``resnet_down``.
    ``resnet_groups=None`` derives each GroupNorm's groups from its channels (``min(C // 4, 32)``).
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, dropout: float = 0.0,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default",
                 resnet_act_fn: str = "swish", resnet_groups: int | None = 32, resnet_pre_norm: bool = True,
                 output_scale_factor: float = 1.0, add_downsample: bool = True, downsample_padding: int = 1,
                 downsample_type: str | None = "conv", skip_time_act: bool = False,
                 attention: AttentionSpec = None, attention_head_dim: int | None = 1,
                 attention_norm_groups: int | None = None, skip: bool = False):
        super().__init__()
        if downsample_type not in (None, "conv", "resnet"):
            raise ValueError(f"downsample_type must be 'conv', 'resnet' or None; got {downsample_type!r}")
        self.skip = skip
        self.downsample_type = downsample_type if add_downsample and not skip else None
        self.gradient_checkpointing = False

        def resnet(cin: int, **extra) -> ResnetBlock2D:
            groups = resnet_groups if resnet_groups is not None else _auto_groups(cin)
            groups_out = resnet_groups if resnet_groups is not None else _auto_groups(out_channels)
            return ResnetBlock2D(in_channels=cin, out_channels=out_channels, temb_channels=temb_channels,
                                 eps=resnet_eps, groups=groups, groups_out=extra.pop("groups_out", groups_out),
                                 dropout=dropout, time_embedding_norm=resnet_time_scale_shift,
                                 non_linearity=resnet_act_fn, output_scale_factor=output_scale_factor,
                                 pre_norm=resnet_pre_norm, skip_time_act=skip_time_act, **extra)

        norm_groups = attention_norm_groups if attention_norm_groups is not None else resnet_groups
        self.attentions = self._build_attentions(attention, num_layers, out_channels, head_dim=attention_head_dim,
                                                 norm_groups=norm_groups, eps=resnet_eps, rescale=output_scale_factor)
        self.resnets = nn.ModuleList(resnet(in_channels if i == 0 else out_channels) for i in range(num_layers))

        self.downsamplers = None
        if skip:
            self.resnet_down = self.skip_conv = None
            if add_downsample:
                self.resnet_down = resnet(out_channels, groups_out=None, use_in_shortcut=True, down=True,
                                          kernel="fir")
                self.downsamplers = nn.ModuleList([FirDownsample2D(out_channels, out_channels=out_channels)])
                self.skip_conv = nn.Conv2d(SKIP_CHANNELS, out_channels, kernel_size=(1, 1), stride=(1, 1))
        elif self.downsample_type == "conv":
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, use_conv=True, out_channels=out_channels,
                                                            padding=downsample_padding, name="op")])
        elif self.downsample_type == "resnet":
            self.downsamplers = nn.ModuleList([resnet(out_channels, groups_out=None, down=True)])

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None,
                skip_sample: torch.Tensor | None = None, *, attention_kwargs: dict[str, Any] | None = None,
                additional_residuals: torch.Tensor | None = None):
        """hidden_states ``(B, in_channels, H, W)``, temb ``(B, temb_channels)``, skip_sample
        ``(B, 3, H, W)`` (skip blocks) -> ``(hidden_states, res_hidden_states[, skip_sample])``."""
        output_states = ()
        last = len(self.resnets) - 1
        for i, resnet in enumerate(self.resnets):
            hidden_states = self._resnet(resnet, hidden_states, temb)
            if self.attentions is not None:
                hidden_states = _attend(self.attentions[i], hidden_states, attention_kwargs)
            if i == last and additional_residuals is not None:
                hidden_states = hidden_states + additional_residuals
            output_states += (hidden_states,)

        if self.skip:
            if self.resnet_down is not None:
                if skip_sample is None:
                    raise ValueError(f"{type(self).__name__} downsamples a skip image: pass skip_sample "
                                     f"(B, {SKIP_CHANNELS}, H, W); got None")
                hidden_states = self.resnet_down(hidden_states, temb)
                skip_sample = self.downsamplers[0](skip_sample)
                hidden_states = self.skip_conv(skip_sample) + hidden_states
                output_states += (hidden_states,)
            return hidden_states, output_states, skip_sample

        if self.downsamplers is not None:
            for downsampler in self.downsamplers:
                if self.downsample_type == "resnet":
                    hidden_states = downsampler(hidden_states, temb)
                else:
                    hidden_states = downsampler(hidden_states)
            output_states += (hidden_states,)
        return hidden_states, output_states


class UpBlock(_Block):
    """``num_layers`` resnets, each fed ``cat([hidden, popped skip connection])`` (each optionally
    followed by attention), then a 2x upsampler.

    upsample_type: ``"conv"`` (nearest 2x + conv, ``upsamplers.0.conv``), ``"resnet"``
    (``ResnetBlock2D(up=True)`` at ``upsamplers.0``) or ``None``; ``add_upsample=False`` also turns it
    off. ``skip=True`` builds the NCSN++ variant: the incoming 3-channel skip image is FIR-upsampled
    (``upsampler``), ``skip_conv(silu(skip_norm(h)))`` is added to it, and ``resnet_up`` upsamples.
    """

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int | None,
                 resolution_idx: int | None = None, dropout: float = 0.0, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int | None = 32, resnet_pre_norm: bool = True, output_scale_factor: float = 1.0,
                 add_upsample: bool = True, upsample_type: str | None = "conv", skip_time_act: bool = False,
                 attention: AttentionSpec = None, attention_head_dim: int | None = 1,
                 attention_norm_groups: int | None = None, attention_per_layer: bool = True, skip: bool = False):
        super().__init__()
        if upsample_type not in (None, "conv", "resnet"):
            raise ValueError(f"upsample_type must be 'conv', 'resnet' or None; got {upsample_type!r}")
        self.skip = skip
        self.upsample_type = upsample_type if add_upsample and not skip else None
        self.resolution_idx = resolution_idx
        self.attention_per_layer = attention_per_layer
        self.gradient_checkpointing = False
        self._freeu: FreeUFn | None = None
        self.resnet_groups = resnet_groups

        def resnet(cin: int, **extra) -> ResnetBlock2D:
            return ResnetBlock2D(in_channels=cin, out_channels=out_channels, temb_channels=temb_channels,
                                 eps=resnet_eps, dropout=dropout, time_embedding_norm=resnet_time_scale_shift,
                                 non_linearity=resnet_act_fn, output_scale_factor=output_scale_factor,
                                 pre_norm=resnet_pre_norm, skip_time_act=skip_time_act, **extra)

        auto_out = _auto_groups(out_channels)
        resnets = []
        for i in range(num_layers):
            res_skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in_channels = prev_output_channel if i == 0 else out_channels
            groups = self._input_groups(resnet_in_channels, res_skip_channels)
            resnets.append(resnet(resnet_in_channels + res_skip_channels, groups=groups,
                                  groups_out=resnet_groups if resnet_groups is not None else auto_out))

        norm_groups = attention_norm_groups if attention_norm_groups is not None else resnet_groups
        self.attentions = self._build_attentions(attention, num_layers if attention_per_layer else 1, out_channels,
                                                 head_dim=attention_head_dim, norm_groups=norm_groups,
                                                 eps=resnet_eps, rescale=output_scale_factor)
        self.resnets = nn.ModuleList(resnets)

        self.upsamplers = None
        if skip:
            self.upsampler = FirUpsample2D(in_channels, out_channels=out_channels)
            self.resnet_up = self.skip_conv = self.skip_norm = self.act = None
            if add_upsample:
                self.resnet_up = resnet(out_channels, groups=auto_out, groups_out=auto_out, use_in_shortcut=True,
                                        up=True, kernel="fir")
                self.skip_conv = nn.Conv2d(out_channels, SKIP_CHANNELS, kernel_size=(3, 3), stride=(1, 1),
                                           padding=(1, 1))
                self.skip_norm = nn.GroupNorm(auto_out, out_channels, eps=resnet_eps, affine=True)
                self.act = nn.SiLU()
        elif self.upsample_type == "conv":
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])
        elif self.upsample_type == "resnet":
            groups = resnet_groups if resnet_groups is not None else auto_out
            self.upsamplers = nn.ModuleList([resnet(out_channels, groups=groups, up=True)])

    def _input_groups(self, resnet_in_channels: int, res_skip_channels: int) -> int:
        """GroupNorm groups of a resnet's ``norm1`` over the concatenated input."""
        if self.resnet_groups is not None:
            return self.resnet_groups
        return _auto_groups(resnet_in_channels + res_skip_channels)

    def set_freeu(self, fn: FreeUFn | None) -> None:
        """Apply ``fn(hidden_states, res_hidden_states) -> (hidden_states, res_hidden_states)`` before
        each concatenation (FreeU); ``None`` switches it off."""
        if fn is not None and not callable(fn):
            raise TypeError(f"set_freeu expects a callable or None; got {type(fn).__name__}")
        self._freeu = fn

    @property
    def freeu(self) -> FreeUFn | None:
        return self._freeu

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor | None = None, upsample_size: tuple[int, int] | None = None,
                skip_sample: torch.Tensor | None = None, *, attention_kwargs: dict[str, Any] | None = None):
        """hidden_states ``(B, prev_output_channel, H, W)``; the last ``len(resnets)`` entries of
        ``res_hidden_states_tuple`` are consumed from the end -> ``hidden_states`` (``(hidden_states,
        skip_sample)`` for skip blocks)."""
        if len(res_hidden_states_tuple) < len(self.resnets):
            raise ValueError(f"{type(self).__name__} needs {len(self.resnets)} skip connections; "
                             f"got {len(res_hidden_states_tuple)}")
        for i, resnet in enumerate(self.resnets):
            res_hidden_states = res_hidden_states_tuple[-1 - i]
            if self._freeu is not None:
                hidden_states, res_hidden_states = self._freeu(hidden_states, res_hidden_states)
            hidden_states = torch.cat([hidden_states, res_hidden_states], dim=1)
            hidden_states = self._resnet(resnet, hidden_states, temb)
            if self.attentions is not None and self.attention_per_layer:
                hidden_states = _attend(self.attentions[i], hidden_states, attention_kwargs)
        if self.attentions is not None and not self.attention_per_layer:
            hidden_states = _attend(self.attentions[0], hidden_states, attention_kwargs)

        if self.skip:
            if skip_sample is not None:
                skip_sample = self.upsampler(skip_sample)
            if self.resnet_up is not None:
                skip_states = self.skip_conv(norm_act(self.skip_norm, hidden_states, "silu"))
                skip_sample = skip_states if skip_sample is None else skip_sample + skip_states
                hidden_states = self.resnet_up(hidden_states, temb)
            return hidden_states, skip_sample

        if self.upsamplers is not None:
            for upsampler in self.upsamplers:
                if self.upsample_type == "resnet":
                    hidden_states = upsampler(hidden_states, temb)
                else:
                    hidden_states = upsampler(hidden_states, upsample_size)
        return hidden_states


class UNetMidBlock2D(_Block):
    """``resnet, (attention, resnet) * num_layers`` at the lowest resolution.

    Self-attention by default (``attn_groups`` groups in its norm; ``None`` means ``resnet_groups``
    with the "default" time embedding and no norm with "scale_shift"); ``attention`` (a factory)
    replaces it, ``add_attention=False`` drops it. ``out_channels``/``resnet_groups_out`` let the first
    resnet change the width (cross-attention mid blocks).
    """

    def __init__(self, in_channels: int, temb_channels: int | None, dropout: float = 0.0, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int | None = 32, attn_groups: int | None = None, resnet_pre_norm: bool = True,
                 add_attention: bool = True, attention_head_dim: int | None = 1, output_scale_factor: float = 1.0,
                 *, out_channels: int | None = None, resnet_groups_out: int | None = None,
                 attention: AttentionSpec = "self", skip_time_act: bool = False):
        super().__init__()
        out_channels = out_channels or in_channels
        resnet_groups = resnet_groups if resnet_groups is not None else _auto_groups(in_channels)
        resnet_groups_out = resnet_groups_out or resnet_groups
        if attn_groups is None:
            attn_groups = resnet_groups if resnet_time_scale_shift == "default" else None
        self.add_attention = add_attention
        self.gradient_checkpointing = False

        def resnet(cin: int, groups: int, groups_out: int | None = None) -> ResnetBlock2D:
            return ResnetBlock2D(in_channels=cin, out_channels=out_channels, temb_channels=temb_channels,
                                 eps=resnet_eps, groups=groups, groups_out=groups_out, dropout=dropout,
                                 time_embedding_norm=resnet_time_scale_shift, non_linearity=resnet_act_fn,
                                 output_scale_factor=output_scale_factor, pre_norm=resnet_pre_norm,
                                 skip_time_act=skip_time_act)

        if add_attention:
            self.attentions = self._build_attentions(attention, num_layers, out_channels,
                                                     head_dim=attention_head_dim, norm_groups=attn_groups,
                                                     eps=resnet_eps, rescale=output_scale_factor)
        else:
            self.attentions = nn.ModuleList([None] * num_layers)
        self.resnets = nn.ModuleList([resnet(in_channels, resnet_groups, resnet_groups_out)]
                                     + [resnet(out_channels, resnet_groups_out) for _ in range(num_layers)])

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, *,
                attention_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        """``(B, in_channels, H, W) -> (B, out_channels, H, W)``."""
        hidden_states = self._resnet(self.resnets[0], hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            if attn is not None:
                hidden_states = _attend(attn, hidden_states, attention_kwargs)
            hidden_states = self._resnet(resnet, hidden_states, temb)
        return hidden_states


# -- diffusers' class names: presets of the generic blocks -------------------------------------------

_SKIP_PRESET = dict(skip=True, resnet_groups=None, output_scale_factor=math.sqrt(2.0), attention_norm_groups=32)


class DownBlock2D(DownBlock):
    """Resnets, then a stride-2 conv."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "attention": None})


class AttnDownBlock2D(DownBlock):
    """Resnets each followed by self-attention, then a conv (or resnet) downsampler."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "attention": "self"})


class ResnetDownsampleBlock2D(DownBlock):
    """Resnets, then a downsampling resnet (BigGAN style)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "attention": None, "downsample_type": "resnet"})


class SkipDownBlock2D(DownBlock):
    """NCSN++: resnets, then a FIR downsampling resnet plus the projected skip image."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**_SKIP_PRESET, **kwargs, "attention": None, "skip": True})


class AttnSkipDownBlock2D(DownBlock):
    """NCSN++ skip block with self-attention after each resnet."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**_SKIP_PRESET, **kwargs, "attention": "self", "skip": True})


class UpBlock2D(UpBlock):
    """Resnets over concatenated skip connections, then nearest 2x + conv."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "attention": None})


class AttnUpBlock2D(UpBlock):
    """Resnets each followed by self-attention, then a conv (or resnet) upsampler."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "attention": "self", "attention_per_layer": True})


class ResnetUpsampleBlock2D(UpBlock):
    """Resnets, then an upsampling resnet (BigGAN style)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "attention": None, "upsample_type": "resnet"})


class SkipUpBlock2D(UpBlock):
    """NCSN++: resnets, then the skip-image update and a FIR upsampling resnet."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**_SKIP_PRESET, **kwargs, "attention": None, "skip": True})


class AttnSkipUpBlock2D(UpBlock):
    """NCSN++ skip block with one self-attention after the last resnet."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**_SKIP_PRESET, **kwargs, "attention": "self", "attention_per_layer": False,
                                   "skip": True})

    def _input_groups(self, resnet_in_channels: int, res_skip_channels: int) -> int:
        # diffusers computes min(resnet_in + res_skip // 4, 32) here (only the skip width is divided);
        # kept so that outputs match its checkpoints
        return min(resnet_in_channels + res_skip_channels // 4, 32)


# -- the registry ------------------------------------------------------------------------------------

BlockBuilder = Callable[..., nn.Module]
_COMMON = ("num_layers", "in_channels", "out_channels", "temb_channels", "dropout", "resnet_eps", "resnet_act_fn",
           "resnet_time_scale_shift")
_RENAMES = {"resnet_skip_time_act": "skip_time_act", "resnet_out_scale_factor": "output_scale_factor"}


def _builder(cls: type, *args: str) -> BlockBuilder:
    """A builder passing the common ``get_*_block`` arguments and ``args`` (renamed) to ``cls``."""
    keys = _COMMON + args

    def build(**kw) -> nn.Module:
        return cls(**{_RENAMES.get(k, k): kw[k] for k in keys if k in kw})

    return build


def _attn_down(**kw) -> nn.Module:
    # diffusers' AttnDownBlock2D has no add_downsample: it is folded into downsample_type
    kind = (kw.get("downsample_type") or "conv") if kw["add_downsample"] else None
    return _builder(AttnDownBlock2D, "resnet_groups", "downsample_padding", "attention_head_dim",
                    "downsample_type")(**{**kw, "downsample_type": kind})


def _attn_up(**kw) -> nn.Module:
    kind = (kw.get("upsample_type") or "conv") if kw["add_upsample"] else None
    return _builder(AttnUpBlock2D, "prev_output_channel", "resolution_idx", "resnet_groups", "attention_head_dim",
                    "upsample_type")(**{**kw, "upsample_type": kind})


DOWN_BLOCKS: dict[str, BlockBuilder] = {
    "DownBlock2D": _builder(DownBlock2D, "add_downsample", "resnet_groups", "downsample_padding"),
    "ResnetDownsampleBlock2D": _builder(ResnetDownsampleBlock2D, "add_downsample", "resnet_groups",
                                        "resnet_skip_time_act", "resnet_out_scale_factor"),
    "AttnDownBlock2D": _attn_down,
    "SkipDownBlock2D": _builder(SkipDownBlock2D, "add_downsample", "downsample_padding"),
    "AttnSkipDownBlock2D": _builder(AttnSkipDownBlock2D, "add_downsample", "attention_head_dim"),
}

UP_BLOCKS: dict[str, BlockBuilder] = {
    "UpBlock2D": _builder(UpBlock2D, "prev_output_channel", "resolution_idx", "add_upsample", "resnet_groups"),
    "ResnetUpsampleBlock2D": _builder(ResnetUpsampleBlock2D, "prev_output_channel", "resolution_idx",
                                      "add_upsample", "resnet_groups", "resnet_skip_time_act",
                                      "resnet_out_scale_factor"),
    "AttnUpBlock2D": _attn_up,
    "SkipUpBlock2D": _builder(SkipUpBlock2D, "prev_output_channel", "resolution_idx", "add_upsample"),
    "AttnSkipUpBlock2D": _builder(AttnSkipUpBlock2D, "prev_output_channel", "resolution_idx", "add_upsample",
                                  "attention_head_dim"),
}


def register_down_block(name: str, builder: BlockBuilder) -> None:
    """Make ``get_down_block(name, ...)`` call ``builder(**get_down_block_keyword_arguments)``."""
    DOWN_BLOCKS[name] = builder


def register_up_block(name: str, builder: BlockBuilder) -> None:
    """Make ``get_up_block(name, ...)`` call ``builder(**get_up_block_keyword_arguments)``."""
    UP_BLOCKS[name] = builder


def _lookup(registry: dict[str, BlockBuilder], name: str, what: str) -> BlockBuilder:
    if not isinstance(name, str):
        raise TypeError(f"{what} type must be a str; got {type(name).__name__}")
    key = name[len("UNetRes"):] if name.startswith("UNetRes") else name
    if key not in registry:
        raise ValueError(f"unknown {what} type {name!r}; expected one of {sorted(registry)}")
    return registry[key]


def get_down_block(down_block_type: str, num_layers: int, in_channels: int, out_channels: int,
                   temb_channels: int | None, add_downsample: bool, resnet_eps: float, resnet_act_fn: str,
                   **kwargs) -> nn.Module:
    """Build the down block named ``down_block_type`` with diffusers' ``get_down_block`` arguments
    (``resnet_groups``, ``attention_head_dim`` (``None``: ``num_attention_heads``), ``downsample_padding``,
    ``resnet_time_scale_shift``, ``downsample_type``, ``dropout``, ``resnet_skip_time_act``,
    ``resnet_out_scale_factor``, ...); each type takes the ones its diffusers class takes."""
    builder = _lookup(DOWN_BLOCKS, down_block_type, "down block")
    if kwargs.get("attention_head_dim") is None:
        kwargs["attention_head_dim"] = kwargs.get("num_attention_heads")
    return builder(num_layers=num_layers, in_channels=in_channels, out_channels=out_channels,
                   temb_channels=temb_channels, add_downsample=add_downsample, resnet_eps=resnet_eps,
                   resnet_act_fn=resnet_act_fn, **kwargs)


def get_up_block(up_block_type: str, num_layers: int, in_channels: int, out_channels: int,
                 prev_output_channel: int, temb_channels: int | None, add_upsample: bool, resnet_eps: float,
                 resnet_act_fn: str, **kwargs) -> nn.Module:
    """Build the up block named ``up_block_type`` with diffusers' ``get_up_block`` arguments (see
    :func:`get_down_block`; ``resolution_idx`` and ``upsample_type`` instead of the downsampling ones)."""
    builder = _lookup(UP_BLOCKS, up_block_type, "up block")
    if kwargs.get("attention_head_dim") is None:
        kwargs["attention_head_dim"] = kwargs.get("num_attention_heads")
    return builder(num_layers=num_layers, in_channels=in_channels, out_channels=out_channels,
                   prev_output_channel=prev_output_channel, temb_channels=temb_channels, add_upsample=add_upsample,
                   resnet_eps=resnet_eps, resnet_act_fn=resnet_act_fn, **kwargs)


__all__ = [
    "AttentionFactory",
    "AttnDownBlock2D",
    "AttnSkipDownBlock2D",
    "AttnSkipUpBlock2D",
    "AttnUpBlock2D",
    "DOWN_BLOCKS",
    "DownBlock",
    "DownBlock2D",
    "ResnetDownsampleBlock2D",
    "ResnetUpsampleBlock2D",
    "SkipDownBlock2D",
    "SkipUpBlock2D",
    "UNetMidBlock2D",
    "UP_BLOCKS",
    "UpBlock",
    "UpBlock2D",
    "get_down_block",
    "get_up_block",
    "register_down_block",
    "register_up_block",
    "self_attention",
]
