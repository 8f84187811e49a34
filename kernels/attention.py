"""Scaled dot-product attention: ``softmax(q @ k^T * scale + bias) @ v`` in FlashAttention-2 style.

Semantics are those of ``torch.nn.functional.scaled_dot_product_attention`` without dropout and
without a causal mask:

* ``q`` ``(B, H, N, D)``, ``k`` ``(B, H, M, D)``, ``v`` ``(B, H, M, Dv)`` -> ``out`` ``(B, H, N, Dv)``;
  fp32, fp16 or bf16, all three the same dtype. Any strides are accepted, e.g. a ``(B, N, H, D)``
  tensor transposed to ``(B, H, N, D)`` or a slice of a fused qkv projection, and read in place
  when the innermost stride is 1 and the pointer and other strides are 16-byte aligned (any head
  dim that is a multiple of 8); otherwise the launcher first makes an aligned copy. ``out`` and the
  gradients are allocated with the dimension order of their input, so such layouts round-trip.
* ``attn_mask``: ``None``, bool (True keeps a score) or an additive float bias, broadcastable to
  ``(B, H, N, M)``. The kernels take one kind, an additive bias in q's dtype or fp32: a bool mask
  becomes ``0 / -inf`` in q's dtype, a float mask of another dtype becomes fp32 (copies at the
  mask's own size). Broadcast dimensions are read with stride 0, never expanded in memory. The mask
  is a constant: no gradient flows into it.
* ``scale`` defaults to ``1 / sqrt(D)``.
* A query row whose keys are all masked (all False, or all ``-inf``) gives an output row of zeros
  and zero gradients (its own dq row zero, no contribution to dk, dv). That is what
  ``scaled_dot_product_attention`` gives on CPU in torch 2.13, measured for fp32, fp16 and bf16, bool
  and additive masks, on the default (fused) and the math backend alike; older PyTorch and some CUDA
  backends give NaN there. Its stored log-sum-exp is ``+inf``.
* NaN and Inf propagate as in SDPA's math path, never masked away: a NaN in a key makes every
  output of its (batch, head) NaN, one in a query its row, one in a value that column of the
  (batch, head). A score of ``+inf`` (an infinite q or k entry) makes its row NaN; a NaN in a key
  that a bool mask removes still makes the outputs NaN (the mask is an additive ``-inf``, and
  ``NaN - inf`` is NaN), as SDPA's fused CPU kernel does.
* Extremes: scores are formed, max-subtracted and exponentiated in fp32, so logits ``q.k * scale``
  up to ~1e4 and beyond in fp16/bf16 give a finite, accurate forward. The backward stays finite;
  its dq/dk carry an absolute error of about one unit in the last place of ``out`` times
  ``|dO| |k| scale`` (resp. ``|q|``), because ``delta = rowsum(dO * out)`` is formed from the rounded
  ``out`` (as in FlashAttention): in a nearly one-hot softmax the true dq/dk are far smaller than that.

Forward: each program owns ``BLOCK_M`` queries of one (batch, head) and streams the keys in
``BLOCK_N`` tiles with an online softmax; scores live in log2 units (``log2(e)`` is folded into the
scale, so the kernel uses ``exp2``). Only ``out`` and the fp32 log-sum-exp ``lse`` ``(B, H, N)``
(natural log) are written; the ``N x M`` score matrix never exists in memory. Softmax statistics
and every ``tl.dot`` accumulate in fp32. The whole key tiles of an unmasked call run without any
masking, in the fused form ``exp2(s * qk_scale - m)`` (one FMA per score, the row max scaled once
per row, which needs ``scale >= 0``: a negative scale runs as ``|scale|`` on ``-k``); the ragged
last tile, and every tile of a masked call, scale, add the bias and mask. Both backward kernels
split their loops the same way.

The dots run on the tensor cores: fp16/bf16 directly (P and dS rounded to the input dtype, as
FlashAttention does); fp32 as 3xTF32 (``input_precision="tf32x3"``, about fp32 accuracy) under
``torch.get_float32_matmul_precision() == "highest"`` (the default), plain TF32 under "high" or
"medium" (see ``_dot_precision``). Triton's interpreter ignores ``input_precision`` and multiplies
fp32 in fp32, so the CPU tests check the fp32 kernels at fp32 accuracy. Exceptions, where every
tensor-core tile tried spilled registers (table entries with ``fma=True``, plain fp32 FMA dots at any
matmul precision): the fp32 backward at BLOCK_D 256 (head dims 129-256), the fp32 forward at BLOCK_D 256
on sm_80, and the fp32 short-sequence kernels.

Tiles come from per-(precision, arch) tables (``_FWD_CONFIGS`` ...), the arch from
``_backend.compute_capability`` (sm_80 and sm_90 tables; CPU tensors under the interpreter take
sm_80's). ``_attention_configs()`` lists every config a launcher can select; the compile test
compiles each on its arch with the launch's own specialisation.

Backward (recomputes the scores from ``q, k, v, out, lse``): ``delta = rowsum(dO * O)``, then one
kernel parallel over key blocks for ``dK, dV`` and one parallel over query blocks for ``dQ``.
Deterministic, no atomics.

Short sequences (``N, M <= 32``, e.g. temporal attention over 8 to 32 frames with ``B*H`` in the
tens of thousands) use a second pair of kernels: one square ``16`` or ``32`` tile covers a whole
sequence, so the softmax is a single pass, and each program loops over several (batch, head)
sequences. Its backward computes ``dQ, dK, dV`` of a sequence in one go (fp32 with large heads
takes the main kernels, see ``_attention_short_config``).

Head dims ``1 .. 256`` on the Triton path, padded to a power of two ``>= 64`` and masked, except that
the main kernels split SD 1.5's head dims (33..48, 65..80, 129..160: 40, 80, 160) into two
power-of-two pieces, 32+16, 64+16 and 128+32 columns, each with its own dots into one score tile
and its own output accumulator (``BLOCK_D2``, ``_block_dims``), so they compute 48, 80 and 160 columns
instead of 64, 128 and 256; the torch reference takes any. Both paths register as ``torch.library`` custom ops (``fastunet::attention_fwd``
-> ``(out, lse)``, ``fastunet::attention_bwd`` -> ``(dq, dk, dv)``) so ``torch.compile(fullgraph=True)``
traces through them; the backend is picked inside the op with ``use_triton``.

The torch reference path (CPU tensors, or backend "torch") saves the same ``(q, k, v, out, lse)``.
Where PyTorch's fused CPU kernels apply (``aten._scaled_dot_product_flash_attention_for_cpu`` and
its ``_backward``: CPU tensors, ``D == Dv``, non-empty, no infinite q/k entry or ``+inf`` in a float
mask (see ``_cpu_flash_applies``); the backward also fp32/fp16/bf16, as it reads
the fp32 ``lse``), both directions run them: they take the mask only as an additive bias in q's
dtype (a bool mask becomes ``0 / -inf`` at the mask's own size, a float one is cast) viewed 4-D with
stride-0 broadcasts, and read rows of q, k, v and out as contiguous, so an operand (dO too) whose
innermost stride is not 1 is copied first. The backward recomputes ``exp(s - lse)`` from our ``lse``, so a
fully masked row (``lse = +inf``) gets zero gradients as on the Triton path; it is parallel over
(batch, head) only. Elsewhere (``D != Dv``, empty, fp64 backward, or a PyTorch without the ops)
plain-torch recomputations chunked over queries (~16 MiB fp32 score chunks) serve instead.
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import NamedTuple, Optional

import torch

from . import _backend
from ._backend import (backward_call, dense_strides, forward_call, interpreter_enabled, record_launch, register_once,
                       tl, triton, use_triton)

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: fp32 dots run on tensor cores (3xTF32 or TF32); read by ``fastunet.static_report``'s checks.
_FP32_TENSOR_CORES = True
_MAX_HEAD_DIM = 256
#: Longest query and key length handled by the short-sequence kernels.
_SHORT_SEQ_MAX = 32


# --------------------------------------------------------------------------------------------------
# Triton kernels
#
# Helpers: under Triton's interpreter (the CPU tests) each @triton.jit helper call costs about 0.15 ms
# on top of its body (measured: a 1000-step loop of a trivial op took 35 us a step inlined, 190 us
# through a helper); on a GPU they are inlined. The kernels therefore call helpers per program or
# per tile, where a tile's loads and dots cost far more, and never per element.
# --------------------------------------------------------------------------------------------------


@triton.jit
def _attention_dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """``a @ b (+ acc)`` accumulated in fp32. ``DOT_PRECISION == "ieee-upcast"`` multiplies fp32 copies
    of the operands instead: the launchers ask for it only under Triton's interpreter for bf16, whose
    ``tl.dot`` multiplies the raw bits of bf16 values (it stores them as uint16). Products of bf16
    values are exact in fp32, so the result is the tensor-core one up to summation order."""
    if DOT_PRECISION == "ieee-upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _attention_tile_ptrs(base, rows, cols, stride_row, stride_col):
    """Pointers ``(len(rows), len(cols))`` of a tile of one (batch, head) slice. The launchers hand
    the kernels only tensors whose data pointer and strides are 16-byte aligned and whose innermost
    stride is 1 (see ``_aligned``); saying so lets loads and stores vectorise even where Triton's
    own specialisation cannot see it (a head stride of 40 elements, say)."""
    return tl.multiple_of(base + rows[:, None] * stride_row + cols[None, :] * stride_col, [16, 16])


@triton.jit
def _attention_masked_scores(s, bias_ptrs, valid, HAS_MASK: tl.constexpr):
    """Add the additive mask to log2-unit scores ``s``; ``-inf`` where ``valid`` is False."""
    if HAS_MASK:
        s = s + tl.load(bias_ptrs, mask=valid, other=0.0).to(tl.float32) * LOG2E
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _attention_batch_head(bh, num_heads):
    """Batch and head index (int64, for pointer offsets) of the (batch, head) sequence ``bh``."""
    return (bh // num_heads).to(tl.int64), (bh % num_heads).to(tl.int64)


@triton.jit
def _attention_load_rows(base, rows, offs_d, stride_row, stride_col, row_ok, DIM: tl.constexpr,
                         END: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Tile ``(len(rows), len(offs_d))`` of one (batch, head) slice: columns ``offs_d``, a run of the
    head dim that ends before column ``END``, zero past ``DIM`` columns and, with ``CHECK_ROWS``, on
    rows where ``row_ok`` is False. A full tile whose columns all lie below ``DIM`` loads without a
    mask."""
    ptrs = _attention_tile_ptrs(base, rows, offs_d, stride_row, stride_col)
    if CHECK_ROWS:
        tile = tl.load(ptrs, mask=row_ok[:, None] & (offs_d < DIM)[None, :], other=0.0)
    elif DIM >= END:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=(offs_d < DIM)[None, :], other=0.0)
    return tile


@triton.jit
def _attention_head_dots(a, b, a2, b2, acc, BLOCK_D2: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``a @ b^T (+ acc)`` over the whole head dim: the first piece's columns (``a``, ``b``) and, where
    the head dim is split (``BLOCK_D2 > 0``), the second piece's (``a2``, ``b2``) into the same
    accumulator."""
    acc = _attention_dot(a, tl.trans(b), acc, DOT_PRECISION)
    if BLOCK_D2 > 0:
        acc = _attention_dot(a2, tl.trans(b2), acc, DOT_PRECISION)
    return acc


@triton.jit
def _attention_second_piece(first, base, rows, stride_row, stride_col, row_ok, DIM: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """The head dim's second piece of a tile of rows ``rows``: columns ``BLOCK_D .. BLOCK_D + BLOCK_D2``,
    zero past ``DIM`` (and, with ``CHECK_ROWS``, on rows where ``row_ok`` is False). Where the head dim
    is not split (``BLOCK_D2 == 0``) it is ``first``, the first piece, which then goes unused."""
    piece = first
    if BLOCK_D2 > 0:
        piece = _attention_load_rows(base, rows, BLOCK_D + tl.arange(0, BLOCK_D2), stride_row, stride_col, row_ok,
                                     DIM, BLOCK_D + BLOCK_D2, CHECK_ROWS)
    return piece


@triton.jit
def _attention_second_acc(first, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr):
    """A zero fp32 accumulator ``(ROWS, BLOCK_D2)`` for the head dim's second piece, and its column
    offsets; ``first`` and the first piece's offsets, unused, where the head dim is not split."""
    acc, offs = first, tl.arange(0, BLOCK_D)
    if BLOCK_D2 > 0:
        acc, offs = tl.zeros([ROWS, BLOCK_D2], tl.float32), BLOCK_D + tl.arange(0, BLOCK_D2)
    return acc, offs


@triton.jit
def _attention_fwd_tile(q, q2, k_base, v_base, m_base, rows, cols, offs_d, row_ok, seqlen_k,
                        stride_k_m, stride_k_d, stride_v_m, stride_v_d, stride_mask_n, stride_mask_m,
                        m_i, l_i, acc, acc2, qk_scale,
                        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_D2: tl.constexpr, HAS_MASK: tl.constexpr, RAGGED: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """One key tile of the forward's online softmax; returns the updated ``(m_i, l_i, acc, acc2)``
    (``acc2``: the output columns of the head dim's second piece, passed through when it has none).

    ``m_i`` is the running row max in log2 units. A full tile without a mask (``RAGGED`` and
    ``HAS_MASK`` False) keeps the raw scores: the row max is scaled once per row, and the scale and
    the max-subtraction meet in one FMA per score, ``exp2(s * qk_scale - m)``. The last, ragged
    tile and every tile of a masked call scale first, add the bias and set missing keys to
    ``-inf``. ``qk_scale >= 0`` (the launchers make it so), so ``max(s) * qk_scale`` is
    ``max(s * qk_scale)`` exactly."""
    col_ok = cols < seqlen_k
    k = _attention_load_rows(k_base, cols, offs_d, stride_k_m, stride_k_d, col_ok, HEAD_DIM, BLOCK_D, RAGGED)
    k2 = _attention_second_piece(k, k_base, cols, stride_k_m, stride_k_d, col_ok, HEAD_DIM, BLOCK_D, BLOCK_D2, RAGGED)
    s = _attention_head_dots(q, k, q2, k2, None, BLOCK_D2, DOT_PRECISION)
    if HAS_MASK or RAGGED:
        s = _attention_masked_scores(s * qk_scale, _attention_tile_ptrs(m_base, rows, cols, stride_mask_n,
                                                                        stride_mask_m),
                                     row_ok[:, None] & col_ok[None, :], HAS_MASK)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with every score -inf so far keeps m = -inf; subtract 0 instead to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s * qk_scale - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _attention_load_rows(v_base, cols, offs_d, stride_v_m, stride_v_d, col_ok, HEAD_DIM_V, BLOCK_D, RAGGED)
    p = p.to(v.dtype)
    acc = _attention_dot(p, v, acc * alpha[:, None], DOT_PRECISION)
    if BLOCK_D2 > 0:
        v2 = _attention_second_piece(v, v_base, cols, stride_v_m, stride_v_d, col_ok, HEAD_DIM_V, BLOCK_D, BLOCK_D2,
                                     RAGGED)
        acc2 = _attention_dot(p, v2, acc2 * alpha[:, None], DOT_PRECISION)
    return m_new, l_i, acc, acc2


@triton.jit
def _attention_full_tiles(seqlen, BLOCK: tl.constexpr, HAS_MASK: tl.constexpr):
    """Length of the prefix of a loop over ``seqlen`` in ``BLOCK`` steps whose tiles run unmasked:
    every whole tile, or none when a mask is applied (then every tile takes the masked path)."""
    if HAS_MASK:
        full = seqlen * 0
    else:
        full = (seqlen // BLOCK) * BLOCK
    return full


@triton.jit
def _attention_store_rows(base, rows, offs_d, stride_row, stride_col, row_ok, tile, DIM: tl.constexpr):
    """Store ``tile`` at rows ``rows`` and head-dim columns ``offs_d`` of one (batch, head) slice,
    skipping rows where ``row_ok`` is False and columns from ``DIM`` on."""
    tl.store(_attention_tile_ptrs(base, rows, offs_d, stride_row, stride_col), tile.to(base.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d < DIM)[None, :])


@triton.jit
def _attention_fwd_kernel(
    q_ptr,  # (B, H, N, D)
    k_ptr,  # (B, H, M, D)
    v_ptr,  # (B, H, M, Dv)
    mask_ptr,  # additive bias, broadcast view (B, H, N, M), q's dtype or fp32; unused without HAS_MASK
    out_ptr,  # (B, H, N, Dv)
    lse_ptr,  # (B*H, N) fp32, natural log
    stride_q_b, stride_q_h, stride_q_n, stride_q_d,
    stride_k_b, stride_k_h, stride_k_m, stride_k_d,
    stride_v_b, stride_v_h, stride_v_m, stride_v_d,
    stride_mask_b, stride_mask_h, stride_mask_n, stride_mask_m,
    stride_out_b, stride_out_h, stride_out_n, stride_out_d,
    num_heads, seqlen_q, seqlen_k,
    qk_scale,  # softmax scale * log2(e), >= 0
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = _attention_batch_head(bh, num_heads)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < seqlen_q

    q_base = q_ptr + b * stride_q_b + h * stride_q_h
    q = _attention_load_rows(q_base, rows, offs_d, stride_q_n, stride_q_d, row_ok, HEAD_DIM, BLOCK_D, True)
    k_base = k_ptr + b * stride_k_b + h * stride_k_h
    v_base = v_ptr + b * stride_v_b + h * stride_v_h
    m_base = mask_ptr + b * stride_mask_b + h * stride_mask_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # The head dim's second piece (columns BLOCK_D .. BLOCK_D + BLOCK_D2), where it is split; without
    # one, its names stand for the first piece's and are passed through unused.
    q2 = _attention_second_piece(q, q_base, rows, stride_q_n, stride_q_d, row_ok, HEAD_DIM, BLOCK_D, BLOCK_D2, True)
    acc2, offs_d2 = _attention_second_acc(acc, BLOCK_M, BLOCK_D, BLOCK_D2)
    # Whole key tiles unmasked (query rows past seqlen_q are computed and never stored), then the
    # ragged tail; with a mask every tile is masked.
    full = _attention_full_tiles(seqlen_k, BLOCK_N, HAS_MASK)
    for start_n in range(0, full, BLOCK_N):
        m_i, l_i, acc, acc2 = _attention_fwd_tile(q, q2, k_base, v_base, m_base, rows, start_n + offs_n, offs_d,
                                                  row_ok, seqlen_k, stride_k_m, stride_k_d, stride_v_m,
                                                  stride_v_d, stride_mask_n, stride_mask_m, m_i, l_i, acc, acc2,
                                                  qk_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_D2, False, False,
                                                  DOT_PRECISION)
    for start_n in range(full, seqlen_k, BLOCK_N):
        m_i, l_i, acc, acc2 = _attention_fwd_tile(q, q2, k_base, v_base, m_base, rows, start_n + offs_n, offs_d,
                                                  row_ok, seqlen_k, stride_k_m, stride_k_d, stride_v_m,
                                                  stride_v_d, stride_mask_n, stride_mask_m, m_i, l_i, acc, acc2,
                                                  qk_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_D2, HAS_MASK, True,
                                                  DOT_PRECISION)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out_base = out_ptr + b * stride_out_b + h * stride_out_h
    _attention_store_rows(out_base, rows, offs_d, stride_out_n, stride_out_d, row_ok, acc / l_safe[:, None], HEAD_DIM_V)
    if BLOCK_D2 > 0:
        _attention_store_rows(out_base, rows, offs_d2, stride_out_n, stride_out_d, row_ok, acc2 / l_safe[:, None],
                              HEAD_DIM_V)
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    tl.store(lse_ptr + bh.to(tl.int64) * seqlen_q + rows, lse, mask=row_ok)


@triton.jit
def _attention_bwd_preprocess_kernel(
    out_ptr,  # (B, H, N, Dv)
    do_ptr,  # (B, H, N, Dv)
    delta_ptr,  # (B*H, N) fp32 out: rowsum(dO * O)
    stride_out_b, stride_out_h, stride_out_n, stride_out_d,
    stride_do_b, stride_do_h, stride_do_n, stride_do_d,
    num_heads, seqlen_q,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = _attention_batch_head(bh, num_heads)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (rows[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM_V)
    o = tl.load(_attention_tile_ptrs(out_ptr + b * stride_out_b + h * stride_out_h, rows, offs_d, stride_out_n,
                                     stride_out_d), mask=ok, other=0.0)
    do = tl.load(_attention_tile_ptrs(do_ptr + b * stride_do_b + h * stride_do_h, rows, offs_d, stride_do_n,
                                      stride_do_d), mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + bh.to(tl.int64) * seqlen_q + rows, delta, mask=rows < seqlen_q)


@triton.jit
def _attention_bwd_probs(s, lse, bias_ptrs, valid, qk_scale, HAS_MASK: tl.constexpr, RAGGED: tl.constexpr):
    """Softmax probabilities of raw scores ``s`` from the log2-unit log-sum-exp ``lse`` (already
    broadcast to ``s``'s shape): ``exp2(s * qk_scale - lse)`` as one FMA per score on a full tile
    without a mask; scaled, biased and ``-inf`` where ``valid`` is False otherwise."""
    if HAS_MASK or RAGGED:
        p = tl.exp2(_attention_masked_scores(s * qk_scale, bias_ptrs, valid, HAS_MASK) - lse)
    else:
        p = tl.exp2(s * qk_scale - lse)
    return p


@triton.jit
def _attention_bwd_query_stats(lse_base, delta_base, rows, row_ok, RAGGED: tl.constexpr):
    """Log-sum-exp (log2 units; ``+inf`` for missing queries, so their ``p`` is 0) and ``delta`` of
    queries ``rows``."""
    if RAGGED:
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * LOG2E
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    else:
        lse = tl.load(lse_base + rows) * LOG2E
        delta = tl.load(delta_base + rows)
    return lse, delta


@triton.jit
def _attention_dkdv_tile(k, k2, v, v2, q_base, do_base, m_base, lse_base, delta_base, rows, cols, offs_d,
                         col_ok, seqlen_q, stride_q_n, stride_q_d, stride_do_n, stride_do_d, stride_mask_n,
                         stride_mask_m, dk, dk2, dv, dv2, qk_scale, HEAD_DIM: tl.constexpr,
                         HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
                         HAS_MASK: tl.constexpr, RAGGED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One query tile of the dK/dV loop on transposed tiles (keys along dim 0); returns
    ``(dk, dk2, dv, dv2)`` (dk before the softmax scale; the ``2`` names are the head dim's second
    piece, passed through when it has none). ``RAGGED`` and ``HAS_MASK`` as in ``_attention_fwd_tile``."""
    row_ok = rows < seqlen_q
    q = _attention_load_rows(q_base, rows, offs_d, stride_q_n, stride_q_d, row_ok, HEAD_DIM, BLOCK_D, RAGGED)
    do = _attention_load_rows(do_base, rows, offs_d, stride_do_n, stride_do_d, row_ok, HEAD_DIM_V, BLOCK_D, RAGGED)
    q2 = _attention_second_piece(q, q_base, rows, stride_q_n, stride_q_d, row_ok, HEAD_DIM, BLOCK_D, BLOCK_D2, RAGGED)
    do2 = _attention_second_piece(do, do_base, rows, stride_do_n, stride_do_d, row_ok, HEAD_DIM_V, BLOCK_D, BLOCK_D2,
                                  RAGGED)
    lse, delta = _attention_bwd_query_stats(lse_base, delta_base, rows, row_ok, RAGGED)
    s_t = _attention_head_dots(k, q, k2, q2, None, BLOCK_D2, DOT_PRECISION)
    p_t = _attention_bwd_probs(s_t, lse[None, :], _attention_tile_ptrs(m_base, cols, rows, stride_mask_m,
                                                                      stride_mask_n),
                               col_ok[:, None] & row_ok[None, :], qk_scale, HAS_MASK, RAGGED)
    p_lo = p_t.to(do.dtype)
    dv = _attention_dot(p_lo, do, dv, DOT_PRECISION)
    if BLOCK_D2 > 0:
        dv2 = _attention_dot(p_lo, do2, dv2, DOT_PRECISION)
    dp_t = _attention_head_dots(v, do, v2, do2, None, BLOCK_D2, DOT_PRECISION)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
    dk = _attention_dot(ds_t, q, dk, DOT_PRECISION)
    if BLOCK_D2 > 0:
        dk2 = _attention_dot(ds_t, q2, dk2, DOT_PRECISION)
    return dk, dk2, dv, dv2


@triton.jit
def _attention_bwd_dkdv_kernel(
    q_ptr,  # (B, H, N, D)
    k_ptr,  # (B, H, M, D)
    v_ptr,  # (B, H, M, Dv)
    mask_ptr,  # broadcast view (B, H, N, M); unused without HAS_MASK
    do_ptr,  # (B, H, N, Dv)
    lse_ptr,  # (B*H, N) fp32
    delta_ptr,  # (B*H, N) fp32
    dk_ptr,  # (B, H, M, D) out
    dv_ptr,  # (B, H, M, Dv) out
    stride_q_b, stride_q_h, stride_q_n, stride_q_d,
    stride_k_b, stride_k_h, stride_k_m, stride_k_d,
    stride_v_b, stride_v_h, stride_v_m, stride_v_d,
    stride_mask_b, stride_mask_h, stride_mask_n, stride_mask_m,
    stride_do_b, stride_do_h, stride_do_n, stride_do_d,
    stride_dk_b, stride_dk_h, stride_dk_m, stride_dk_d,
    stride_dv_b, stride_dv_h, stride_dv_m, stride_dv_d,
    num_heads, seqlen_q, seqlen_k,
    sm_scale,  # softmax scale (natural units), >= 0
    qk_scale,  # sm_scale * log2(e)
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = _attention_batch_head(bh, num_heads)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < seqlen_k
    k_base = k_ptr + b * stride_k_b + h * stride_k_h
    v_base = v_ptr + b * stride_v_b + h * stride_v_h
    k = _attention_load_rows(k_base, cols, offs_d, stride_k_m, stride_k_d, col_ok, HEAD_DIM, BLOCK_D, True)
    v = _attention_load_rows(v_base, cols, offs_d, stride_v_m, stride_v_d, col_ok, HEAD_DIM_V, BLOCK_D, True)
    q_base = q_ptr + b * stride_q_b + h * stride_q_h
    do_base = do_ptr + b * stride_do_b + h * stride_do_h
    m_base = mask_ptr + b * stride_mask_b + h * stride_mask_h
    lse_base = lse_ptr + bh.to(tl.int64) * seqlen_q
    delta_base = delta_ptr + bh.to(tl.int64) * seqlen_q

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # the head dim's second piece where it is split, as in the forward
    k2 = _attention_second_piece(k, k_base, cols, stride_k_m, stride_k_d, col_ok, HEAD_DIM, BLOCK_D, BLOCK_D2, True)
    v2 = _attention_second_piece(v, v_base, cols, stride_v_m, stride_v_d, col_ok, HEAD_DIM_V, BLOCK_D, BLOCK_D2, True)
    dk2, offs_d2 = _attention_second_acc(dk, BLOCK_N, BLOCK_D, BLOCK_D2)
    dv2, _ = _attention_second_acc(dv, BLOCK_N, BLOCK_D, BLOCK_D2)
    # Whole query tiles unmasked, then the ragged tail. Key rows past seqlen_k (k, v loaded as 0)
    # reach only rows of dk, dv that are never stored, so the unmasked tiles leave them unmasked.
    full = _attention_full_tiles(seqlen_q, BLOCK_M, HAS_MASK)
    for start_m in range(0, full, BLOCK_M):
        dk, dk2, dv, dv2 = _attention_dkdv_tile(k, k2, v, v2, q_base, do_base, m_base, lse_base, delta_base,
                                                start_m + offs_m, cols, offs_d, col_ok, seqlen_q, stride_q_n,
                                                stride_q_d, stride_do_n, stride_do_d, stride_mask_n, stride_mask_m,
                                                dk, dk2, dv, dv2, qk_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_D2,
                                                False, False, DOT_PRECISION)
    for start_m in range(full, seqlen_q, BLOCK_M):
        dk, dk2, dv, dv2 = _attention_dkdv_tile(k, k2, v, v2, q_base, do_base, m_base, lse_base, delta_base,
                                                start_m + offs_m, cols, offs_d, col_ok, seqlen_q, stride_q_n,
                                                stride_q_d, stride_do_n, stride_do_d, stride_mask_n, stride_mask_m,
                                                dk, dk2, dv, dv2, qk_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_D2,
                                                HAS_MASK, True, DOT_PRECISION)

    dk_base = dk_ptr + b * stride_dk_b + h * stride_dk_h
    dv_base = dv_ptr + b * stride_dv_b + h * stride_dv_h
    _attention_store_rows(dk_base, cols, offs_d, stride_dk_m, stride_dk_d, col_ok, dk * sm_scale, HEAD_DIM)
    _attention_store_rows(dv_base, cols, offs_d, stride_dv_m, stride_dv_d, col_ok, dv, HEAD_DIM_V)
    if BLOCK_D2 > 0:
        _attention_store_rows(dk_base, cols, offs_d2, stride_dk_m, stride_dk_d, col_ok, dk2 * sm_scale, HEAD_DIM)
        _attention_store_rows(dv_base, cols, offs_d2, stride_dv_m, stride_dv_d, col_ok, dv2, HEAD_DIM_V)


@triton.jit
def _attention_dq_tile(q, q2, do, do2, lse, delta, k_base, v_base, m_base, rows, cols, offs_d, row_ok,
                       seqlen_k, stride_k_m, stride_k_d, stride_v_m, stride_v_d, stride_mask_n, stride_mask_m, dq,
                       dq2, qk_scale, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_D2: tl.constexpr, HAS_MASK: tl.constexpr, RAGGED: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """One key tile of the dQ loop; returns ``(dq, dq2)`` (before the softmax scale; ``dq2`` the head
    dim's second piece, passed through when it has none)."""
    col_ok = cols < seqlen_k
    k = _attention_load_rows(k_base, cols, offs_d, stride_k_m, stride_k_d, col_ok, HEAD_DIM, BLOCK_D, RAGGED)
    v = _attention_load_rows(v_base, cols, offs_d, stride_v_m, stride_v_d, col_ok, HEAD_DIM_V, BLOCK_D, RAGGED)
    k2 = _attention_second_piece(k, k_base, cols, stride_k_m, stride_k_d, col_ok, HEAD_DIM, BLOCK_D, BLOCK_D2, RAGGED)
    v2 = _attention_second_piece(v, v_base, cols, stride_v_m, stride_v_d, col_ok, HEAD_DIM_V, BLOCK_D, BLOCK_D2,
                                 RAGGED)
    s = _attention_head_dots(q, k, q2, k2, None, BLOCK_D2, DOT_PRECISION)
    p = _attention_bwd_probs(s, lse[:, None], _attention_tile_ptrs(m_base, rows, cols, stride_mask_n, stride_mask_m),
                             row_ok[:, None] & col_ok[None, :], qk_scale, HAS_MASK, RAGGED)
    dp = _attention_head_dots(do, v, do2, v2, None, BLOCK_D2, DOT_PRECISION)
    ds = (p * (dp - delta[:, None])).to(k.dtype)
    dq = _attention_dot(ds, k, dq, DOT_PRECISION)
    if BLOCK_D2 > 0:
        dq2 = _attention_dot(ds, k2, dq2, DOT_PRECISION)
    return dq, dq2


@triton.jit
def _attention_bwd_dq_kernel(
    q_ptr,  # (B, H, N, D)
    k_ptr,  # (B, H, M, D)
    v_ptr,  # (B, H, M, Dv)
    mask_ptr,  # broadcast view (B, H, N, M); unused without HAS_MASK
    do_ptr,  # (B, H, N, Dv)
    lse_ptr,  # (B*H, N) fp32
    delta_ptr,  # (B*H, N) fp32
    dq_ptr,  # (B, H, N, D) out
    stride_q_b, stride_q_h, stride_q_n, stride_q_d,
    stride_k_b, stride_k_h, stride_k_m, stride_k_d,
    stride_v_b, stride_v_h, stride_v_m, stride_v_d,
    stride_mask_b, stride_mask_h, stride_mask_n, stride_mask_m,
    stride_do_b, stride_do_h, stride_do_n, stride_do_d,
    stride_dq_b, stride_dq_h, stride_dq_n, stride_dq_d,
    num_heads, seqlen_q, seqlen_k,
    sm_scale,  # softmax scale (natural units), >= 0
    qk_scale,  # sm_scale * log2(e)
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = _attention_batch_head(bh, num_heads)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < seqlen_q
    stat_base = bh.to(tl.int64) * seqlen_q
    q_base = q_ptr + b * stride_q_b + h * stride_q_h
    do_base = do_ptr + b * stride_do_b + h * stride_do_h
    q = _attention_load_rows(q_base, rows, offs_d, stride_q_n, stride_q_d, row_ok, HEAD_DIM, BLOCK_D, True)
    do = _attention_load_rows(do_base, rows, offs_d, stride_do_n, stride_do_d, row_ok, HEAD_DIM_V, BLOCK_D, True)
    lse, delta = _attention_bwd_query_stats(lse_ptr + stat_base, delta_ptr + stat_base, rows, row_ok, True)
    k_base = k_ptr + b * stride_k_b + h * stride_k_h
    v_base = v_ptr + b * stride_v_b + h * stride_v_h
    m_base = mask_ptr + b * stride_mask_b + h * stride_mask_h

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # the head dim's second piece where it is split, as in the forward
    q2 = _attention_second_piece(q, q_base, rows, stride_q_n, stride_q_d, row_ok, HEAD_DIM, BLOCK_D, BLOCK_D2, True)
    do2 = _attention_second_piece(do, do_base, rows, stride_do_n, stride_do_d, row_ok, HEAD_DIM_V, BLOCK_D, BLOCK_D2,
                                  True)
    dq2, offs_d2 = _attention_second_acc(dq, BLOCK_M, BLOCK_D, BLOCK_D2)
    full = _attention_full_tiles(seqlen_k, BLOCK_N, HAS_MASK)  # as in the forward
    for start_n in range(0, full, BLOCK_N):
        dq, dq2 = _attention_dq_tile(q, q2, do, do2, lse, delta, k_base, v_base, m_base, rows, start_n + offs_n,
                                     offs_d, row_ok, seqlen_k, stride_k_m, stride_k_d, stride_v_m, stride_v_d,
                                     stride_mask_n, stride_mask_m, dq, dq2, qk_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_D,
                                     BLOCK_D2, False, False, DOT_PRECISION)
    for start_n in range(full, seqlen_k, BLOCK_N):
        dq, dq2 = _attention_dq_tile(q, q2, do, do2, lse, delta, k_base, v_base, m_base, rows, start_n + offs_n,
                                     offs_d, row_ok, seqlen_k, stride_k_m, stride_k_d, stride_v_m, stride_v_d,
                                     stride_mask_n, stride_mask_m, dq, dq2, qk_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_D,
                                     BLOCK_D2, HAS_MASK, True, DOT_PRECISION)

    dq_base = dq_ptr + b * stride_dq_b + h * stride_dq_h
    _attention_store_rows(dq_base, rows, offs_d, stride_dq_n, stride_dq_d, row_ok, dq * sm_scale, HEAD_DIM)
    if BLOCK_D2 > 0:
        _attention_store_rows(dq_base, rows, offs_d2, stride_dq_n, stride_dq_d, row_ok, dq2 * sm_scale, HEAD_DIM)


@triton.jit
def _attention_short_tiles(rows, cols, offs_d, seqlen_q, seqlen_k, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr):
    """Validity masks of the short kernels' whole-sequence tiles: rows (queries), cols (keys), q/dq
    ``(rows, D)``, k/dk ``(cols, D)``, v/dv ``(cols, Dv)``, out/dO ``(rows, Dv)`` and the scores
    ``(rows, cols)``."""
    row_ok = rows < seqlen_q
    col_ok = cols < seqlen_k
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    k_mask = col_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    v_mask = col_ok[:, None] & (offs_d[None, :] < HEAD_DIM_V)
    o_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM_V)
    return row_ok, q_mask, k_mask, v_mask, o_mask, row_ok[:, None] & col_ok[None, :]


@triton.jit
def _attention_short_scores(q_base, k_base, v_base, m_base, rows, cols, offs_d,
                            stride_q_n, stride_q_d, stride_k_m, stride_k_d, stride_v_m, stride_v_d,
                            stride_mask_n, stride_mask_m, q_mask, k_mask, v_mask, valid, qk_scale,
                            HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``q``, ``k``, ``v`` of one whole (batch, head) sequence and its masked log2-unit scores."""
    q = tl.load(_attention_tile_ptrs(q_base, rows, offs_d, stride_q_n, stride_q_d), mask=q_mask, other=0.0)
    k = tl.load(_attention_tile_ptrs(k_base, cols, offs_d, stride_k_m, stride_k_d), mask=k_mask, other=0.0)
    v = tl.load(_attention_tile_ptrs(v_base, cols, offs_d, stride_v_m, stride_v_d), mask=v_mask, other=0.0)
    s = _attention_dot(q, tl.trans(k), None, DOT_PRECISION) * qk_scale
    s = _attention_masked_scores(s, _attention_tile_ptrs(m_base, rows, cols, stride_mask_n, stride_mask_m), valid,
                                 HAS_MASK)
    return q, k, v, s


@triton.jit
def _attention_short_fwd_kernel(
    q_ptr,  # (B, H, N, D), N <= BLOCK_M
    k_ptr,  # (B, H, M, D), M <= BLOCK_N
    v_ptr,  # (B, H, M, Dv)
    mask_ptr,  # broadcast view (B, H, N, M); unused without HAS_MASK
    out_ptr,  # (B, H, N, Dv)
    lse_ptr,  # (B*H, N) fp32, natural log
    stride_q_b, stride_q_h, stride_q_n, stride_q_d,
    stride_k_b, stride_k_h, stride_k_m, stride_k_d,
    stride_v_b, stride_v_h, stride_v_m, stride_v_d,
    stride_mask_b, stride_mask_h, stride_mask_n, stride_mask_m,
    stride_out_b, stride_out_h, stride_out_n, stride_out_d,
    num_heads, batch_heads, seqlen_q, seqlen_k,
    qk_scale,  # softmax scale * log2(e)
    seqs_per_program,  # (batch, head) sequences handled by one program
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok, q_mask, k_mask, v_mask, o_mask, valid = _attention_short_tiles(rows, cols, offs_d, seqlen_q, seqlen_k,
                                                                           HEAD_DIM, HEAD_DIM_V)
    first = tl.program_id(0) * seqs_per_program
    last = tl.minimum(first + seqs_per_program, batch_heads)
    for bh in range(first, last):
        b, h = _attention_batch_head(bh, num_heads)
        q, k, v, s = _attention_short_scores(
            q_ptr + b * stride_q_b + h * stride_q_h, k_ptr + b * stride_k_b + h * stride_k_h,
            v_ptr + b * stride_v_b + h * stride_v_h, mask_ptr + b * stride_mask_b + h * stride_mask_h,
            rows, cols, offs_d, stride_q_n, stride_q_d, stride_k_m, stride_k_d, stride_v_m, stride_v_d,
            stride_mask_n, stride_mask_m, q_mask, k_mask, v_mask, valid, qk_scale, HAS_MASK, DOT_PRECISION)
        # The whole row is in the tile: a plain (not online) softmax.
        m = tl.max(s, 1)
        m = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp2(s - m[:, None])
        l = tl.sum(p, 1)
        empty = l == 0.0
        out = _attention_dot(p.to(v.dtype), v, None, DOT_PRECISION) / tl.where(empty, 1.0, l)[:, None]
        tl.store(_attention_tile_ptrs(out_ptr + b * stride_out_b + h * stride_out_h, rows, offs_d, stride_out_n,
                                      stride_out_d),
                 out.to(out_ptr.dtype.element_ty), mask=o_mask)
        lse = tl.where(empty, float("inf"), (m + tl.log2(tl.where(empty, 1.0, l))) * LN2)
        tl.store(lse_ptr + (b * num_heads + h) * seqlen_q + rows, lse, mask=row_ok)


@triton.jit
def _attention_short_bwd_kernel(
    q_ptr,  # (B, H, N, D), N <= BLOCK_M
    k_ptr,  # (B, H, M, D), M <= BLOCK_N
    v_ptr,  # (B, H, M, Dv)
    mask_ptr,  # broadcast view (B, H, N, M); unused without HAS_MASK
    out_ptr,  # (B, H, N, Dv)
    do_ptr,  # (B, H, N, Dv)
    lse_ptr,  # (B*H, N) fp32
    dq_ptr,  # (B, H, N, D) out
    dk_ptr,  # (B, H, M, D) out
    dv_ptr,  # (B, H, M, Dv) out
    stride_q_b, stride_q_h, stride_q_n, stride_q_d,
    stride_k_b, stride_k_h, stride_k_m, stride_k_d,
    stride_v_b, stride_v_h, stride_v_m, stride_v_d,
    stride_mask_b, stride_mask_h, stride_mask_n, stride_mask_m,
    stride_out_b, stride_out_h, stride_out_n, stride_out_d,
    stride_do_b, stride_do_h, stride_do_n, stride_do_d,
    stride_dq_b, stride_dq_h, stride_dq_n, stride_dq_d,
    stride_dk_b, stride_dk_h, stride_dk_m, stride_dk_d,
    stride_dv_b, stride_dv_h, stride_dv_m, stride_dv_d,
    num_heads, batch_heads, seqlen_q, seqlen_k,
    sm_scale,  # softmax scale (natural units)
    qk_scale,  # sm_scale * log2(e)
    seqs_per_program,  # (batch, head) sequences handled by one program
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok, q_mask, k_mask, v_mask, o_mask, valid = _attention_short_tiles(rows, cols, offs_d, seqlen_q, seqlen_k,
                                                                           HEAD_DIM, HEAD_DIM_V)
    first = tl.program_id(0) * seqs_per_program
    last = tl.minimum(first + seqs_per_program, batch_heads)
    for bh in range(first, last):
        b, h = _attention_batch_head(bh, num_heads)
        o = tl.load(_attention_tile_ptrs(out_ptr + b * stride_out_b + h * stride_out_h, rows, offs_d, stride_out_n,
                                         stride_out_d), mask=o_mask, other=0.0)
        do = tl.load(_attention_tile_ptrs(do_ptr + b * stride_do_b + h * stride_do_h, rows, offs_d, stride_do_n,
                                          stride_do_d), mask=o_mask, other=0.0)
        lse = tl.load(lse_ptr + (b * num_heads + h) * seqlen_q + rows, mask=row_ok, other=float("inf")) * LOG2E
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        q, k, v, s = _attention_short_scores(
            q_ptr + b * stride_q_b + h * stride_q_h, k_ptr + b * stride_k_b + h * stride_k_h,
            v_ptr + b * stride_v_b + h * stride_v_h, mask_ptr + b * stride_mask_b + h * stride_mask_h,
            rows, cols, offs_d, stride_q_n, stride_q_d, stride_k_m, stride_k_d, stride_v_m, stride_v_d,
            stride_mask_n, stride_mask_m, q_mask, k_mask, v_mask, valid, qk_scale, HAS_MASK, DOT_PRECISION)
        p = tl.exp2(s - lse[:, None])
        dv = _attention_dot(tl.trans(p.to(do.dtype)), do, None, DOT_PRECISION)
        dp = _attention_dot(do, tl.trans(v), None, DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dq = _attention_dot(ds, k, None, DOT_PRECISION) * sm_scale
        dk = _attention_dot(tl.trans(ds), q, None, DOT_PRECISION) * sm_scale
        tl.store(_attention_tile_ptrs(dq_ptr + b * stride_dq_b + h * stride_dq_h, rows, offs_d, stride_dq_n,
                                      stride_dq_d), dq.to(dq_ptr.dtype.element_ty), mask=q_mask)
        tl.store(_attention_tile_ptrs(dk_ptr + b * stride_dk_b + h * stride_dk_h, cols, offs_d, stride_dk_m,
                                      stride_dk_d), dk.to(dk_ptr.dtype.element_ty), mask=k_mask)
        tl.store(_attention_tile_ptrs(dv_ptr + b * stride_dv_b + h * stride_dv_h, cols, offs_d, stride_dv_m,
                                      stride_dv_d), dv.to(dv_ptr.dtype.element_ty), mask=v_mask)


# --------------------------------------------------------------------------------------------------
# Launchers and configs
# --------------------------------------------------------------------------------------------------


class _AttentionConfig(NamedTuple):
    """Tile sizes and launch settings of one attention kernel launch."""

    block_m: int  # queries per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int
    #: fp32 only: exact FMA dots (``input_precision="ieee"``) instead of tensor cores, for tiles whose
    #: 3xTF32 operands (split into high and low parts) cannot stay in registers without spilling.
    fma: bool = False


def _pad16(x: int) -> int:
    """Power of two >= x and >= 16 (``tl.dot`` needs every dim >= 16)."""
    return max(16, triton.next_power_of_2(max(int(x), 1)))


def _block_d(d: int) -> int:
    """Padded head dim: a power of two >= 64. Head dims up to 32 are rare and cheap; buckets for
    them would only add compiled variants (see ``_FWD_CONFIGS``)."""
    return max(64, triton.next_power_of_2(max(int(d), 1)))


#: Head dims the main kernels can split into two power-of-two pieces instead of padding them to the
#: next power of two: ``(first piece, second piece)`` for the dims above the first piece up to their
#: sum. These are SD 1.5's heads (40, 80, 160 at 320, 640, 1280 channels over 8 heads), padded to 64,
#: 128, 256 columns; split, 48, 80 and 160 columns are computed. The pieces keep every ``tl.dot``
#: dimension >= 16.
_HEAD_DIM_SPLITS = ((32, 16), (64, 16), (128, 32))

#: The head-dim buckets (``_block_d``: 64, 128, 256) whose split dims each main kernel splits, by
#: (kernel, precision class, arch). A split is listed where, with the bucket's config, every launch
#: the static report's probes make of it (all dtypes, masks, layouts and fp32 precisions) compiles
#: for that arch with no stack, and every innermost loop of the SD 1.5 shapes is no longer (SASS
#: instructions per iteration) than the padded head dim's, masked and unmasked (2026-12-02).
#: ``_SPLIT_BUCKETS_UNMASKED`` adds the splits that hold only without a mask (SD's self- and
#: cross-attention pass none): with one, half 64+16 in the sm_80 forward and dK/dV spilled 8-80 B
#: (255 registers, a key-bias mask), fp32 128+32 in the sm_80 dQ 8 B.
#: Padded elsewhere: the split spilled (half 128+32 on sm_80, 40-136 B, and on sm_90's dK/dV tile,
#: 168-176 B, where the split takes its own tile instead, ``_SPLIT_CONFIGS``; fp32
#: 64+16, 24-296 B; fp32 128+32 in the sm_90 forward under plain TF32, 8-16 B), or its loop was longer (half 32+16
#: on sm_90, where a 64-wide wgmma beats two narrower ones; fp32 32+16 on sm_80 and in the sm_90
#: forward and dQ). Per iteration the splits kept run fewer instructions: fp32 128+32 (the 256
#: bucket runs FMA or 3xTF32 dots on 256 columns) 29-34%; half 64+16 on sm_80 19-21% (forward),
#: 22-24% (dK/dV), 24-30% (dQ); half 128+32 in the sm_90 forward 17-21% and dQ 27-28%; the others
#: 0.3-9%.
_SPLIT_BUCKETS = {
    ("fwd", "half", 80): (), ("fwd", "half", 90): (128, 256),
    ("fwd", "fp32", 80): (256,), ("fwd", "fp32", 90): (),
    ("dkdv", "half", 80): (64,), ("dkdv", "half", 90): (128, 256),
    ("dkdv", "fp32", 80): (256,), ("dkdv", "fp32", 90): (64, 256),
    ("dq", "half", 80): (64, 128), ("dq", "half", 90): (256,),
    ("dq", "fp32", 80): (), ("dq", "fp32", 90): (256,),
}
_SPLIT_BUCKETS_UNMASKED = {("fwd", "half", 80): (128,), ("dkdv", "half", 80): (128,), ("dq", "fp32", 80): (256,)}


@functools.lru_cache(maxsize=512)
def _block_dims(d: int, kernel: str, dtype: torch.dtype, cc: int, has_mask: bool) -> dict:
    """``{"BLOCK_D": ..., "BLOCK_D2": ...}`` of main kernel ``kernel`` ("fwd", "dkdv" or "dq") for
    head dim ``d`` (the max of D and Dv) on arch ``cc``, with or without a mask: the two pieces of
    ``_HEAD_DIM_SPLITS`` where ``_SPLIT_BUCKETS`` (or, unmasked, ``_SPLIT_BUCKETS_UNMASKED``) lists
    the split, else ``_block_d(d)`` and 0, one padded piece. The config tables stay keyed on
    ``_block_d(d)``. Cached like the config lookups (one per launch); callers only unpack the dict."""
    bucket, key = _block_d(d), (kernel, _precision_class(dtype), _arch(cc))
    if bucket in _SPLIT_BUCKETS[key] + (() if has_mask else _SPLIT_BUCKETS_UNMASKED.get(key, ())):
        for first, second in _HEAD_DIM_SPLITS:
            if first < d <= first + second:
                return {"BLOCK_D": first, "BLOCK_D2": second}
    return {"BLOCK_D": bucket, "BLOCK_D2": 0}


#: Archs the config tables are written for; any other capability takes the nearest one below
#: (sm_86/89 -> 80, sm_100 -> 90; below 80 -> 80).
_ARCHS = (80, 90)

# (block_m, block_n, num_warps, num_stages[, fma]) by (precision, arch) and padded head dim; block_m
# counts queries, block_n keys. Every dot runs on tensor cores: fp16/bf16 directly, fp32 as 3xTF32
# (or TF32) dots, whose fp32 operands, split in high and low parts, take several times the registers
# of half ones, hence the smaller fp32 tiles; where no such tile compiled without spilling (fp32
# backward at BLOCK_D 256, fp32 forward at BLOCK_D 256 on sm_80) the entry says ``fma=True`` and keeps
# exact FMA dots (16 x 16 or 16 x 32 tiles, 8 warps).
# The fp32 entries are sized for the masked launches (HAS_MASK: the bias tile adds live registers)
# and the unmasked ones alike, on head dims masked along D or not; 3xTF32 fp32 tiles sit near
# 255 registers, so a change here must be recompiled (static report) before it is kept.
# On sm_90, tiles whose dots are 64 rows per warpgroup lower to wgmma (HGMMA), others to mma.sync.
# The tiles do not shrink for short sequences: N, M <= 32 go to the short kernels. Every entry is
# compiled on its arch by tests/ops/test_attention_compile.py: no spills, shared memory within limits.
_FWD_CONFIGS = {
    ("half", 80): {64: (128, 64, 8, 3), 128: (128, 64, 8, 3), 256: (64, 64, 8, 2)},
    ("half", 90): {64: (128, 128, 8, 2), 128: (128, 64, 8, 3), 256: (64, 64, 8, 2)},
    ("fp32", 80): {64: (32, 32, 4, 1), 128: (16, 32, 4, 2), 256: (16, 32, 8, 1, True)},
    ("fp32", 90): {64: (64, 32, 4, 2), 128: (16, 32, 4, 2), 256: (16, 32, 8, 1)},
}
# ("fp32", 80) at 64 runs one stage: with two (or three), plain-TF32 launches (matmul precision "high")
# at D 8-32 on 33 queries and keys kept 8 B of stack at 96 registers; with one, all 36 probed launches of
# the bucket compile without stack at 122-181 registers, loops 281-330 where two stages took 283-340
# (2026-12-02, full static set).
_DKDV_CONFIGS = {
    ("half", 80): {64: (32, 128, 8, 2), 128: (32, 64, 8, 2), 256: (16, 32, 8, 1)},
    ("half", 90): {64: (32, 128, 8, 2), 128: (32, 64, 8, 2), 256: (16, 32, 8, 1)},
    ("fp32", 80): {64: (16, 32, 4, 2), 128: (16, 16, 8, 1), 256: (16, 16, 8, 1, True)},
    ("fp32", 90): {64: (16, 64, 4, 1), 128: (16, 16, 8, 1), 256: (16, 16, 8, 1, True)},
}
# ("fp32", 90) at 64 runs one stage: with two, a ragged 33-key launch at D 64 (tf32x3, unmasked) spilled 8 B
# at 255 registers on sm_90 (found by the full static set, not the CI subset); with one, every probed
# launch of the bucket (36: D 8-64, split 40, masks, tf32x3 and tf32) compiles without stack at 113-254
# registers, loops 256-279 instructions where two stages took 272-301 (2026-12-02).

#: dK/dV configs of a split head dim (``_SPLIT_BUCKETS``) that differ from its bucket's padded config, by
#: (precision class, arch) and bucket. The half dK/dV 128+32 split (SD 1.5's D 160) on sm_90
#: takes 64 keys on 4 warps: its dots have 64 rows per warpgroup and lower to wgmma (HGMMA, with
#: cp.async loads), 241-249 registers, no stack in any probed launch (fp16/bf16, masked or not), 280-445
#: SASS instructions per 16x64 iteration, 1.1-1.7 warp-instructions per query-key pair against 4.8-5.9
#: for the padded 16x32 tile on 8 warps (mma.sync). The padded 256 columns spilled 32-1552 B on every
#: 64-key tile tried (4 or 8 warps, 16-64 queries, 1-3 stages), so D 200/256 keep the 16x32 mma.sync
#: tile (2026-12-02).
_SPLIT_CONFIGS = {("half", 90): {256: (16, 64, 4, 2)}}
#: Forward configs of masked launches (``HAS_MASK``: the bias tile adds live registers) that differ from
#: the bucket's, by (precision class, arch) and bucket. On sm_80 the half 128 bucket's 128x64 tile sits at
#: 255 registers when masked, and a bias-masked D 128 launch of 4,097 queries and 333 keys spilled 8 B
#: there (the whole static set; the CI subset does not reach it). 128 queries x 32 keys keeps the K/V
#: re-reads: every masked launch of the bucket (D 80-128, key and full biases, fp16/bf16) compiles at
#: 179-188 registers without stack, 1.02-1.21 warp-instructions per query-key pair against 0.96-1.10
#: (2026-12-03). Unmasked launches keep 128x64 (0.42-0.68 against 0.51-0.76 for 128x32). Also tried,
#: on the bucket: 64x64 on 4 warps, 2 stages (16-24 B), 128x64 on 2 or 4 stages (8 B); 64x64 on 8 warps,
#: 3 stages compiled clean at 1.41-1.44.
_MASKED_FWD_CONFIGS = {("half", 80): {128: (128, 32, 8, 3)}}
_DQ_CONFIGS = {
    ("half", 80): {64: (128, 32, 8, 2), 128: (64, 32, 8, 2), 256: (32, 32, 8, 1)},
    ("half", 90): {64: (128, 32, 8, 2), 128: (128, 32, 8, 2), 256: (64, 32, 8, 2)},
    ("fp32", 80): {64: (32, 32, 8, 2), 128: (16, 16, 4, 2), 256: (16, 16, 8, 1, True)},
    ("fp32", 90): {64: (64, 32, 4, 2), 128: (16, 16, 8, 2), 256: (16, 16, 8, 1, True)},
}
# fp32 dQ at 128 runs two stages on both archs: with one, a bias-masked tf32x3 launch of 32 queries and
# keys at D 128 spilled 24 B (sm_80, 4 warps) and 16 B (sm_90, 8 warps) at 255 registers; with two, all
# 16 probed launches of the bucket compile without stack at 120-255 registers, each loop within 10% of
# its one-stage length (tf32x3 823-875 on sm_80, 742-752 on sm_90). Other tiles tried spilled: 16x16 on 8
# warps one stage on sm_80 (8 B), 32x16 (16-120 B), 4 warps on sm_90 (8 B) (2026-12-02, full static set).


def _arch(cc: int) -> int:
    """The ``_ARCHS`` entry whose table serves compute capability ``cc``."""
    return max([a for a in _ARCHS if a <= cc] or [_ARCHS[0]])


def _precision_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def _lookup(table, block_d: int, dtype: torch.dtype, cc: int, overrides=None) -> _AttentionConfig:
    """``table``'s config for (precision class, arch) and bucket ``block_d``, unless ``overrides`` (a
    table of the same keys that lists only some entries) has one."""
    key = (_precision_class(dtype), _arch(cc))
    return _AttentionConfig(*((overrides or {}).get(key, {}).get(block_d) or table[key][block_d]))


@functools.lru_cache(maxsize=None)
def _attention_fwd_config(block_d: int, dtype: torch.dtype, cc: int = 80, masked: bool = False) -> _AttentionConfig:
    """Config of ``_attention_fwd_kernel`` on arch ``cc``; ``block_d`` is the padded max(D, Dv);
    ``masked``: the launch has a mask, which ``_MASKED_FWD_CONFIGS`` may tile differently."""
    return _lookup(_FWD_CONFIGS, block_d, dtype, cc, _MASKED_FWD_CONFIGS if masked else None)


@functools.lru_cache(maxsize=None)
def _attention_bwd_dkdv_config(block_d: int, dtype: torch.dtype, cc: int = 80,
                               split: bool = False) -> _AttentionConfig:
    """Config of ``_attention_bwd_dkdv_kernel`` (block_n keys per program, block_m queries per step);
    ``split``: the head dim runs in two pieces (``_block_dims``), which ``_SPLIT_CONFIGS`` may tile
    differently."""
    return _lookup(_DKDV_CONFIGS, block_d, dtype, cc, _SPLIT_CONFIGS if split else None)


@functools.lru_cache(maxsize=None)
def _attention_bwd_dq_config(block_d: int, dtype: torch.dtype, cc: int = 80) -> _AttentionConfig:
    """Config of ``_attention_bwd_dq_kernel`` (block_m queries per program, block_n keys per step)."""
    return _lookup(_DQ_CONFIGS, block_d, dtype, cc)


@functools.lru_cache(maxsize=None)
def _attention_bwd_preprocess_config(block_d: int) -> _AttentionConfig:
    """Config of ``_attention_bwd_preprocess_kernel`` (block_n unused); the same on every arch."""
    return _AttentionConfig(block_m=64 if block_d <= 128 else 32, block_n=16, num_warps=4 if block_d <= 128 else 8,
                            num_stages=1)


@functools.lru_cache(maxsize=None)
def _attention_short_config(block_d: int, seqlen_q: int, seqlen_k: int, dtype: torch.dtype,
                            backward: bool = False, cc: int = 80) -> Optional[_AttentionConfig]:
    """Config of the short-sequence kernels, whose square 16 or 32 tile covers a whole sequence; None
    where they do not apply: sequences longer than ``_SHORT_SEQ_MAX``, and fp32 tiles too large for
    one program (there the main kernels run). fp32 keeps the FMA dots these tiles were sized and
    compile-checked for (3xTF32 splits every operand in two, doubling their registers). The same on every arch (``cc`` is taken for a uniform
    interface: one tile per sequence leaves nothing to tune per arch)."""
    if seqlen_q > _SHORT_SEQ_MAX or seqlen_k > _SHORT_SEQ_MAX:
        return None
    block = _pad16(max(seqlen_q, seqlen_k))
    tile = block_d * block
    if dtype == torch.float32:
        if tile > (2048 if backward else 4096):
            return None
        warps = 8 if (backward and block == 32) or (not backward and tile > 2048 and block == 32) else 4
        return _AttentionConfig(block, block, warps, 1, fma=True)
    warps = 4 if tile < (2048 if backward else 4096) else 8
    return _AttentionConfig(block, block, warps, 1)


def _attention_configs():
    """Every (kernel name, dtype, BLOCK_D, arch, config) a launcher can select, one dtype per
    precision class (fp16 stands for bf16 too, which takes the same tables). The compile test
    compiles each on its arch."""
    entries = set()
    for dtype in (torch.float16, torch.float32):
        for block_d in (64, 128, 256):
            for cc in _ARCHS:
                for masked in (False, True):
                    entries.add(("_attention_fwd_kernel", dtype, block_d, cc,
                                 _attention_fwd_config(block_d, dtype, cc, masked)))
                for split in (False, True):
                    entries.add(("_attention_bwd_dkdv_kernel", dtype, block_d, cc,
                                 _attention_bwd_dkdv_config(block_d, dtype, cc, split)))
                entries.add(("_attention_bwd_dq_kernel", dtype, block_d, cc,
                             _attention_bwd_dq_config(block_d, dtype, cc)))
                entries.add(("_attention_bwd_preprocess_kernel", dtype, block_d, cc,
                             _attention_bwd_preprocess_config(block_d)))
                for seqlen in (16, 32):  # the two short tiles
                    for name, backward in (("_attention_short_fwd_kernel", False),
                                           ("_attention_short_bwd_kernel", True)):
                        cfg = _attention_short_config(block_d, seqlen, seqlen, dtype, backward, cc)
                        if cfg is not None:
                            entries.add((name, dtype, block_d, cc, cfg))
    return sorted(entries, key=lambda e: (e[0], str(e[1]), e[2], e[3], e[4]))


def _short_seqs_per_program(batch_heads: int) -> int:
    """(batch, head) sequences per program of the short kernels: enough programs to fill a GPU
    several times over, and no more, so each program amortises its set-up over many sequences."""
    return max(1, min(32, triton.next_power_of_2(batch_heads) // 2048))


def _kernel_precision(precision: str, cfg: _AttentionConfig) -> str:
    """``DOT_PRECISION`` of one launch: the call's ``_dot_precision``, or "ieee" where the config
    asks for FMA dots (fp32 tables only)."""
    return "ieee" if cfg.fma else precision


def _dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of every ``tl.dot``, chosen per call by the launchers.

    fp32 runs on the tensor cores as three TF32 products ("tf32x3": the operands split into a TF32
    high part and a TF32 remainder, ``hi*hi + hi*lo + lo*hi``, about fp32 accuracy) under
    ``torch.get_float32_matmul_precision() == "highest"`` (PyTorch's default), and as one plain TF32
    product ("tf32", ~1e-3 relative error, as torch's own matmuls then give) under "high" or
    "medium". fp16/bf16 ignore it (the value passed is "tf32"), except the interpreter's bf16
    workaround described in ``_attention_dot``. Triton's interpreter multiplies fp32 operands in
    fp32 whatever the precision asks, so the CPU tests see exact fp32 dots."""
    if dtype == torch.float32:
        return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    if dtype == torch.bfloat16 and interpreter_enabled():
        return "ieee-upcast"
    return "tf32"


def _alloc_like(t: torch.Tensor, shape, dtype=None, device=None) -> torch.Tensor:
    """Uninitialised 4-D tensor of ``shape`` whose first three dims lie in memory in the order of
    ``t``'s (so a ``(B, N, H, D)`` layout seen as ``(B, H, N, D)`` round-trips), the last dim
    innermost and padded to 16 bytes (a view of the first ``shape[3]`` columns is returned), so that
    every stride is 16-byte aligned."""
    order, width, _ = _like_layout(t, shape, dtype or t.dtype)
    buf = torch.empty([shape[i] for i in order] + [width], dtype=dtype or t.dtype, device=device or t.device)
    return buf.permute([order.index(i) for i in range(3)] + [3])[..., : shape[3]]


def _like_layout(t: torch.Tensor, shape, dtype: torch.dtype) -> tuple[list[int], int, tuple[int, ...]]:
    """The layout of ``_alloc_like(t, shape, dtype)`` without allocating: the first three dims in
    memory order (outermost first), the padded width of the last, and the view's strides."""
    order = sorted(range(3), key=lambda i: -t.stride(i))
    vec = max(1, 16 // dtype.itemsize)
    width = -(-shape[3] // vec) * vec
    return order, width, dense_strides((*shape[:3], width), [*order, 3])


def _alloc_stats(q: torch.Tensor, shape) -> torch.Tensor:
    """Uninitialised fp32 row statistics (lse, delta) ``(B, H, N)``, contiguous."""
    return torch.empty(shape, dtype=torch.float32, device=q.device)


def _is_aligned(t: torch.Tensor) -> bool:
    """Unit innermost stride, and the data pointer and every other stride (of dims longer than 1)
    16-byte aligned: what ``_attention_tile_ptrs`` promises the compiler."""
    size = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(st * size % 16 == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1))


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when aligned (the usual case: head dims that are multiples of 8, in any layout,
    including slices of a fused qkv projection), else an aligned copy: odd head dims, a stride-0
    gradient, or a view at an odd offset."""
    if _is_aligned(t):
        return t
    return _alloc_like(t, t.shape).copy_(t)


#: Converted masks (bool -> additive bias, other float dtypes -> fp32, unaligned rows -> an aligned
#: copy) by ``id`` of the caller's mask tensor: ``(weakref to the mask, its version counter, q's
#: dtype, key length, the bias)``. The forward converts a mask once and its backward, and every other
#: attention call on the same unchanged mask (a UNet passes one mask to all its layers), reuse it.
#: An entry lives as long as its mask does (a finaliser removes it); an in-place change of the mask
#: bumps its version and forces a new conversion.
_MASK_BIASES: dict = {}


def _convert_mask(mask: torch.Tensor, dtype: torch.dtype, seqlen_k: int) -> torch.Tensor:
    """``mask`` (4-D) as an additive bias the kernels take, at the mask's own size; see ``_mask_args``."""
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    elif mask.dtype not in (dtype, torch.float32):
        mask = mask.float()
    return _aligned(mask.expand(*mask.shape[:3], seqlen_k))


def _mask_bias(attn_mask: torch.Tensor, dtype: torch.dtype, seqlen_k: int) -> torch.Tensor:
    """``_convert_mask`` of ``attn_mask``, from ``_MASK_BIASES`` when this mask was converted before
    and has not changed since. Inference tensors have no version counter and are converted each
    time (no backward follows them)."""
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if attn_mask.is_inference():
        return _convert_mask(mask, dtype, seqlen_k)
    key = id(attn_mask)
    entry = _MASK_BIASES.get(key)
    if entry is not None and entry[0]() is attn_mask and entry[1:4] == (attn_mask._version, dtype, seqlen_k):
        return entry[4]
    bias = _convert_mask(mask, dtype, seqlen_k)
    if bias.untyped_storage().data_ptr() != attn_mask.untyped_storage().data_ptr():  # converted or copied
        if entry is None or entry[0]() is not attn_mask:
            weakref.finalize(attn_mask, _MASK_BIASES.pop, key, None)
        _MASK_BIASES[key] = (weakref.ref(attn_mask), attn_mask._version, dtype, seqlen_k, bias)
    return bias


def _mask_args(attn_mask: Optional[torch.Tensor], q: torch.Tensor, shape):
    """(additive bias tensor, its four strides, HAS_MASK) for a mask broadcast to ``shape``.

    The kernels take one kind of mask, an additive bias in q's dtype or fp32 (which dominates the
    compile-time resource checks): a bool mask becomes ``0 / -inf`` in q's dtype (exact), a float
    mask of another dtype becomes fp32. The bias keeps the mask's own size, broadcast dims get
    stride 0; it is copied (at its own size) only when converted or when its rows are not 16-byte
    aligned (e.g. 77 keys), once per mask (``_MASK_BIASES``). A mask broadcast along the keys is
    materialised along them (a mask constant over the keys is a no-op or a fully masked row, so this
    is rare)."""
    if attn_mask is None:
        return q, (0, 0, 0, 0), False
    view = _mask_bias(attn_mask, q.dtype, shape[3]).expand(shape)  # stride 0 on broadcast dims, no copy
    return view, view.stride(), True


#: CUDA's cap on the second grid dim, which carries the (batch, head) sequences of the main kernels.
_MAX_GRID_Y = 65535


def _batch_chunks(batch: int, heads: int) -> list[slice]:
    """Batch slices of at most ``_MAX_GRID_Y`` sequences each, one launch per slice: past 65535
    sequences (4096 images of 16 heads) a single grid ``(blocks, B * H)`` would fail to launch."""
    if heads > _MAX_GRID_Y:
        raise ValueError(f"the Triton attention kernels take up to {_MAX_GRID_Y} heads for sequences longer than "
                         f"{_SHORT_SEQ_MAX}; got H={heads}")
    step = _MAX_GRID_Y // heads
    return [slice(b0, min(b0 + step, batch)) for b0 in range(0, batch, step)]


def _batch_slices(tensors, batch: int, heads: int):
    """Per launch: ``(the tensors sliced to its batch chunk, its number of sequences)``. One chunk
    (any batch below 65535 sequences) passes the tensors themselves, without slicing."""
    chunks = _batch_chunks(batch, heads)
    if len(chunks) == 1:
        return [(tensors, batch * heads)]
    return [([t[bs] for t in tensors], (bs.stop - bs.start) * heads) for bs in chunks]  # strides kept


def _check_head_dims(d: int, dv: int) -> None:
    if d > _MAX_HEAD_DIM or dv > _MAX_HEAD_DIM:
        raise ValueError(f"the Triton attention kernels take head dims up to {_MAX_HEAD_DIM}; got D={d}, Dv={dv} "
                         "(use the 'torch' backend for larger heads)")


def _nonnegative_scale(k: torch.Tensor, scale: float):
    """``(k, scale)`` with ``scale >= 0``, which the kernels' fused softmax needs (it scales the row
    max, not every score): a negative scale becomes ``|scale|`` on ``-k`` (a copy; the scores are the
    same, and dK of ``-k`` is minus dK). Returns ``(k, scale, negated)``."""
    if scale < 0:
        return _aligned(-k), -scale, True
    return k, scale, False


def _attention_fwd(q, k, v, attn_mask, scale):
    """Triton forward; returns ``(out, lse)``."""
    batch, heads, seqlen_q, d = q.shape
    seqlen_k, dv = k.shape[2], v.shape[3]
    _check_head_dims(d, dv)
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    k, scale, _ = _nonnegative_scale(k, scale)
    out = _alloc_like(q, (batch, heads, seqlen_q, dv))
    lse = _alloc_stats(q, (batch, heads, seqlen_q))
    if out.numel() == 0:
        return out, lse
    mask, mask_strides, has_mask = _mask_args(attn_mask, q, (batch, heads, seqlen_q, seqlen_k))
    block_d = _block_d(max(d, dv))  # one padded width for q/k and v keeps the compiled variants few
    cc = _backend.compute_capability(q.device)
    common = dict(HEAD_DIM=d, HEAD_DIM_V=dv, HAS_MASK=has_mask)
    pieces = _block_dims(max(d, dv), "fwd", q.dtype, cc, has_mask)
    precision = _dot_precision(q.dtype)
    strides = (*q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride())
    qk_scale = scale * math.log2(math.e)
    cfg = _attention_short_config(block_d, seqlen_q, seqlen_k, q.dtype, False, cc)
    if cfg is not None:
        per_program = _short_seqs_per_program(batch * heads)
        grid = (triton.cdiv(batch * heads, per_program),)
        _attention_short_fwd_kernel[grid](
            q, k, v, mask, out, lse, *strides, heads, batch * heads, seqlen_q, seqlen_k, qk_scale,
            per_program, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            DOT_PRECISION=_kernel_precision(precision, cfg), **common)
        record_launch("_attention_short_fwd_kernel")
        return out, lse
    cfg = _attention_fwd_config(block_d, q.dtype, cc, masked=has_mask)
    for (q_, k_, v_, mask_, out_, lse_), seqs in _batch_slices((q, k, v, mask, out, lse), batch, heads):
        _attention_fwd_kernel[(triton.cdiv(seqlen_q, cfg.block_m), seqs)](
            q_, k_, v_, mask_, out_, lse_, *strides, heads, seqlen_q, seqlen_k, qk_scale,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            DOT_PRECISION=_kernel_precision(precision, cfg), **common, **pieces)
        record_launch("_attention_fwd_kernel")
    return out, lse


def _attention_bwd(do, q, k, v, out, lse, attn_mask, scale):
    """Triton backward; returns ``(dq, dk, dv)``."""
    batch, heads, seqlen_q, d = q.shape
    seqlen_k, dv_dim = k.shape[2], v.shape[3]
    _check_head_dims(d, dv_dim)
    q, k, v, out, do = _aligned(q), _aligned(k), _aligned(v), _aligned(out), _aligned(do)
    dq, dk, dv = _alloc_like(q, q.shape), _alloc_like(k, k.shape), _alloc_like(v, v.shape)
    if batch * heads == 0:
        return dq, dk, dv
    if seqlen_q == 0 or seqlen_k == 0:  # no scores: every gradient is zero
        return dq.zero_(), dk.zero_(), dv.zero_()
    k, scale, negated = _nonnegative_scale(k, scale)
    mask, mask_strides, has_mask = _mask_args(attn_mask, q, (batch, heads, seqlen_q, seqlen_k))
    block_d = _block_d(max(d, dv_dim))
    cc = _backend.compute_capability(q.device)
    common = dict(HEAD_DIM=d, HEAD_DIM_V=dv_dim, HAS_MASK=has_mask)
    dkdv_pieces, dq_pieces = (_block_dims(max(d, dv_dim), kernel, q.dtype, cc, has_mask)
                              for kernel in ("dkdv", "dq"))
    precision = _dot_precision(q.dtype)
    qk_scale = scale * math.log2(math.e)
    cfg = _attention_short_config(block_d, seqlen_q, seqlen_k, q.dtype, True, cc)
    if cfg is not None:
        per_program = _short_seqs_per_program(batch * heads)
        grid = (triton.cdiv(batch * heads, per_program),)
        _attention_short_bwd_kernel[grid](
            q, k, v, mask, out, do, lse, dq, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(), *do.stride(),
            *dq.stride(), *dk.stride(), *dv.stride(),
            heads, batch * heads, seqlen_q, seqlen_k, scale, qk_scale, per_program,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, DOT_PRECISION=_kernel_precision(precision, cfg), **common)
        record_launch("_attention_short_bwd_kernel")
        return dq, (dk.neg_() if negated else dk), dv

    delta = _alloc_stats(q, (batch, heads, seqlen_q))
    pre = _attention_bwd_preprocess_config(block_d)
    inputs = (*q.stride(), *k.stride(), *v.stride(), *mask_strides, *do.stride())
    dkdv_cfg = _attention_bwd_dkdv_config(block_d, q.dtype, cc, dkdv_pieces["BLOCK_D2"] > 0)
    dq_cfg = _attention_bwd_dq_config(block_d, q.dtype, cc)
    for (q_, k_, v_, mask_, out_, do_, lse_, delta_, dq_, dk_, dv_), seqs in _batch_slices(
            (q, k, v, mask, out, do, lse, delta, dq, dk, dv), batch, heads):
        _attention_bwd_preprocess_kernel[(triton.cdiv(seqlen_q, pre.block_m), seqs)](
            out_, do_, delta_, *out.stride(), *do.stride(), heads, seqlen_q,
            HEAD_DIM_V=dv_dim, BLOCK_M=pre.block_m, BLOCK_D=block_d, num_warps=pre.num_warps,
            num_stages=pre.num_stages)
        record_launch("_attention_bwd_preprocess_kernel")

        cfg = dkdv_cfg
        _attention_bwd_dkdv_kernel[(triton.cdiv(seqlen_k, cfg.block_n), seqs)](
            q_, k_, v_, mask_, do_, lse_, delta_, dk_, dv_, *inputs, *dk.stride(), *dv.stride(),
            heads, seqlen_q, seqlen_k, scale, qk_scale,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            DOT_PRECISION=_kernel_precision(precision, cfg), **common, **dkdv_pieces)
        record_launch("_attention_bwd_dkdv_kernel")

        cfg = dq_cfg
        _attention_bwd_dq_kernel[(triton.cdiv(seqlen_q, cfg.block_m), seqs)](
            q_, k_, v_, mask_, do_, lse_, delta_, dq_, *inputs, *dq.stride(),
            heads, seqlen_q, seqlen_k, scale, qk_scale,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            DOT_PRECISION=_kernel_precision(precision, cfg), **common, **dq_pieces)
        record_launch("_attention_bwd_dq_kernel")
    return dq, (dk.neg_() if negated else dk), dv


# --------------------------------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------------------------------


# PyTorch's fused CPU attention (the kernels behind scaled_dot_product_attention on CPU). They are
# private ATen ops, so they are looked up, not assumed: None on a PyTorch without them.
_CPU_FLASH_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _cpu_flash_applies(q, k, v, attn_mask) -> bool:
    """Whether the fused CPU kernels take these inputs: CPU tensors, one head dim for keys and values
    (D == Dv), at least one query, one key and one (batch, head), no ``+inf`` in a float mask and, in
    fp16/bf16, no infinite entry of q or k. In fp16/bf16 those kernels give a row whose max score is
    ``+inf`` an output of zeros (measured on torch 2.13), where SDPA's math path, its fp32 fused kernel
    and the Triton kernels give NaN (``exp(inf - inf)``); the chunked recomputation gives NaN too. The
    check reads q and k once (a min/max reduction each, no full-size temporary unless they hold a
    NaN), against the N * M * D of the op."""
    batch, heads, seqlen_q, d = q.shape
    if not (q.device.type == "cpu" and d == v.shape[-1] and min(batch * heads, seqlen_q, k.shape[2]) > 0):
        return False
    if attn_mask is not None and attn_mask.dtype != torch.bool and _has_inf(attn_mask, positive_only=True):
        return False
    # fp32: the kernel is SDPA's own fp32 CPU kernel, NaN rows for a +inf score included, so an
    # infinite q or k entry needs no test (two reductions and four host syncs a call saved)
    return q.dtype == torch.float32 or not (_has_inf(q) or _has_inf(k))


def _has_inf(t: torch.Tensor, positive_only: bool = False) -> bool:
    """Whether ``t`` holds ``+inf`` (or, unless ``positive_only``, ``-inf``), from its extremes: two
    scalars and no temporary of ``t``'s size, except when a NaN hides them (then an element-wise test)."""
    dense = _in_memory_order(t)
    low, high = torch.aminmax(dense) if dense.is_contiguous() else (t.amin(), t.amax())
    if bool(torch.isfinite(high - low)):  # the common case in one host sync: no inf, no NaN
        return False
    if bool(torch.isnan(high)):
        return bool((t == float("inf")).any()) if positive_only else bool(torch.isinf(t).any())
    return bool(high == float("inf")) or (not positive_only and bool(low == float("-inf")))


def _in_memory_order(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed with its dims in memory order (outermost first, no copy): contiguous exactly when
    ``t`` is dense and non-overlapping, and then an order-free reduction reads it straight. ``aminmax``
    copies a permuted view (the heads of a ``(B, N, H, D)`` projection seen as ``(B, H, N, D)``) in full
    first: 135 us against 17 us for a ``(4, 8, 1024, 4)`` fp32 q on one core."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(order)


def _cpu_flash_operand(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy where its innermost stride is not 1: the fused CPU kernels read each
    row of q, k, v and out as contiguous whatever that stride says (a ``[..., ::2]`` view gives wrong
    numbers, not an error); dO takes the same rule. Other strides, stride 0 included, are honoured."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _cpu_flash_bias(attn_mask: Optional[torch.Tensor], q: torch.Tensor) -> Optional[torch.Tensor]:
    """The mask as the fused CPU kernels take it, at the mask's own size: additive in q's dtype (they
    reject bool masks, so one becomes ``0 / -inf``). Forward and backward build it here, so that both
    see the same rounded bias."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
    return attn_mask.to(q.dtype)


def _in_fake_layout(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x``, or a copy of it in the layout ``_alloc_like(t, x.shape)`` gives, which the fake ops promise
    (the fused CPU kernels return ``(B, N, H, D)`` memory order whatever the input's)."""
    want = _like_layout(t, x.shape, t.dtype)[2]
    # the stride of a size-1 dim places nothing: comparing it would copy an equal layout (one head)
    if all(a == b or n == 1 for a, b, n in zip(x.stride(), want, x.shape)):
        return x
    return _alloc_like(t, x.shape).copy_(x)


def _query_chunk(batch_heads: int, seqlen_k: int) -> int:
    """Queries per chunk so one fp32 score chunk stays near 16 MiB."""
    return max(1, (1 << 22) // max(1, batch_heads * seqlen_k))


def _reference_scores(q, k, mask, scale):
    """Scores ``q @ k^T * scale`` in fp32 (fp64 for fp64 inputs) with the mask applied (``-inf``
    where a bool mask is False)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    if mask is None:
        return s
    if mask.dtype == torch.bool:
        return s.masked_fill(~mask, float("-inf"))
    return s + mask.to(dtype)


def _reference_lse(s):
    """Row log-sum-exp of scores, ``+inf`` for a row with every score ``-inf`` (so ``exp(s - lse)``
    is 0 there rather than NaN)."""
    lse = torch.logsumexp(s, -1)
    return lse.masked_fill(lse == float("-inf"), float("inf"))


def _attention_fwd_reference(q, k, v, attn_mask, scale):
    """Plain-torch forward returning ``(out, lse)`` with the kernels' conventions (lse in fp32,
    ``+inf`` and a zero output row where every key is masked). Uses PyTorch's fused CPU kernel where
    it applies, else chunks over queries in fp32."""
    batch, heads, seqlen_q, _ = q.shape
    seqlen_k = k.shape[2]
    if _CPU_FLASH_FWD is not None and _cpu_flash_applies(q, k, v, attn_mask):
        bias, dead = _cpu_flash_bias(attn_mask, q), None
        if bias is not None:
            dead = (bias == float("-inf")).all(-1)
            bias = bias.expand(batch, heads, seqlen_q, seqlen_k)  # it takes 2-D and 4-D masks only
        out, lse = _CPU_FLASH_FWD(*map(_cpu_flash_operand, (q, k, v)), 0.0, False, attn_mask=bias, scale=scale)
        if dead is not None:  # the kernel stores 0 there
            lse = lse.masked_fill(dead.expand(batch, heads, seqlen_q), float("inf"))
        return _in_fake_layout(q, out), lse.float().contiguous()

    out = _alloc_like(q, (batch, heads, seqlen_q, v.shape[-1]))
    lse = _alloc_stats(q, (batch, heads, seqlen_q))
    mask = None if attn_mask is None else attn_mask.expand(batch, heads, seqlen_q, seqlen_k)
    chunk = _query_chunk(batch * heads, seqlen_k)
    for i in range(0, seqlen_q, chunk):
        rows = slice(i, i + chunk)
        s = _reference_scores(q[:, :, rows], k, None if mask is None else mask[:, :, rows], scale)
        row_lse = _reference_lse(s)
        out[:, :, rows] = torch.matmul(torch.exp(s - row_lse[..., None]), v.float()).to(q.dtype)
        lse[:, :, rows] = row_lse
    return out, lse


def _attention_bwd_reference(do, q, k, v, out, lse, attn_mask, scale):
    """Plain-torch backward ``(dq, dk, dv)`` from ``(q, k, v, out, lse)``: PyTorch's fused CPU backward
    where it applies (``_cpu_flash_applies``, and fp32/fp16/bf16, whose log-sum-exp it reads in fp32),
    else :func:`_attention_bwd_chunked`. The fused kernel recomputes ``exp(s - lse)`` from the saved
    ``lse``, so a fully masked row (scores ``-inf``, lse ``+inf``) gets zero gradients there too."""
    batch, heads, seqlen_q, _ = q.shape
    if _CPU_FLASH_BWD is None or q.dtype not in _DTYPES or not _cpu_flash_applies(q, k, v, attn_mask):
        return _attention_bwd_chunked(do, q, k, v, out, lse, attn_mask, scale)
    bias = _cpu_flash_bias(attn_mask, q)
    if bias is not None:
        bias = bias.expand(batch, heads, seqlen_q, k.shape[2])
    grads = _CPU_FLASH_BWD(*map(_cpu_flash_operand, (do, q, k, v, out)), lse, 0.0, False,
                           attn_mask=bias, scale=scale)
    return tuple(_in_fake_layout(t, g) for t, g in zip((q, k, v), grads))


def _attention_bwd_chunked(do, q, k, v, out, lse, attn_mask, scale):
    """Plain-torch backward from ``(q, k, v, out, lse)``, chunked over queries, fp32 throughout."""
    batch, heads, seqlen_q, _ = q.shape
    seqlen_k = k.shape[2]
    kf, vf = k.float(), v.float()
    dq = _alloc_like(q, q.shape, torch.float32)
    dk = _alloc_like(k, k.shape, torch.float32).zero_()
    dv = _alloc_like(v, v.shape, torch.float32).zero_()
    mask = None if attn_mask is None else attn_mask.expand(batch, heads, seqlen_q, seqlen_k)
    chunk = _query_chunk(batch * heads, seqlen_k)
    for i in range(0, seqlen_q, chunk):
        rows = slice(i, i + chunk)
        q_c, do_c = q[:, :, rows].float(), do[:, :, rows].float()
        s = _reference_scores(q_c, kf, None if mask is None else mask[:, :, rows], scale)
        p = s.sub_(lse[:, :, rows, None]).exp_()
        delta = (do_c * out[:, :, rows].float()).sum(-1, keepdim=True)
        ds = torch.matmul(do_c, vf.transpose(-1, -2)).sub_(delta).mul_(p).mul_(scale)
        dv += torch.matmul(p.transpose(-1, -2), do_c)
        dk += torch.matmul(ds.transpose(-1, -2), q_c)
        dq[:, :, rows] = torch.matmul(ds, kf)
    return tuple(g if g.dtype == t.dtype else _alloc_like(t, t.shape).copy_(g) for g, t in ((dq, q), (dk, k), (dv, v)))


def attention_reference(q, k, v, attn_mask=None, scale=None):
    """Attention in plain torch, differentiable by autograd: q ``(B, H, N, D)``, k ``(B, H, M, D)``,
    v ``(B, H, M, Dv)`` -> ``(B, H, N, Dv)``, computed in fp32 (fp64 for fp64 inputs) and materialising
    the ``N x M`` scores; same mask and fully-masked-row rules as :func:`attention`."""
    _check_inputs(q, k, v, attn_mask, scale, dtypes=_DTYPES + (torch.float64,))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    s = _reference_scores(q, k, attn_mask, scale)
    p = torch.exp(s - _reference_lse(s)[..., None])
    return torch.matmul(p, v.to(p.dtype)).to(q.dtype)


# --------------------------------------------------------------------------------------------------
# Custom ops, autograd and the public function
# --------------------------------------------------------------------------------------------------


def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, H, N, Dv), lse (B, H, N) fp32)``; Triton or torch reference per ``use_triton``."""
    if use_triton(q, k, v, attn_mask):
        return _attention_fwd(q, k, v, attn_mask, scale)
    return _attention_fwd_reference(q, k, v, attn_mask, scale)


def _attention_fwd_fake(q, k, v, attn_mask, scale):
    batch, heads, seqlen_q, _ = q.shape
    out = _alloc_like(q, (batch, heads, seqlen_q, v.shape[-1]))
    return out, q.new_empty((batch, heads, seqlen_q), dtype=torch.float32)


def _attention_bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      out: torch.Tensor, lse: torch.Tensor, attn_mask: Optional[torch.Tensor],
                      scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` from the saved ``(q, k, v, out, lse)``."""
    if use_triton(q, k, v, attn_mask):
        return _attention_bwd(grad_out, q, k, v, out, lse, attn_mask, scale)
    return _attention_bwd_reference(grad_out, q, k, v, out, lse, attn_mask, scale)


def _attention_bwd_fake(grad_out, q, k, v, out, lse, attn_mask, scale):
    return _alloc_like(q, q.shape), _alloc_like(k, k.shape), _alloc_like(v, v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, attn_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, attn_mask = ctx.saved_tensors
    dq, dk, dv = attention_bwd_call(grad_out, q, k, v, out, lse, attn_mask, ctx.scale)
    return dq, dk, dv, None, None


def _register_ops() -> None:
    fwd = torch.library.custom_op("fastunet::attention_fwd", _attention_fwd_op, mutates_args=())
    fwd.register_fake(_attention_fwd_fake)
    bwd = torch.library.custom_op("fastunet::attention_bwd", _attention_bwd_op, mutates_args=())
    bwd.register_fake(_attention_bwd_fake)
    fwd.register_autograd(_attention_backward, setup_context=_attention_setup_context)


register_once(__name__, "fastunet::attention_fwd", _register_ops)


class _AttentionEager(torch.autograd.Function):
    """``fastunet::attention_fwd`` with its registered autograd, minus the dispatcher: what an eager call
    runs (``direct_call``), with the same outputs, saved tensors and backward. Through the op, a CPU
    call paid ~0.9 ms of dispatch per forward+backward (SD-tiny's 32 attention calls: 29 ms a step)."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, scale):
        output = _attention_fwd_op(q, k, v, attn_mask, scale)
        _attention_setup_context(ctx, (q, k, v, attn_mask, scale), output)
        return output

    backward = staticmethod(_attention_backward)


# the package's module only: a stray top-level ``kernels`` import (see register_once) goes through the ops
_DIRECT = __name__.startswith("fastunet.kernels.")


def attention_fwd_call(q, k, v, attn_mask, scale):
    """``torch.ops.fastunet.attention_fwd(...)``, differentiable, with the dispatcher skipped where
    ``direct_call`` allows."""
    return forward_call(_DIRECT, "attention_fwd", _AttentionEager, _attention_fwd_op, (q, k, v, attn_mask, scale), 3)


def attention_bwd_call(grad_out, q, k, v, out, lse, attn_mask, scale):
    """``torch.ops.fastunet.attention_bwd(...)``, with the dispatcher skipped where ``direct_call`` allows."""
    return backward_call(_DIRECT, "attention_bwd", _attention_bwd_op,
                         (grad_out, q, k, v, out, lse, attn_mask, scale), (q, grad_out))


def _check_inputs(q, k, v, attn_mask, scale, dtypes=_DTYPES) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, seq, head_dim); got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if q.dtype not in dtypes:
        raise TypeError(f"attention takes dtypes {dtypes}; got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or q.shape[:2] != v.shape[:2]:
        raise ValueError("q, k and v must share (B, H); got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must share the head dim D; got q {q.shape[3]} (shape {tuple(q.shape)}) "
                         f"and k {k.shape[3]} (shape {tuple(k.shape)})")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must share the key length M; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None; got {type(scale).__name__}")
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None; got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise TypeError(f"attn_mask must be bool or floating point; got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask must be on the device of q ({q.device}); got {attn_mask.device}")
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    shape = tuple(attn_mask.shape)
    if len(shape) > 4 or any(s not in (1, t) for s, t in zip(shape[::-1], target[::-1])):
        raise ValueError(f"attn_mask of shape {shape} does not broadcast to (B, H, N, M) = {target}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
              scale: Optional[float] = None) -> torch.Tensor:
    """``softmax(q @ k^T * scale + mask) @ v`` with ``scaled_dot_product_attention`` semantics
    (no dropout, no causal mask).

    q ``(B, H, N, D)``, k ``(B, H, M, D)``, v ``(B, H, M, Dv)``, all fp32/fp16/bf16 of one dtype and
    any strides; ``attn_mask`` bool (True keeps) or additive float, broadcastable to ``(B, H, N, M)``
    and never differentiated; ``scale`` defaults to ``1/sqrt(D)``. Returns ``(B, H, N, Dv)``.
    Rows whose keys are all masked (a bool mask all False, or an additive mask all ``-inf``, along
    the keys) come out as zeros with zero gradients, as ``scaled_dot_product_attention`` gives on
    CPU in torch 2.13 (measured, default and math backends). NaN and Inf propagate as in SDPA (see
    the module docstring). Differentiable in q, k, v; deterministic (no atomics).
    """
    _check_inputs(q, k, v, attn_mask, scale)
    if attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
        raise ValueError("attention does not differentiate attn_mask; pass attn_mask.detach()")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return attention_fwd_call(q, k, v, attn_mask, scale)[0]
