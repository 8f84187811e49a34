"""Scaled dot-product attention at UNet sizes, forward and forward + backward.

Shapes (``B, H, N, M, D``):
  self-4096     self-attention over a 64x64 latent (SD's first level)
  self-16384    self-attention over a 128x128 latent (SDXL/upscalers)
  cross-77      cross-attention to 77 text tokens
  temporal-16   temporal attention: 16 frames, B*H in the tens of thousands (the short-sequence kernels)
On a CPU the batch and heads shrink so the file finishes in a few minutes; N and M stay. At the
small (smoke-test) sizes every kind shrinks to a few hundred tokens.

Providers:
  fastunet          fastunet.kernels.attention, backend "auto" (the Triton kernels on CUDA, the torch
                    reference on CPU)
  fastunet-torch    the torch reference path (backend "torch")
  torch             F.scaled_dot_product_attention with PyTorch's own backend choice
  torch.compile     torch.compile of the SDPA call (CUDA, or CPU with FASTUNET_BENCH_COMPILE=1)
  sdpa-flash        SDPA with the FlashAttention-2 backend forced (CUDA only)
  sdpa-mem-efficient  SDPA with the memory-efficient backend forced (CUDA only)
  torch-math        eager softmax(q k^T * scale) v in explicit matmuls (the scores materialised)

Columns: ``tflops`` counts 4*B*H*N*M*D flops forward and 2.5 times that for the backward (so
3.5 times for fwd+bwd); ``peak_mib`` is the peak memory of one call beyond what was allocated before
it (CUDA: ``max_memory_allocated``; CPU: the profiler's memory timeline); ``saved_mib`` the bytes
autograd keeps for backward. Run: ``.venv/bin/python -m pytest bench/bench_attention.py
--benchmark-enable``; the table lands in ``bench/results/bench_attention.md``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import (CUDA, available, cpu_peak_bytes, cuda_peak_bytes, record_rate, saved_bytes, small, time_rounds,
                     warm_up)

import fastunet
from fastunet.kernels import attention

if CUDA:
    SHAPES = {"self-4096": (2, 8, 4096, 4096, 64), "self-16384": (1, 8, 16384, 16384, 64),
              "cross-77": (2, 8, 4096, 77, 40), "temporal-16": (2560, 8, 16, 16, 40)}
    DTYPES = [torch.float16, torch.bfloat16]
else:
    SHAPES = {"self-4096": (1, 2, 4096, 4096, 64), "self-16384": (1, 1, 16384, 16384, 64),
              "cross-77": (1, 8, 4096, 77, 40), "temporal-16": (256, 8, 16, 16, 40)}
    DTYPES = [torch.float32]
if small():  # smoke-test sizes, one per kind (a 40 and a 64 head dim, a short-sequence batch)
    SHAPES = {"self-256": (1, 2, 256, 256, 64), "cross-77": (1, 2, 64, 77, 40), "temporal-16": (16, 2, 16, 16, 40)}
PROVIDERS = ["fastunet", "fastunet-torch", "torch", "torch.compile", "sdpa-flash", "sdpa-mem-efficient", "torch-math"]


def flops(shape, backward: bool) -> float:
    b, h, n, m, d = shape
    return 4.0 * b * h * n * m * d * (3.5 if backward else 1.0)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def _math(q, k, v):
    """Attention spelled out in eager ops: the (B, H, N, M) scores are materialised."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.matmul(scores.softmax(dim=-1), v)


def setup(provider: str, shape, dtype: torch.dtype, backward: bool, device):
    """A zero-argument callable running ``provider`` once (forward, and backward when ``backward``)."""
    b, h, n, m, d = shape
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype, requires_grad=backward) for s in (n, m, m))
    grad_out = torch.randn(b, h, n, d, device=device, dtype=dtype)

    if provider.startswith("fastunet"):
        backend = "torch" if provider == "fastunet-torch" else "auto"

        def fn(q, k, v):
            with fastunet.use_backend(backend):
                return attention(q, k, v)
    elif provider in ("sdpa-flash", "sdpa-mem-efficient"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        forced = SDPBackend.FLASH_ATTENTION if provider == "sdpa-flash" else SDPBackend.EFFICIENT_ATTENTION

        def fn(q, k, v):
            with sdpa_kernel(forced):
                return _sdpa(q, k, v)
    elif provider == "torch-math":
        fn = _math
    else:
        fn = torch.compile(_sdpa) if provider == "torch.compile" else _sdpa

    def run():
        if not backward:
            with torch.no_grad():
                return fn(q, k, v)
        q.grad = k.grad = v.grad = None
        out = fn(q, k, v)
        out.backward(grad_out)
        return out

    return run, lambda: fn(q, k, v)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("provider", available(PROVIDERS))
def test_attention(benchmark, provider, name, dtype, mode, device):
    shape = SHAPES[name]
    backward = mode == "fwd+bwd"
    torch.manual_seed(0)
    run, forward = setup(provider, shape, dtype, backward, device)
    benchmark.group = f"{name} {tuple(shape)} {str(dtype).removeprefix('torch.')} {mode}"
    if benchmark.enabled:  # disabled (a smoke run): time_rounds runs it once, nothing is measured
        warm_up(run)
        benchmark.extra_info["peak_mib"] = (cuda_peak_bytes(run) if CUDA else cpu_peak_bytes(run)) / 2**20
        if backward:
            benchmark.extra_info["saved_mib"] = saved_bytes(forward) / 2**20
    time_rounds(benchmark, run, rounds=20 if CUDA else 3, warmup_rounds=1)
    record_rate(benchmark, "tflops", flops(shape, backward) / 1e12)
