"""The blocks of ``UNet1DModel``, under diffusers' block-type names and state-dict keys.

Sequences are ``(batch, channels, length)`` throughout. Two families of blocks:

* audio (Dance Diffusion): ``ResConvBlock`` (conv5 -> GroupNorm(1)+GELU -> conv5 -> GroupNorm(1)+GELU, plus
  a skip), ``SelfAttention1d`` and the fixed-FIR resamplers ``Downsample1d``/``Upsample1d``, assembled into
  ``DownBlock1DNoSkip``, ``DownBlock1D``, ``AttnDownBlock1D``, ``UNetMidBlock1D``, ``AttnUpBlock1D``,
  ``UpBlock1D`` and ``UpBlock1DNoSkip``;
* planning (Janner et al.'s Diffuser): ``ResidualTemporalBlock1D`` (two ``Conv1dBlock``: conv ->
  GroupNorm(8)+Mish) with strided-conv resampling ``Downsample1D``/``Upsample1D``, assembled into
  ``DownResnetBlock1D``, ``UpResnetBlock1D``, ``MidResTemporalBlock1D``, ``ValueFunctionMidBlock1D`` and
  the heads ``OutConv1DBlock``/``OutValueFunctionBlock``.

Every GroupNorm (+ activation) runs through ``fastunet.kernels.group_norm_act``; the self-attention
through an attention processor (by default ``TritonAttnProcessor``, on ``fastunet.kernels.attention``).
The block-type strings of ``UNet1DModel``'s config map to constructors in ``DOWN_BLOCKS``,
``MID_BLOCKS``, ``UP_BLOCKS`` and ``OUT_BLOCKS``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.activations import get_activation
from ..layers.attention_processor import Attention, AttentionProcessor, TritonAttnProcessor
from ..layers.normalization import norm_act


def _check_channels(module: nn.Module, x: torch.Tensor, expected: int) -> None:
    if x.dim() != 3 or x.shape[1] != expected:
        raise ValueError(f"{type(module).__name__} expects (batch, {expected}, length) input; "
                         f"got shape {tuple(x.shape)}")


# --------------------------------------------------------------------------------------------------
# Fixed-kernel resampling (audio blocks)
# --------------------------------------------------------------------------------------------------

_RESAMPLE_KERNELS = {
    "linear": [1 / 8, 3 / 8, 3 / 8, 1 / 8],
    "cubic": [-0.01171875, -0.03515625, 0.11328125, 0.43359375,
              0.43359375, 0.11328125, -0.03515625, -0.01171875],
    "lanczos3": [0.003689131001010537, 0.015056144446134567, -0.03399861603975296, -0.066637322306633,
                 0.13550527393817902, 0.44638532400131226, 0.44638532400131226, 0.13550527393817902,
                 -0.066637322306633, -0.03399861603975296, 0.015056144446134567, 0.003689131001010537],
}


class _FixedResample1d(nn.Module):
    """Shared set-up of ``Downsample1d``/``Upsample1d``: the FIR taps as the persistent buffer ``kernel``
    (diffusers checkpoints carry it), and the padding."""

    def __init__(self, kernel: str, pad_mode: str, gain: float):
        super().__init__()
        if kernel not in _RESAMPLE_KERNELS:
            raise ValueError(f"kernel must be one of {sorted(_RESAMPLE_KERNELS)}; got {kernel!r}")
        self.pad_mode = pad_mode
        taps = torch.tensor(_RESAMPLE_KERNELS[kernel]) * gain
        self.pad = taps.numel() // 2 - 1
        self.register_buffer("kernel", taps)

    def _pad(self, x: torch.Tensor, amount: int) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"{type(self).__name__} expects (batch, channels, length); got shape {tuple(x.shape)}")
        if self.pad_mode == "reflect" and x.shape[2] <= amount:
            raise ValueError(f"{type(self).__name__} pads {amount} samples by reflection, so the sequence must be "
                             f"longer than {amount}; got length {x.shape[2]} (use a longer sample)")
        return F.pad(x, (amount, amount), self.pad_mode)

    def _depthwise_weight(self, x: torch.Tensor) -> torch.Tensor:
        # the same taps for every channel: a grouped convolution instead of diffusers' dense (C, C, K) diagonal
        return self.kernel.to(x).expand(x.shape[1], 1, -1).contiguous()


class Downsample1d(_FixedResample1d):
    """Low-pass filter and decimate by 2: ``(B, C, L) -> (B, C, L // 2)``.

    ``kernel`` picks the FIR taps (``"linear"``, ``"cubic"``, ``"lanczos3"``); the input is padded by
    ``len(taps) // 2 - 1`` samples each side with ``pad_mode``.
    """

    def __init__(self, kernel: str = "linear", pad_mode: str = "reflect"):
        super().__init__(kernel, pad_mode, gain=1.0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self._pad(hidden_states, self.pad)
        return F.conv1d(x, self._depthwise_weight(x), stride=2, groups=x.shape[1])


class Upsample1d(_FixedResample1d):
    """Zero-stuff by 2 and low-pass filter (taps scaled by 2): ``(B, C, L) -> (B, C, 2 L)``."""

    def __init__(self, kernel: str = "linear", pad_mode: str = "reflect"):
        super().__init__(kernel, pad_mode, gain=2.0)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        x = self._pad(hidden_states, (self.pad + 1) // 2)
        return F.conv_transpose1d(x, self._depthwise_weight(x), stride=2, padding=2 * self.pad + 1,
                                  groups=x.shape[1])


# --------------------------------------------------------------------------------------------------
# Audio building blocks
# --------------------------------------------------------------------------------------------------

class ResConvBlock(nn.Module):
    """``conv_1 -> GroupNorm(1)+GELU -> conv_2 -> GroupNorm(1)+GELU`` plus a (1x1-projected) skip.

    ``is_last`` drops the second norm and GELU. ``(B, in_channels, L) -> (B, out_channels, L)``.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, is_last: bool = False):
        super().__init__()
        self.is_last = is_last
        self.has_conv_skip = in_channels != out_channels
        self.conv_skip = nn.Conv1d(in_channels, out_channels, 1, bias=False) if self.has_conv_skip else None
        self.conv_1 = nn.Conv1d(in_channels, mid_channels, 5, padding=2)
        self.group_norm_1 = nn.GroupNorm(1, mid_channels)
        self.conv_2 = nn.Conv1d(mid_channels, out_channels, 5, padding=2)
        self.group_norm_2 = None if is_last else nn.GroupNorm(1, out_channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = self.conv_skip(hidden_states) if self.has_conv_skip else hidden_states
        h = norm_act(self.group_norm_1, self.conv_1(hidden_states), "gelu")
        h = self.conv_2(h)
        if self.group_norm_2 is not None:
            h = norm_act(self.group_norm_2, h, "gelu")
        return h + residual


class SelfAttention1d(nn.Module):
    """Multi-head self-attention over the length axis with a GroupNorm(1) in front and a residual.

    ``(B, in_channels, L) -> (B, in_channels, L)``; ``n_head`` heads of ``in_channels // n_head`` channels,
    softmax scale ``head_dim ** -0.5``.

    The attention runs through an attention processor, as in ``fastunet.layers.attention_processor.Attention``
    (default ``TritonAttnProcessor``: ``group_norm_act`` and ``fastunet.kernels.attention``; any processor
    of that module can be set with ``set_processor`` or the model's ``set_attn_processor``). The layer
    keeps diffusers' parameter names (``group_norm``, ``query``, ``key``, ``value``, ``proj_attn``) and
    presents ``Attention``'s interface over them to the processors: ``to_q``/``to_k``/``to_v``/``to_out``
    are read-only aliases, so checkpoints hold each tensor once, under diffusers' key.
    """

    # the parts of Attention's interface that SelfAttention1d does not have, fixed
    spatial_norm = norm_cross = added_kv_proj_dim = None
    residual_connection = True
    rescale_output_factor = 1.0
    upcast_attention = upcast_softmax = False
    is_cross_attention = False
    use_bias = True
    fused_projections = False

    to_q = property(lambda self: self.query)
    to_k = property(lambda self: self.key)
    to_v = property(lambda self: self.value)
    to_out = property(lambda self: (self.proj_attn, self.dropout))

    # Attention's processor API and the helpers processors call, which only read the attributes above
    set_processor = Attention.set_processor
    get_processor = Attention.get_processor
    set_attention_slice = Attention.set_attention_slice
    head_to_batch_dim = Attention.head_to_batch_dim
    batch_to_head_dim = Attention.batch_to_head_dim
    get_attention_scores = Attention.get_attention_scores
    prepare_attention_mask = Attention.prepare_attention_mask
    fuse_projections = Attention.fuse_projections
    unfuse_projections = Attention.unfuse_projections

    def __init__(self, in_channels: int, n_head: int = 1, dropout_rate: float = 0.0,
                 processor: AttentionProcessor | None = None):
        super().__init__()
        if n_head < 1 or in_channels % n_head:
            raise ValueError(f"SelfAttention1d needs n_head >= 1 dividing in_channels={in_channels}; "
                             f"got n_head={n_head} (the audio blocks use channels // 32 heads, so their "
                             "attention needs at least 32 channels)")
        self.channels = in_channels
        self.num_heads = self.heads = self.sliceable_head_dim = n_head
        self.scale = (in_channels // n_head) ** -0.5
        self.group_norm = nn.GroupNorm(1, in_channels)
        self.query = nn.Linear(in_channels, in_channels)
        self.key = nn.Linear(in_channels, in_channels)
        self.value = nn.Linear(in_channels, in_channels)
        self.proj_attn = nn.Linear(in_channels, in_channels)
        self.dropout = nn.Dropout(dropout_rate)
        self.set_processor(processor if processor is not None else TritonAttnProcessor())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        _check_channels(self, hidden_states, self.channels)
        # processors take (B, tokens, C) and apply the group norm over C themselves
        return self.processor(self, hidden_states.transpose(1, 2)).transpose(1, 2)


class _ResConvStack(nn.Module):
    """``num_layers`` ResConvBlocks ``in -> mid -> ... -> mid -> out``, each optionally followed by a
    SelfAttention1d with ``channels // 32`` heads (attributes ``resnets`` and ``attentions``)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, num_layers: int = 3,
                 add_attention: bool = False, last_is_plain: bool = False):
        super().__init__()
        ins = [in_channels] + [mid_channels] * (num_layers - 1)
        outs = [mid_channels] * (num_layers - 1) + [out_channels]
        self.resnets = nn.ModuleList(
            ResConvBlock(i, mid_channels, o, is_last=last_is_plain and n == num_layers - 1)
            for n, (i, o) in enumerate(zip(ins, outs)))
        self.attentions = nn.ModuleList(SelfAttention1d(o, o // 32) for o in outs) if add_attention else None

    def _run_stack(self, h: torch.Tensor) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            h = resnet(h)
            if self.attentions is not None:
                h = self.attentions[i](h)
        return h


def _temb_over_length(temb: torch.Tensor | None, like: torch.Tensor, owner: nn.Module) -> torch.Tensor:
    """A ``(B, T)`` or ``(B|1, T, L|1)`` time embedding broadcast to ``(B, T, L)`` of ``like``."""
    if temb is None:
        raise ValueError(f"{type(owner).__name__} concatenates the time embedding to its input; temb is required")
    if temb.dim() == 2:
        temb = temb[:, :, None]
    if temb.dim() != 3:
        raise ValueError(f"temb must be (batch, channels) or (batch, channels, length); got shape {tuple(temb.shape)}")
    return temb.to(like.dtype).expand(like.shape[0], -1, like.shape[2])


class _AudioDownBlock(_ResConvStack):
    """[Downsample1d("cubic")] [-> concat time embedding] -> 3 ResConvBlocks [with attention].

    ``forward(hidden_states, temb) -> (output, (output,))``; the output is also the skip connection.
    """

    def __init__(self, out_channels: int, in_channels: int, mid_channels: int | None, *,
                 add_downsample: bool, add_attention: bool, concat_temb: bool):
        mid_channels = out_channels if mid_channels is None else mid_channels
        super().__init__(in_channels, mid_channels, out_channels, add_attention=add_attention)
        self.down = Downsample1d("cubic") if add_downsample else None
        self.concat_temb = concat_temb

    @property
    def halvings(self) -> int:
        return int(self.down is not None)

    def output_lengths(self, length: int) -> tuple[int, int]:
        """``(output length, skip length)`` for an input of ``length``: the FIR decimation floors."""
        out = length if self.down is None else length // 2
        return out, out

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None):
        h = hidden_states if self.down is None else self.down(hidden_states)
        if self.concat_temb:
            h = torch.cat([h, _temb_over_length(temb, h, self)], dim=1)
        h = self._run_stack(h)
        return h, (h,)


class DownBlock1DNoSkip(_AudioDownBlock):
    """Concatenates the time embedding to the input, then 3 ResConvBlocks; no resampling."""

    def __init__(self, out_channels: int, in_channels: int, mid_channels: int | None = None):
        super().__init__(out_channels, in_channels, mid_channels,
                         add_downsample=False, add_attention=False, concat_temb=True)


class DownBlock1D(_AudioDownBlock):
    """Cubic downsampling, then 3 ResConvBlocks."""

    def __init__(self, out_channels: int, in_channels: int, mid_channels: int | None = None):
        super().__init__(out_channels, in_channels, mid_channels,
                         add_downsample=True, add_attention=False, concat_temb=False)


class AttnDownBlock1D(_AudioDownBlock):
    """Cubic downsampling, then 3 ResConvBlock + SelfAttention1d pairs."""

    def __init__(self, out_channels: int, in_channels: int, mid_channels: int | None = None):
        super().__init__(out_channels, in_channels, mid_channels,
                         add_downsample=True, add_attention=True, concat_temb=False)


class UNetMidBlock1D(_ResConvStack):
    """Cubic downsampling, 6 ResConvBlock + SelfAttention1d pairs, cubic upsampling (length unchanged)."""

    halvings = 1  # the length must be even to come back unchanged

    @staticmethod
    def output_length(length: int) -> int:
        return 2 * (length // 2)

    def __init__(self, mid_channels: int, in_channels: int, out_channels: int | None = None):
        out_channels = in_channels if out_channels is None else out_channels
        super().__init__(in_channels, mid_channels, out_channels, num_layers=6, add_attention=True)
        self.down = Downsample1d("cubic")
        self.up = Upsample1d("cubic")

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.up(self._run_stack(self.down(hidden_states)))


class _AudioUpBlock(_ResConvStack):
    """Concat the skip -> 3 ResConvBlocks [with attention] [-> Upsample1d("cubic")]."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int, *,
                 add_upsample: bool, add_attention: bool, last_is_plain: bool = False):
        super().__init__(2 * in_channels, mid_channels, out_channels, add_attention=add_attention,
                         last_is_plain=last_is_plain)
        self.up = Upsample1d("cubic") if add_upsample else None

    def output_length(self, length: int) -> int:
        return length if self.up is None else 2 * length

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self._run_stack(torch.cat([hidden_states, res_hidden_states_tuple[-1]], dim=1))
        return h if self.up is None else self.up(h)


class AttnUpBlock1D(_AudioUpBlock):
    """3 ResConvBlock + SelfAttention1d pairs on ``[input, skip]``, then cubic upsampling."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None):
        mid_channels = out_channels if mid_channels is None else mid_channels
        super().__init__(in_channels, out_channels, mid_channels, add_upsample=True, add_attention=True)


class UpBlock1D(_AudioUpBlock):
    """3 ResConvBlocks on ``[input, skip]``, then cubic upsampling."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None):
        mid_channels = in_channels if mid_channels is None else mid_channels
        super().__init__(in_channels, out_channels, mid_channels, add_upsample=True, add_attention=False)


class UpBlock1DNoSkip(_AudioUpBlock):
    """3 ResConvBlocks on ``[input, skip]``, the last without norm/GELU (it produces the output)."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None):
        mid_channels = in_channels if mid_channels is None else mid_channels
        super().__init__(in_channels, out_channels, mid_channels, add_upsample=False, add_attention=False,
                         last_is_plain=True)


# --------------------------------------------------------------------------------------------------
# Planning building blocks
# --------------------------------------------------------------------------------------------------

class Downsample1D(nn.Module):
    """Halve the length: strided 3-tap conv (``use_conv``, ``(L + 2 padding - 3) // 2 + 1`` outputs) or
    average pooling. The layer is the attribute ``conv`` either way, as in diffusers."""

    def __init__(self, channels: int, use_conv: bool = False, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv1d(channels, self.out_channels, 3, stride=2, padding=padding)
        elif self.out_channels != channels:
            raise ValueError(f"Downsample1D without a conv keeps the channels: out_channels must be {channels}; "
                             f"got {self.out_channels}")
        else:
            self.conv = nn.AvgPool1d(kernel_size=2, stride=2)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        _check_channels(self, inputs, self.channels)
        return self.conv(inputs)


class Upsample1D(nn.Module):
    """Double the length: a stride-2 transposed conv (``use_conv_transpose``), or nearest-neighbour
    repetition followed by an optional 3-tap conv (``use_conv``)."""

    def __init__(self, channels: int, use_conv: bool = False, use_conv_transpose: bool = False,
                 out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_conv_transpose = use_conv_transpose
        if use_conv_transpose:
            self.conv = nn.ConvTranspose1d(channels, self.out_channels, 4, 2, 1)
        elif use_conv:
            self.conv = nn.Conv1d(channels, self.out_channels, 3, padding=1)
        else:
            self.conv = None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        _check_channels(self, inputs, self.channels)
        if self.use_conv_transpose:
            return self.conv(inputs)
        out = F.interpolate(inputs, scale_factor=2.0, mode="nearest")
        return out if self.conv is None else self.conv(out)


class Conv1dBlock(nn.Module):
    """``conv1d -> GroupNorm(n_groups) + activation`` (one ``group_norm_act``); same length out."""

    def __init__(self, inp_channels: int, out_channels: int, kernel_size: int, n_groups: int = 8,
                 activation: str = "mish"):
        super().__init__()
        self.conv1d = nn.Conv1d(inp_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.group_norm = nn.GroupNorm(n_groups, out_channels)
        get_activation(activation)  # validates the name
        self.act_fn = activation

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return norm_act(self.group_norm, self.conv1d(inputs), self.act_fn)


class ResidualTemporalBlock1D(nn.Module):
    """``conv_out(conv_in(x) + time_emb(act(t))) + residual_conv(x)`` with two Mish ``Conv1dBlock``.

    x ``(B, inp_channels, L)``, t ``(B, embed_dim)`` -> ``(B, out_channels, L)``. ``activation`` is the
    one applied to ``t``; the conv blocks always use Mish, as in diffusers.
    """

    def __init__(self, inp_channels: int, out_channels: int, embed_dim: int, kernel_size: int = 5,
                 activation: str = "mish"):
        super().__init__()
        self.conv_in = Conv1dBlock(inp_channels, out_channels, kernel_size)
        self.conv_out = Conv1dBlock(out_channels, out_channels, kernel_size)
        self.time_emb_act = get_activation(activation)
        self.time_emb = nn.Linear(embed_dim, out_channels)
        self.residual_conv = nn.Conv1d(inp_channels, out_channels, 1) if inp_channels != out_channels else nn.Identity()

    def forward(self, inputs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.dim() != 2:
            raise ValueError("ResidualTemporalBlock1D needs a (batch, embed_dim) time embedding "
                             f"(UNet1DModel with use_timestep_embedding=True); got shape {tuple(t.shape)}")
        t = self.time_emb(self.time_emb_act(t))
        h = self.conv_out(self.conv_in(inputs) + t[:, :, None])
        return h + self.residual_conv(inputs)


class _TemporalResnets(nn.Module):
    """``1 + num_layers`` ResidualTemporalBlock1D (``in -> out -> ... -> out``) as ``resnets``."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, num_layers: int):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResidualTemporalBlock1D(in_channels if i == 0 else out_channels, out_channels, embed_dim=embed_dim)
            for i in range(num_layers + 1))

    def _run_resnets(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            h = resnet(h, temb)
        return h


class DownResnetBlock1D(_TemporalResnets):
    """Residual temporal blocks [-> non_linearity] [-> strided-conv downsampling].

    ``forward(hidden_states, temb) -> (output, (skip,))`` where the skip is taken before the
    non-linearity and the downsampling.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, num_layers: int = 1,
                 temb_channels: int = 32, non_linearity: str | None = None, add_downsample: bool = True):
        out_channels = in_channels if out_channels is None else out_channels
        super().__init__(in_channels, out_channels, temb_channels, num_layers)
        self.nonlinearity = get_activation(non_linearity)
        self.downsample = Downsample1D(out_channels, use_conv=True, padding=1) if add_downsample else None

    @property
    def halvings(self) -> int:
        return int(self.downsample is not None)

    def output_lengths(self, length: int) -> tuple[int, int]:
        """``(output length, skip length)``: the skip is taken before the strided conv, which rounds up."""
        return (length if self.downsample is None else (length + 1) // 2), length

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None):
        skip = h = self._run_resnets(hidden_states, temb)
        if self.nonlinearity is not None:
            h = self.nonlinearity(h)
        if self.downsample is not None:
            h = self.downsample(h)
        return h, (skip,)


class UpResnetBlock1D(_TemporalResnets):
    """Concat the skip -> residual temporal blocks [-> non_linearity] [-> transposed-conv upsampling]."""

    def __init__(self, in_channels: int, out_channels: int | None = None, num_layers: int = 1,
                 temb_channels: int = 32, non_linearity: str | None = None, add_upsample: bool = True):
        out_channels = in_channels if out_channels is None else out_channels
        super().__init__(2 * in_channels, out_channels, temb_channels, num_layers)
        self.nonlinearity = get_activation(non_linearity)
        self.upsample = Upsample1D(out_channels, use_conv_transpose=True) if add_upsample else None

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...] | None = None,
                temb: torch.Tensor | None = None) -> torch.Tensor:
        if res_hidden_states_tuple is not None:
            hidden_states = torch.cat([hidden_states, res_hidden_states_tuple[-1]], dim=1)
        h = self._run_resnets(hidden_states, temb)
        if self.nonlinearity is not None:
            h = self.nonlinearity(h)
        return h if self.upsample is None else self.upsample(h)

    def output_length(self, length: int) -> int:
        return length if self.upsample is None else 2 * length


class MidResTemporalBlock1D(_TemporalResnets):
    """Residual temporal blocks [-> nearest+conv upsampling | strided-conv downsampling].

    ``non_linearity`` is accepted for diffusers' signature; diffusers never applies it here, nor do we.
    """

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, num_layers: int = 1,
                 add_downsample: bool = False, add_upsample: bool = False, non_linearity: str | None = None):
        if add_downsample and add_upsample:
            raise ValueError("MidResTemporalBlock1D cannot both downsample and upsample; "
                             "got add_downsample=True and add_upsample=True")
        super().__init__(in_channels, out_channels, embed_dim, num_layers)
        self.upsample = Upsample1D(out_channels, use_conv=True) if add_upsample else None
        self.downsample = Downsample1D(out_channels, use_conv=True) if add_downsample else None

    @property
    def halvings(self) -> int:
        return int(self.downsample is not None)

    def output_length(self, length: int) -> int:
        if self.upsample is not None:
            length *= 2
        return length if self.downsample is None else (length + 1) // 2

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self._run_resnets(hidden_states, temb)
        if self.upsample is not None:
            h = self.upsample(h)
        if self.downsample is not None:
            h = self.downsample(h)
        return h


class ValueFunctionMidBlock1D(nn.Module):
    """Two (residual temporal block, strided-conv downsampling) stages halving the channels each time:
    ``(B, C, L) -> (B, C // 4, ceil(ceil(L / 2) / 2))``."""

    halvings = 2

    @staticmethod
    def output_length(length: int) -> int:
        return ((length + 1) // 2 + 1) // 2

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.embed_dim = embed_dim
        self.res1 = ResidualTemporalBlock1D(in_channels, in_channels // 2, embed_dim=embed_dim)
        self.down1 = Downsample1D(out_channels // 2, use_conv=True)
        self.res2 = ResidualTemporalBlock1D(in_channels // 2, in_channels // 4, embed_dim=embed_dim)
        self.down2 = Downsample1D(out_channels // 4, use_conv=True)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        x = self.down1(self.res1(x, temb))
        return self.down2(self.res2(x, temb))


class OutConv1DBlock(nn.Module):
    """``final_conv1d_1 (k=5) -> GroupNorm + act_fn -> final_conv1d_2 (1x1)``:
    ``(B, embed_dim, L) -> (B, out_channels, L)``."""

    def __init__(self, num_groups_out: int, out_channels: int, embed_dim: int, act_fn: str):
        super().__init__()
        self.final_conv1d_1 = nn.Conv1d(embed_dim, embed_dim, 5, padding=2)
        self.final_conv1d_gn = nn.GroupNorm(num_groups_out, embed_dim)
        get_activation(act_fn)  # validates the name
        self.act_fn = act_fn
        self.final_conv1d_2 = nn.Conv1d(embed_dim, out_channels, 1)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = norm_act(self.final_conv1d_gn, self.final_conv1d_1(hidden_states), self.act_fn)
        return self.final_conv1d_2(h)


class OutValueFunctionBlock(nn.Module):
    """Value head: flatten ``(B, fc_dim, 1)``, append the ``(B, embed_dim)`` time embedding, then
    ``Linear -> act_fn -> Linear`` to ``(B, 1)`` (``final_block.0`` and ``final_block.2``)."""

    def __init__(self, fc_dim: int, embed_dim: int, act_fn: str = "mish"):
        super().__init__()
        self.fc_dim = fc_dim
        self.final_block = nn.ModuleList([
            nn.Linear(fc_dim + embed_dim, fc_dim // 2),
            nn.Identity() if act_fn is None else get_activation(act_fn),
            nn.Linear(fc_dim // 2, 1),
        ])

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = hidden_states.reshape(hidden_states.shape[0], -1)
        if h.shape[1] != self.fc_dim:
            raise ValueError(f"OutValueFunctionBlock needs (batch, {self.fc_dim}, 1) features (the sequence reduced "
                             f"to length 1); got shape {tuple(hidden_states.shape)}")
        if temb.dim() != 2:
            raise ValueError("OutValueFunctionBlock needs a (batch, embed_dim) time embedding; "
                             f"got shape {tuple(temb.shape)}")
        h = torch.cat([h, temb.expand(h.shape[0], -1)], dim=-1)
        for layer in self.final_block:
            h = layer(h)
        return h


# --------------------------------------------------------------------------------------------------
# Block-type registries (the strings of UNet1DModel's config)
# --------------------------------------------------------------------------------------------------

def _audio_block(cls):
    def build(*, in_channels: int, out_channels: int, **_unused):
        return cls(in_channels=in_channels, out_channels=out_channels)
    return build


#: down block type -> builder(num_layers, in_channels, out_channels, temb_channels, add_downsample)
DOWN_BLOCKS: dict[str, Callable[..., nn.Module]] = {
    "DownResnetBlock1D": lambda *, num_layers, in_channels, out_channels, temb_channels, add_downsample:
        DownResnetBlock1D(in_channels, out_channels, num_layers, temb_channels, add_downsample=add_downsample),
    "DownBlock1D": _audio_block(DownBlock1D),
    "AttnDownBlock1D": _audio_block(AttnDownBlock1D),
    "DownBlock1DNoSkip": _audio_block(DownBlock1DNoSkip),
}

#: up block type -> builder(num_layers, in_channels, out_channels, temb_channels, add_upsample)
UP_BLOCKS: dict[str, Callable[..., nn.Module]] = {
    "UpResnetBlock1D": lambda *, num_layers, in_channels, out_channels, temb_channels, add_upsample:
        UpResnetBlock1D(in_channels, out_channels, num_layers, temb_channels, add_upsample=add_upsample),
    "UpBlock1D": _audio_block(UpBlock1D),
    "AttnUpBlock1D": _audio_block(AttnUpBlock1D),
    "UpBlock1DNoSkip": _audio_block(UpBlock1DNoSkip),
}

#: mid block type -> builder(num_layers, in_channels, mid_channels, out_channels, embed_dim, add_downsample)
MID_BLOCKS: dict[str, Callable[..., nn.Module]] = {
    "MidResTemporalBlock1D": lambda *, num_layers, in_channels, mid_channels, out_channels, embed_dim, add_downsample:
        MidResTemporalBlock1D(in_channels, out_channels, embed_dim, num_layers, add_downsample=add_downsample),
    "ValueFunctionMidBlock1D": lambda *, in_channels, out_channels, embed_dim, **_unused:
        ValueFunctionMidBlock1D(in_channels, out_channels, embed_dim),
    "UNetMidBlock1D": lambda *, in_channels, mid_channels, out_channels, **_unused:
        UNetMidBlock1D(mid_channels, in_channels, out_channels),
}

#: out block type -> builder(num_groups_out, embed_dim, out_channels, act_fn, fc_dim)
OUT_BLOCKS: dict[str, Callable[..., nn.Module]] = {
    "OutConv1DBlock": lambda *, num_groups_out, embed_dim, out_channels, act_fn, fc_dim:
        OutConv1DBlock(num_groups_out, out_channels, embed_dim, act_fn),
    "ValueFunction": lambda *, num_groups_out, embed_dim, out_channels, act_fn, fc_dim:
        OutValueFunctionBlock(fc_dim, embed_dim, act_fn),
}


def _build(registry: dict, kind: str, block_type: str, **kwargs) -> nn.Module:
    if block_type not in registry:
        raise ValueError(f"{kind} block type must be one of {sorted(registry)}; got {block_type!r}")
    return registry[block_type](**kwargs)


def get_down_block(down_block_type: str, num_layers: int, in_channels: int, out_channels: int,
                   temb_channels: int, add_downsample: bool) -> nn.Module:
    return _build(DOWN_BLOCKS, "down", down_block_type, num_layers=num_layers, in_channels=in_channels,
                  out_channels=out_channels, temb_channels=temb_channels, add_downsample=add_downsample)


def get_up_block(up_block_type: str, num_layers: int, in_channels: int, out_channels: int,
                 temb_channels: int, add_upsample: bool) -> nn.Module:
    return _build(UP_BLOCKS, "up", up_block_type, num_layers=num_layers, in_channels=in_channels,
                  out_channels=out_channels, temb_channels=temb_channels, add_upsample=add_upsample)


def get_mid_block(mid_block_type: str, num_layers: int, in_channels: int, mid_channels: int, out_channels: int,
                  embed_dim: int, add_downsample: bool) -> nn.Module:
    return _build(MID_BLOCKS, "mid", mid_block_type, num_layers=num_layers, in_channels=in_channels,
                  mid_channels=mid_channels, out_channels=out_channels, embed_dim=embed_dim,
                  add_downsample=add_downsample)


def get_out_block(*, out_block_type: str | None, num_groups_out: int, embed_dim: int, out_channels: int,
                  act_fn: str | None, fc_dim: int) -> nn.Module | None:
    """The output head, or ``None`` for ``out_block_type=None``."""
    if out_block_type is None:
        return None
    return _build(OUT_BLOCKS, "out", out_block_type, num_groups_out=num_groups_out, embed_dim=embed_dim,
                  out_channels=out_channels, act_fn=act_fn, fc_dim=fc_dim)
