"""GroupNorm + activation for every layer: the one place the modules call ``fastunet.kernels.group_norm_act``.

:func:`norm_act` takes an ``nn.GroupNorm`` (whose parameters and state-dict names stay diffusers') and a
diffusers ``act_fn`` name. Activations the kernel can fuse (silu/swish, gelu, mish) run inside it; any
other (relu) runs after the normalisation. ``out_layout`` picks the memory order of the output, so a
layer can have the normalised tensor written straight in the layout its next op reads (the temporal
transformer's ``(B, H, W, F, C)`` tokens). :func:`auto_groups` is the rule diffusers uses where a block
is built without a group count.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import group_norm_act
from ..kernels._backend import direct_call, use_triton
from ..kernels.group_norm_act import (
    group_norm_act_bwd_call,
    group_norm_act_fwd_call,
    group_norm_act_recompute_torch,
    group_norm_act_reference,
    group_norm_act_recomputed_bwd_torch,
)
from .activations import fused_activation_name

# diffusers activations that group_norm_act cannot fuse, applied after it instead
_UNFUSED = {"relu": F.relu}

# group_norm_act is gaining ``out_layout``; until a version with it is installed, norm_act writes the
# contiguous result once more in the requested order (one extra copy), so callers need not care which.
_KERNEL_HAS_OUT_LAYOUT = "out_layout" in inspect.signature(group_norm_act).parameters


def auto_groups(channels: int) -> int:
    """GroupNorm groups when none are configured: a quarter of the channels, at most 32."""
    return min(channels // 4, 32)


def check_groups(channels: int, groups: int, what: str) -> None:
    """Raise ValueError unless ``groups`` is a positive int dividing ``channels``."""
    if not isinstance(groups, int) or groups < 1 or channels % groups != 0:
        raise ValueError(f"{what}: {channels} channels cannot be split into {groups!r} GroupNorm groups "
                         f"(expected a positive divisor of {channels})")


def norm_act(norm: nn.GroupNorm, x: torch.Tensor, act_fn: str | None = None, add: torch.Tensor | None = None,
             scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
             out_layout: tuple[int, ...] | None = None) -> torch.Tensor:
    """``act(norm(x + add) * (1 + scale) + shift)`` through ``group_norm_act`` with ``norm``'s parameters.

    x: ``(B, C, *spatial)``, any strides; add/scale/shift: ``(B, C)`` or None; ``act_fn``: a diffusers
    name or None. The result is shaped like ``x``; it is contiguous when ``out_layout`` is None, and
    otherwise laid out in memory in the order of the dims ``out_layout`` lists (outermost first), i.e.
    ``y.permute(out_layout)`` is contiguous: ``out_layout=(0, 3, 4, 2, 1)`` on ``(B, C, F, H, W)``
    stores ``(B, H, W, F, C)``.
    """
    return _norm_act(norm, x, act_fn, add, scale, shift, out_layout, out_layout is None and _plain(norm, x))


def _norm_act(norm, x, act_fn, add, scale, shift, out_layout, plain: bool) -> torch.Tensor:
    """:func:`norm_act` with its ``_plain`` decision made by the caller (``norm_act_conv`` has it already)."""
    key = act_fn.lower() if isinstance(act_fn, str) else act_fn
    post = _UNFUSED.get(key)
    fused = None if post is not None else fused_activation_name(act_fn)
    if plain:
        y = group_norm_act_reference(x, norm.num_groups, norm.weight, norm.bias, norm.eps, fused, add=add,
                                     scale=scale, shift=shift)
        return y if post is None else post(y)
    layout = {"out_layout": out_layout} if _KERNEL_HAS_OUT_LAYOUT and out_layout is not None else {}
    y = group_norm_act(x, norm.num_groups, norm.weight, norm.bias, norm.eps, fused, add=add, scale=scale,
                       shift=shift, **layout)
    if out_layout is not None and not _KERNEL_HAS_OUT_LAYOUT:
        y = _relayout(y, out_layout)
    return y if post is None else post(y)  # an elementwise post-activation keeps y's layout


def norm_act_conv(norm: nn.GroupNorm, x: torch.Tensor, conv: nn.Module, act_fn: str | None = None,
                  add: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                  shift: torch.Tensor | None = None, dropout: nn.Module | None = None) -> torch.Tensor:
    """``conv(dropout(norm_act(norm, x, act_fn, add, scale, shift)))``, saving less for backward.

    ``conv`` is an ``nn.Conv1d``/``Conv2d``/``Conv3d``. In a training forward the two run as one autograd
    node that keeps only what the fused GroupNorm keeps (``x`` and the small vectors): the normalised,
    activated tensor the convolution reads is not saved but recomputed in backward (one more
    ``group_norm_act`` forward, an elementwise pass) before the convolution's gradients. Where that
    node does not apply -- no gradient wanted, autocast, an activation the kernel cannot fuse, an
    active dropout, a convolution other than plain zero-padded ``nn.ConvNd`` or one with hooks -- the
    two run as separate ops, with the same result.
    """
    plain = _plain(norm, x)
    if not _fusable_conv(conv, x, dropout) or (act_fn is not None and act_fn.lower() in _UNFUSED) or plain:
        h = _norm_act(norm, x, act_fn, add, scale, shift, None, plain)
        return conv(h if dropout is None else dropout(h))
    activation = fused_activation_name(act_fn) or _NO_ACTIVATION
    return _NormActConv.apply(x, norm.weight, norm.bias, add, scale, shift, conv.weight, conv.bias,
                              norm.num_groups, float(norm.eps), activation, tuple(conv.stride),
                              tuple(conv.padding), tuple(conv.dilation), conv.groups)


# Below this many elements of x, on the torch path (no Triton kernel: CPU tensors) in eager mode, a
# GroupNorm site runs aten's own differentiable ops (F.group_norm, the activation, then the
# convolution, as diffusers does) instead of fastunet's autograd nodes. Those cost about 0.1 ms of
# Python a call forward and 0.3 ms backward on a CPU core, more than a small layer's arithmetic, and
# what they spare in saved activations there is at most 2 x 128 KiB of fp32 a call.
PLAIN_BELOW_ELEMENTS = 1 << 15


def _plain(norm: nn.GroupNorm, x: torch.Tensor) -> bool:
    """Whether a GroupNorm site on ``x`` runs aten's plain ops (``PLAIN_BELOW_ELEMENTS``)."""
    return (x.numel() < PLAIN_BELOW_ELEMENTS and x.dtype == torch.float32 and direct_call(x)
            and not use_triton(x, norm.weight, norm.bias))


_NO_ACTIVATION = "none"  # group_norm_act_fwd's name for no activation
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _fusable_conv(conv: nn.Module, x: torch.Tensor, dropout: nn.Module | None) -> bool:
    """Whether :func:`norm_act_conv` may run as one node: a plain zero-padded convolution in a forward
    that records gradients, outside autocast, with no dropout that acts and no hooks to honour."""
    if type(conv) not in _CONVS or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    if conv._forward_hooks or conv._forward_pre_hooks:
        return False
    if dropout is not None and dropout.training and dropout.p > 0:
        return False
    if not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
        return False
    return x.dim() == conv.weight.dim()


class _NormActConv(torch.autograd.Function):
    """``conv(group_norm_act(x))`` whose backward recomputes the ``group_norm_act`` output.

    Saved: x, the norm's weight and bias, add/scale/shift, the convolution's weight, the (B, G)
    statistics. Backward: the ``group_norm_act`` output again (the Triton path: its forward, same
    statistics bit for bit; the torch path: aten's GroupNorm forward again, whose output the
    activation's gradient then overwrites), ``aten.convolution_backward`` for the convolution's input,
    weight and bias gradients, then ``group_norm_act``'s own backward.
    """

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, add, scale, shift, conv_weight, conv_bias, num_groups, eps,
                activation, stride, padding, dilation, groups):
        # forward(ctx, ...) rather than a separate setup_context: apply() then binds no default arguments
        # through inspect, a cost on every one of a UNet's ~40 calls per step
        h, mean, rstd = group_norm_act_fwd_call(x, norm_weight, norm_bias, add, scale, shift, num_groups, eps,
                                                activation, None)
        ctx.save_for_backward(x, norm_weight, norm_bias, add, scale, shift, conv_weight, mean, rstd)
        ctx.norm_args = (num_groups, eps, activation)
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.has_conv_bias = conv_bias is not None
        return torch.convolution(h, conv_weight, conv_bias, stride, padding, dilation, False, [0] * len(stride),
                                 groups)

    @staticmethod
    def backward(ctx, dy):
        x, norm_weight, norm_bias, add, scale, shift, conv_weight, mean, rstd = ctx.saved_tensors
        num_groups, eps, activation = ctx.norm_args
        stride, padding, dilation, groups = ctx.conv_args
        # the torch path runs aten's GroupNorm forward again and keeps its output u beside the
        # activation's: two passes over x's size more than a backward from saved activations, and the
        # activation's gradient is then written over u (x centred first, for a large mean: one more)
        state = None
        if scale is None and shift is None and direct_call(x) and not use_triton(x, norm_weight, norm_bias, add):
            h, state = group_norm_act_recompute_torch(x, norm_weight, norm_bias, add, mean, rstd, num_groups,
                                                      eps, activation)
        else:
            h, _, _ = group_norm_act_fwd_call(x, norm_weight, norm_bias, add, scale, shift, num_groups, eps,
                                              activation, None)
        needs = ctx.needs_input_grad
        norm_needs = any(needs[:6])
        bias_sizes = [conv_weight.shape[0]] if ctx.has_conv_bias else None
        dh, dconv_weight, dconv_bias = torch.ops.aten.convolution_backward(
            dy, h, conv_weight, bias_sizes, stride, padding, dilation, False, [0] * len(stride), groups,
            [norm_needs, needs[6], ctx.has_conv_bias and needs[7]])
        del h
        grads = [None] * 6
        if norm_needs and state is not None:
            grads = list(group_norm_act_recomputed_bwd_torch(dh, state, x, norm_weight, norm_bias, add, mean,
                                                             rstd, num_groups))
        elif norm_needs:
            grads = list(group_norm_act_bwd_call(dh, x, norm_weight, norm_bias, add, scale, shift, mean, rstd,
                                                 num_groups, activation, eps))
        grads = [g if t is not None and need else None
                 for g, t, need in zip(grads, (x, norm_weight, norm_bias, add, scale, shift), needs)]
        return (*grads, dconv_weight, dconv_bias, None, None, None, None, None, None, None)


def _relayout(y: torch.Tensor, out_layout: tuple[int, ...]) -> torch.Tensor:
    """``y`` copied into the memory order ``out_layout`` (outermost dim first), viewed in ``y``'s dim order."""
    order = tuple(out_layout)
    if sorted(order) != list(range(y.dim())):
        raise ValueError(f"out_layout must be a permutation of the {y.dim()} dims {tuple(range(y.dim()))}; "
                         f"got {out_layout!r}")
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    return y.permute(order).contiguous().permute(inverse)


__all__ = ["auto_groups", "check_groups", "norm_act", "norm_act_conv"]
