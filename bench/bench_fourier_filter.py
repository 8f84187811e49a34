"""FreeU's Fourier filter on Stable-Diffusion-sized skip features (threshold 1, as FreeU uses it).

Providers:
  fastunet          fastunet.kernels.fourier_filter, backend "auto": the Triton kernel on CUDA, the
                    direct-DFT matmul reference on CPU
  fastunet-torch    the direct-DFT reference (backend "torch")
  fastunet-triton   the Triton kernel, forced (CUDA only; skipped on CPU)
  diffusers         diffusers.utils.torch_utils.fourier_filter (FFT, full-size mask)
  torch.compile     torch.compile of diffusers' filter (on CUDA, or on CPU with FASTUNET_BENCH_COMPILE=1)

``gbps`` counts the least traffic the op needs, one read and one write of the tensor, so on a GPU it
compares directly with the device's bandwidth; ``peak_mib`` is the peak memory allocated during a call
beyond the input (CUDA: ``max_memory_allocated``; CPU: the profiler's memory timeline). The filter is
benchmarked forward only (its backward is the same filter), so nothing is saved for backward.  Run:
``.venv/bin/python -m pytest bench/bench_fourier_filter.py --benchmark-enable``; the table lands in
``bench/results/bench_fourier_filter.md``.
"""

from __future__ import annotations

import pytest
import torch
from harness import CUDA, available, cpu_peak_bytes, cuda_peak_bytes, record_rate, small, time_rounds, warm_up

import fastunet
from fastunet.kernels import fourier_filter

SHAPES = [(2, 1280, 16, 16), (2, 640, 32, 32), (2, 1280, 32, 32), (2, 640, 64, 64)]
if small():  # smoke-test sizes: a one-tile plane and an odd one
    SHAPES = [(1, 4, 16, 16), (1, 3, 33, 47)]
DTYPES = [torch.float32, torch.float16] if CUDA else [torch.float32]
PROVIDERS = ["fastunet", "fastunet-torch", "fastunet-triton", "diffusers", "torch.compile"]
THRESHOLD, SCALE = 1, 0.9


def _diffusers_filter():
    """diffusers' filter (the baseline); an ImportError when diffusers is not installed."""
    from diffusers.utils.torch_utils import fourier_filter as diffusers_fourier_filter

    return diffusers_fourier_filter


def setup(provider: str, shape: tuple, dtype: torch.dtype, device, backward: bool = False):
    """A zero-argument callable filtering one fresh random ``shape`` tensor with ``provider`` (and
    back-propagating a random gradient through it when ``backward``)."""
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=backward)
    grad = torch.randn(shape, device=device, dtype=dtype)
    if provider.startswith("fastunet"):
        backend = {"fastunet": "auto", "fastunet-torch": "torch", "fastunet-triton": "triton"}[provider]

        def fn(x):
            with fastunet.use_backend(backend):
                return fourier_filter(x, THRESHOLD, SCALE)
    else:
        baseline = _diffusers_filter()
        compiled = torch.compile(baseline) if provider == "torch.compile" else baseline

        def fn(x):
            return compiled(x, THRESHOLD, SCALE)

    def run():
        if not backward:
            return fn(x)
        x.grad = None
        y = fn(x)
        y.backward(grad)
        return y

    return run


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", available(PROVIDERS))
def test_fourier_filter(benchmark, provider, shape, dtype, device):
    torch.manual_seed(0)
    run = setup(provider, shape, dtype, device)
    if benchmark.enabled:  # disabled (a smoke run): time_rounds runs it once, nothing is measured
        warm_up(run)
        benchmark.extra_info["peak_mib"] = (cuda_peak_bytes(run) if CUDA else cpu_peak_bytes(run)) / 2**20
    benchmark.group = f"{'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}"
    time_rounds(benchmark, run, rounds=20 if CUDA else 10, warmup_rounds=2)
    numel = torch.Size(shape).numel()
    record_rate(benchmark, "gbps", 2 * numel * dtype.itemsize / 1e9)
