"""Bitwise reproducibility of every kernel, and ``torch.use_deterministic_algorithms(True)``.

Each op (group_norm_act forward and backward, attention forward and backward with and without
masks, on both its kernel families, and FreeU's fourier_filter forward and backward) runs three
times on the same inputs, on the torch backend and on the Triton kernels (under Triton's interpreter
on CPU), with PyTorch's deterministic mode off and on; outputs and gradients must be bitwise equal
across the runs, and the deterministic mode must neither raise nor change a bit of the results.

No kernel in ``fastunet.kernels`` uses atomics: every reduction (group statistics and gradient
partial sums, attention's dK/dV over query blocks, the filter's DFT sums) runs in a fixed order
within one program or across programs through buffers merged by a later launch. So the launchers
need no deterministic alternative; ``test_no_kernel_uses_atomics`` keeps it that way.
"""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest
import torch

import fastunet
from fastunet.kernels import attention, fourier_filter, group_norm_act, launch_counts

BACKENDS = ("torch", "triton")
RUNS = 3
gna = importlib.import_module("fastunet.kernels.group_norm_act")


@pytest.fixture(params=[False, True], ids=["default", "deterministic-mode"])
def deterministic_mode(request):
    """PyTorch's deterministic mode off or on for the test, the previous setting restored after."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(request.param)
    try:
        yield request.param
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def runs(fn, tensors, grad_out, backend):
    """``RUNS`` forward + backward passes of ``fn`` on fresh leaf copies: a list of
    ``[out, *grads]``, and the Triton launches made."""
    before = sum(launch_counts.values())
    results = []
    for _ in range(RUNS):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        with fastunet.use_backend(backend):
            out = fn(*leaves)
            out.backward(grad_out)
        results.append([out.detach()] + [t.grad for t in leaves])
    return results, sum(launch_counts.values()) - before


def assert_bitwise_equal(results, names, backend, launched):
    assert (launched > 0) == (backend == "triton"), f"{backend}: {launched} Triton launches"
    first = results[0]
    for i, other in enumerate(results[1:], start=2):
        for name, a, b in zip(names, first, other):
            assert a.dtype == b.dtype and a.stride() == b.stride(), name
            # compare the bits (NaN-safe, and -0.0 vs 0.0 counts as a difference)
            assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)), (
                f"{name}: run {i} differs from run 1 by up to {(a.double() - b.double()).abs().max().item():.3g}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", ["cpu-split", "gpu-split"])
def test_group_norm_act_is_bitwise_reproducible(split, backend, deterministic_mode, monkeypatch):
    """Every input option on; each group is split over programs (two under the interpreter's
    target, four for "gpu-split", as on a GPU), whose partial sums a later launch merges."""
    if split == "gpu-split":
        monkeypatch.setattr(gna, "_target_programs", lambda device: 64)  # 4 programs per group, not 2
    B, C = 1, 16
    x = (torch.randn(B, C, 16, 64) * 1.7 + 0.6).half()
    vectors = [(1 + 0.5 * torch.randn(C)).half(), (0.5 * torch.randn(C)).half(),
               torch.randn(B, C).half(), (0.3 * torch.randn(B, C)).half(), (0.5 * torch.randn(B, C)).half()]

    def fn(x_, w_, b_, add_, scale_, shift_):
        return group_norm_act(x_, 4, w_, b_, 1e-5, "silu", add_, scale_, shift_)

    results, launched = runs(fn, [x, *vectors], torch.randn(x.shape).half(), backend)
    assert_bitwise_equal(results, ("y", "dx", "dweight", "dbias", "dadd", "dscale", "dshift"), backend, launched)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"], ids=str)
@pytest.mark.parametrize("seqlen", [24, 80], ids=["short-kernels", "main-kernels"])
def test_attention_is_bitwise_reproducible(seqlen, mask_kind, backend, deterministic_mode):
    """80 keys span two key tiles and two query blocks of the main kernels (dK/dV sum over query
    blocks in one program, dQ over key tiles in another); 24 takes the short kernels."""
    q, k, v = (torch.randn(2, 2, seqlen, 40).half() for _ in range(3))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, seqlen, seqlen) > 0.3
        mask[0, 0, 5] = False  # a fully masked row
    elif mask_kind == "float":
        mask = torch.randn(1, seqlen, seqlen)  # fp32 bias for fp16 inputs, broadcast over batch

    results, launched = runs(lambda *t: attention(*t, mask), (q, k, v), torch.randn(2, 2, seqlen, 40).half(), backend)
    assert_bitwise_equal(results, ("out", "dq", "dk", "dv"), backend, launched)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fourier_filter_is_bitwise_reproducible(dtype, backend, deterministic_mode):
    x = torch.randn(1, 2, 16, 12).to(dtype)
    results, launched = runs(lambda x_: fourier_filter(x_, 1, 0.9), (x,), torch.randn(x.shape).to(dtype), backend)
    assert_bitwise_equal(results, ("y", "dx"), backend, launched)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_mode_changes_no_result(backend):
    """Results with ``use_deterministic_algorithms(True)`` are those without, bit for bit."""
    q, k, v = (torch.randn(1, 2, 40, 16).half() for _ in range(3))
    mask = torch.rand(40, 40) > 0.2
    x = torch.randn(1, 16, 8, 8).half()
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    outputs = []
    try:
        for mode in (False, True):
            torch.use_deterministic_algorithms(mode)
            with fastunet.use_backend(backend):
                outputs.append([attention(q, k, v, mask), group_norm_act(x, 4, activation="gelu"),
                                fourier_filter(x.float(), 1, 0.5)])
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    for a, b in zip(*outputs):
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def test_no_kernel_uses_atomics():
    """Atomic accumulation would make results depend on the order programs run in on a GPU (and
    would oblige the launchers to honour ``torch.are_deterministic_algorithms_enabled()``). None of
    the kernels uses any: their reductions are ordered (see the module docstring)."""
    kernels_dir = pathlib.Path(importlib.import_module("fastunet.kernels").__file__).parent
    sources = sorted(kernels_dir.glob("*.py"))
    assert {"attention.py", "group_norm_act.py", "fourier_filter.py"} <= {p.name for p in sources}
    for path in sources:
        hits = [n for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"\batomic_\w+\s*\(", line)]
        assert not hits, f"{path.name} uses atomics on lines {hits}: give it a deterministic path"
