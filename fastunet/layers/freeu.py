"""FreeU (Si et al., 2023): reweighting backbone and skip features in a UNet's first two up stages.

In an up block at stage ``resolution_idx`` 0 or 1, before the skip features are concatenated to the
backbone features, FreeU

* multiplies the first half of the backbone channels (``hidden_states[:, :C // 2]``) by ``b1`` (stage 0)
  or ``b2`` (stage 1), and
* damps the lowest frequencies of the skip features: :func:`fastunet.kernels.fourier_filter` with
  ``threshold=1`` and ``scale=s1`` (stage 0) or ``s2`` (stage 1).

Deeper stages pass through.  Unlike diffusers, nothing here writes into the caller's tensors.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..kernels import fourier_filter

_THRESHOLD = 1


@dataclass(frozen=True)
class FreeUConfig:
    """FreeU's four factors: ``s1``/``s2`` scale the skip features' low frequencies at stages 0/1,
    ``b1``/``b2`` scale the first half of the backbone channels at stages 0/1."""

    s1: float
    s2: float
    b1: float
    b2: float

    def __post_init__(self):
        for name in ("s1", "s2", "b1", "b2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"FreeUConfig.{name} must be a real number; got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"FreeUConfig.{name} must be finite; got {value}")
            object.__setattr__(self, name, float(value))

    def factors(self, resolution_idx: int | None) -> tuple[float, float] | None:
        """``(backbone, skip)`` factors for an up stage, or ``None`` where FreeU leaves it alone."""
        if resolution_idx == 0:
            return self.b1, self.s1
        if resolution_idx == 1:
            return self.b2, self.s2
        return None


def _scale_leading_channels(hidden_states: torch.Tensor, factor: float) -> torch.Tensor:
    """A new tensor equal to ``hidden_states`` with channels ``[:C // 2]`` multiplied by ``factor``:
    one pass, a per-channel factor vector broadcast over ``(B, C, *spatial)``.

    The product is taken in fp32 (float64 for float64) and rounded once to the input dtype, as
    ``tensor * python_float`` does, so results match diffusers bit for bit in every dtype.
    """
    channels = hidden_states.shape[1]
    compute = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
    scale = torch.ones(channels, dtype=compute, device=hidden_states.device)
    scale[: channels // 2] = factor
    scale = scale.view(1, channels, *(1,) * (hidden_states.dim() - 2))
    if torch.is_grad_enabled() and hidden_states.requires_grad:
        return (hidden_states * scale).to(hidden_states.dtype)
    # no autograd needed: compute in fp32 and round straight into the output, without an fp32 copy
    return torch.mul(hidden_states, scale, out=torch.empty_like(hidden_states))


def apply_freeu(resolution_idx: int | None, hidden_states: torch.Tensor, res_hidden_states: torch.Tensor,
                config: FreeUConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """FreeU on one up block's inputs.

    Args:
        resolution_idx: the up block's stage (0 is the lowest resolution); ``None`` or an int.
        hidden_states: ``(B, C, *spatial)`` backbone features; the first ``C // 2`` channels are scaled.
        res_hidden_states: ``(B, C_skip, H, W)`` skip features, Fourier-filtered.
        config: the :class:`FreeUConfig` factors.

    Returns:
        ``(hidden_states, res_hidden_states)``: new tensors at stages 0 and 1, the inputs themselves at
        other stages.  The inputs are never modified.
    """
    if not isinstance(config, FreeUConfig):
        raise TypeError(f"config must be a FreeUConfig; got {type(config).__name__}")
    if resolution_idx is not None and (isinstance(resolution_idx, bool)
                                       or not isinstance(resolution_idx, numbers.Integral)):
        raise TypeError(f"resolution_idx must be an int or None; got {type(resolution_idx).__name__}")
    factors = config.factors(resolution_idx)
    if factors is None:
        return hidden_states, res_hidden_states
    for name, t in (("hidden_states", hidden_states), ("res_hidden_states", res_hidden_states)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if hidden_states.dim() < 2:
        raise ValueError(f"hidden_states must be (B, C, *spatial); got shape {tuple(hidden_states.shape)}")
    backbone, skip = factors
    return (_scale_leading_channels(hidden_states, backbone),
            fourier_filter(res_hidden_states, _THRESHOLD, skip))
