"""Eager calls skip the custom-op dispatcher (``fastunet.kernels._backend.direct_call``) with the same
results, and everything that must see the ``torch.ops.fastunet`` ops still does."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastunet
from fastunet.kernels import group_norm_act
from fastunet.layers.normalization import norm_act_conv
from fastunet.testing import rel_err

backend = importlib.import_module("fastunet.kernels._backend")
gna = importlib.import_module("fastunet.kernels.group_norm_act")


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_direct_call_only_for_plain_eager_tensors():
    x = torch.randn(2, 3)
    assert backend.direct_call(x)
    assert not backend.direct_call(torch.empty(2, 3, device="meta"))
    with _OpLog():
        assert not backend.direct_call(x)
    assert not backend.direct_call(torch.nn.Parameter(x))  # a subclass: through the op


def test_dispatch_modes_still_see_the_custom_ops():
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    with _OpLog() as log:
        group_norm_act(x, 4).sum().backward()
    assert "fastunet.group_norm_act_fwd" in log.ops and "fastunet.group_norm_act_bwd" in log.ops, log.ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["plain", "add", "modulated"])
def test_direct_path_equals_the_op_bit_for_bit(dtype, variant):
    g = torch.Generator().manual_seed(3)
    B, C = 2, 12
    x = torch.randn(B, C, 5, 7, generator=g).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(C, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(C, generator=g)).requires_grad_()
    extra = {}
    if variant == "add":
        extra["add"] = torch.randn(B, C, generator=g).requires_grad_()
    if variant == "modulated":
        extra["scale"] = (0.2 * torch.randn(B, C, generator=g)).requires_grad_()
        extra["shift"] = (0.2 * torch.randn(B, C, generator=g)).requires_grad_()
    dy = torch.randn(x.shape, generator=g).to(dtype)
    leaves = [x, w, b, *extra.values()]

    y = group_norm_act(x, 3, w, b, 1e-5, "silu", **extra)
    grads = torch.autograd.grad(y, leaves, dy)
    args = (x, w, b, extra.get("add"), extra.get("scale"), extra.get("shift"), 3, 1e-5, "silu", None)
    y_op = torch.ops.fastunet.group_norm_act_fwd(*args)[0]
    grads_op = torch.autograd.grad(y_op, leaves, dy)
    assert torch.equal(y, y_op)
    for got, want in zip(grads, grads_op):
        assert torch.equal(got, want)


@pytest.mark.parametrize("with_add", [False, True])
@pytest.mark.parametrize("offset, centred, tol", [(3.0, False, 1e-5), (1000.0, True, 3e-4)],
                         ids=["mean-3std", "mean-1000std"])
def test_norm_act_conv_torch_backward_against_float64(with_add, offset, centred, tol, monkeypatch, fused_nodes):
    """The torch path's recompute (norm_act_conv's backward) against autograd through the float64
    unfused ops: aten's GroupNorm run again for a moderate mean, the input centred on the saved mean
    for a large one (x = 1000 + noise, where reading x as it is would cancel)."""
    normalization = importlib.import_module("fastunet.layers.normalization")
    calls = []

    def spy(*args):
        h, state = gna.group_norm_act_recompute_torch(*args)
        calls.append((args[0].shape, state.xc is not None))
        return h, state

    monkeypatch.setattr(normalization, "group_norm_act_recompute_torch", spy)
    g = torch.Generator().manual_seed(5)
    norm, conv = nn.GroupNorm(4, 16), nn.Conv2d(16, 8, 3, padding=1)
    with torch.no_grad():
        norm.weight.add_(0.2 * torch.randn(16, generator=g))
        norm.bias.add_(0.2 * torch.randn(16, generator=g))
    x = (offset + torch.randn(2, 16, 6, 5, generator=g)).requires_grad_()
    add = torch.randn(2, 16, generator=g).requires_grad_() if with_add else None
    dy = torch.randn(2, 8, 6, 5, generator=g)
    leaves = [x, norm.weight, norm.bias, conv.weight, conv.bias] + ([add] if with_add else [])
    with fastunet.use_backend("torch"):
        out = norm_act_conv(norm, x, conv, "silu", add=add)
    grads = torch.autograd.grad(out, leaves, dy)
    assert calls == [(x.shape, centred)]  # the recompute path ran, centred or not

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, w64, b64, cw64, cb64 = leaves64[:5]
    h64 = x64 + leaves64[5][:, :, None, None] if with_add else x64
    ref = torch.nn.functional.conv2d(torch.nn.functional.silu(torch.nn.functional.group_norm(h64, 4, w64, b64)),
                                     cw64, cb64, padding=1)
    grads64 = torch.autograd.grad(ref, leaves64, dy.double())
    assert rel_err(out, ref, norm="max") < tol
    for got, want in zip(grads, grads64):
        assert rel_err(got, want, norm="max") < tol


@pytest.mark.parametrize("shape, plain", [((2, 16, 6, 5), True), ((2, 64, 16, 16), False)],
                         ids=["under-cutoff", "over-cutoff"])
def test_small_group_norm_sites_run_plain_aten_ops(shape, plain, monkeypatch):
    """In eager mode on the torch path, a GroupNorm site under ``PLAIN_BELOW_ELEMENTS`` elements runs
    aten's own differentiable ops (the step ends in aten's convolution node, nothing of fastunet's),
    one at or over it the fused recompute node; both give the gradients of the fused node."""
    normalization = importlib.import_module("fastunet.layers.normalization")
    assert (shape[0] * shape[1] * shape[2] * shape[3] < normalization.PLAIN_BELOW_ELEMENTS) == plain
    g = torch.Generator().manual_seed(11)
    norm, conv = nn.GroupNorm(4, shape[1]), nn.Conv2d(shape[1], 8, 3, padding=1)
    x = (0.5 + torch.randn(*shape, generator=g)).requires_grad_()
    dy = torch.randn(shape[0], 8, *shape[2:], generator=g)
    leaves = [x, norm.weight, norm.bias, conv.weight, conv.bias]
    with fastunet.use_backend("torch"):
        out = norm_act_conv(norm, x, conv, "silu")
        assert type(out.grad_fn).__name__ == ("ConvolutionBackward0" if plain else "_NormActConvBackward")
        grads = torch.autograd.grad(out, leaves, dy)
        monkeypatch.setattr(normalization, "PLAIN_BELOW_ELEMENTS", 0)
        fused = norm_act_conv(norm, x, conv, "silu")
        assert type(fused.grad_fn).__name__ == "_NormActConvBackward"
        fused_grads = torch.autograd.grad(fused, leaves, dy)
    assert rel_err(out, fused, norm="max") < 1e-6
    for got, want in zip(grads, fused_grads):
        assert rel_err(got, want, norm="max") < 1e-5
