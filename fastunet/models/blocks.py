"""Down, mid and up blocks of every UNet, written once: each layer of a block is an ordered list of
named stages.

A diffusers block is a fixed sequence of sub-modules per layer -- 2-D ``resnet -> attention``, 3-D
``resnet -> temp_conv -> attention -> temp_attention``, motion ``resnet -> attention ->
motion_module``. Here a block holds one ``nn.ModuleList`` per stage under diffusers' attribute name
(``resnets``, ``attentions``, ``temp_convs``, ``temp_attentions``, ``motion_modules``), so state dicts
load strict, and runs the stages of each layer in order. A diffusers block type is then a preset: a
list of :class:`Stage` plus a few options (see ``unet_2d_blocks.py``, ``unet_2d_condition_blocks.py``).

* :class:`Stage` -- ``name`` (the attribute), ``build(layer_index, channels) -> nn.Module`` and
  ``run(module, hidden_states, context) -> hidden_states``. Resnets are the one stage every block has;
  they are built by :class:`ResnetFactory` because their input width varies by layer.
* :class:`BlockContext` -- what every stage may read: ``temb``, the encoder states and masks,
  ``cross_attention_kwargs`` and ``num_frames``. The UNet skeleton builds it once per forward; no
  block branches on whether it has cross-attention.
* :class:`DownBlock` / :class:`UpBlock` / :class:`MidBlock` -- the three shapes of block. Down and up
  blocks run ``resnet``, then the other stages, for each layer; mid blocks run ``resnets[0]`` (and the
  per-resnet stages, e.g. ``temp_convs[0]``) and then, per layer, the attention-like stages and the
  next resnet. The NCSN++ "skip" variants of the 2-D UNet (``resnet_down``/``resnet_up``,
  ``skip_conv``, ``skip_norm``) are options of the down and up blocks.
* :class:`BlockRegistry` -- one per model family, built explicitly from preset builders: diffusers'
  ``get_down_block`` / ``get_up_block`` / ``get_mid_block`` by block-type string.

Block outputs: ``DownBlock`` returns ``(hidden_states, res_hidden_states)`` -- plus the downsampled
skip image for skip blocks; ``UpBlock`` returns ``hidden_states`` -- or ``(hidden_states,
skip_sample)`` for skip blocks; ``MidBlock`` returns ``hidden_states``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from ..layers.attention_processor import Attention
from ..layers.normalization import auto_groups, check_groups, norm_act
from ..layers.resampling import Downsample2D, FirDownsample2D, FirUpsample2D, Upsample2D
from ..layers.resnet import ResnetBlock2D
from ..layers.utils import maybe_checkpoint

FreeUFn = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]

# the NCSN++ skip path carries an RGB image pyramid (diffusers fixes it at 3 channels)
SKIP_CHANNELS = 3


# -- the context and the stages ----------------------------------------------------------------------


@dataclass
class BlockContext:
    """What the stages of a block may read besides the hidden states.

    ``temb`` ``(B, temb_channels)``; ``encoder_hidden_states`` ``(B, M, D)``; ``attention_mask`` /
    ``encoder_attention_mask`` additive biases ``(B, 1, tokens)``; ``num_frames``: the video models run
    their 2-D stages on ``(B * num_frames, C, H, W)`` and their temporal stages over the frames.
    """

    temb: torch.Tensor | None = None
    encoder_hidden_states: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    cross_attention_kwargs: dict[str, Any] | None = None
    encoder_attention_mask: torch.Tensor | None = None
    num_frames: int = 1

    @classmethod
    def of(cls, context: BlockContext | None, temb: torch.Tensor | None, **overrides) -> BlockContext:
        """``context`` (or a new one) with ``temb`` and every non-``None`` keyword in ``overrides`` set."""
        if context is not None and temb is None and not overrides:
            return context  # the UNets' call: torch.compile traces it without dataclass introspection
        unknown = sorted(set(overrides) - _CONTEXT_FIELDS)
        if unknown:
            raise TypeError(f"unexpected block arguments {unknown}; a block takes {sorted(_CONTEXT_FIELDS)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        if temb is not None:
            given["temb"] = temb
        return replace(context, **given) if context is not None else cls(**given)


_CONTEXT_FIELDS = frozenset(f.name for f in fields(BlockContext))

StageRunner = Callable[[nn.Module, torch.Tensor, BlockContext], torch.Tensor]


def run_resnet(resnet: nn.Module, hidden_states: torch.Tensor, context: BlockContext) -> torch.Tensor:
    return resnet(hidden_states, context.temb)


def run_self_attention(attn: nn.Module, hidden_states: torch.Tensor, context: BlockContext) -> torch.Tensor:
    """diffusers' spatial self-attention layer: it reads nothing from the context."""
    return attn(hidden_states)


def run_transformer(transformer: nn.Module, hidden_states: torch.Tensor, context: BlockContext) -> torch.Tensor:
    """A spatial transformer (``Transformer2DModel``) with the encoder states and masks."""
    out = transformer(hidden_states, encoder_hidden_states=context.encoder_hidden_states,
                      attention_mask=context.attention_mask, cross_attention_kwargs=context.cross_attention_kwargs,
                      encoder_attention_mask=context.encoder_attention_mask, return_dict=False)
    return out[0] if isinstance(out, tuple) else out


def run_temporal_conv(conv: nn.Module, hidden_states: torch.Tensor, context: BlockContext) -> torch.Tensor:
    return conv(hidden_states, num_frames=context.num_frames)


def run_temporal_transformer(transformer: nn.Module, hidden_states: torch.Tensor,
                             context: BlockContext) -> torch.Tensor:
    """A transformer over the frames of ``(B * F, C, H, W)`` (``TransformerTemporalModel``)."""
    out = transformer(hidden_states, num_frames=context.num_frames,
                      cross_attention_kwargs=context.cross_attention_kwargs, return_dict=False)
    return out[0] if isinstance(out, tuple) else out


def run_motion_module(module: nn.Module, hidden_states: torch.Tensor, context: BlockContext) -> torch.Tensor:
    """An AnimateDiff motion module over the frames of ``(B * F, C, H, W)``."""
    return module(hidden_states, num_frames=context.num_frames)


@dataclass(frozen=True)
class Stage:
    """One named sub-module list of a block.

    ``build(layer_index, channels)`` makes the module stored at ``<name>.<layer_index>`` (``None``
    for an empty slot, as diffusers' mid block without attention has); ``run`` applies it.
    ``per_resnet`` stages (``temp_convs``) have one module per resnet and run right after it; in a mid
    block the others have one module fewer than the resnets. ``cross_attention``: the stage attends
    to the encoder states.
    """

    name: str
    build: Callable[[int, int], nn.Module | None]
    run: StageRunner
    per_resnet: bool = False
    cross_attention: bool = False


def self_attention_stage(head_dim: int | None, norm_groups: int | None, eps: float,
                         rescale_output_factor: float) -> Stage:
    """diffusers' spatial self-attention layer of the 2-D UNets (``_from_deprecated_attn_block``)."""

    def build(index: int, channels: int) -> Attention:
        dim = channels if head_dim is None else head_dim
        if not isinstance(dim, int) or not 0 < dim <= channels:
            raise ValueError(f"attention_head_dim must be an int in [1, {channels}] for {channels} channels; "
                             f"got {dim!r}")
        if norm_groups is not None:
            check_groups(channels, norm_groups, "attention group_norm")
        return Attention(channels, heads=channels // dim, dim_head=dim, rescale_output_factor=rescale_output_factor,
                         eps=eps, norm_num_groups=norm_groups, residual_connection=True, bias=True,
                         upcast_softmax=True, _from_deprecated_attn_block=True)

    return Stage("attentions", build, run_self_attention)


def _already_built(index: int, channels: int) -> None:
    raise RuntimeError("a block's stages are built once, in its constructor")


# -- resnets ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResnetFactory:
    """The ``ResnetBlock2D`` settings a block shares; :meth:`__call__` builds one resnet.

    ``groups=None`` derives each GroupNorm's groups from its own channels (:func:`auto_groups`).
    """

    out_channels: int
    temb_channels: int | None
    eps: float = 1e-6
    groups: int | None = 32
    dropout: float = 0.0
    time_embedding_norm: str = "default"
    act_fn: str = "swish"
    output_scale_factor: float = 1.0
    pre_norm: bool = True
    skip_time_act: bool = False

    def __call__(self, in_channels: int, *, groups: int | None = None, groups_out: int | None = None,
                 **extra) -> ResnetBlock2D:
        own = self.groups
        return ResnetBlock2D(
            in_channels=in_channels, out_channels=self.out_channels, temb_channels=self.temb_channels,
            eps=self.eps, groups=groups or own or auto_groups(in_channels),
            groups_out=groups_out or own or auto_groups(self.out_channels), dropout=self.dropout,
            time_embedding_norm=self.time_embedding_norm, non_linearity=self.act_fn,
            output_scale_factor=self.output_scale_factor, pre_norm=self.pre_norm,
            skip_time_act=self.skip_time_act, **extra)


# -- blocks ---------------------------------------------------------------------------------------------


class Block(nn.Module):
    """What the three block shapes share: stage construction and the per-layer stage loop."""

    def _build_stages(self, resnets: list[nn.Module], stages: Sequence[Stage], count: int, channels: int,
                      register_order: Sequence[str] | None) -> None:
        for stage in stages:
            if not isinstance(stage, Stage):
                raise TypeError(f"stages must be Stage objects; got {type(stage).__name__}")
        # keep what forward needs; the builders (closures) are dropped so that models pickle
        self._stages = tuple(replace(stage, build=_already_built) for stage in stages)
        built = {"resnets": nn.ModuleList(resnets)}
        for stage in stages:
            n = len(resnets) if stage.per_resnet else count
            built[stage.name] = nn.ModuleList(stage.build(i, channels) for i in range(n))
        order = list(register_order) if register_order is not None else [*built][1:] + ["resnets"]
        if sorted(order) != sorted(built):
            raise ValueError(f"register_order must name each stage once: {sorted(built)}; got {order}")
        for name in order:
            setattr(self, name, built[name])
        self.gradient_checkpointing = False

    @property
    def has_cross_attention(self) -> bool:
        return any(s.cross_attention for s in self._stages)

    def _run(self, name: str, run: StageRunner, index: int, hidden_states: torch.Tensor,
             context: BlockContext) -> torch.Tensor:
        module = getattr(self, name)[index]
        if module is None:
            return hidden_states
        return maybe_checkpoint(self.gradient_checkpointing and run is run_resnet, run, module, hidden_states,
                                context)

    def _layer(self, index: int, hidden_states: torch.Tensor, context: BlockContext, *,
               resnet_index: int | None = None, with_resnet: bool = True, with_others: bool = True) -> torch.Tensor:
        """Layer ``index``: its resnet and per-resnet stages (at ``resnet_index``, default ``index``), then
        the other stages."""
        r = index if resnet_index is None else resnet_index
        if with_resnet:
            hidden_states = self._run("resnets", run_resnet, r, hidden_states, context)
            for stage in self._stages:
                if stage.per_resnet:
                    hidden_states = self._run(stage.name, stage.run, r, hidden_states, context)
        if with_others:
            for stage in self._stages:
                if not stage.per_resnet:
                    hidden_states = self._run(stage.name, stage.run, index, hidden_states, context)
        return hidden_states


class DownBlock(Block):
    """``num_layers`` layers (resnet, then the other stages), then a 2x downsampler.

    ``downsample_type``: ``"conv"`` (stride-2 conv, ``downsamplers.0.conv``), ``"resnet"`` (a
    ``ResnetBlock2D(down=True)`` at ``downsamplers.0``) or ``None``; ``add_downsample=False`` also turns
    it off. ``skip=True`` builds the NCSN++ variant: the block also carries a 3-channel skip image,
    FIR-downsampled and added through ``skip_conv`` after ``resnet_down``.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, dropout: float = 0.0,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default",
                 resnet_act_fn: str = "swish", resnet_groups: int | None = 32, resnet_pre_norm: bool = True,
                 output_scale_factor: float = 1.0, add_downsample: bool = True, downsample_padding: int = 1,
                 downsample_type: str | None = "conv", skip_time_act: bool = False,
                 stages: Sequence[Stage] = (), register_order: Sequence[str] | None = None, skip: bool = False):
        super().__init__()
        if downsample_type not in (None, "conv", "resnet"):
            raise ValueError(f"downsample_type must be 'conv', 'resnet' or None; got {downsample_type!r}")
        self.skip = skip
        self.downsample_type = downsample_type if add_downsample and not skip else None
        resnet = ResnetFactory(out_channels, temb_channels, resnet_eps, resnet_groups, dropout,
                               resnet_time_scale_shift, resnet_act_fn, output_scale_factor, resnet_pre_norm,
                               skip_time_act)
        self._build_stages([resnet(in_channels if i == 0 else out_channels) for i in range(num_layers)],
                           stages, num_layers, out_channels, register_order)

        self.downsamplers = None
        if skip:
            self.resnet_down = self.skip_conv = None
            if add_downsample:
                self.resnet_down = resnet(out_channels, use_in_shortcut=True, down=True, kernel="fir")
                self.downsamplers = nn.ModuleList([FirDownsample2D(out_channels, out_channels=out_channels)])
                self.skip_conv = nn.Conv2d(SKIP_CHANNELS, out_channels, kernel_size=(1, 1), stride=(1, 1))
        elif self.downsample_type == "conv":
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, use_conv=True, out_channels=out_channels,
                                                            padding=downsample_padding, name="op")])
        elif self.downsample_type == "resnet":
            self.downsamplers = nn.ModuleList([resnet(out_channels, down=True)])

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, *,
                context: BlockContext | None = None, skip_sample: torch.Tensor | None = None,
                additional_residuals: torch.Tensor | None = None, **context_fields):
        """hidden_states ``(B, in_channels, H, W)`` -> ``(hidden_states, res_hidden_states[, skip_sample])``.

        ``additional_residuals`` (T2I-Adapter) is added after the last layer, before it is recorded
        as a skip connection and before downsampling. ``skip_sample`` ``(B, 3, H, W)``: skip blocks.
        ``context_fields``: :class:`BlockContext` fields, for a call without a ``context``.
        """
        context = BlockContext.of(context, temb, **context_fields)
        output_states = ()
        last = len(self.resnets) - 1
        for i in range(len(self.resnets)):
            hidden_states = self._layer(i, hidden_states, context)
            if i == last and additional_residuals is not None:
                hidden_states = hidden_states + additional_residuals
            output_states += (hidden_states,)

        if self.skip:
            if self.resnet_down is not None:
                if skip_sample is None:
                    raise ValueError(f"{type(self).__name__} downsamples a skip image: pass skip_sample "
                                     f"(B, {SKIP_CHANNELS}, H, W); got None")
                hidden_states = self.resnet_down(hidden_states, context.temb)
                skip_sample = self.downsamplers[0](skip_sample)
                hidden_states = self.skip_conv(skip_sample) + hidden_states
                output_states += (hidden_states,)
            return hidden_states, output_states, skip_sample

        if self.downsamplers is not None:
            for downsampler in self.downsamplers:
                if self.downsample_type == "resnet":
                    hidden_states = downsampler(hidden_states, context.temb)
                else:
                    hidden_states = downsampler(hidden_states)
            output_states += (hidden_states,)
        return hidden_states, output_states


InputGroups = Callable[[int, int], int]


class UpBlock(Block):
    """``num_layers`` layers, each fed ``cat([hidden, popped skip connection])`` (resnet, then the other
    stages), then a 2x upsampler.

    ``upsample_type``: ``"conv"`` (nearest 2x + conv, ``upsamplers.0.conv``), ``"resnet"``
    (``ResnetBlock2D(up=True)`` at ``upsamplers.0``) or ``None``; ``add_upsample=False`` also turns it
    off. ``attention_per_layer=False`` gives the non-resnet stages one module, run after the last
    layer. ``skip=True`` builds the NCSN++ variant: the incoming 3-channel skip image is FIR-upsampled
    (``upsampler``), ``skip_conv(silu(skip_norm(h)))`` is added to it, and ``resnet_up`` upsamples.
    ``input_groups(resnet_in, skip)`` overrides the GroupNorm groups over a concatenated input.
    """

    #: diffusers applies FreeU in its plain and cross-attention up blocks only (presets set this)
    supports_freeu = False

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int | None,
                 resolution_idx: int | None = None, dropout: float = 0.0, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int | None = 32, resnet_pre_norm: bool = True, output_scale_factor: float = 1.0,
                 add_upsample: bool = True, upsample_type: str | None = "conv", skip_time_act: bool = False,
                 stages: Sequence[Stage] = (), register_order: Sequence[str] | None = None,
                 attention_per_layer: bool = True, skip: bool = False, input_groups: InputGroups | None = None):
        super().__init__()
        if upsample_type not in (None, "conv", "resnet"):
            raise ValueError(f"upsample_type must be 'conv', 'resnet' or None; got {upsample_type!r}")
        self.skip = skip
        self.upsample_type = upsample_type if add_upsample and not skip else None
        self.resolution_idx = resolution_idx
        self.attention_per_layer = attention_per_layer
        self._freeu: FreeUFn | None = None
        resnet = ResnetFactory(out_channels, temb_channels, resnet_eps, resnet_groups, dropout,
                               resnet_time_scale_shift, resnet_act_fn, output_scale_factor, resnet_pre_norm,
                               skip_time_act)
        resnets = []
        for i in range(num_layers):
            res_skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in_channels = prev_output_channel if i == 0 else out_channels
            groups = input_groups(resnet_in_channels, res_skip_channels) if input_groups else None
            resnets.append(resnet(resnet_in_channels + res_skip_channels, groups=groups))
        self._build_stages(resnets, stages, num_layers if attention_per_layer else 1, out_channels, register_order)

        self.upsamplers = None
        if skip:
            auto_out = auto_groups(out_channels)
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
            self.upsamplers = nn.ModuleList([resnet(out_channels, up=True)])

    def set_freeu(self, fn: FreeUFn | None) -> None:
        """Apply ``fn(hidden_states, res_hidden_states) -> (hidden_states, res_hidden_states)`` before
        each concatenation (FreeU); ``None`` switches it off."""
        if fn is not None and not callable(fn):
            raise TypeError(f"set_freeu expects a callable or None; got {type(fn).__name__}")
        self._freeu = fn

    @property
    def freeu(self) -> FreeUFn | None:
        return self._freeu

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: Sequence[torch.Tensor],
                temb: torch.Tensor | None = None, upsample_size: Sequence[int] | None = None, *,
                context: BlockContext | None = None, skip_sample: torch.Tensor | None = None, **context_fields):
        """hidden_states ``(B, prev_output_channel, H, W)``; the last ``len(resnets)`` entries of
        ``res_hidden_states_tuple`` are consumed from the end -> ``hidden_states`` (``(hidden_states,
        skip_sample)`` for skip blocks)."""
        if len(res_hidden_states_tuple) < len(self.resnets):
            raise ValueError(f"{type(self).__name__} needs {len(self.resnets)} skip connections; "
                             f"got {len(res_hidden_states_tuple)}")
        context = BlockContext.of(context, temb, **context_fields)
        for i in range(len(self.resnets)):
            res_hidden_states = res_hidden_states_tuple[-1 - i]
            if self._freeu is not None:
                hidden_states, res_hidden_states = self._freeu(hidden_states, res_hidden_states)
            hidden_states = torch.cat([hidden_states, res_hidden_states], dim=1)
            hidden_states = self._layer(i, hidden_states, context, with_others=self.attention_per_layer)
        if not self.attention_per_layer:
            hidden_states = self._layer(0, hidden_states, context, with_resnet=False)

        if self.skip:
            if skip_sample is not None:
                skip_sample = self.upsampler(skip_sample)
            if self.resnet_up is not None:
                skip_states = self.skip_conv(norm_act(self.skip_norm, hidden_states, "silu"))
                skip_sample = skip_states if skip_sample is None else skip_sample + skip_states
                hidden_states = self.resnet_up(hidden_states, context.temb)
            return hidden_states, skip_sample

        if self.upsamplers is not None:
            for upsampler in self.upsamplers:
                if self.upsample_type == "resnet":
                    hidden_states = upsampler(hidden_states, context.temb)
                else:
                    hidden_states = upsampler(hidden_states, upsample_size)
        return hidden_states


class MidBlock(Block):
    """``resnets[0]``, then ``num_layers`` x (the attention-like stages, the next resnet), at the lowest
    resolution; per-resnet stages (``temp_convs``) follow each resnet. ``out_channels`` /
    ``resnet_groups_out`` let the first resnet change the width."""

    def __init__(self, in_channels: int, temb_channels: int | None, dropout: float = 0.0, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int | None = 32, resnet_pre_norm: bool = True, output_scale_factor: float = 1.0,
                 *, out_channels: int | None = None, resnet_groups_out: int | None = None,
                 skip_time_act: bool = False, stages: Sequence[Stage] = (),
                 register_order: Sequence[str] | None = None):
        super().__init__()
        out_channels = out_channels or in_channels
        resnet_groups = resnet_groups if resnet_groups is not None else auto_groups(in_channels)
        resnet_groups_out = resnet_groups_out or resnet_groups
        resnet = ResnetFactory(out_channels, temb_channels, resnet_eps, resnet_groups, dropout,
                               resnet_time_scale_shift, resnet_act_fn, output_scale_factor, resnet_pre_norm,
                               skip_time_act)
        resnets = [resnet(in_channels, groups_out=resnet_groups_out)]
        resnets += [resnet(out_channels, groups=resnet_groups_out, groups_out=resnet_groups_out)
                    for _ in range(num_layers)]
        self._build_stages(resnets, stages, num_layers, out_channels, register_order)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, *,
                context: BlockContext | None = None, **context_fields) -> torch.Tensor:
        """``(B, in_channels, H, W) -> (B, out_channels, H, W)``."""
        context = BlockContext.of(context, temb, **context_fields)
        hidden_states = self._layer(0, hidden_states, context, with_others=False)
        for i in range(len(self.resnets) - 1):
            hidden_states = self._layer(i, hidden_states, context, with_resnet=False)
            hidden_states = self._layer(i, hidden_states, context, resnet_index=i + 1, with_others=False)
        return hidden_states


# -- registries -----------------------------------------------------------------------------------------

BlockBuilder = Callable[..., nn.Module]


def keyword_builder(cls: type, keys: Sequence[str], renames: Mapping[str, str] | None = None,
                    defaults: Mapping[str, Any] | None = None, **fixed) -> BlockBuilder:
    """A builder passing the ``keys`` of diffusers' ``get_*_block`` arguments (renamed by ``renames``;
    ``defaults`` where the caller gives none, as diffusers' ``get_*_block`` defaults differ from the
    block classes' own) and ``fixed`` to ``cls``."""
    renames = dict(renames or {})
    defaults = dict(defaults or {})

    def build(**kw) -> nn.Module:
        kw = {**defaults, **kw}
        return cls(**{renames.get(k, k): kw[k] for k in keys if k in kw}, **fixed)

    return build


class BlockRegistry:
    """diffusers' block-type strings of one model family, mapped to builders taking ``get_*_block``'s
    keyword arguments. Built explicitly from dicts; nothing registers into it at import time.

    ``aliases`` maps old prefixes to strip (diffusers accepts ``"UNetRes" + name``); ``unsupported``
    names diffusers types fastunet does not implement (``NotImplementedError`` instead of "unknown").
    """

    def __init__(self, family: str, down: Mapping[str, BlockBuilder], up: Mapping[str, BlockBuilder],
                 mid: Mapping[str, BlockBuilder] | None = None, *, strip_prefix: str | None = None,
                 unsupported: Sequence[str] = ()):
        self.family = family
        self.down_blocks = dict(down)
        self.up_blocks = dict(up)
        self.mid_blocks = dict(mid or {})
        self._prefix = strip_prefix
        self._unsupported = frozenset(unsupported)

    def _lookup(self, table: dict[str, BlockBuilder], name, what: str) -> BlockBuilder:
        if not isinstance(name, str):
            raise TypeError(f"{what} type must be a str; got {type(name).__name__}")
        key = name[len(self._prefix):] if self._prefix and name.startswith(self._prefix) else name
        if key in self._unsupported:
            raise NotImplementedError(f"block type {name!r} is not supported by fastunet")
        if key not in table:
            raise ValueError(f"unknown {what} type {name!r} for {self.family}; expected one of {sorted(table)}")
        return table[key]

    def down(self, block_type: str, **kwargs) -> nn.Module:
        return self._lookup(self.down_blocks, block_type, "down block")(**kwargs)

    def up(self, block_type: str, **kwargs) -> nn.Module:
        return self._lookup(self.up_blocks, block_type, "up block")(**kwargs)

    def mid(self, block_type: str | None, **kwargs) -> nn.Module | None:
        if block_type is None:
            return None
        return self._lookup(self.mid_blocks, block_type, "mid block")(**kwargs)


__all__ = [
    "SKIP_CHANNELS",
    "Block",
    "BlockContext",
    "BlockRegistry",
    "DownBlock",
    "MidBlock",
    "ResnetFactory",
    "Stage",
    "UpBlock",
    "keyword_builder",
    "run_motion_module",
    "run_resnet",
    "run_self_attention",
    "run_temporal_conv",
    "run_temporal_transformer",
    "run_transformer",
    "self_attention_stage",
]
