"""fastunet.kernels.group_norm_act against a float64 oracle.

The Triton kernels run on CPU tensors through Triton's interpreter (backend "triton"); the torch path
(backend "torch") is checked the same way. The oracle is ``group_norm_act_reference`` (F.group_norm
plus the modulation and activation, differentiated by autograd) on float64 copies of the inputs. Our
error may be at most twice torch's own error in the inputs' dtype (the same oracle run in that dtype)
plus a small floor relative to the largest reference value.
"""

from __future__ import annotations

import importlib
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastunet.kernels import group_norm_act, group_norm_act_reference, launch_counts, use_backend
from fastunet.testing import check_against_oracle, rel_err

gna = importlib.import_module("fastunet.kernels.group_norm_act")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
FLOOR = {F32: 1e-5, F16: 1e-3, BF16: 8e-3}
KERNELS = ("_group_norm_act_stats_kernel", "_group_norm_act_fwd_kernel", "_group_norm_act_bwd_reduce_kernel",
           "_group_norm_act_bwd_dx_kernel")
# a group that fits one program's registers runs the fwd (dx) kernel alone (ONE_PASS), without the stats
# (reduce) kernel; the backward's limit is half the forward's


def expected_launches(shape, num_groups) -> dict:
    """Launches of each kernel that one forward and backward of x of ``shape`` make."""
    Cg, L = shape[1] // num_groups, math.prod(shape[2:])
    one_pass = [gna._group_norm_act_one_pass_config(Cg, L, backward) is not None for backward in (False, True)]
    return {"_group_norm_act_stats_kernel": int(not one_pass[0]), "_group_norm_act_fwd_kernel": 1,
            "_group_norm_act_bwd_reduce_kernel": int(not one_pass[1]), "_group_norm_act_bwd_dx_kernel": 1}


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


def run(fn, inputs, dy, num_groups, activation, eps=1e-5, cast=None, **kwargs):
    """``fn``'s output and the gradients of every input, on leaf copies (optionally cast; a copy keeps
    the strides of its tensor) with ``kwargs`` passed on to ``fn``."""
    leaves = {k: (v.to(cast) if cast else v).detach().clone().requires_grad_() for k, v in inputs.items()}
    y = fn(leaves["x"], num_groups, leaves.get("weight"), leaves.get("bias"), eps, activation,
           leaves.get("add"), leaves.get("scale"), leaves.get("shift"), **kwargs)
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


def run_backend(backend, inputs, dy, num_groups, activation, **kwargs):
    with use_backend(backend):
        return run(group_norm_act, inputs, dy, num_groups, activation, **kwargs)


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
    # one pass: 10 channels a group (a 16-channel tile), 63 positions (a 64-position tile)
    ("one-pass-odd-10ch-7x9-fp32", (2, 40, 7, 9), 4, F32, "mish", dict(add=True, scale=True, shift=True)),
    # one pass at the register cap (2 x 4096 = 8192 lanes, 16 warps) forward, two kernels backward
    ("one-pass-largest-bf16", (1, 8, 64, 64), 4, BF16, "gelu", dict(add=True, scale=True, shift=True)),
    # one pass both ways at the backward's cap (2 x 2048 = 4096 lanes)
    ("one-pass-largest-bwd-fp32", (1, 8, 32, 64), 4, F32, "silu", dict(add=True, shift=True)),
    ("two-pass-smallest-fp16", (1, 12, 33, 64), 4, F16, "silu", dict(add=True, scale=True, shift=True)),
]


@pytest.mark.parametrize("shape, num_groups, dtype, activation, opts",
                         [c[1:] for c in TRITON_CASES], ids=[c[0] for c in TRITON_CASES])
def test_triton_matches_float64(shape, num_groups, dtype, activation, opts):
    inputs, dy = make_inputs(shape, dtype, **opts)
    before = {k: launch_counts[k] for k in KERNELS}
    ours = run_backend("triton", inputs, dy, num_groups, activation)
    launched = {k: launch_counts[k] - before[k] for k in KERNELS}
    assert launched == expected_launches(shape, num_groups), launched
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


@pytest.mark.parametrize("Cg, S1", [(1, 1), (3, 91), (10, 4096), (20, 1024), (40, 256), (40, 64), (40, 16384),
                                    (64, 37), (160, 4097), (2, 1 << 20)])
@pytest.mark.parametrize("S0", [1, 16])
@pytest.mark.parametrize("n_bg, target", [(1, 8), (64, 8), (2, 1056), (64, 1056), (4096, 1056)])
def test_split_covers_every_tile_once(Cg, S1, S0, n_bg, target):
    """Every (channel block, spatial tile) of a group, with S0 rows of cdiv(S1, BLOCK_L) tiles each, is
    covered by exactly one program."""
    cfg = gna._group_norm_act_config(Cg, S1)
    assert cfg in gna._group_norm_act_configs()
    bc, bl = cfg["BLOCK_C"], cfg["BLOCK_L"]
    s = gna._group_norm_act_split(n_bg, Cg, S1, bc, bl, target, S0)
    assert 1 <= s["n_split"] <= gna._MAX_SPLIT and 1 <= s["split_l"] <= gna._MAX_SPLIT_L
    n_lt1 = -(-S1 // bl)
    covered = []
    for pid in range(s["n_split"]):  # the kernels' arithmetic
        c_lo = (pid // s["split_l"]) * s["cb_per_prog"] * bc
        t_lo = (pid % s["split_l"]) * s["lt_per_prog"]
        c_hi, t_hi = min(c_lo + s["cb_per_prog"] * bc, Cg), min(t_lo + s["lt_per_prog"], S0 * n_lt1)
        assert c_lo < c_hi and t_lo < t_hi, "empty program"
        covered += [(c, t // n_lt1, (t % n_lt1) * bl) for c in range(c_lo, c_hi, bc) for t in range(t_lo, t_hi)]
    assert sorted(covered) == [(c, s0, l) for c in range(0, Cg, bc) for s0 in range(S0) for l in range(0, S1, bl)]


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


@pytest.mark.parametrize("backend, length", [("torch", 256), ("triton", 256), ("triton", 4096)],
                         ids=["torch", "triton-one-pass", "triton-two-pass"])
def test_large_mean_does_not_cancel(backend, length):
    """x = 1000 + noise in fp32: the backward must centre x before its reductions. Summing du * x and
    subtracting mean * sum(du) afterwards (as the torch path did) cancels catastrophically: up to
    8e-4 relative error in dweight on these inputs, against 2e-4 centred. Groups of 4 x 256 take the
    one-pass kernels, 4 x 4096 the two-kernel ones."""
    for seed in range(4 if length == 256 else 2):
        torch.manual_seed(seed)
        inputs = {"x": 1000 + torch.randn(2, 8, length), "weight": 1 + 0.5 * torch.randn(8), "bias": torch.randn(8)}
        dy = torch.randn(2, 8, length)
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
        torch.library.opcheck(torch.ops.fastunet.group_norm_act_fwd.default, (*args, 4, 1e-5, "gelu", None))
        torch.library.opcheck(torch.ops.fastunet.group_norm_act_fwd.default,
                              (args[0], None, None, None, None, None, 4, 1e-5, "none", None))


def test_bare_kernels_copy_does_not_take_over_the_ops():
    """transformers imports a top-level ``kernels`` to probe for the PyPI package; with the repository
    root on sys.path that is a second copy of kernels/, which must leave the registered ops alone."""
    root = pathlib.Path(gna.__file__).resolve().parents[1]
    code = textwrap.dedent(f"""
        import sys, torch
        from fastunet.kernels import group_norm_act, launch_counts, use_backend
        # fastunet's import may already have brought in the PyPI ``kernels`` (transformers imports it):
        # forget it, so that the import below finds the repository's folder as a bare copy
        for name in [n for n in sys.modules if n == "kernels" or n.startswith("kernels.")]:
            del sys.modules[name]
        sys.path.insert(0, {str(root)!r})
        import kernels.group_norm_act
        bare = sys.modules["kernels.group_norm_act"].__file__
        assert bare.startswith({str(root)!r}), bare
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


# ----------------------------------------------------------------------------------------------
# Strided x and out_layout: the video UNets' (B, C, F, H, W) view of (B*F, C, H, W) memory
# ----------------------------------------------------------------------------------------------

LAYOUTS = {"contiguous": None, "tokens": (0, 3, 4, 2, 1), "frames": (0, 2, 1, 3, 4)}


def video_view(batch, frames, channels, plane, dtype):
    """``h.view(B, F, C, H, W).permute(0, 2, 1, 3, 4)`` of a fresh ``(B*F, C, H, W)`` tensor ``h``,
    as the video UNets hand their 2-D layers' output to the temporal GroupNorm: not contiguous."""
    h = (torch.randn(batch * frames, channels, *plane) * 1.7 + 0.6).to(dtype)
    return h.view(batch, frames, channels, *plane).permute(0, 2, 1, 3, 4)


def randn_in_layout(shape, layout, dtype):
    """Random tensor of ``shape`` whose dims lie in memory in the order ``layout`` (outermost first)."""
    order = layout or range(len(shape))
    t = torch.randn([shape[d] for d in order]).to(dtype)
    return t.permute([list(order).index(d) for d in range(len(shape))])


VIDEO_DTYPES = {32: F32, 64: BF16, 320: F16, 96: F32}
VIDEO_ACTIVATIONS = {1: "silu", 3: None, 8: "gelu", 16: "mish"}


def video_cases():
    """(frames, channels, plane, layout, backend): B = 2, 32 groups. The torch path takes every frame
    count, channel count and layout; the interpreter (seconds per case) every (frames, channels) pair
    with the layouts rotating so that each layout meets every frame count and every channel count,
    and every layout on the odd case (C = 96: 3 channels a group, a 7 x 9 plane)."""
    cases = []
    for i, frames in enumerate((1, 3, 8, 16)):
        for j, channels in enumerate((32, 64, 320)):
            for k, layout in enumerate(LAYOUTS):
                cases.append((frames, channels, (4, 4), layout, "torch"))
                if k == (i + j) % len(LAYOUTS):
                    cases.append((frames, channels, (4, 4), layout, "triton"))
    for frames in (3, 8):
        cases += [(frames, 96, (7, 9), layout, backend) for layout in LAYOUTS for backend in ("triton", "torch")]
    return cases


@pytest.mark.parametrize("frames, channels, plane, layout, backend", video_cases(),
                         ids=[f"F{f}-C{c}-{h}x{w}-{lay}-{be}" for f, c, (h, w), lay, be in video_cases()])
def test_video_view_and_out_layout(frames, channels, plane, layout, backend):
    """Forward and every gradient against float64, the output in each layout the video blocks use and
    the incoming gradient in that layout too (what comes back through the permute)."""
    dtype, activation, out_layout = VIDEO_DTYPES[channels], VIDEO_ACTIVATIONS[frames], LAYOUTS[layout]
    inputs, _ = make_inputs((2, channels, frames, *plane), dtype, add=True, scale=True, shift=True)
    inputs["x"] = video_view(2, frames, channels, plane, dtype)
    dy = randn_in_layout(inputs["x"].shape, out_layout, dtype)
    before = {k: launch_counts[k] for k in KERNELS}
    ours = run_backend(backend, inputs, dy, 32, activation, out_layout=out_layout)
    launched = {k: launch_counts[k] - before[k] for k in KERNELS}
    expected = expected_launches(inputs["x"].shape, 32) if backend == "triton" else dict.fromkeys(KERNELS, 0)
    assert launched == expected, launched
    y, dx = ours["y"], ours["x"]
    assert y.permute(*(out_layout or range(5))).is_contiguous(), y.stride()
    assert dx.stride() == inputs["x"].stride(), "dx is laid out as x"
    assert_matches_oracle(inputs, dy, 32, activation, ours)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("out_layout", [None, (0, 2, 3, 1)], ids=["contiguous-out", "channels-last-out"])
def test_channels_last_input(out_layout, backend):
    """A 4-D channels_last ``x`` (channels innermost, read in place by the kernels), the output
    contiguous or channels_last, the gradient arriving channels_last."""
    inputs, _ = make_inputs((2, 96, 7, 9), BF16, add=True, scale=True, shift=True)
    inputs["x"] = inputs["x"].contiguous(memory_format=torch.channels_last)
    dy = randn_in_layout(inputs["x"].shape, (0, 2, 3, 1), BF16)
    ours = run_backend(backend, inputs, dy, 32, "silu", out_layout=out_layout)
    assert ours["y"].permute(*(out_layout or range(4))).is_contiguous()
    assert ours["x"].is_contiguous(memory_format=torch.channels_last)
    assert_matches_oracle(inputs, dy, 32, "silu", ours)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_spatial_dims_that_do_not_merge_fall_back(backend):
    """An out_layout that reverses the spatial dims leaves three non-mergeable dims: the launcher
    then computes into contiguous buffers and copies; results are the same."""
    inputs, dy = make_inputs((2, 32, 3, 4, 5), F32, add=True)
    inputs["x"] = video_view(2, 3, 32, (4, 5), F32)
    assert gna._spatial_plan(inputs["x"].shape, [inputs["x"], gna._alloc_out(inputs["x"], (0, 1, 4, 3, 2))]) is None
    ours = run_backend(backend, inputs, dy, 8, "gelu", out_layout=(0, 1, 4, 3, 2))
    assert ours["y"].permute(0, 1, 4, 3, 2).is_contiguous()
    assert_matches_oracle(inputs, dy, 8, "gelu", ours)


def test_spatial_plan_merges_the_video_layouts():
    x5 = video_view(2, 8, 64, (6, 10), F32)
    y = gna._alloc_out(x5, (0, 3, 4, 2, 1))
    S0, S1, (sx, sy) = gna._spatial_plan(x5.shape, [x5, y])
    assert (S0, S1) == (8, 60)  # (F, H*W)
    assert sx == (8 * 64 * 60, 60, 64 * 60, 1) and sy == (60 * 8 * 64, 1, 64, 8 * 64)
    S0, S1, (sx,) = gna._spatial_plan((2, 64, 1, 6, 10), [x5[:, :, :1]])
    assert (S0, S1) == (1, 60) and sx[3] == 1  # a single frame drops out
    cl = torch.randn(2, 64, 6, 10).contiguous(memory_format=torch.channels_last)
    assert gna._spatial_plan(cl.shape, [cl]) == (1, 60, [(64 * 60, 1, 0, 64)])
    cfg = gna._group_norm_act_config(2, 60, channels_inner=True)
    assert cfg["BLOCK_C"] == 4 and gna._group_norm_act_config(10, 60, channels_inner=True)["BLOCK_C"] == 16


class _CountCopies(TorchDispatchMode):
    """Counts the aten ops that copy at least ``numel`` elements into another buffer. Triton's
    interpreter writes every tensor argument back onto its own storage after a launch (a copy_ of a
    storage onto itself, a no-op on the CPU and absent on a GPU); those are not counted."""

    COPIES = {torch.ops.aten.copy_.default, torch.ops.aten.clone.default, torch.ops.aten._to_copy.default}

    def __init__(self, numel):
        super().__init__()
        self.numel, self.copies = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        src = args[1] if func == torch.ops.aten.copy_.default else args[0]
        dst = args[0] if func == torch.ops.aten.copy_.default else out
        if func in self.COPIES and src.numel() >= self.numel and (
                src.untyped_storage().data_ptr() != dst.untyped_storage().data_ptr()):
            self.copies.append(str(func))
        return out


@pytest.mark.parametrize("out_layout", [None, (0, 3, 4, 2, 1), (0, 2, 1, 3, 4)], ids=list(LAYOUTS))
def test_triton_path_copies_nothing_of_x_size(out_layout):
    """The video view and its gradient go through the launchers with no full-size copy (the torch
    path, for contrast, copies x), and the kernels get x's own memory."""
    x5 = video_view(2, 3, 64, (4, 4), F16)
    w, b, add = torch.randn(64).half(), torch.randn(64).half(), torch.randn(2, 64).half()
    dy = randn_in_layout(x5.shape, out_layout, F16)
    with _CountCopies(x5.numel()) as mode:
        y, mean, rstd = gna._group_norm_act_fwd(x5, w, b, add, None, None, 32, 1e-5, "silu", out_layout)
        dx = gna._group_norm_act_bwd(dy, x5, w, b, add, None, None, mean, rstd, 32, "silu")[0]
    assert mode.copies == [], mode.copies
    assert dx.stride() == x5.stride()
    with _CountCopies(x5.numel()) as mode:
        gna._group_norm_act_fwd_torch(x5, w, b, add, None, None, 32, 1e-5, "silu", out_layout)
    assert mode.copies, "the counter sees the torch path's copy of x"


def test_kernels_get_the_callers_tensors(monkeypatch):
    """Through the public op and autograd: the kernels read x and the gradient where they lie and
    write y and dx where they are returned (pointers compared)."""
    seen = {}

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen[self.name] = [a.data_ptr() for a in args if isinstance(a, torch.Tensor)]
                return self.kernel[grid](*args, **kwargs)
            return launch

    for name in ("_group_norm_act_fwd_kernel", "_group_norm_act_bwd_dx_kernel"):
        monkeypatch.setattr(gna, name, Spy(name, getattr(gna, name)))
    h = torch.randn(2 * 3, 64, 4, 4, requires_grad=True)
    x5 = h.view(2, 3, 64, 4, 4).permute(0, 2, 1, 3, 4)
    w = torch.randn(64, requires_grad=True)
    with use_backend("triton"):
        y = group_norm_act(x5, 32, w, None, out_layout=(0, 3, 4, 2, 1))
        tokens = y.permute(0, 3, 4, 2, 1).reshape(2 * 16, 3, 64)  # the temporal proj_in's input: a view
        dy = torch.randn(tokens.shape)
        (dh,) = torch.autograd.grad(tokens, h, dy)
    assert tokens.data_ptr() == y.data_ptr()
    fwd, dx = seen["_group_norm_act_fwd_kernel"], seen["_group_norm_act_bwd_dx_kernel"]
    assert fwd[0] == h.data_ptr() and fwd[6] == y.data_ptr()  # x_ptr, y_ptr
    assert dx[0] == h.data_ptr() and dx[2] == dy.data_ptr()  # x_ptr, dy_ptr (the gradient's own memory)
    assert dx[11] == dh.data_ptr()  # dx_ptr: dx reaches h through the permute and view as it was written


class _TemporalNormProj(nn.Module):
    """The video blocks' temporal GroupNorm on the (B, C, F, H, W) view and proj_in on its tokens."""

    def __init__(self, channels=64, frames=3):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels)
        self.proj_in = nn.Linear(channels, channels)
        self.frames = frames

    def forward(self, h):
        bf, c, height, width = h.shape
        x5 = h.view(bf // self.frames, self.frames, c, height, width).permute(0, 2, 1, 3, 4)
        y = group_norm_act(x5, 32, self.norm.weight, self.norm.bias, 1e-6, None, out_layout=(0, 3, 4, 2, 1))
        return self.proj_in(y.permute(0, 3, 4, 2, 1).reshape(-1, self.frames, c))


@pytest.mark.parametrize("compiler, backend", [("aot_eager", "triton"), ("aot_eager", "torch"), ("inductor", "torch")])
def test_torch_compile_fullgraph_out_layout(compiler, backend):
    """torch.compile(fullgraph=True) around the strided input and out_layout, forward and backward: the
    fake implementation's strides match the real ones, and compiled and eager results agree."""
    torch._dynamo.reset()
    module = _TemporalNormProj()
    h = torch.randn(6, 64, 4, 5)
    results = []
    for fn in (module, torch.compile(module, fullgraph=True, backend=compiler)):
        module.zero_grad()
        leaf = h.clone().requires_grad_()
        with use_backend(backend):
            out = fn(leaf)
            out.square().sum().backward()
        results.append([out.detach(), leaf.grad, *(p.grad.clone() for p in module.parameters())])
    for compiled, eager in zip(*reversed(results)):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_op_registration_out_layout(backend):
    """opcheck (schema, fake strides against the real ones, autograd) on the video view with each
    out_layout, and on a channels_last input."""
    x5 = video_view(2, 3, 32, (3, 4), F32).requires_grad_()
    w, b = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    add = torch.randn(2, 32, requires_grad=True)
    op = torch.ops.fastunet.group_norm_act_fwd.default
    with use_backend(backend):
        for layout in LAYOUTS.values():
            torch.library.opcheck(op, (x5, w, b, add, None, None, 8, 1e-5, "silu",
                                       None if layout is None else list(layout)))
        cl = torch.randn(2, 32, 3, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
        torch.library.opcheck(op, (cl, w, b, None, None, None, 8, 1e-5, "gelu", [0, 2, 3, 1]))


def test_out_layout_validation():
    x = torch.randn(2, 8, 3, 4)
    with pytest.raises(ValueError, match=r"permutation of x's 4 dims \(0, 1, 2, 3\); got \(0, 2, 1\)"):
        group_norm_act(x, 4, out_layout=(0, 2, 1))
    with pytest.raises(ValueError, match=r"got \(0, 1, 1, 3\)"):
        group_norm_act(x, 4, out_layout=[0, 1, 1, 3])
    with pytest.raises(TypeError, match="out_layout must be None or a sequence of ints; got '0123'"):
        group_norm_act(x, 4, out_layout="0123")
    with pytest.raises(TypeError, match="sequence of ints"):
        group_norm_act(x, 4, out_layout=(0, 1, 2.0, 3))


# Without scale/shift the torch backward runs on aten's native_group_norm_backward (issue 12's CPU
# speed); these cases pin that path: add or not, every activation, missing weight or bias, half x with
# fp32 vectors, a channels-last x and a non-contiguous incoming gradient.
ATEN_BWD_CASES = [
    ("add-silu-fp32", (2, 64, 16, 16), 32, F32, "silu", dict(add=True)),
    ("no-add-gelu-bf16", (2, 32, 8, 8), 8, BF16, "gelu", dict()),
    ("no-affine-mish-fp16", (3, 16, 37), 4, F16, "mish", dict(affine=False, add=True)),
    ("identity-fp32-1group", (1, 24, 5, 7), 1, F32, None, dict(add=True)),
    ("fp16-x-fp32-vectors", (2, 64, 8, 8), 8, F16, "silu", dict(add=True, vec_dtype=F32)),
    ("video-3d-bf16", (1, 32, 3, 4, 4), 8, BF16, "silu", dict(add=True)),
]


@pytest.mark.parametrize("shape, num_groups, dtype, activation, opts",
                         [c[1:] for c in ATEN_BWD_CASES], ids=[c[0] for c in ATEN_BWD_CASES])
def test_torch_backward_without_modulation_matches_float64(shape, num_groups, dtype, activation, opts):
    inputs, dy = make_inputs(shape, dtype, **opts)
    assert_matches_oracle(inputs, dy, num_groups, activation, run_backend("torch", inputs, dy, num_groups, activation))


@pytest.mark.parametrize("missing", ["weight", "bias"])
def test_torch_backward_weight_or_bias_alone(missing):
    """The oracle is taken with the missing vector present as its identity (ones, zeros): aten's own
    GroupNorm backward fails for a bias without a weight."""
    inputs, dy = make_inputs((2, 32, 6, 6), F32, add=True)
    full = dict(inputs, **{missing: (torch.ones if missing == "weight" else torch.zeros)(32)})
    del inputs[missing]
    ours = run_backend("torch", inputs, dy, 8, "silu")
    ref = run(group_norm_act_reference, full, dy, 8, "silu", cast=torch.float64)
    low = run(group_norm_act_reference, full, dy, 8, "silu")
    assert set(ours) == set(ref) - {missing}
    for name in ours:
        check_against_oracle(ours[name], ref[name], low[name], floor=FLOOR[F32] * max(1.0, ref[name].abs().max().item()),
                             name=name)


@pytest.mark.parametrize("activation", ["silu", "mish", None])
def test_torch_backward_strided_input_and_gradient(activation):
    """A channels-last x and a transposed incoming gradient (as an attention block's proj_in hands
    back): the gradient of x is laid out like ``torch.empty_like(x)`` (channels-last) and matches
    the oracle, whichever activation (the identity's and mish's gradients keep dy's strides)."""
    inputs, _ = make_inputs((2, 32, 6, 5), F32, add=True)
    inputs["x"] = inputs["x"].contiguous(memory_format=torch.channels_last)
    dy = torch.randn(2, 32, 5, 6).transpose(2, 3)
    ours = run_backend("torch", inputs, dy, 8, activation)
    assert ours["x"].stride() == torch.empty_like(inputs["x"]).stride()
    assert_matches_oracle(inputs, dy, 8, activation, ours)


def test_torch_backward_paths_agree():
    """The aten-backed backward (no scale/shift) and the kernels' algebra (taken with scale = 0, which
    changes nothing mathematically) give the same gradients to fp32 rounding."""
    x = torch.randn(2, 32, 8, 8) * 3 + 5
    w, b, add, dy = torch.randn(32), torch.randn(32), torch.randn(2, 32), torch.randn(2, 32, 8, 8)
    y, mean, rstd = gna._group_norm_act_fwd_torch(x, w, b, add, None, None, 8, 1e-5, "silu")
    fast = gna._group_norm_act_bwd_torch(dy, x, w, b, add, None, None, mean, rstd, 8, "silu")
    algebra = gna._group_norm_act_bwd_torch(dy, x, w, b, add, torch.zeros(2, 32), None, mean, rstd, 8, "silu")
    assert fast[4] is None and fast[5] is None
    for got, want in zip(fast[:4], algebra[:4]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_torch_backward_nan_stays_in_its_group():
    """A NaN in one group of one sample: NaN gradients exactly where the float64 oracle has them (that
    group of x and add, those channels of weight and bias), finite elsewhere."""
    inputs, dy = make_inputs((2, 16, 4, 4), F32, add=True)
    inputs["x"][1, 5, 2, 3] = float("nan")
    ours = run_backend("torch", inputs, dy, 4, "silu")
    ref = run(group_norm_act_reference, inputs, dy, 4, "silu", cast=torch.float64)
    for name, r in ref.items():
        assert torch.equal(ours[name].isnan(), r.isnan()), name
        assert ours[name].isnan().any() and not ours[name].isnan().all(), name
