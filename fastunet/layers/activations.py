"""Activation lookup by diffusers' ``act_fn`` names."""

from __future__ import annotations

import torch.nn as nn

_ACTIVATION_MODULES = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "mish": nn.Mish,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
}

# act_fn name -> the `activation` string that fastunet.kernels.group_norm_act understands
_FUSABLE = {"silu": "silu", "swish": "silu", "mish": "mish", "gelu": "gelu", None: None}


def get_activation(name: str | None) -> nn.Module | None:
    """An activation module for a diffusers ``act_fn`` name (``None`` gives ``None``)."""
    if name is None:
        return None
    key = name.lower()
    if key not in _ACTIVATION_MODULES:
        raise ValueError(f"act_fn must be one of {sorted(_ACTIVATION_MODULES)}; got {name!r}")
    return _ACTIVATION_MODULES[key]()


def fused_activation_name(name: str | None) -> str | None:
    """The ``group_norm_act`` activation equal to diffusers' ``act_fn`` name (``None``: no activation)."""
    key = name.lower() if isinstance(name, str) else name
    if key not in _FUSABLE:
        raise ValueError(f"act_fn {name!r} cannot be fused with GroupNorm; expected one of "
                         f"{sorted(k for k in _FUSABLE if k)} or None")
    return _FUSABLE[key]
