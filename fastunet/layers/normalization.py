"""GroupNorm + activation for every layer: the one place the modules call ``fastunet.kernels.group_norm_act``.

:func:`norm_act` takes an ``nn.GroupNorm`` (whose parameters and state-dict names stay diffusers') and a
diffusers ``act_fn`` name. Activations the kernel can fuse (silu/swish, gelu, mish) run inside it; any
other (relu) runs after the normalisation. :func:`auto_groups` is the rule diffusers uses where a block
is built without a group count.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import group_norm_act
from .activations import fused_activation_name

# diffusers activations that group_norm_act cannot fuse, applied after it instead
_UNFUSED = {"relu": F.relu}


def auto_groups(channels: int) -> int:
    """GroupNorm groups when none are configured: a quarter of the channels, at most 32."""
    return min(channels // 4, 32)


def check_groups(channels: int, groups: int, what: str) -> None:
    """Raise ValueError unless ``groups`` is a positive int dividing ``channels``."""
    if not isinstance(groups, int) or groups < 1 or channels % groups != 0:
        raise ValueError(f"{what}: {channels} channels cannot be split into {groups!r} GroupNorm groups "
                         f"(expected a positive divisor of {channels})")


def norm_act(norm: nn.GroupNorm, x: torch.Tensor, act_fn: str | None = None, add: torch.Tensor | None = None,
             scale: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
    """``act(norm(x + add) * (1 + scale) + shift)`` through ``group_norm_act`` with ``norm``'s parameters.

    x: ``(B, C, *spatial)``; add/scale/shift: ``(B, C)`` or None; ``act_fn``: a diffusers name or None.
    """
    key = act_fn.lower() if isinstance(act_fn, str) else act_fn
    post = _UNFUSED.get(key)
    fused = None if post is not None else fused_activation_name(act_fn)
    y = group_norm_act(x, norm.num_groups, norm.weight, norm.bias, norm.eps, fused, add=add, scale=scale, shift=shift)
    return y if post is None else post(y)


__all__ = ["auto_groups", "check_groups", "norm_act"]
