"""Small helpers shared by the layers and models."""

from __future__ import annotations

import torch
import torch.utils.checkpoint


def maybe_checkpoint(enabled: bool, fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)``, through non-reentrant activation checkpointing when ``enabled``
    and autograd is recording."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)
