"""2x resampling layers of the 2-D UNets, with diffusers' names and state-dict keys.

* :class:`Downsample2D` -- stride-2 convolution, or 2x2 average pooling without one.
* :class:`Upsample2D`   -- nearest-neighbour 2x (or to ``output_size``) then an optional 3x3 conv,
  or a stride-2 transposed convolution.
* :class:`FirDownsample2D` / :class:`FirUpsample2D` -- resampling through a separable FIR filter
  (NCSN++ / score-SDE), optionally fused with a 3x3 convolution.
* :func:`upfirdn2d` -- zero-insert upsample, pad, FIR filter, subsample: the primitive under both FIR layers.

All layers take and return ``(B, C, H, W)`` tensors.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

_DEFAULT_FIR = (1, 3, 3, 1)


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad, filter with ``kernel`` (true convolution), then subsample.

    x: ``(B, C, H, W)``; kernel: ``(kh, kw)``. ``pad = (before, after)`` applies to both spatial
    axes; negative values crop. Output: ``(B, C, (H*up + before + after - kh) // down + 1, ...)``.
    """
    if x.dim() != 4:
        raise ValueError(f"upfirdn2d expects a (B, C, H, W) tensor; got shape {tuple(x.shape)}")
    if kernel.dim() != 2:
        raise ValueError(f"upfirdn2d expects a 2-D kernel; got shape {tuple(kernel.shape)}")
    batch, channels, height, width = x.shape
    if up > 1:
        # interleave up-1 zeros after every sample along each axis
        x = x.reshape(batch, channels, height, 1, width, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(batch, channels, height * up, width * up)
    before, after = pad
    x = F.pad(x, (before, after, before, after))
    weight = kernel.flip(0, 1).to(dtype=x.dtype, device=x.device)
    weight = weight[None, None].expand(channels, 1, *kernel.shape)
    return F.conv2d(x, weight, stride=down, groups=channels)


def fir_kernel(kernel: Sequence[float] | torch.Tensor | None, factor: int, gain: float = 1.0) -> torch.Tensor:
    """The normalised 2-D FIR filter: outer product of a 1-D ``kernel`` (or a 2-D one as given),
    divided by its sum and multiplied by ``gain`` (default kernel: ``[1] * factor``, box filter)."""
    k = torch.as_tensor([1.0] * factor if kernel is None else kernel, dtype=torch.float32)
    if k.dim() == 1:
        k = torch.outer(k, k)
    return k / k.sum() * gain


def upsample_2d(x: torch.Tensor, kernel=None, factor: int = 2, gain: float = 1.0) -> torch.Tensor:
    """FIR upsampling by an integer ``factor``: ``(B, C, H, W) -> (B, C, H*factor, W*factor)``."""
    _check_factor(factor)
    k = fir_kernel(kernel, factor, gain * factor**2)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: torch.Tensor, kernel=None, factor: int = 2, gain: float = 1.0) -> torch.Tensor:
    """FIR downsampling by an integer ``factor``: ``(B, C, H, W) -> (B, C, H//factor, W//factor)``."""
    _check_factor(factor)
    k = fir_kernel(kernel, factor, gain)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def _check_factor(factor) -> None:
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"factor must be a positive int; got {factor!r}")


def _check_channels(layer: nn.Module, x: torch.Tensor, expected: int) -> None:
    if x.dim() != 4 or x.shape[1] != expected:
        raise ValueError(f"{type(layer).__name__} expects (B, {expected}, H, W) input; got shape {tuple(x.shape)}")


def _channel_norm(norm_type: str | None, channels: int, eps, elementwise_affine) -> nn.Module | None:
    """Optional per-pixel norm over channels (diffusers' ``norm_type`` "ln_norm"/"rms_norm")."""
    if norm_type is None:
        return None
    if norm_type == "ln_norm":
        return nn.LayerNorm(channels, eps, elementwise_affine)
    if norm_type == "rms_norm":
        return nn.RMSNorm(channels, eps, elementwise_affine)
    raise ValueError(f"norm_type must be None, 'ln_norm' or 'rms_norm'; got {norm_type!r}")


def _apply_channel_norm(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    if norm is None:
        return x
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Downsample2D(nn.Module):
    """Halve H and W: a stride-2 ``kernel_size`` conv (``use_conv``) or 2x2 average pooling.

    ``padding=0`` pads one zero row/column at the bottom/right first (the LDM convention).
    The layer lives at ``conv``; with the default ``name="conv"`` it is also registered as
    ``Conv2d_0`` (both keys appear in the state dict, as in diffusers).
    """

    def __init__(self, channels: int, use_conv: bool = False, out_channels: int | None = None, padding: int = 1,
                 name: str = "conv", kernel_size: int = 3, norm_type: str | None = None, eps: float | None = None,
                 elementwise_affine: bool | None = None, bias: bool = True):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.padding = padding
        self.name = name
        self.norm = _channel_norm(norm_type, channels, eps, elementwise_affine)
        if use_conv:
            conv = nn.Conv2d(channels, self.out_channels, kernel_size, stride=2, padding=padding, bias=bias)
        else:
            if self.out_channels != channels:
                raise ValueError(f"Downsample2D without a conv keeps the channel count: out_channels must be "
                                 f"{channels}; got {self.out_channels}")
            conv = nn.AvgPool2d(kernel_size=2, stride=2)
        if name == "conv":
            self.Conv2d_0 = conv
        self.conv = conv

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(B, channels, H, W) -> (B, out_channels, H/2, W/2)``."""
        _check_channels(self, hidden_states, self.channels)
        hidden_states = _apply_channel_norm(self.norm, hidden_states)
        if self.use_conv and self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1))
        return self.conv(hidden_states)


class Upsample2D(nn.Module):
    """Double H and W (or resize to ``output_size``) by nearest-neighbour interpolation, then an
    optional conv; or a stride-2 transposed conv (``use_conv_transpose``, kernel 4 by default).

    The conv is registered as ``conv`` (``name="conv"``) or ``Conv2d_0`` (any other name).
    """

    def __init__(self, channels: int, use_conv: bool = False, use_conv_transpose: bool = False,
                 out_channels: int | None = None, name: str = "conv", kernel_size: int | None = None, padding=1,
                 norm_type: str | None = None, eps: float | None = None, elementwise_affine: bool | None = None,
                 bias: bool = True, interpolate: bool = True):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_conv_transpose = use_conv_transpose
        self.name = name
        self.interpolate = interpolate
        self.norm = _channel_norm(norm_type, channels, eps, elementwise_affine)
        conv = None
        if use_conv_transpose:
            conv = nn.ConvTranspose2d(channels, self.out_channels, kernel_size or 4, stride=2, padding=padding,
                                      bias=bias)
        elif use_conv:
            conv = nn.Conv2d(channels, self.out_channels, kernel_size or 3, padding=padding, bias=bias)
        if name == "conv":
            self.conv = conv
        else:
            self.Conv2d_0 = conv

    def forward(self, hidden_states: torch.Tensor, output_size: Sequence[int] | None = None) -> torch.Tensor:
        """``(B, channels, H, W) -> (B, out_channels, 2H, 2W)`` (or ``output_size``)."""
        _check_channels(self, hidden_states, self.channels)
        hidden_states = _apply_channel_norm(self.norm, hidden_states)
        conv = self.conv if self.name == "conv" else self.Conv2d_0
        if self.use_conv_transpose:
            return conv(hidden_states)
        if self.interpolate and self.use_conv and _fusable_conv(conv, hidden_states):
            size = tuple(output_size) if output_size is not None else tuple(2 * d for d in hidden_states.shape[2:])
            return _NearestUpsampleConv.apply(hidden_states, conv.weight, conv.bias, size, output_size is None,
                                              tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation),
                                              conv.groups)
        if self.interpolate:
            if output_size is None:
                hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
            else:
                hidden_states = F.interpolate(hidden_states, size=tuple(output_size), mode="nearest")
        if self.use_conv:
            hidden_states = conv(hidden_states)
        return hidden_states


def _fusable_conv(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether a convolution may run inside :class:`_NearestUpsampleConv`: a plain zero-padded
    ``nn.Conv2d`` without hooks, in a forward that records gradients, outside autocast."""
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and not (conv._forward_hooks or conv._forward_pre_hooks) and torch.is_grad_enabled()
            and not torch.is_autocast_enabled(x.device.type))


class _NearestUpsampleConv(torch.autograd.Function):
    """``conv(interpolate(x, size, mode="nearest"))`` that saves ``x``, not the upsampled tensor (four
    times larger): backward upsamples again (a copy) before the convolution's gradients, then sums the
    input gradient back through aten's nearest-upsampling backward, as autograd would."""

    @staticmethod
    def forward(ctx, x, weight, bias, size, by_factor, stride, padding, dilation, groups):
        # forward(ctx, ...), not a separate setup_context: apply() then binds no default arguments
        # through inspect.signature, a cost on every call
        ctx.save_for_backward(x, weight)
        ctx.args = (size, by_factor, stride, padding, dilation, groups, bias is not None)
        up = F.interpolate(x, scale_factor=2.0, mode="nearest") if by_factor else F.interpolate(x, size=size,
                                                                                                mode="nearest")
        return torch.convolution(up, weight, bias, stride, padding, dilation, False, [0, 0], groups)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        size, by_factor, stride, padding, dilation, groups, has_bias = ctx.args
        needs = ctx.needs_input_grad
        up = F.interpolate(x, scale_factor=2.0, mode="nearest") if by_factor else F.interpolate(x, size=size,
                                                                                                mode="nearest")
        dup, dweight, dbias = torch.ops.aten.convolution_backward(
            dy, up, weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation, False, [0, 0],
            groups, [needs[0], needs[1], has_bias and needs[2]])
        dx = None
        if needs[0]:
            scales = (2.0, 2.0) if by_factor else (None, None)
            dx = torch.ops.aten.upsample_nearest2d_backward(dup, list(size), list(x.shape), *scales)
        return dx, dweight, dbias, None, None, None, None, None, None


class _FirResample2D(nn.Module):
    """What the FIR resamplers share: the filter taps and, with ``use_conv``, a 3x3 conv at ``Conv2d_0``."""

    def __init__(self, channels: int | None = None, out_channels: int | None = None, use_conv: bool = False,
                 fir_kernel: Sequence[float] = _DEFAULT_FIR):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.Conv2d_0 = nn.Conv2d(channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.fir_kernel = fir_kernel
        self.use_conv = use_conv
        self.out_channels = out_channels


class FirDownsample2D(_FirResample2D):
    """Halve H and W with a FIR filter (default ``(1, 3, 3, 1)``); with ``use_conv`` the filter is
    fused with a stride-2 3x3 conv stored at ``Conv2d_0``."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C or out_channels, H/2, W/2)``."""
        if not self.use_conv:
            return downsample_2d(hidden_states, self.fir_kernel, factor=2)
        weight = self.Conv2d_0.weight
        _check_channels(self, hidden_states, weight.shape[1])
        k = fir_kernel(self.fir_kernel, 2)
        # pad once for filter and conv together, filter at full resolution, then the strided conv
        p = (k.shape[0] - 2) + (weight.shape[-1] - 1)
        filtered = upfirdn2d(hidden_states, k, pad=((p + 1) // 2, p // 2))
        return F.conv2d(filtered, weight, self.Conv2d_0.bias, stride=2)


class FirUpsample2D(_FirResample2D):
    """Double H and W with a FIR filter (default ``(1, 3, 3, 1)``); with ``use_conv`` a 3x3 conv
    stored at ``Conv2d_0`` is applied as a stride-2 transposed conv before the filter."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C or out_channels, 2H, 2W)``."""
        if not self.use_conv:
            return upsample_2d(hidden_states, self.fir_kernel, factor=2)
        weight = self.Conv2d_0.weight
        _check_channels(self, hidden_states, weight.shape[1])
        k = fir_kernel(self.fir_kernel, 2, gain=4.0)
        # the conv, run as the adjoint of a strided conv (flipped kernel, in/out swapped), upsamples
        # by zero insertion; the FIR filter then smooths with the padding that centres the result
        p = (k.shape[0] - 2) - (weight.shape[-1] - 1)
        upsampled = F.conv_transpose2d(hidden_states, weight.flip(2, 3).transpose(0, 1), stride=2)
        out = upfirdn2d(upsampled, k, pad=((p + 1) // 2 + 1, p // 2 + 1))
        return out + self.Conv2d_0.bias.view(1, -1, 1, 1)
