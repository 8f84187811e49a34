"""fastunet.kernels.attention against float64 ``scaled_dot_product_attention``: forward and the
gradients of q, k and v.

The Triton kernels run on CPU tensors through Triton's interpreter (backend "triton"); backend
"torch" is the reference path. Tolerance: our error is at most twice the error of PyTorch's own SDPA
in the same dtype (vs the same float64 oracle), plus a floor of one unit in the last place at the
reference's largest magnitude (our fp16/bf16 kernels round P and dS to the input dtype for the tensor
cores, as FlashAttention does, where PyTorch's CPU kernel keeps them in fp32; and Triton's interpreter
rounds fp32 -> bf16 toward zero).
"""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import fastunet
from fastunet.kernels import attention, attention_reference, launch_counts
from fastunet.testing import check_against_oracle

attn = sys.modules["fastunet.kernels.attention"]  # the package attribute `attention` is the function

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
MAIN = ("_attention_fwd_kernel", "_attention_bwd_preprocess_kernel", "_attention_bwd_dkdv_kernel",
        "_attention_bwd_dq_kernel")
SHORT = ("_attention_short_fwd_kernel", "_attention_short_bwd_kernel")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an element a kernel forgets to write
    shows up as an error."""
    alloc_like, alloc_stats = attn._alloc_like, attn._alloc_stats
    monkeypatch.setattr(attn, "_alloc_like", lambda *a, **kw: alloc_like(*a, **kw).fill_(float("nan")))
    monkeypatch.setattr(attn, "_alloc_stats", lambda *a, **kw: alloc_stats(*a, **kw).fill_(float("nan")))


def randn(*shape, dtype):
    return torch.randn(*shape, dtype=dtype)


def sdpa(q, k, v, mask, scale, grad_out):
    """Forward and (dq, dk, dv) of torch's SDPA on copies of the inputs, in their dtype."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    out.backward(grad_out.to(q.dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


def run(backend, q, k, v, mask=None, scale=None, grad_out=None):
    """Our forward and gradients on the given backend, and the kernel launches they made."""
    before = Counter(launch_counts)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with fastunet.use_backend(backend):
        out = attention(q, k, v, mask, scale)
        out.backward(grad_out)
    return [out.detach(), q.grad, k.grad, v.grad], launch_counts - before


def check(q, k, v, mask=None, scale=None, backend="triton", expect=None):
    """Compare our forward and gradients against float64 SDPA, with the tolerance of the module
    docstring; ``expect`` names the kernels that must have run (default: by sequence length)."""
    grad_out = randn(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    ours, launched = run(backend, q, k, v, mask, scale, grad_out)
    if backend == "torch":
        assert not launched, f"the torch path launched {dict(launched)}"
    else:
        if expect is None:
            expect = SHORT if max(q.shape[2], k.shape[2]) <= attn._SHORT_SEQ_MAX else MAIN
        missing = [name for name in expect if launched[name] == 0]
        assert not missing, f"kernels that did not run: {missing}; launches: {dict(launched)}"
    exact = sdpa(q.double(), k.double(), v.double(), None if mask is None else (
        mask if mask.dtype == torch.bool else mask.double()), scale, grad_out.double())
    theirs = sdpa(q, k, v, mask, scale, grad_out)
    errors = {}
    for name, a, ref, t in zip(("out", "dq", "dk", "dv"), ours, exact, theirs):
        assert a.shape == ref.shape and a.dtype == q.dtype, (name, a.shape, a.dtype)
        assert torch.isfinite(a).all(), f"{name}: non-finite values (unwritten or NaN)"
        floor = ULP[q.dtype] * max(ref.abs().max().item(), 1e-3)
        errors[name] = check_against_oracle(a, ref, t, floor=floor, name=name)
    return ours, errors


def qkv(b, h, n, m, d, dtype, dv=None):
    return randn(b, h, n, d, dtype=dtype), randn(b, h, m, d, dtype=dtype), randn(b, h, m, dv or d, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernels (interpreter) against float64
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", (8, 40, 64, 80, 160))
def test_head_dims(head_dim, dtype):
    check(*qkv(1, 2, 77, 100, head_dim, dtype))


@pytest.mark.parametrize(
    "seqlen_q, seqlen_k, dtype",
    [(1, 77, torch.float16), (77, 1, torch.bfloat16), (16, 129, torch.float32), (129, 16, torch.float16),
     (100, 129, torch.bfloat16), (129, 100, torch.float32), (4097, 20, torch.float16)],
)
def test_sequence_lengths(seqlen_q, seqlen_k, dtype):
    check(*qkv(1, 1 if seqlen_q > 1000 else 2, seqlen_q, seqlen_k, 64, dtype))


def test_head_dim_256_and_custom_scale():
    check(*qkv(1, 1, 70, 65, 256, torch.bfloat16), scale=0.3)


def test_value_head_dim_differs():
    check(*qkv(2, 1, 40, 50, 40, torch.float16, dv=64))
    check(*qkv(2, 1, 12, 20, 64, torch.float32, dv=24))


MASK_SHAPES = {"per_key": (2, 1, 1, 100), "per_head": (1, 3, 77, 100), "per_batch": (2, 1, 77, 100),
               "2d": (77, 100)}


@pytest.mark.parametrize("shape", list(MASK_SHAPES), ids=list(MASK_SHAPES))
@pytest.mark.parametrize("kind", ("bool", "additive"))
def test_masks(kind, shape):
    dtype = torch.float16 if kind == "bool" else torch.float32
    q, k, v = qkv(2, 3, 77, 100, 40, dtype)
    keep = torch.rand(MASK_SHAPES[shape]) > 0.3
    if kind == "bool":
        mask = keep
    else:  # a real-valued bias with -inf where masked, in fp32 on fp32 inputs
        mask = torch.randn(MASK_SHAPES[shape]).masked_fill(~keep, float("-inf"))
    masked = False if kind == "bool" else float("-inf")
    if mask.shape[-2] == 1:
        mask[1] = masked  # every query of batch 1 sees no key: output 0
    else:
        mask[..., 3, :] = masked  # fully masked query rows: output 0
        mask[..., 5, :7] = masked
    check(q, k, v, mask)


def test_additive_mask_in_other_dtype_and_broadcast_over_keys():
    q, k, v = qkv(2, 2, 40, 48, 64, torch.bfloat16)
    check(q, k, v, torch.randn(2, 1, 40, 48, dtype=torch.float16))  # becomes fp32
    check(q, k, v, torch.randn(1, 2, 40, 1))  # constant over keys: materialised along them


def test_fully_masked_rows_give_zero_output_and_gradients():
    q, k, v = qkv(1, 2, 40, 50, 64, torch.float16)
    mask = torch.ones(1, 1, 40, 50, dtype=torch.bool)
    mask[..., 7, :] = False
    for backend in ("triton", "torch"):
        out, dq, _, _ = check(q, k, v, mask, backend=backend)[0]
        assert (out[:, :, 7] == 0).all() and (dq[:, :, 7] == 0).all()
        with fastunet.use_backend(backend):
            _, lse = torch.ops.fastunet.attention_fwd(q, k, v, mask, 0.125)
        assert torch.isinf(lse[:, :, 7]).all() and torch.isfinite(lse[:, :, :7]).all()


def test_strided_views_are_read_in_place():
    """q/k/v as (B, N, H, D) projections viewed as (B, H, N, D), k and v slices of one fused
    projection: the launcher hands them to the kernels without copies, and out keeps q's layout."""
    b, n, m, h, d = 2, 70, 90, 3, 40
    q = randn(b, n, h, d, dtype=torch.float16).transpose(1, 2)
    kv = randn(b, m, 2, h, d, dtype=torch.float16)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    assert all(attn._aligned(t) is t for t in (q, k, v))
    out = check(q, k, v)[0][0]
    assert out.transpose(1, 2).is_contiguous()  # (B, N, H, D) in memory, like q


def test_unaligned_inputs_and_stride_zero_gradient():
    """Odd head dims and a stride-0 grad_out (from .sum()) take an aligned copy and stay correct."""
    q, k, v = qkv(1, 2, 40, 33, 33, torch.float32)
    check(q, k, v)
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 40, 50, 64, torch.float16))
    with fastunet.use_backend("triton"):
        attention(q, k, v).sum().backward()
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*ref).sum().backward()
    for ours, exact in zip((q.grad, k.grad, v.grad), ref):
        assert (ours.double() - exact.grad).abs().max() < 4e-3


@pytest.mark.parametrize(
    "seqlen_q, seqlen_k, head_dim, dtype",
    [(8, 8, 40, torch.float16), (16, 16, 64, torch.bfloat16), (24, 24, 80, torch.float32),
     (32, 32, 160, torch.float16), (8, 24, 64, torch.float32), (1, 1, 40, torch.bfloat16)],
)
def test_short_sequences_pack_many_per_program(monkeypatch, seqlen_q, seqlen_k, head_dim, dtype):
    """Temporal attention: many (batch, head) sequences of 8 to 32 frames. Three sequences per
    program (a tail program gets fewer) exercise the packing loop at a size the interpreter runs."""
    monkeypatch.setattr(attn, "_short_seqs_per_program", lambda batch_heads: 3)
    q, k, v = qkv(20, 2, seqlen_q, seqlen_k, head_dim, dtype)
    mask = torch.rand(20, 1, 1, seqlen_k) > 0.2 if seqlen_q == 8 else None
    fwd_short = attn._attention_short_config(attn._block_d(head_dim), seqlen_q, seqlen_k, dtype) is not None
    bwd_short = attn._attention_short_config(attn._block_d(head_dim), seqlen_q, seqlen_k, dtype, True) is not None
    assert fwd_short and (bwd_short or dtype == torch.float32)
    expect = (("_attention_short_fwd_kernel",) + (SHORT[1:] if bwd_short else MAIN[1:]))
    check(q, k, v, mask, expect=expect)


def test_large_fp32_heads_fall_back_to_main_kernels_for_short_backward():
    q, k, v = qkv(3, 2, 16, 16, 160, torch.float32)
    check(q, k, v, expect=("_attention_short_fwd_kernel",) + MAIN[1:])


def test_launch_grids_fit_cuda_limits_past_65535_sequences(monkeypatch):
    """B * H = 4097 * 16 sequences on the main kernels: CUDA caps the second and third grid dims at
    65535, so the launchers split the batch over several launches that together cover every
    sequence. The kernels are stubbed (the interpreter would take minutes); the inputs are one
    sequence expanded by stride 0."""
    grids = {}

    class Stub:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            grids.setdefault(self.name, []).append(grid)
            return lambda *args, **kwargs: None

    for name in ("_attention_fwd_kernel", "_attention_bwd_preprocess_kernel", "_attention_bwd_dkdv_kernel",
                 "_attention_bwd_dq_kernel"):
        monkeypatch.setattr(attn, name, Stub(name))
    batch, heads = 4097, 16
    q = randn(1, 1, 1, 8, dtype=torch.float16).expand(batch, heads, 1, 8)
    k = randn(1, 1, attn._SHORT_SEQ_MAX + 1, 8, dtype=torch.float16).expand(batch, heads, -1, 8)
    out, lse = attn._attention_fwd(q, k, k, None, 1.0)
    attn._attention_bwd(out, q, k, k, out, lse, None, 1.0)
    assert len(grids) == 4
    for name, launches in grids.items():
        assert all(len(g) == 2 and g[1] <= 65535 for g in launches), (name, launches)
        assert sum(g[1] for g in launches) == batch * heads, (name, launches)


def test_empty_key_set_gives_zeros():
    q, k, v = qkv(1, 2, 5, 0, 64, torch.float16)
    for backend in ("triton", "torch"):
        with fastunet.use_backend(backend):
            out = attention(q, k, v)
        assert out.shape == (1, 2, 5, 64) and (out == 0).all()


# Key and query lengths around the tiles: whole tiles only (no ragged tail: the masked loop runs
# zero times), whole tiles plus a ragged tail, and a tail alone. The main kernels' tiles are 16 to
# 128 long, so 128 and 256 are whole-tile lengths of every config and 130, 200 have tails.
@pytest.mark.parametrize(
    "seqlen_q, seqlen_k, head_dim, dtype",
    [(128, 256, 64, torch.float16), (130, 200, 40, torch.float16), (200, 130, 80, torch.bfloat16),
     (256, 128, 40, torch.float32), (130, 77, 160, torch.float32), (77, 130, 64, torch.bfloat16),
     (200, 200, 160, torch.float16), (130, 256, 80, torch.float32)],
)
def test_whole_and_ragged_tiles(seqlen_q, seqlen_k, head_dim, dtype):
    check(*qkv(1, 2, seqlen_q, seqlen_k, head_dim, dtype))


@pytest.mark.parametrize("kind", ("bool", "additive"))
@pytest.mark.parametrize("seqlen_k, head_dim, dtype", [(128, 40, torch.float16), (200, 80, torch.float32),
                                                       (130, 160, torch.bfloat16)])
def test_masks_on_whole_and_ragged_tiles(kind, seqlen_k, head_dim, dtype):
    """With a mask every key tile takes the masked path, the whole ones included."""
    q, k, v = qkv(2, 2, 130, seqlen_k, head_dim, dtype)
    keep = torch.rand(2, 1, 130, seqlen_k) > 0.3
    mask = keep if kind == "bool" else torch.randn(2, 1, 130, seqlen_k).masked_fill(~keep, float("-inf"))
    mask[..., 9, :] = False if kind == "bool" else float("-inf")
    check(q, k, v, mask)


@pytest.mark.parametrize("seqlen, dtype", [(130, torch.float16), (20, torch.float32), (200, torch.bfloat16)])
def test_negative_and_zero_scale(seqlen, dtype):
    """The fused softmax scales the row max, which needs scale >= 0: a negative scale runs on -k
    (short and main kernels), and dK comes back with its sign restored."""
    q, k, v = qkv(1, 2, seqlen, seqlen + 3, 40, dtype)
    check(q, k, v, scale=-0.4)
    check(q, k, v, scale=0.0)


@pytest.mark.parametrize("dtype, head_dim", [(torch.float16, 64), (torch.bfloat16, 160), (torch.float32, 80)])
def test_sm90_tiles(monkeypatch, dtype, head_dim):
    """The sm_90 tables' tiles (e.g. 128 x 128 for half precision at D 64) under the interpreter,
    which otherwise runs sm_80's: the arch comes from ``_backend.compute_capability``."""
    monkeypatch.setattr(attn._backend, "compute_capability", lambda device: 90)
    seen = []
    fwd_config = attn._attention_fwd_config
    monkeypatch.setattr(attn, "_attention_fwd_config", lambda *a, **kw: seen.append(a[2]) or fwd_config(*a, **kw))
    check(*qkv(1, 2, 200, 130, head_dim, dtype), torch.rand(1, 1, 200, 130) > 0.2 if head_dim == 80 else None)
    assert seen == [90]


@pytest.mark.parametrize("precision", ("high", "medium"))
def test_fp32_matmul_precision_setting(monkeypatch, precision):
    """"high" and "medium" select TF32 dots (on a GPU; the interpreter multiplies in fp32 whatever
    the precision asks, so the float64 parity holds at fp32 tolerance here)."""
    seen = []
    original = attn._dot_precision
    monkeypatch.setattr(attn, "_dot_precision", lambda dtype: seen.append(original(dtype)) or seen[-1])
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        check(*qkv(1, 2, 70, 90, 64, torch.float32))
    finally:
        torch.set_float32_matmul_precision(previous)
    assert set(seen) == {"tf32"}, seen
    assert original(torch.float32) == "tf32x3"  # "highest", the default


def test_mask_is_converted_once_for_forward_and_backward(monkeypatch):
    """A bool mask (and an unaligned additive one: 77 keys) becomes the kernels' bias once; the
    backward and later calls on the unchanged mask reuse it, an in-place change converts again."""
    calls = []
    convert = attn._convert_mask
    monkeypatch.setattr(attn, "_convert_mask", lambda *a: calls.append(a[0].dtype) or convert(*a))
    q, k, v = qkv(2, 2, 40, 77, 40, torch.float16)
    for mask in (torch.rand(2, 1, 1, 77) > 0.3, torch.randn(2, 1, 40, 77, dtype=torch.float16)):
        calls.clear()
        check(q, k, v, mask)
        check(q, k, v, mask)
        assert len(calls) == 1, calls
        if mask.dtype == torch.bool:
            mask[0, 0, 0, :5] = False
        else:
            mask[0, 0, 0, :5] = float("-inf")
        check(q, k, v, mask)  # new values: converted again, and correct
        assert len(calls) == 2, calls
    assert not any(e[0]() is None for e in attn._MASK_BIASES.values())
    n = len(attn._MASK_BIASES)
    del mask
    assert len(attn._MASK_BIASES) == n - 1  # the entry goes with its mask


# --------------------------------------------------------------------------------------------------
# torch reference path
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_path(dtype):
    q, k, v = qkv(2, 2, 50, 60, 40, dtype)
    check(q, k, v, torch.rand(2, 1, 50, 60) > 0.3, backend="torch")


@pytest.fixture
def reference_backward_paths(monkeypatch):
    """Counts the calls of the reference backward's two paths: PyTorch's fused CPU kernel
    (``_CPU_FLASH_BWD``) and the chunked recomputation (``_attention_bwd_chunked``)."""
    calls = Counter()
    for name in ("_CPU_FLASH_BWD", "_attention_bwd_chunked"):
        fn = getattr(attn, name)
        if fn is None:
            continue

        def counted(*args, _name=name, _fn=fn, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(attn, name, counted)
    return calls


def _strided_qkv(dtype):
    """q a (B, N, H, D) projection seen as (B, H, N, D); k and v with innermost stride 2."""
    q = randn(2, 45, 3, 40, dtype=dtype).transpose(1, 2)
    k, v = (randn(2, 3, 50, 40, 2, dtype=dtype)[..., 0] for _ in range(2))
    return q, k, v


def _masked_rows(mask, masked):
    mask[..., 3, :] = masked  # a fully masked query row
    mask[..., 5, :7] = masked
    return mask


# (dtype, inputs, mask): every input and mask form the fused CPU backward takes
FUSED_FORMS = {
    "fp32-no-mask": (torch.float32, lambda dt: qkv(2, 3, 45, 50, 64, dt), lambda: None),
    "fp16-bool-per-batch": (torch.float16, lambda dt: qkv(2, 3, 45, 50, 40, dt),
                            lambda: _masked_rows(torch.rand(2, 1, 45, 50) > 0.3, False)),
    "bf16-bool-2d": (torch.bfloat16, lambda dt: qkv(2, 3, 45, 50, 40, dt),
                     lambda: _masked_rows(torch.rand(45, 50) > 0.3, False)),
    "fp32-additive-per-head-key": (torch.float32, lambda dt: qkv(2, 3, 45, 50, 80, dt),
                                   lambda: torch.randn(1, 3, 1, 50)),
    "fp32-additive-2d-inf": (torch.float32, lambda dt: qkv(2, 3, 45, 50, 40, dt),
                             lambda: _masked_rows(torch.randn(45, 50), float("-inf"))),
    "bf16-additive-fp32-3d": (torch.bfloat16, lambda dt: qkv(2, 3, 45, 50, 64, dt),
                              lambda: _masked_rows(torch.randn(3, 45, 50), float("-inf"))),
    "bf16-additive-over-queries": (torch.bfloat16, lambda dt: qkv(2, 3, 45, 50, 40, dt),
                                   lambda: torch.randn(2, 1, 45, 1)),
    "fp32-strided": (torch.float32, _strided_qkv, lambda: torch.rand(2, 1, 1, 50) > 0.2),
    "bf16-strided": (torch.bfloat16, _strided_qkv, lambda: None),
}


@pytest.mark.parametrize("form", list(FUSED_FORMS), ids=list(FUSED_FORMS))
def test_reference_backward_runs_pytorch_fused_kernel(form, reference_backward_paths):
    """D == Dv on CPU: the reference backward is PyTorch's fused CPU kernel, for no mask, bool and
    additive masks of every broadcast form, fp32/fp16/bf16 and strided inputs (innermost stride 2
    is copied first, forward and backward); fully masked rows keep zero output and gradients."""
    if attn._CPU_FLASH_BWD is None:
        pytest.skip("this PyTorch has no _scaled_dot_product_flash_attention_for_cpu_backward")
    dtype, make_inputs, make_mask = FUSED_FORMS[form]
    q, k, v = make_inputs(dtype)
    mask = make_mask()
    out, dq, _, _ = check(q, k, v, mask, backend="torch")[0]
    assert reference_backward_paths == Counter({"_CPU_FLASH_BWD": 1}), dict(reference_backward_paths)
    if mask is not None and mask.shape[-2] > 1 and mask.shape[-1] > 1:
        assert (out[:, :, 3] == 0).all() and (dq[:, :, 3] == 0).all()


def test_reference_path_chunked_and_value_head_dim(monkeypatch, reference_backward_paths):
    """Dv != D skips PyTorch's fused CPU kernels; a tiny chunk exercises the query chunking."""
    monkeypatch.setattr(attn, "_query_chunk", lambda batch_heads, seqlen_k: 7)
    q, k, v = qkv(1, 2, 30, 20, 40, torch.float32, dv=24)
    mask = torch.randn(1, 2, 30, 20)
    mask[..., 4, :] = float("-inf")
    check(q, k, v, mask, backend="torch")
    assert reference_backward_paths == Counter({"_attention_bwd_chunked": 1}), dict(reference_backward_paths)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_reference_backward_falls_back_without_fused_kernel(monkeypatch, reference_backward_paths, dtype):
    """A PyTorch without the fused CPU backward gets the chunked one, from the fused forward's
    (out, lse), fully masked rows included."""
    monkeypatch.setattr(attn, "_CPU_FLASH_BWD", None)
    q, k, v = qkv(2, 2, 40, 50, 64, dtype)
    mask = _masked_rows(torch.rand(2, 1, 40, 50) > 0.3, False)
    out, dq, _, _ = check(q, k, v, mask, backend="torch")[0]
    assert reference_backward_paths == Counter({"_attention_bwd_chunked": 1}), dict(reference_backward_paths)
    assert (out[:, :, 3] == 0).all() and (dq[:, :, 3] == 0).all()


def test_attention_reference_matches_sdpa_in_float64():
    q, k, v = qkv(1, 2, 9, 11, 8, torch.float64)
    mask = torch.rand(9, 11) > 0.4
    mask[2] = False
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.7)
    torch.testing.assert_close(attention_reference(q, k, v, mask, 0.7), expected)


def test_compile_fullgraph_forward_and_backward():
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 20, 40, 40, torch.float32))
    mask = torch.rand(1, 1, 20, 40) > 0.2

    def f(q, k, v, mask):
        return attention(q * 2, k, v, mask).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with fastunet.use_backend("torch"):
        loss = compiled(q, k, v, mask)
        grads = torch.autograd.grad(loss, (q, k, v))
        expected = torch.autograd.grad(f(q, k, v, mask), (q, k, v))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_custom_ops_pass_opcheck(backend):
    """Fake and real kernels agree on shapes, dtypes and strides (also for a (B, N, H, D) layout and
    an odd head dim, whose outputs are padded), autograd registration, and the schemas."""
    q, k, v = qkv(1, 2, 40, 36, 40, torch.float32)
    q_bnhd = randn(1, 40, 2, 40, dtype=torch.float32).transpose(1, 2)
    odd = qkv(1, 2, 8, 8, 33, torch.float16)
    fwd, bwd = torch.ops.fastunet.attention_fwd.default, torch.ops.fastunet.attention_bwd.default
    with fastunet.use_backend(backend):
        torch.library.opcheck(fwd, (q.clone().requires_grad_(), k, v, None, 0.2))
        mask = torch.rand(40, 36) > 0.5
        torch.library.opcheck(fwd, (q_bnhd, k.clone().requires_grad_(), v, mask, 0.2))
        torch.library.opcheck(fwd, (*odd, None, 0.2))
        for args in ((q_bnhd, k, v), odd):
            out, lse = fwd(*args, None, 0.2)
            torch.library.opcheck(bwd, (torch.randn_like(out), *args, out, lse, None, 0.2))


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------


def test_mismatched_head_dims_raise():
    q, k, v = randn(1, 2, 5, 40, dtype=torch.float32), randn(1, 2, 6, 64, dtype=torch.float32), randn(
        1, 2, 6, 64, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"head dim.*q 40.*k 64"):
        attention(q, k, v)


@pytest.mark.parametrize("shape", [(2, 1, 5, 7), (3, 6), (1, 1, 1, 1, 6), (4,)])
def test_mask_that_does_not_broadcast_raises(shape):
    q, k, v = qkv(1, 2, 5, 6, 8, torch.float32)
    with pytest.raises(ValueError, match=r"does not broadcast.*\(1, 2, 5, 6\)"):
        attention(q, k, v, torch.zeros(shape, dtype=torch.bool))


def test_wrong_ranks_dtypes_and_types_raise():
    q, k, v = qkv(1, 2, 5, 6, 8, torch.float32)
    with pytest.raises(ValueError, match=r"q must be 4-D.*\(2, 5, 8\)"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="v must be 4-D"):
        attention(q, k, v[..., None])
    with pytest.raises(TypeError, match=r"share a dtype.*q torch.float32, k torch.float16"):
        attention(q, k.half(), v)
    with pytest.raises(TypeError, match="float64"):
        attention(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="attn_mask must be bool or floating point; got torch.int64"):
        attention(q, k, v, torch.ones(5, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="share the key length"):
        attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match=r"share \(B, H\)"):
        attention(q, k[:, :1], v[:, :1])
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        attention(q.numpy(), k, v)
    with pytest.raises(ValueError, match="does not differentiate attn_mask"):
        attention(q, k, v, torch.zeros(5, 6, requires_grad=True))
    big = randn(1, 1, 4, 320, dtype=torch.float32)
    with fastunet.use_backend("triton"), pytest.raises(ValueError, match="head dims up to 256; got D=320"):
        attention(big, big, big)
    with fastunet.use_backend("torch"):  # the reference path takes any head dim
        assert attention(big, big, big).shape == big.shape
