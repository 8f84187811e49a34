"""Backend selection shared by every op in ``fastunet.kernels``.

Three backends:

* ``"auto"``   -- Triton kernels for CUDA tensors when triton imports, the torch reference otherwise.
* ``"triton"`` -- always the Triton kernels.  On CPU tensors this only works under Triton's
  interpreter (``TRITON_INTERPRET=1`` set before triton is imported); otherwise a ``RuntimeError``
  says so.
* ``"torch"``  -- always the plain-torch reference implementations.

Launchers record every Triton launch in :data:`launch_counts`, under the kernel's function name, so
tests can prove a kernel really ran.

No op falls back silently under ``"triton"``: where an op's kernel does not take some inputs (its
docstring lists them) and the op runs its torch reference instead, :func:`warn_fallback` emits a
:class:`KernelFallbackWarning`, once per op and limit.  ``"auto"`` falls back without a word.

This is the one place ``triton`` is imported. It is optional (pyproject installs it on Linux only): the
op files take ``triton``, ``tl`` and ``HAS_TRITON`` from here, and without triton they get a stand-in
under which their ``@triton.jit`` definitions still import as plain functions, never launched, because
:func:`use_triton` sends every op to its torch path ("auto") or refuses ("triton").

:func:`register_once` registers an op file's ``torch.library`` custom ops.
"""

from __future__ import annotations

import contextlib
import os
import threading
import types
import warnings
from collections import Counter
from typing import Callable, Iterator

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_VALID = ("auto", "triton", "torch")
_state = threading.local()
_global_backend = "auto"

#: Number of Triton launches per kernel name since import (tests reset and read it).
launch_counts: Counter = Counter()


class _Constexpr:
    """Stand-in for ``tl.constexpr`` without triton: what kernel arguments are annotated with, and a
    wrapper for module-level kernel constants."""

    def __init__(self, value=None):
        self.value = value


def _jit(fn=None, **_options):
    """Stand-in for ``triton.jit`` without triton, bare (``@jit``) or with options (``@jit(...)``):
    the kernel stays the plain Python function it was written as."""
    return fn if fn is not None else (lambda f: f)


try:  # triton is optional at import time (e.g. macOS, or a CPU-only install without it)
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - not only a missing triton: a broken install leaves the torch paths too
    HAS_TRITON = False
    # What the op files use of triton outside their kernels: the decorator, tl.constexpr, and the
    # integer helpers of the config functions.
    triton = types.SimpleNamespace(jit=_jit, cdiv=lambda a, b: -(-a // b),
                                   next_power_of_2=lambda n: 1 if n <= 1 else 1 << (int(n) - 1).bit_length())
    tl = types.SimpleNamespace(constexpr=_Constexpr)


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


class KernelFallbackWarning(UserWarning):
    """Backend ``"triton"`` was selected, but an op ran its torch reference: its kernel does not take
    these inputs (the op's docstring lists its limits)."""


#: (op, limit) pairs already warned about (tests clear it).
fallbacks_warned: set = set()


def warn_fallback(op: str, limit: str, detail: str) -> None:
    """Under backend ``"triton"``, say once per ``(op, limit)`` that ``op`` ran its torch reference
    because its kernel does not take ``limit`` (a fixed phrase; ``detail`` gives this call's values)."""
    if (op, limit) in fallbacks_warned:
        return
    fallbacks_warned.add((op, limit))
    warnings.warn(f"{op}: backend 'triton' was selected, but its Triton kernel does not take {limit} "
                  f"({detail}); running the torch reference {op}_reference instead (warned once)",
                  KernelFallbackWarning, stacklevel=3)


def record_launch(name: str) -> None:
    """Count one launch of the Triton kernel whose function is named ``name``."""
    launch_counts[name] += 1


def register_once(module_name: str, op: str, register: Callable[[], object]) -> None:
    """Call ``register`` (which defines an op file's ``torch.library`` custom ops) when ``module_name``,
    the calling file's ``__name__``, is that file inside the package (``fastunet.kernels.<file>``) and
    the custom op ``op`` (``"fastunet::<name>"``, one of those it defines) does not exist yet.

    Only the package's own module registers: with the repository root on sys.path (``python -m
    pytest``) kernels/ is also importable as a bare top-level ``kernels``, which transformers imports
    while probing for the PyPI ``kernels`` project. That copy has its own module state (backend
    choice included) and must neither register the ops over the package's nor instead of them; its
    public functions call the ``torch.ops.fastunet`` ops, which stay the package's.
    """
    namespace, name = op.split("::")
    if module_name.startswith("fastunet.kernels.") and not hasattr(getattr(torch.ops, namespace), name):
        register()


def direct_call(x: torch.Tensor) -> bool:
    """Whether an op called on ``x`` may run its implementation directly, not through ``torch.ops.fastunet``.

    True in eager mode on a plain tensor (not fake, meta or a subclass, not wrapped by a functorch
    transform) with no torch dispatch mode active. There the dispatcher adds nothing but its own cost
    (schema defaults, the autograd and dynamo wrappers: tens of microseconds per call on a CPU, more
    than a small tensor's work); ``torch.compile``, fake tensors, transforms and dispatch modes (flop
    counters, tracers) still see the custom ops.
    """
    return (type(x) is torch.Tensor and x.device.type != "meta" and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(x) and _get_current_dispatch_mode() is None)


def dense_strides(shape, order=None) -> tuple[int, ...]:
    """Strides of a dense tensor of ``shape`` whose dims lie in memory in ``order`` (outermost first;
    None: contiguous), as ``torch.empty`` would give them (a size-0 dim steps like a size-1 one)."""
    strides = [0] * len(shape)
    step = 1
    for d in reversed(range(len(shape)) if order is None else order):
        strides[d] = step
        step *= max(shape[d], 1)
    return tuple(strides)


def forward_call(direct: bool, op: str, eager: type, impl, args: tuple, differentiable: int):
    """One kernel op's forward on ``args``, the way a layer calls it: ``torch.ops.fastunet.<op>`` unless
    ``direct`` (the caller is the package's own module) and ``direct_call(args[0])``; otherwise
    ``eager.apply`` (the op's autograd minus the dispatcher) where any of the first ``differentiable``
    args is a tensor that needs a gradient, else ``impl`` itself, recording nothing."""
    if not (direct and direct_call(args[0])):
        return getattr(torch.ops.fastunet, op)(*args)
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in args[:differentiable]):
        return eager.apply(*args)
    return impl(*args)


def backward_call(direct: bool, op: str, impl, args: tuple, probes: tuple):
    """One kernel op's backward on ``args``: ``impl`` where ``direct`` and every tensor in ``probes`` may
    skip the dispatcher (``direct_call``), else ``torch.ops.fastunet.<op>``."""
    if direct and all(direct_call(t) for t in probes):
        return impl(*args)
    return getattr(torch.ops.fastunet, op)(*args)


def compute_capability(device: torch.device) -> int:
    """The arch a launcher sizes its kernels for: ``major * 10 + minor`` of a CUDA ``device``
    (``torch.cuda.get_device_capability``; 80 for an A100, 90 for an H100), and 80 for any other
    device (CPU tensors under Triton's interpreter, which has no arch). Launchers call it as
    ``_backend.compute_capability(...)`` so that a report or test can substitute an arch."""
    device = torch.device(device)
    if device.type != "cuda":
        return 80
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor
