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


def frames_per_sample(hidden_states: torch.Tensor, num_frames: int, channels: int, owner: str) -> int:
    """Check a ``(B*F, channels, H, W)`` stack of video frames and return ``B``."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, torch.SymInt)):
        raise TypeError(f"{owner}: num_frames must be an int; got {type(num_frames).__name__}")
    if num_frames < 1:
        raise ValueError(f"{owner}: num_frames must be at least 1; got {num_frames}")
    if hidden_states.dim() != 4 or hidden_states.shape[1] != channels:
        raise ValueError(f"{owner} expects frames (B*num_frames, {channels}, H, W); "
                         f"got shape {tuple(hidden_states.shape)}")
    if hidden_states.shape[0] % num_frames != 0:
        raise ValueError(f"{owner}: the {hidden_states.shape[0]} frames of the batch are not a multiple of "
                         f"num_frames={num_frames}")
    return hidden_states.shape[0] // num_frames
