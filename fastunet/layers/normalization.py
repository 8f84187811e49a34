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
    key = act_fn.lower() if isinstance(act_fn, str) else act_fn
    post = _UNFUSED.get(key)
    fused = None if post is not None else fused_activation_name(act_fn)
    layout = {"out_layout": out_layout} if _KERNEL_HAS_OUT_LAYOUT and out_layout is not None else {}
    y = group_norm_act(x, norm.num_groups, norm.weight, norm.bias, norm.eps, fused, add=add, scale=scale,
                       shift=shift, **layout)
    if out_layout is not None and not _KERNEL_HAS_OUT_LAYOUT:
        y = _relayout(y, out_layout)
    return y if post is None else post(y)  # an elementwise post-activation keeps y's layout


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


__all__ = ["auto_groups", "check_groups", "norm_act"]
