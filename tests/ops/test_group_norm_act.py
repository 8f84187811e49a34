"""fastunet.kernels.group_norm_act against a float64 oracle.

The Triton kernels run on CPU tensors through Triton's interpreter (backend "triton"); the torch path
(backend "torch") is checked the same way. The oracle is ``group_norm_act_reference`` (F.group_norm
plus the modulation and activation, differentiated by autograd) on float64 copies of the inputs. Our
error may be at most twice torch's own error in the inputs' dtype (the same oracle run in that dtype)
plus a small floor relative to the largest reference value.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from fastunet.kernels import group_norm_act, group_norm_act_reference, launch_counts, use_backend
from fastunet.testing import check_against_oracle, rel_err

gna = importlib.import_module("fastunet.kernels.group_norm_act")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
FLOOR = {F32: 1e-5, F16: 1e-3, BF16: 8e-3}
KERNELS = ("_group_norm_act_stats_kernel", "_group_norm_act_fwd_kernel", "_group_norm_act_bwd_reduce_kernel",
           "_group_norm_act_bwd_dx_kernel")


def make_inputs(shape, dtype, *, affine=True, add=False, scale=False, shift=False, vec_dtype=None):
    """Fresh random inputs (off-centre, not unit variance) and an output gradient."""
    B, C = shape[:2]
    vd = vec_dtype or dtype
    inputs = {"x": (torch.randn(shape) * 1.7 + 0.6).to(dtype)}
    if affine:
        inputs["weight"] = (1 + 0.5 * torch.randn(C)).to(vd)
        inputs["bias"] = (0.5 * torch.randn(C)).to(vd)
    if add:
        inputs["add"] = torch.randn(B, C).to(vd)
    if scale:
        inputs["scale"] = (0.3 * torch.randn(B, C)).to(vd)
    if shift:
        inputs["shift"] = (0.5 * torch.randn(B, C)).to(vd)
    return inputs, torch.randn(shape).to(dtype)


def run(fn, inputs, dy, num_groups, activation, eps=1e-5, cast=None):
    """``fn``'s output and the gradients of every input, on leaf copies (optionally cast)."""
    leaves = {k: (v.to(cast) if cast else v).detach().clone().requires_grad_() for k, v in inputs.items()}
    y = fn(leaves["x"], num_groups, leaves.get("weight"), leaves.get("bias"), eps, activation,
           leaves.get("add"), leaves.get("scale"), leaves.get("shift"))
    y.backward(dy.to(cast) if cast else dy)
    return {"y": y.detach(), **{k: v.grad for k, v in leaves.items()}}


def assert_matches_oracle(inputs, dy, num_groups, activation, ours):
    """Compare ``ours`` (output and gradients) with the float64 oracle, bounded by torch's own error."""
    dtype = inputs["x"].dtype
    ref = run(group_norm_act_reference, inputs, dy, num_groups, activation, cast=torch.float64)
    low = run(group_norm_act_reference, inputs, dy, num_groups, activation, cast=dtype)
    assert set(ours) == set(ref)
    for name, r in ref.items():
        assert ours[name].dtype == inputs.get(name, inputs["x"]).dtype, name
        assert ours[name].shape == r.shape, name
        check_against_oracle(ours[name], r, low[name], floor=FLOOR[dtype] * max(1.0, r.abs().max().item()), name=name)


def run_backend(backend, inputs, dy, num_groups, activation):
    with use_backend(backend):
        return run(group_norm_act, inputs, dy, num_groups, activation)


# (id, shape, num_groups, dtype, activation, input options)
TRITON_CASES = [
    ("sd-320x64x64-fp16", (2, 320, 64, 64), 32, F16, "silu", dict(add=True, scale=True, shift=True)),
    ("sd-1280x8x8-bf16", (2, 1280, 8, 8), 32, BF16, "mish", dict(add=True)),
    ("long-group-40ch-128x128-bf16", (1, 40, 128, 128), 1, BF16, "gelu", dict(add=True)),
    ("odd-13x7-no-affine-fp32", (1, 96, 13, 7), 32, F32, "mish", dict(affine=False)),
    ("1d-fp16", (3, 16, 37), 4, F16, "gelu", dict(add=True, shift=True)),
    ("video-3d-bf16", (1, 64, 4, 8, 8), 32, BF16, "silu", dict(scale=True, shift=True)),
    ("split-channels-and-space-fp32", (1, 16, 32, 64), 1, F32, None, dict(add=True, scale=True, shift=True)),
    ("fp16-x-fp32-vectors", (2, 64, 16, 16), 8, F16, "silu",
     dict(add=True, scale=True, shift=True, vec_dtype=F32)),
]


@pytest.mark.parametrize("shape, num_groups, dtype, activation, opts",
                         [c[1:] for c in TRITON_CASES], ids=[c[0] for c in TRITON_CASES])
def test_triton_matches_float64(shape, num_groups, dtype, activation, opts):
    inputs, dy = make_inputs(shape, dtype, **opts)
    before = {k: launch_counts[k] for k in KERNELS}
    ours = run_backend("triton", inputs, dy, num_groups, activation)
    assert all(launch_counts[k] == before[k] + 1 for k in KERNELS), "a Triton kernel did not run"
    assert_matches_oracle(inputs, dy, num_groups, activation, ours)


@pytest.mark.parametrize("activation", ["silu", "gelu", "mish", None])
def test_triton_each_activation(activation):
    inputs, dy = make_inputs((2, 32, 9, 11), F32, add=True, scale=True, shift=True)
    inputs["x"] = inputs["x"] * 3  # reach the activations' tails
    assert_matches_oracle(inputs, dy, 8, activation, run_backend("triton", inputs, dy, 8, activation))


def test_triton_split_as_on_a_gpu(monkeypatch):
    """The split a 132-SM GPU would use (64 programs per group over channels and space)."""
    monkeypatch.setattr(gna, "_target_programs", lambda device: 8 * 132)
    cfg = gna._group_norm_act_config(8, 4096)
    split = gna._group_norm_act_split(4, 8, 4096, cfg["BLOCK_C"], cfg["BLOCK_L"], 8 * 132)
    assert split["n_split"] == 32 and split["split_l"] == 4
    inputs, dy = make_inputs((1, 32, 64, 64), F32, add=True, scale=True, shift=True)
    first = run_backend("triton", inputs, dy, 4, "silu")
    assert_matches_oracle(inputs, dy, 4, "silu", first)
    second = run_backend("triton", inputs, dy, 4, "silu")
    for name in first:  # deterministic: no atomics, fixed reduction order
        assert torch.equal(first[name], second[name]), name


def test_triton_strided_inputs():
    """channels_last ``x`` and ``scale``/``shift`` as the two halves of one embedding."""
    inputs, dy = make_inputs((2, 64, 12, 10), F32, add=True)
    emb = torch.randn(2, 128) * 0.4
    inputs["scale"], inputs["shift"] = emb.chunk(2, dim=1)
    inputs["x"] = inputs["x"].contiguous(memory_format=torch.channels_last)
    assert not inputs["scale"].is_contiguous() and not inputs["x"].is_contiguous()
    assert_matches_oracle(inputs, dy, 16, "gelu", run_backend("triton", inputs, dy, 16, "gelu"))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_transposed_view_input(backend):
    """A (B, C, H, W) view of a (B, H*W, C) token tensor (what attention blocks hand back): reshaping
    it to (B, C, L) stays a non-contiguous view, which both paths must read correctly."""
    inputs, dy = make_inputs((2, 32, 6, 5), F32, add=True, scale=True, shift=True)
    tokens = torch.randn(2, 30, 32) * 1.3 + 0.2
    inputs["x"] = tokens.transpose(1, 2).reshape(2, 32, 6, 5)
    assert not inputs["x"].is_contiguous()
    assert_matches_oracle(inputs, dy, 8, "silu", run_backend(backend, inputs, dy, 8, "silu"))


def test_triton_writes_every_element():
    """Outputs poisoned with NaN before the kernels write them come back fully overwritten."""
    inputs, dy = make_inputs((2, 48, 7, 9), F16, add=True, scale=True, shift=True)
    args = [inputs["x"], inputs["weight"], inputs["bias"], inputs["add"], inputs["scale"], inputs["shift"]]
    y = torch.full_like(inputs["x"], float("nan"))
    y_out, mean, rstd = gna._group_norm_act_fwd(*args, 12, 1e-5, "silu", y=y)
    assert y_out is y and not y.isnan().any()
    y_ref, mean_ref, rstd_ref = gna._group_norm_act_fwd(*args, 12, 1e-5, "silu")
    assert torch.equal(y, y_ref) and torch.equal(mean, mean_ref) and torch.equal(rstd, rstd_ref)
    dx = torch.full_like(inputs["x"], float("nan"))
    grads = gna._group_norm_act_bwd(dy, *args, mean, rstd, 12, "silu", dx=dx)
    assert grads[0] is dx and not dx.isnan().any()
    assert all(not g.isnan().any() for g in grads)
    assert torch.equal(dx, gna._group_norm_act_bwd(dy, *args, mean, rstd, 12, "silu")[0])


@pytest.mark.parametrize("Cg, L", [(1, 1), (3, 91), (10, 4096), (20, 1024), (40, 256), (40, 64), (40, 16384),
                                   (64, 37), (160, 4097), (2, 1 << 20)])
@pytest.mark.parametrize("n_bg, target", [(1, 8), (64, 8), (2, 1056), (64, 1056), (4096, 1056)])
def test_split_covers_every_tile_once(Cg, L, n_bg, target):
    cfg = gna._group_norm_act_config(Cg, L)
    assert cfg in gna._group_norm_act_configs()
    bc, bl = cfg["BLOCK_C"], cfg["BLOCK_L"]
    s = gna._group_norm_act_split(n_bg, Cg, L, bc, bl, target)
    assert 1 <= s["n_split"] <= gna._MAX_SPLIT and 1 <= s["split_l"] <= gna._MAX_SPLIT_L
    covered = []
    for pid in range(s["n_split"]):  # the kernels' arithmetic
        c_lo = (pid // s["split_l"]) * s["cb_per_prog"] * bc
        l_lo = (pid % s["split_l"]) * s["lt_per_prog"] * bl
        c_hi, l_hi = min(c_lo + s["cb_per_prog"] * bc, Cg), min(l_lo + s["lt_per_prog"] * bl, L)
        assert c_lo < c_hi and l_lo < l_hi, "empty program"
        covered += [(c, l) for c in range(c_lo, c_hi, bc) for l in range(l_lo, l_hi, bl)]
    assert sorted(covered) == [(c, l) for c in range(0, Cg, bc) for l in range(0, L, bl)]


def test_config_is_bucketed():
    assert gna._group_norm_act_config(40, 4096) == gna._group_norm_act_config(40, 4093)
    assert gna._group_norm_act_config(10, 64 * 64) == gna._group_norm_act_config(10, 63 * 65)
    assert len({str(gna._group_norm_act_config(c, l)) for c in range(1, 200, 7) for l in range(1, 9000, 97)}) <= 3


TORCH_CASES = [
    ("sd-320x64x64-fp32", (2, 320, 64, 64), 32, F32, "silu", dict(add=True, scale=True, shift=True)),
    ("odd-13x7-bf16", (1, 96, 13, 7), 32, BF16, "mish", dict(add=True)),
    ("1d-fp16", (3, 16, 37), 4, F16, "gelu", dict(add=True, scale=True, affine=False)),
    ("video-3d-fp32", (1, 64, 4, 8, 8), 32, F32, None, dict(shift=True)),
]


@pytest.mark.parametrize("shape, num_groups, dtype, activation, opts",
                         [c[1:] for c in TORCH_CASES], ids=[c[0] for c in TORCH_CASES])
def test_torch_path_matches_float64(shape, num_groups, dtype, activation, opts):
    inputs, dy = make_inputs(shape, dtype, **opts)
    before = sum(launch_counts[k] for k in KERNELS)
    ours = run_backend("torch", inputs, dy, num_groups, activation)
    assert sum(launch_counts[k] for k in KERNELS) == before
    assert_matches_oracle(inputs, dy, num_groups, activation, ours)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_large_mean_does_not_cancel(backend):
    """x = 1000 + noise in fp32: the backward must centre x before its reductions. Summing du * x and
    subtracting mean * sum(du) afterwards (as the torch path did) cancels catastrophically: up to
    8e-4 relative error in dweight on these inputs, against 2e-4 centred."""
    for seed in range(4):
        torch.manual_seed(seed)
        inputs = {"x": 1000 + torch.randn(2, 8, 256), "weight": 1 + 0.5 * torch.randn(8), "bias": torch.randn(8)}
        dy = torch.randn(2, 8, 256)
        ours = run_backend(backend, inputs, dy, 2, "silu")
        ref = run(group_norm_act_reference, inputs, dy, 2, "silu", cast=torch.float64)
        for name in ("x", "weight", "bias"):
            err = rel_err(ours[name], ref[name], norm="max")
            assert err < 3e-4, (seed, name, err)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_saves_only_inputs_and_statistics(backend):
    """Autograd keeps x, the small vectors and (B, G) fp32 statistics: nothing else of x's size."""
    inputs, dy = make_inputs((2, 32, 8, 8), F16, add=True, scale=True, shift=True)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    saved = []
    with use_backend(backend), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                                         lambda t: t):
        y = group_norm_act(leaves["x"], 8, leaves["weight"], leaves["bias"], 1e-5, "silu",
                           leaves["add"], leaves["scale"], leaves["shift"])
    x = leaves["x"]
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr() and big[0].shape == x.shape
    small = [t for t in saved if t.numel() < x.numel()]
    assert sum(t.numel() for t in small) <= 2 * 8 * 2 + 2 * 32 + 3 * 2 * 32
    stats = [t for t in small if t.shape == (2, 8)]
    assert len(stats) == 2 and all(t.dtype == torch.float32 for t in stats)
    y.backward(dy)
    assert all(v.grad is not None for v in leaves.values())


class _ResnetNorm(nn.Module):
    """GroupNorm + SiLU with a time-embedding add and scale/shift, as a UNet resnet block uses it."""

    def __init__(self, channels=32, emb=16):
        super().__init__()
        self.norm = nn.GroupNorm(8, channels)
        self.time_proj = nn.Linear(emb, channels)
        self.mod_proj = nn.Linear(emb, 2 * channels)

    def forward(self, x, emb):
        scale, shift = self.mod_proj(emb).chunk(2, dim=1)
        return group_norm_act(x, 8, self.norm.weight, self.norm.bias, self.norm.eps, "silu",
                              add=self.time_proj(emb), scale=scale, shift=shift)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    module = _ResnetNorm()
    x, emb = torch.randn(2, 32, 6, 5), torch.randn(2, 16)
    with use_backend(backend):
        eager = module(x, emb)
        eager.square().sum().backward()
        grads = [p.grad.clone() for p in module.parameters()]
        module.zero_grad()
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")(x, emb)
        compiled.square().sum().backward()
    torch.testing.assert_close(compiled, eager)
    for g, p in zip(grads, module.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_torch_compile_inductor():
    """The default torch.compile backend (inductor, C++ on the CPU) around the opaque custom ops."""
    torch._dynamo.reset()
    module = _ResnetNorm()
    x, emb = torch.randn(2, 32, 6, 5, requires_grad=True), torch.randn(2, 16)
    with use_backend("torch"):
        eager = module(x, emb)
        compiled = torch.compile(module, fullgraph=True)(x, emb)
        (dx_eager,) = torch.autograd.grad(eager.square().sum(), x)
        (dx_compiled,) = torch.autograd.grad(compiled.square().sum(), x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(dx_compiled, dx_eager)


def test_custom_op_registration():
    """Schema, fake tensors and autograd registration as torch.library checks them."""
    inputs, _ = make_inputs((2, 16, 5, 3), F32, add=True, scale=True, shift=True)
    args = [inputs[k].requires_grad_() for k in ("x", "weight", "bias", "add", "scale", "shift")]
    with use_backend("torch"):
        torch.library.opcheck(torch.ops.fastunet.group_norm_act_fwd.default, (*args, 4, 1e-5, "gelu"))
        torch.library.opcheck(torch.ops.fastunet.group_norm_act_fwd.default,
                              (args[0], None, None, None, None, None, 4, 1e-5, "none"))


def test_bare_kernels_copy_does_not_take_over_the_ops():
    """transformers imports a top-level ``kernels`` to probe for the PyPI package; with the repository
    root on sys.path that is a second copy of kernels/, which must leave the registered ops alone."""
    root = pathlib.Path(gna.__file__).resolve().parents[1]
    code = textwrap.dedent(f"""
        import sys, torch
        from fastunet.kernels import group_norm_act, launch_counts, use_backend
        sys.path.insert(0, {str(root)!r})
        import kernels.group_norm_act
        assert "kernels.group_norm_act" in sys.modules
        with use_backend("triton"):
            group_norm_act(torch.randn(2, 8, 3, 3), 2)
        assert launch_counts["_group_norm_act_fwd_kernel"] == 1, dict(launch_counts)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_empty_batch():
    x = torch.randn(0, 16, 4, 4, requires_grad=True)
    with use_backend("triton"):
        y = group_norm_act(x, 4, torch.randn(16), torch.randn(16))
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_validation_errors():
    x = torch.randn(2, 12, 4, 4)
    with pytest.raises(ValueError, match="divide the 12 channels"):
        group_norm_act(x, 5)
    with pytest.raises(ValueError, match=r"weight must have shape \(12,\); got \(6,\)"):
        group_norm_act(x, 4, weight=torch.randn(6))
    with pytest.raises(ValueError, match=r"add must have shape \(2, 12\); got \(2, 12, 1, 1\)"):
        group_norm_act(x, 4, add=torch.randn(2, 12, 1, 1))
    with pytest.raises(ValueError, match="activation must be one of .* got 'relu'"):
        group_norm_act(x, 4, activation="relu")
    with pytest.raises(ValueError, match=r"1 to 3 spatial dims .* got 2 dims"):
        group_norm_act(torch.randn(2, 12), 4)
    with pytest.raises(ValueError, match="got 6 dims"):
        group_norm_act(torch.randn(1, 12, 2, 2, 2, 2), 4)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16; got torch.float64"):
        group_norm_act(x.double(), 4)
    with pytest.raises(TypeError, match="scale must be torch.float16 .* got torch.bfloat16"):
        group_norm_act(x.half(), 4, scale=torch.randn(2, 12, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="num_groups must be an int; got float"):
        group_norm_act(x, 4.0)
    with pytest.raises(ValueError, match="non-empty spatial"):
        group_norm_act(torch.randn(2, 12, 0, 3), 4)
