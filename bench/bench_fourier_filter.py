"""FreeU's Fourier filter on Stable-Diffusion-sized skip features (threshold 1, as FreeU uses it).

Providers:
  fastunet          fastunet.kernels.fourier_filter, backend "auto": the Triton kernel on CUDA, the
                    direct-DFT matmul reference on CPU
  fastunet-torch    the direct-DFT reference (backend "torch")
  fastunet-triton   the Triton kernel, forced (CUDA only; skipped on CPU)
  diffusers         diffusers.utils.torch_utils.fourier_filter (FFT, full-size mask)
  torch.compile     torch.compile of diffusers' filter (on CUDA, or on CPU with FASTUNET_BENCH_COMPILE=1)

``gbps`` counts the least traffic the op needs, one read and one write of the tensor, so on a GPU it
compares directly with the device's bandwidth; ``peak_mib`` (CUDA) is the peak memory allocated
during a call beyond the input.  Run: ``.venv/bin/python -m pytest bench/bench_fourier_filter.py
--benchmark-enable``; the table lands in ``bench/results/bench_fourier_filter.md``.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.utils.torch_utils import fourier_filter as diffusers_fourier_filter
from harness import COMPILE, CUDA, cuda_peak_bytes, time_rounds, warm_up

import fastunet
from fastunet.kernels import fourier_filter

SHAPES = [(2, 1280, 16, 16), (2, 640, 32, 32), (2, 1280, 32, 32), (2, 640, 64, 64)]
DTYPES = [torch.float32, torch.float16] if CUDA else [torch.float32]
PROVIDERS = ["fastunet", "fastunet-torch", "fastunet-triton", "diffusers", "torch.compile"]
THRESHOLD, SCALE = 1, 0.9


def setup(provider: str, shape: tuple, dtype: torch.dtype, device):
    """A zero-argument callable filtering one fresh random ``shape`` tensor with ``provider``."""
    x = torch.randn(shape, device=device, dtype=dtype)
    if provider.startswith("fastunet"):
        backend = {"fastunet": "auto", "fastunet-torch": "torch", "fastunet-triton": "triton"}[provider]

        def run():
            with fastunet.use_backend(backend):
                return fourier_filter(x, THRESHOLD, SCALE)

        return run
    fn = torch.compile(diffusers_fourier_filter) if provider == "torch.compile" else diffusers_fourier_filter
    return lambda: fn(x, THRESHOLD, SCALE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_fourier_filter(benchmark, provider, shape, dtype, device):
    if provider == "fastunet-triton" and not CUDA:
        pytest.skip("the Triton kernel needs a CUDA device outside the interpreter")
    if provider == "torch.compile" and not COMPILE:
        pytest.skip("torch.compile runs on CUDA, or on CPU with FASTUNET_BENCH_COMPILE=1")
    torch.manual_seed(0)
    run = setup(provider, shape, dtype, device)
    warm_up(run)
    if CUDA:
        benchmark.extra_info["peak_mib"] = cuda_peak_bytes(run) / 2**20
    benchmark.group = f"{'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}"
    time_rounds(benchmark, run, rounds=20 if CUDA else 10, warmup_rounds=2)
    numel = torch.Size(shape).numel()
    bytes_moved = 2 * numel * torch.empty((), dtype=dtype).element_size()
    benchmark.extra_info["gbps"] = bytes_moved / benchmark.stats.stats.median / 1e9
