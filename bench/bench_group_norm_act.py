"""GroupNorm + SiLU as Stable Diffusion's resnet blocks use it, forward and forward + backward.

Variants:
  plain       act(GroupNorm(x)) with the affine weight/bias (norm1/norm2 of a resnet block)
  modulated   act(GroupNorm(x + add) * (1 + scale) + shift): the time embedding fused in
  add         act(GroupNorm(x + add)): the per-channel add alone (``fastunet bench``'s real-shape runs)
x may be 3-, 4- or 5-D ``(B, C, ...)``; the activation is SiLU unless ``setup`` is given another
(``None``: the transformers' plain input norm).

Providers:
  fastunet          fastunet.kernels.group_norm_act, backend "auto": the Triton kernels on CUDA, the
                    torch path (hand-written backward) on CPU
  fastunet-torch    the torch path (backend "torch")
  fastunet-triton   the Triton kernels, forced (CUDA only; skipped on CPU)
  torch             eager F.group_norm + F.silu (and the modulation ops)
  torch.compile     torch.compile of the eager function (on CUDA, or on CPU with FASTUNET_BENCH_COMPILE=1)

``gbps`` counts the least traffic the op needs: one read of x and one write of y forward; plus a
read of x and dy and a write of dx backward (the (B, C) vectors are negligible). On a GPU it compares
directly with the device's bandwidth. ``peak_mib`` is the peak memory allocated during a call beyond
what was allocated before it (CUDA: ``max_memory_allocated``; CPU: the profiler's memory timeline);
``saved_mib`` (fwd+bwd) the bytes autograd keeps for backward. Run: ``.venv/bin/python -m pytest bench/bench_group_norm_act.py
--benchmark-enable``; the table lands in ``bench/results/bench_group_norm_act.md``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import (CUDA, available, cpu_peak_bytes, cuda_peak_bytes, record_rate, saved_bytes, small, time_rounds,
                     warm_up)

import fastunet
from fastunet.kernels import group_norm_act

SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16)]
if small():  # smoke-test sizes: a square map and an odd one
    SHAPES = [(1, 64, 8, 8), (1, 96, 9, 11)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32] if CUDA else [torch.float32]
PROVIDERS = ["fastunet", "fastunet-torch", "fastunet-triton", "torch", "torch.compile"]
GROUPS = 32


def _eager(x, weight, bias, add, scale, shift, activation="silu"):
    """The unfused torch spelling of the op."""
    per_channel = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    if add is not None:
        x = x + add.view(per_channel)
    y = F.group_norm(x, GROUPS, weight, bias, 1e-5)
    if scale is not None:
        y = y * (1 + scale.view(per_channel)) + shift.view(per_channel)
    return F.silu(y) if activation == "silu" else y


def setup(provider: str, shape: tuple, dtype: torch.dtype, variant: str, backward: bool, device,
          activation: str | None = "silu"):
    """A zero-argument callable running ``provider`` once on fresh random inputs (forward, and
    backward when ``backward``)."""
    if variant not in ("plain", "modulated", "add"):
        raise ValueError(f"variant must be 'plain', 'modulated' or 'add'; got {variant!r}")
    if activation not in ("silu", None):
        raise ValueError(f"activation must be 'silu' or None; got {activation!r}")
    B, C = shape[:2]
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=backward)
    weight = torch.randn(C, device=device, dtype=dtype, requires_grad=backward)
    bias = torch.randn(C, device=device, dtype=dtype, requires_grad=backward)
    vecs = [None, None, None]
    if variant == "modulated":
        vecs = [torch.randn(B, C, device=device, dtype=dtype, requires_grad=backward) for _ in range(3)]
    elif variant == "add":
        vecs = [torch.randn(B, C, device=device, dtype=dtype, requires_grad=backward), None, None]
    dy = torch.randn(shape, device=device, dtype=dtype)

    if provider.startswith("fastunet"):
        backend = {"fastunet": "auto", "fastunet-torch": "torch", "fastunet-triton": "triton"}[provider]

        def fn(*args):
            with fastunet.use_backend(backend):
                return group_norm_act(args[0], GROUPS, *args[1:3], 1e-5, activation, *args[3:])
    else:
        eager = torch.compile(_eager) if provider == "torch.compile" else _eager

        def fn(*args):
            return eager(*args, activation=activation)

    leaves = [t for t in (x, weight, bias, *vecs) if t is not None]

    def run():
        y = fn(x, weight, bias, *vecs)
        if backward:
            for t in leaves:  # no gradient accumulation in the timing
                t.grad = None
            y.backward(dy)
        return y

    return run


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("variant", ["plain", "modulated"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", available(PROVIDERS))
def test_group_norm_act(benchmark, provider, shape, dtype, variant, backward, device):
    torch.manual_seed(0)
    run = setup(provider, shape, dtype, variant, backward, device)
    if benchmark.enabled:  # disabled (a smoke run): time_rounds runs it once, nothing is measured
        warm_up(run)
        benchmark.extra_info["peak_mib"] = (cuda_peak_bytes(run) if CUDA else cpu_peak_bytes(run)) / 2**20
        if backward:  # run's backward saves nothing itself, so its saved bytes are the forward's
            benchmark.extra_info["saved_mib"] = saved_bytes(run) / 2**20
    mode = "fwd+bwd" if backward else "fwd"
    benchmark.group = f"{'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')} {variant} {mode}"
    time_rounds(benchmark, run, rounds=20 if CUDA else 5, warmup_rounds=2)
    numel = torch.Size(shape).numel()
    passes = 5 if backward else 2
    record_rate(benchmark, "gbps", passes * numel * dtype.itemsize / 1e9)
