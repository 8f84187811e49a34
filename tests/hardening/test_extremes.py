"""Half-precision extremes and non-finite inputs for group_norm_act and attention, on both backends.

Every case runs on the torch backend and on the Triton kernels (under Triton's interpreter on CPU)
and is judged against a float64 reference or against PyTorch's own op:

* GroupNorm(+activation) on fp16 inputs up to 6e4 (whose square overflows fp16: the statistics must
  be fp32) and on near-constant and exactly constant groups (variance -> 0, where the result is
  ``(x - mean) * rsqrt(eps)`` as in ``F.group_norm``), forward and every gradient, by the rule of
  ``fastunet.testing.check_against_oracle``: our error at most twice PyTorch's own error in the same
  dtype plus a floor.
* Attention with logits ``q.k * scale`` near 1e4 in fp16 and bf16 (the max-subtraction must be fp32).
* Fully masked rows, as ``scaled_dot_product_attention`` defines them (measured here too).
* NaN and Inf: the positions of NaN and Inf in our outputs and gradients equal those of PyTorch's op
  on the same inputs (F.group_norm through ``group_norm_act_reference``; SDPA on fp32 copies).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import fastunet
from fastunet.kernels import attention, group_norm_act, group_norm_act_reference
from fastunet.testing import check_against_oracle

BACKENDS = ("torch", "triton")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ULP = {F32: 2.0**-23, F16: 2.0**-10, BF16: 2.0**-7}
# group_norm_act's floors, relative to the reference's largest magnitude (tests/ops/test_group_norm_act.py)
GN_FLOOR = {F32: 1e-5, F16: 1e-3, BF16: 8e-3}
NAN, INF = float("nan"), float("inf")


def with_grads(fn, tensors, grad_out, backend=None):
    """``fn(*tensors)`` and the gradients of every tensor (on leaf copies), optionally on ``backend``."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    if backend is None:
        out = fn(*leaves)
        out.backward(grad_out)
    else:
        with fastunet.use_backend(backend):
            out = fn(*leaves)
            out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves]


def assert_same_nonfinite(ours, theirs, names):
    """Equal NaN positions and equal +-Inf positions, tensor by tensor."""
    for name, a, b in zip(names, ours, theirs):
        assert torch.equal(a.isnan(), b.isnan()), (
            f"{name}: NaN at {a.isnan().sum().item()} positions, PyTorch's op at {b.isnan().sum().item()}")
        for sign in (1, -1):
            assert torch.equal(a == sign * INF, b == sign * INF), f"{name}: {'+' if sign > 0 else '-'}Inf positions differ"


# --------------------------------------------------------------------------------------------------
# GroupNorm + activation
# --------------------------------------------------------------------------------------------------

GN_NAMES = ("y", "dx", "dweight", "dbias")


def gn_check(x, num_groups, activation, backend):
    """Our forward and gradients (x, weight, bias) against the float64 reference, bounded by the
    reference run in x's dtype (what F.group_norm itself gets)."""
    C = x.shape[1]
    weight = (1 + 0.5 * torch.randn(C)).to(x.dtype)
    bias = (0.5 * torch.randn(C)).to(x.dtype)
    dy = torch.randn(x.shape).to(x.dtype)

    def ours_fn(x_, w_, b_):
        return group_norm_act(x_, num_groups, w_, b_, 1e-5, activation)

    def ref_fn(x_, w_, b_):
        return group_norm_act_reference(x_, num_groups, w_, b_, 1e-5, activation)

    ours = with_grads(ours_fn, (x, weight, bias), dy, backend)
    exact = with_grads(ref_fn, [t.double() for t in (x, weight, bias)], dy.double())
    theirs = with_grads(ref_fn, (x, weight, bias), dy)
    for name, a, ref, t in zip(GN_NAMES, ours, exact, theirs):
        assert a.dtype == x.dtype and torch.isfinite(a).all(), f"{name}: non-finite values"
        check_against_oracle(a, ref, t, floor=GN_FLOOR[x.dtype] * max(1.0, ref.abs().max().item()), name=name)
    return ours, bias


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["uniform-6e4", "offset-3e4"])
def test_group_norm_fp16_magnitudes_up_to_6e4(kind, backend):
    if kind == "uniform-6e4":
        x = (torch.rand(2, 32, 6, 6) * 2 - 1) * 6e4
    else:  # large mean and large spread
        x = (3e4 + 1e4 * torch.randn(2, 32, 6, 6)).clamp(-6e4, 6e4)
    x = x.half()
    assert not torch.isfinite((x * x).sum()), "premise: the sum of squares overflows fp16"
    gn_check(x, 8, "silu", backend)


def _grouped_constants(B, G, Cg, spatial, spread):
    """``(B, G * Cg, *spatial)``: one random value per (sample, group), fp32."""
    values = spread * torch.randn(B, G, 1, *([1] * len(spatial)))
    return values.expand(B, G, Cg, *spatial).reshape(B, G * Cg, *spatial).clone()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["fp32-noise-1e-4", "fp32-constant", "fp16-constant", "fp16-constant-6e4"])
def test_group_norm_near_constant_groups(case, backend):
    """Variance -> 0: constant + 1e-4 noise, and exactly constant groups, where ``x - mean`` is 0 and
    F.group_norm's result is the bias through the activation (rstd = rsqrt(eps), finite)."""
    if case == "fp32-noise-1e-4":
        x = _grouped_constants(2, 4, 4, (6, 6), 3.0) + 1e-4 * torch.randn(2, 16, 6, 6)
    elif case == "fp32-constant":
        x = _grouped_constants(2, 4, 4, (6, 6), 3.0)
    elif case == "fp16-constant":
        x = _grouped_constants(2, 4, 4, (6, 6), 100.0).half()
    else:
        x = torch.full((2, 16, 6, 6), 6e4).half()
    (y, *_), bias = gn_check(x, 4, "silu", backend)
    if "constant" in case and backend == "triton":
        # The kernels' statistics are shifted by the group's first element: x - mean is exactly 0,
        # so y is silu(bias) up to the output's rounding. (The torch backend runs aten's GroupNorm,
        # whose fp32 mean of a constant group is off by about an ulp, which rsqrt(eps) = 316 magnifies:
        # ~1 in y for a constant 6e4, exactly as F.group_norm itself, so only the bound above holds.)
        expected = F.silu(bias.double()).reshape(1, -1, 1, 1).expand(y.shape)
        assert (y.double() - expected).abs().max() <= 4 * ULP[x.dtype] * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("activation", ["silu", "mish", None], ids=str)
def test_group_norm_nonfinite_input_propagates_like_f_group_norm(activation, value, backend):
    """One NaN or Inf makes its whole group NaN (output and gradients), as F.group_norm does, and
    leaves the other groups finite. Regression: the Triton forward clamped the variance with a
    NaN-dropping maximum (a lone Inf gave +-Inf outputs instead of NaN), and mish's backward clamp
    turned a NaN pre-activation into a finite gradient."""
    x = (torch.randn(2, 8, 4, 4) * 1.5 + 0.3).half()
    x[1, 3, 2, 1] = value  # sample 1, group 1 of 4
    weight, bias = torch.randn(8).half(), torch.randn(8).half()
    dy = torch.randn(x.shape).half()

    def ours_fn(x_, w_, b_):
        return group_norm_act(x_, 4, w_, b_, 1e-5, activation)

    def ref_fn(x_, w_, b_):
        return group_norm_act_reference(x_, 4, w_, b_, 1e-5, activation)

    ours = with_grads(ours_fn, (x, weight, bias), dy, backend)
    theirs = with_grads(ref_fn, [t.float() for t in (x, weight, bias)], dy.float())
    assert ours[0][1, 2:4].isnan().all() and torch.isfinite(ours[0][0]).all()
    assert_same_nonfinite(ours, theirs, GN_NAMES)


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------

ATTN_NAMES = ("out", "dq", "dk", "dv")


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention_cases(backend, q, k, v, mask, grad_out):
    """Ours, float64 SDPA and SDPA in q's dtype: each ``[out, dq, dk, dv]``."""
    float_mask = mask is not None and mask.dtype != torch.bool
    ours = with_grads(lambda *t: attention(*t, mask), (q, k, v), grad_out, backend)
    mask64 = mask.double() if float_mask else mask
    exact = with_grads(lambda *t: sdpa(*t, mask64), [t.double() for t in (q, k, v)], grad_out.double())
    theirs = with_grads(lambda *t: sdpa(*t, mask), (q, k, v), grad_out)
    return ours, exact, theirs


def large_logit_qkv(n, d, dtype, logit=1e4):
    """q, k whose rows have norm ``sqrt(logit / scale)``, so ``|q.k| * scale`` reaches ~``logit``."""
    scale = d**-0.5
    norm = (logit / scale) ** 0.5
    q, k = (torch.nn.functional.normalize(torch.randn(1, 2, n, d), dim=-1) * norm for _ in range(2))
    return q.to(dtype), k.to(dtype), torch.randn(1, 2, n, d).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seqlen", [20, 40], ids=["short-kernel", "main-kernels"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_attention_logits_near_1e4(dtype, seqlen, backend):
    d = 16
    q, k, v = large_logit_qkv(seqlen, d, dtype)
    logits = q.double() @ k.double().transpose(-1, -2) * d**-0.5
    assert logits.abs().max() > 5e3, "premise: logits reach the thousands"
    grad_out = torch.randn(1, 2, seqlen, d).to(dtype)
    ours, exact, theirs = attention_cases(backend, q, k, v, None, grad_out)
    for name, a in zip(ATTN_NAMES, ours):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
    # the forward and dv (= P^T dO, no cancellation) are as accurate as SDPA's, up to a rounding of P
    for i in (0, 3):
        check_against_oracle(ours[i], exact[i], theirs[i], floor=ULP[dtype] * exact[i].abs().max().item(),
                             name=ATTN_NAMES[i])
    # dq, dk: within the bound the attention module documents, from delta = rowsum(dO * out) formed
    # with the rounded out: about an ulp of out times |dO| |k| (|q|) times the scale, per head dim
    delta_err = d * ULP[dtype] * grad_out.abs().max().item() * ours[0].abs().max().item()
    for i, other in ((1, k), (2, q)):
        bound = 2 * delta_err * other.abs().max().item() * d**-0.5
        check_against_oracle(ours[i], exact[i], theirs[i], floor=bound, name=ATTN_NAMES[i])


@pytest.mark.parametrize("kind", ["bool", "float-inf"])
def test_sdpa_gives_zeros_for_fully_masked_rows(kind):
    """The measurement behind attention's rule: torch's SDPA on CPU returns zeros, and zero
    gradients, for a query row whose keys are all masked (no NaN), in every dtype."""
    for dtype in (F32, F16, BF16):
        q, k, v = (torch.randn(1, 1, 6, 8).to(dtype) for _ in range(3))
        mask = torch.ones(6, 6, dtype=torch.bool)
        mask[2] = False
        if kind == "float-inf":
            mask = torch.zeros(6, 6, dtype=dtype).masked_fill(~mask, -INF)
        out, dq, dk, dv = with_grads(lambda *t: sdpa(*t, mask), (q, k, v), torch.randn(1, 1, 6, 8).to(dtype))
        assert (out[0, 0, 2] == 0).all() and (dq[0, 0, 2] == 0).all(), dtype
        assert torch.isfinite(dk).all() and torch.isfinite(dv).all(), dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seqlen", [20, 40], ids=["short-kernel", "main-kernels"])
@pytest.mark.parametrize("kind", ["bool", "float-inf"])
def test_fully_masked_rows_match_sdpa(kind, seqlen, backend):
    """Rows 3 and 17 of head 0 and every row of head 1 masked out: zeros there, as SDPA gives, the
    other rows and every gradient as accurate as SDPA's; dq of a dead row is zero and no dead row
    leaks into dk, dv."""
    q, k, v = (torch.randn(1, 2, seqlen, 16).half() for _ in range(3))
    keep = torch.rand(1, 2, seqlen, seqlen) > 0.3
    keep[0, 0, [3, 17]] = False
    keep[0, 1] = False
    mask = keep if kind == "bool" else torch.zeros(keep.shape).half().masked_fill(~keep, -INF)
    grad_out = torch.randn(1, 2, seqlen, 16).half()
    ours, exact, theirs = attention_cases(backend, q, k, v, mask, grad_out)
    for name, a, ref, t in zip(ATTN_NAMES, ours, exact, theirs):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        check_against_oracle(a, ref, t, floor=ULP[F16] * max(ref.abs().max().item(), 1e-3), name=name)
    out, dq, dk, dv = ours
    assert (out[0, 0, [3, 17]] == 0).all() and (out[0, 1] == 0).all()
    assert (dq[0, 0, [3, 17]] == 0).all() and (dq[0, 1] == 0).all()
    assert (dk[0, 1] == 0).all() and (dv[0, 1] == 0).all()
    assert torch.equal(out[0, 0, [3, 17]], theirs[0][0, 0, [3, 17]])


def _poison(where, q, k, v):
    """Inputs (and a mask) with one non-finite entry, as ``where`` says."""
    mask = None
    if where == "nan-query":
        q[0, 1, 5, 3] = NAN
    elif where == "nan-key":
        k[1, 0, 7, 3] = NAN
    elif where == "nan-value":
        v[1, 0, 7, 3] = NAN
    elif where == "nan-in-float-mask":
        mask = torch.zeros(q.shape[2], k.shape[2]).half()
        mask[4, 9] = NAN
    elif where == "nan-key-masked-out":  # SDPA adds the mask as -inf: NaN - inf stays NaN
        k[1, 0, 7, 3] = NAN
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
        mask[:, 7] = False
    elif where == "inf-key":
        k[1, 0, 7, 3] = INF
    elif where == "-inf-key-row":
        k[1, 0, 7, :] = -INF
    return mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seqlen", [20, 40], ids=["short-kernel", "main-kernels"])
@pytest.mark.parametrize("where", ["nan-query", "nan-key", "nan-value", "nan-in-float-mask", "nan-key-masked-out",
                                   "inf-key", "-inf-key-row"])
def test_attention_nonfinite_input_propagates_like_sdpa(where, seqlen, backend):
    """NaN/Inf positions of our output (and, for NaN inputs, of every gradient) equal SDPA's on fp32
    copies of the same fp16 inputs. A NaN key makes its whole (batch, head) NaN. For a ``+inf`` score
    SDPA's math path and its fp32 fused kernel give NaN rows (its fp16 fused kernel gives zeros; the
    torch backend therefore does not hand infinite inputs to that kernel)."""
    q, k, v = (torch.randn(2, 2, seqlen, 16).half() for _ in range(3))
    mask = _poison(where, q, k, v)
    grad_out = torch.randn(2, 2, seqlen, 16).half()
    ours = with_grads(lambda *t: attention(*t, mask), (q, k, v), grad_out, backend)
    mask32 = mask.float() if mask is not None and mask.dtype != torch.bool else mask
    theirs = with_grads(lambda *t: sdpa(*t, mask32), [t.float() for t in (q, k, v)], grad_out.float())
    if where == "nan-key":
        assert ours[0][1, 0].isnan().all() and torch.isfinite(ours[0][0]).all() and torch.isfinite(ours[0][1, 1]).all()
    checked = 1 if where in ("inf-key", "-inf-key-row") else 4  # Inf: the forward only
    assert_same_nonfinite(ours[:checked], theirs[:checked], ATTN_NAMES)
    assert ours[0].isnan().any() or where == "-inf-key-row"


@pytest.mark.parametrize("where", ["inf-key", "-inf-key-row", "nan-key"])
def test_attention_fp32_nonfinite_on_the_fused_cpu_kernel_like_sdpa(where, monkeypatch):
    """fp32 on the torch backend takes PyTorch's fused CPU kernel without testing q and k for
    infinities (in fp32 that kernel is SDPA's own, NaN rows for a ``+inf`` score included): NaN/Inf
    positions of the output (and, for a NaN, of every gradient) equal SDPA's."""
    attention_module = importlib.import_module("fastunet.kernels.attention")
    calls = []
    fused = attention_module._CPU_FLASH_FWD
    monkeypatch.setattr(attention_module, "_CPU_FLASH_FWD", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    q, k, v = (torch.randn(2, 2, 40, 16) for _ in range(3))
    _poison(where, q, k, v)
    grad_out = torch.randn(2, 2, 40, 16)
    ours = with_grads(lambda *t: attention(*t, None), (q, k, v), grad_out, "torch")
    theirs = with_grads(lambda *t: sdpa(*t, None), (q, k, v), grad_out)
    assert calls  # the fused kernel ran
    checked = 4 if where == "nan-key" else 1  # Inf: the forward only
    assert_same_nonfinite(ours[:checked], theirs[:checked], ATTN_NAMES)
    assert ours[0].isnan().any() or where == "-inf-key-row"
