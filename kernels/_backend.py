"""Backend selection shared by every op in ``fastunet.kernels``.

Three backends:

* ``"auto"``   -- Triton kernels for CUDA tensors when triton imports, the torch reference otherwise.
* ``"triton"`` -- always the Triton kernels.  On CPU tensors this only works under Triton's
  interpreter (``TRITON_INTERPRET=1`` set before triton is imported); otherwise a ``RuntimeError``
  says so.
* ``"torch"``  -- always the plain-torch reference implementations.

Launchers record every Triton launch in :data:`launch_counts`, so tests can prove a kernel really ran.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter
from typing import Iterator

import torch

_VALID = ("auto", "triton", "torch")
_state = threading.local()
_global_backend = "auto"

#: Number of Triton launches per kernel name since import (tests reset and read it).
launch_counts: Counter = Counter()

try:  # triton is optional at import time (e.g. macOS, or a CPU-only install without it)
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def set_backend(name: str) -> None:
    """Select the kernel backend for this process: ``"auto"``, ``"triton"`` or ``"torch"``."""
    global _global_backend
    _global_backend = _check_name(name)


def get_backend() -> str:
    """The backend in force for this thread (a ``use_backend`` block overrides ``set_backend``)."""
    return getattr(_state, "override", None) or _global_backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager selecting a backend for the enclosed block, restoring the previous one after."""
    name = _check_name(name)
    previous = getattr(_state, "override", None)
    _state.override = name
    try:
        yield
    finally:
        _state.override = previous


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, one of {_VALID}; got {type(name).__name__}")
    if name not in _VALID:
        raise ValueError(f"backend must be one of {_VALID}; got {name!r}")
    return name


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Decide whether an op called on ``tensors`` runs its Triton kernel (True) or torch reference.

    Raises ``RuntimeError`` when the ``"triton"`` backend is forced on CPU tensors without the
    interpreter, or when triton is not installed.
    """
    backend = get_backend()
    if backend == "torch":
        return False
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda and HAS_TRITON
    if not HAS_TRITON:
        raise RuntimeError("backend 'triton' was selected but triton is not installed")
    if not on_cuda and not interpreter_enabled():
        raise RuntimeError(
            "backend 'triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before importing triton, move the tensors to a CUDA device, or use backend 'auto'/'torch'"
        )
    return True


def record_launch(name: str) -> None:
    """Count one launch of the Triton kernel ``name``."""
    launch_counts[name] += 1
