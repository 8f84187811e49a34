"""Measurement helpers shared by the benchmarks (pytest puts bench/ on sys.path: ``from harness import ...``).

Each benchmark builds a zero-argument callable, warms it up, records what it wants in
``benchmark.extra_info`` with these helpers, and times it with :func:`time_rounds`.

With benchmarking disabled (``--benchmark-disable``, the default of the repository's pytest config)
pytest-benchmark runs each timed function once and keeps no statistics: :func:`median_seconds` is then
``None`` and :func:`record_rate` records nothing, so every case still runs end to end (a smoke test).
:data:`SIZE` picks the problem sizes; ``bench/conftest.py`` sets it before the benchmark files import.
"""

from __future__ import annotations

import os

import torch

from fastunet.kernels._backend import interpreter_enabled

CUDA = torch.cuda.is_available()
# torch.compile providers run on CUDA by default; on CPU only with FASTUNET_BENCH_COMPILE=1.
COMPILE = os.environ.get("FASTUNET_BENCH_COMPILE", "1" if CUDA else "0") == "1"
#: ``"full"``: the sizes the committed tables report; ``"small"``: toy sizes, every case in seconds.
#: ``FASTUNET_BENCH_SIZE`` when set, else bench/conftest.py makes it ``"small"`` when benchmarking is
#: disabled and ``"full"`` when it is enabled.
SIZE = os.environ.get("FASTUNET_BENCH_SIZE", "full")


def small() -> bool:
    """Whether this run uses the small (smoke-test) sizes."""
    return SIZE == "small"


def triton_runs() -> bool:
    """Whether the forced-Triton providers run: on CUDA, or at the small sizes on CPU tensors under
    Triton's interpreter (a smoke test of the launch paths; timing the interpreter would mean nothing)."""
    return CUDA or (small() and interpreter_enabled())


def available(providers: list[str]) -> list[str]:
    """``providers`` less those this machine cannot run, so no case is collected only to be skipped: SDPA's
    forced backends (``sdpa-*``) without CUDA, the torch.compile ones without :data:`COMPILE`, and
    ``fastunet-triton`` unless :func:`triton_runs`."""
    def runs(p: str) -> bool:
        if p.startswith("sdpa-"):
            return CUDA
        if p.endswith("compile"):
            return COMPILE
        if p == "fastunet-triton":
            return triton_runs()
        return True

    return [p for p in providers if runs(p)]


def sync() -> None:
    """Wait for the queued CUDA work (no-op on CPU)."""
    if CUDA:
        torch.cuda.synchronize()


def warm_up(fn) -> None:
    """One call of ``fn`` (compilation, autotuning, allocator), finished before anything is measured."""
    fn()
    sync()


def saved_bytes(forward) -> int:
    """Bytes autograd saves for backward while ``forward`` runs (saved-tensor hooks; device independent)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return total


def cuda_peak_bytes(fn, beyond_allocated: bool = True) -> int:
    """Peak CUDA memory allocated during one call of ``fn``: beyond what was allocated before the call
    when ``beyond_allocated``, else the absolute peak (the model and its inputs included)."""
    sync()
    before = torch.cuda.memory_allocated() if beyond_allocated else 0
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() - before


def cpu_peak_bytes(fn) -> int:
    """Peak CPU memory of one call of ``fn`` beyond what was allocated before it (the profiler's memory timeline)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    current = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak


def time_rounds(benchmark, fn, *, rounds: int, warmup_rounds: int) -> None:
    """``benchmark.pedantic`` over ``fn`` followed by a sync, so each round times the finished work."""

    def timed():
        fn()
        sync()

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup_rounds)


def median_seconds(benchmark) -> float | None:
    """The median round time of a timed benchmark, or ``None`` when benchmarking is disabled (the
    fixture then ran the function once and has no statistics)."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.median


def record_rate(benchmark, key: str, amount: float) -> None:
    """``extra_info[key] = amount / median time`` (e.g. GB or TFLOP per second); nothing when disabled."""
    median = median_seconds(benchmark)
    if median is not None:
        benchmark.extra_info[key] = amount / median
