"""Fused GroupNorm + activation (placeholder: torch reference only; the Triton kernels land next)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ACTIVATIONS = {
    None: lambda t: t,
    "silu": F.silu,
    "gelu": F.gelu,
    "mish": F.mish,
}


def group_norm_act_reference(x, num_groups, weight=None, bias=None, eps=1e-5, activation="silu",
                             add=None, scale=None, shift=None):
    """``act(GroupNorm(x + add) * (1 + scale) + shift)`` in plain torch."""
    extra = (1,) * (x.dim() - 2)
    if add is not None:
        x = x + add.view(*add.shape, *extra)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    if scale is not None:
        y = y * (1 + scale.view(*scale.shape, *extra))
    if shift is not None:
        y = y + shift.view(*shift.shape, *extra)
    return _ACTIVATIONS[activation](y)


def group_norm_act(x, num_groups, weight=None, bias=None, eps=1e-5, activation="silu",
                   add=None, scale=None, shift=None):
    """``act(GroupNorm(x + add) * (1 + scale) + shift)``; x is ``(B, C, *spatial)``."""
    return group_norm_act_reference(x, num_groups, weight, bias, eps, activation, add, scale, shift)
