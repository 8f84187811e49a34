"""Memory-traffic counter for Triton kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1).

Under the interpreter every ``tl.load`` / ``tl.store`` ends in the module-level
``triton.runtime.interpreter.interpreter_builder``: ``create_masked_load`` and ``create_masked_store``
(the unmasked ``create_load`` / ``create_store`` build an all-true mask and call those two through
``self``). ``count_traffic()`` wraps the two on that builder instance and, for each call, counts the
active (mask-true) lanes times the pointee's size in bytes. Addresses are attributed to the launch's
pointer arguments: ``GridExecutor._init_args_hst`` (which hands the interpreter its host copies of
the tensor arguments) is wrapped to record each tensor argument's name and address range, and an
address belongs to the first argument, in signature order, whose range holds it (dummy arguments,
e.g. ``x`` passed again for an absent ``weight``, come after the real one). Bytes are summed per
``(kernel, argument)``; a lane that no argument holds counts under ``"?"``.

Counted bytes are what the kernel asks for, one load per lane: no cache, no vector widths, no
coalescing. A value loaded twice counts twice (on a GPU the second read may hit L2), which is the
point: it measures passes over memory.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from triton.runtime import interpreter as _interp


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """Byte range ``[lo, hi)`` that the strided tensor ``t`` spans."""
    size = t.element_size()
    lo = sum(min(0, (n - 1) * s) for n, s in zip(t.shape, t.stride()))
    hi = sum(max(0, (n - 1) * s) for n, s in zip(t.shape, t.stride()))
    return t.data_ptr() + lo * size, t.data_ptr() + (hi + 1) * size


@dataclass
class Launch:
    """One kernel launch: its tensor arguments (name -> (lo, hi, bytes of the tensor)), its number of
    programs, and the bytes loaded from / stored to each argument."""
    kernel: str
    args: dict[str, tuple[int, int, int]]
    programs: int | None = None  # the grid's size, where the launcher gave a tuple
    loads: Counter = field(default_factory=Counter)
    stores: Counter = field(default_factory=Counter)

    def attribute(self, counter: Counter, addrs: np.ndarray, elsize: int) -> None:
        addrs = addrs.astype(np.uint64, copy=False).ravel()
        left = np.ones(addrs.shape, dtype=bool)
        for name, (lo, hi, _) in self.args.items():
            if not left.any():
                break
            hit = left & (addrs >= np.uint64(lo)) & (addrs < np.uint64(hi))
            n = int(hit.sum())
            if n:
                counter[name] += n * elsize
                left &= ~hit
        n = int(left.sum())
        if n:
            counter["?"] += n * elsize


class TrafficCounter:
    """Launches recorded inside ``count_traffic()``, with per-argument byte sums."""

    def __init__(self) -> None:
        self.launches: list[Launch] = []
        self._current: Launch | None = None

    def kernels(self) -> list[str]:
        return list(dict.fromkeys(launch.kernel for launch in self.launches))

    def _sum(self, attr: str, kernel: str | None, arg: str | None) -> int:
        total = 0
        for launch in self.launches:
            if kernel is not None and launch.kernel != kernel:
                continue
            counts = getattr(launch, attr)
            total += counts[arg] if arg is not None else sum(counts.values())
        return total

    def loaded(self, kernel: str | None = None, arg: str | None = None) -> int:
        """Bytes loaded, by ``kernel`` (default: all) from argument ``arg`` (default: all)."""
        return self._sum("loads", kernel, arg)

    def stored(self, kernel: str | None = None, arg: str | None = None) -> int:
        """Bytes stored, by ``kernel`` (default: all) to argument ``arg`` (default: all)."""
        return self._sum("stores", kernel, arg)

    def programs(self, kernel: str) -> int:
        """Programs launched by ``kernel``, summed over its launches."""
        return sum(launch.programs for launch in self.launches if launch.kernel == kernel)

    def total(self, kernel: str | None = None) -> int:
        return self.loaded(kernel) + self.stored(kernel)

    def table(self) -> str:
        """Per kernel and argument: bytes loaded and stored (for failure messages and reports)."""
        rows = []
        for kernel in self.kernels():
            names: dict[str, None] = {}
            for launch in self.launches:
                if launch.kernel == kernel:
                    names.update(dict.fromkeys([*launch.loads, *launch.stores]))
            for name in names:
                rows.append(f"{kernel:40s} {name:12s} load {self.loaded(kernel, name):>10d}  "
                            f"store {self.stored(kernel, name):>10d}")
        return "\n".join(rows)


def _element_size(handle) -> int:
    ty = handle.get_element_ty()
    return max(1, ty.primitive_bitwidth // 8)


@contextlib.contextmanager
def count_traffic() -> Iterator[TrafficCounter]:
    """Count the bytes every interpreted kernel launched inside the block loads and stores."""
    counter = TrafficCounter()
    builder = _interp.interpreter_builder
    executor = _interp.GridExecutor
    orig_load = builder.create_masked_load
    orig_store = builder.create_masked_store
    orig_init = executor._init_args_hst

    def init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = orig_init(self, args_dev, kwargs)
        bound = inspect.signature(self.fn).bind_partial(*args_hst, **kwargs_hst).arguments
        ranges = {}
        for name, value in bound.items():
            base = getattr(value, "base", value)  # a TensorWrapper's tensor
            if isinstance(base, torch.Tensor) and base.numel() > 0:
                ranges[name] = (*_extent(base), base.numel() * base.element_size())
        grid = None if callable(self.grid) else int(np.prod(self.grid))
        counter._current = Launch(self.fn.__name__, ranges, grid)
        counter.launches.append(counter._current)
        return args_hst, kwargs_hst

    def create_masked_load(ptrs, mask, other, cache_policy, is_volatile):
        if counter._current is not None:
            active = np.broadcast_to(mask.data, ptrs.data.shape)
            counter._current.attribute(counter._current.loads, ptrs.data[active], _element_size(ptrs))
        return orig_load(ptrs, mask, other, cache_policy, is_volatile)

    def create_masked_store(ptrs, value, mask, cache_policy):
        if counter._current is not None:
            active = np.broadcast_to(mask.data, ptrs.data.shape)
            counter._current.attribute(counter._current.stores, ptrs.data[active], _element_size(ptrs))
        return orig_store(ptrs, value, mask, cache_policy)

    builder.create_masked_load = create_masked_load
    builder.create_masked_store = create_masked_store
    executor._init_args_hst = init_args_hst
    try:
        yield counter
    finally:
        del builder.create_masked_load
        del builder.create_masked_store
        executor._init_args_hst = orig_init
