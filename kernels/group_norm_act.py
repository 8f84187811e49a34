"""Fused GroupNorm + modulation + activation: ``y = act(GroupNorm(x + add) * (1 + scale) + shift)``.

Math, per sample ``b`` and group ``g`` of ``Cg = C / G`` channels, ``N = Cg * L`` elements
(``L`` is the product of the spatial dims)::

    h     = x + add[b, c]                          (add: time-embedding projection, optional)
    mean  = sum(h) / N,   var = sum((h - mean)^2) / N,   rstd = 1 / sqrt(var + eps)
    u     = (h - mean) * rstd * gain[b, c] + offset[b, c]
    gain  = weight[c] * (1 + scale[b, c]),   offset = bias[c] * (1 + scale[b, c]) + shift[b, c]
    y     = act(u),   act in {silu, gelu (exact, erf), mish, identity}

Layouts and dtypes: ``x`` is ``(B, C, *spatial)`` with 1 to 3 spatial dims, fp32/fp16/bf16, in any
strides. ``out_layout`` (a permutation of x's dims, outermost first) chooses the memory order of
``y``; by default ``y`` is contiguous. The video UNets pass ``x = h.view(B, F, C, H, W).permute(0, 2,
1, 3, 4)`` (the memory of the 2-D layers' ``(B*F, C, H, W)`` tensor) with ``out_layout=(0, 3, 4, 2,
1)``, so that ``y.permute(0, 3, 4, 2, 1).reshape(B*H*W, F, C)`` is a free view for the temporal
transformer's ``proj_in``. ``weight``/``bias`` are ``(C,)``; ``add``/``scale``/``shift`` are ``(B,
C)``; strided views of them (``emb.chunk(2, dim=1)``) are copied, being small, since strided loads
cost the kernels many registers. Each optional tensor is in ``x``'s dtype or fp32. Statistics and all
arithmetic are fp32; ``y`` is in ``x``'s dtype. The gradient of ``x`` is laid out as
``torch.empty_like(x)`` (x's own strides when x is dense), the incoming gradient may have any strides.

Strides. The Triton kernels address every big tensor (x, y, dy, dx) through its own
``(stride_b, stride_c, stride_s0, stride_s1)``: the launcher merges spatial dims that are mergeable in
all the tensors of a launch (H, W of a dense plane, say) into at most two, ``(S0, S1)``; x5 above
becomes ``(F, H*W)``. Only where three non-mergeable spatial dims remain (a layout that permutes the
spatial dims among themselves) does it copy, to contiguous buffers. The torch path copies a strided
``x`` into a contiguous fp32 buffer (aten's GroupNorm needs one) and writes the result into the
requested layout, one copy more than the kernels.

Kernels. A group is the ``(Cg, S0, S1)`` block of sample ``b``. Where it fits one program's
registers (a ``(next_pow2(Cg), next_pow2(S0 * S1))`` tile of at most 8192 lanes forward, 4096
backward, 16 warps at the most), one program per group does each pass alone (``ONE_PASS``, in the
``_fwd`` and ``_bwd_dx`` kernels): the forward loads x once, takes the moments of ``h - pivot`` about
their own mean from the registers, and stores y (2 passes over memory); the backward loads x and dy
once, holds ``x - mean`` and ``du`` through its reductions, and stores dx (3 passes). Larger groups
take two kernels each way; their programs walk a group in ``(BLOCK_C, BLOCK_L)`` tiles over
``(channels, S1)``, one row ``s0`` at a time: a spatial tile index ``t`` runs over ``S0 * cdiv(S1,
BLOCK_L)`` tiles. To fill a GPU when ``B * G`` is small, a group is split over up to ``_MAX_SPLIT``
programs (a grid of channel-block ranges times spatial-tile ranges):

* forward: ``_stats`` writes each program's (count, mean, M2) of ``h - pivot``, the pivot being the
  group's first element (shifted data: the mean of a near-constant group keeps full precision),
  from per-lane sums of ``h - pivot`` and its square and a count in scalar arithmetic; ``_fwd``
  merges a group's partials (Chan's parallel formula, one vector reduction), then normalises,
  modulates, activates and stores ``y``; its first program stores ``mean``/``rstd``. 3 passes.
* backward: ``_bwd_reduce`` recomputes ``u`` from ``x`` and writes per-(b, c, spatial range) sums of
  ``du``, ``du * xhat`` and ``xhat``, plus per-program group sums of ``gain * du`` and
  ``gain * du * xhat``; ``_bwd_dx`` merges them, writes ``dx`` and, from one program per channel, the
  per-(b, c) gradients of add/scale/shift and per-sample rows of dweight/dbias, which torch sums
  over the batch. 5 passes (x and dy read twice).

The second kernel of each pair numbers its programs from the end of the grid, so that on a GPU it
starts on the groups the first kernel read last, still in L2.

Every reduction is in a fixed order: no atomics, bitwise reproducible runs. Autograd saves ``x``,
``add``, ``mean``/``rstd`` ((B, G) fp32) and the small vectors only, on every backend; backward
recomputes ``x + add`` and everything after it. Without Triton (CPU tensors outside the interpreter)
the same forward and backward run in torch, not autograd through ``F.group_norm``: aten's fused
GroupNorm and activation(-gradient) kernels; the backward on aten's GroupNorm backward (fed the
centred input) where there is no scale/shift, else on the backward algebra of the kernels.

Both passes are ``torch.library`` custom ops (``fastunet::group_norm_act_fwd``/``_bwd``) with fake
implementations (giving the same output strides) and ``register_autograd`` (in place of a
``torch.autograd.Function``), so ``torch.compile(fullgraph=True)`` traces them without a graph break.
Not supported: double backward, and autocast (inputs are taken in the dtypes they come in).
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from ._backend import backward_call, dense_strides, forward_call, record_launch, register_once, tl, triton, use_triton

_ACTIVATION_NAMES = ("silu", "gelu", "mish", None)
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Elements per tile, the tile widths along S1 a config may use, and the split limits. The partial
# buffers of one group are merged with one vector load of _MAX_SPLIT (resp. _MAX_SPLIT_L) lanes.
_TILE = 1024
_BLOCK_L_CHOICES = (64, 256, 1024)
_NUM_WARPS = 4
# Register cap of each kernel's launches (ptx .maxnreg). Without one, ptxas (12.x for sm_80, 13.x for
# sm_90) traded an 8-16 byte spill for a lower register count (72 to 128) in 14 of the 144 compiled
# variants (every config and stride layout, tests/ops/test_group_norm_act_compile.py); under these caps
# none spills. Lower caps spilled (the stats kernel at 96, the backward at 128, on sm_90). A capped
# ptxas uses more of the budget than an uncapped one: 4 programs of 128 threads fit an SM at 128
# registers, 3 at 160.
_MAX_REGISTERS = {"_group_norm_act_stats_kernel": 128, "_group_norm_act_fwd_kernel": 128,
                  "_group_norm_act_bwd_reduce_kernel": 160, "_group_norm_act_bwd_dx_kernel": 160}
_MAX_SPLIT = 64
# ONE_PASS launches: a group is one program's register tile, at most this many elements a thread
# (forward, backward) over at most 16 warps: groups of up to 8192 (forward), 4096 (backward) lanes.
_ONE_PASS_PER_THREAD = (16, 8)
_MAX_SPLIT_L = 16
# A launch aims for this many programs per SM on CUDA, and for _CPU_PROGRAMS under Triton's CPU
# interpreter (which runs programs one after another, each with a large fixed cost).
_PROGRAMS_PER_SM = 8
_CPU_PROGRAMS = 8
# Offsets within a sample (spatial part, and one tile's lanes) are int32 in the kernels.
_MAX_OFFSET = 2**31

# Sizes the kernels take unspecialised (one compiled variant whatever their value). Strides are left to
# Triton's specialisation: a unit stride becomes a constant, the others divisible by 16 are marked so,
# which together let the loads and stores along the unit stride vectorise.
_SIZE_ARGS = ["n_bg", "G", "Cg", "L", "S1", "n_lt1", "n_lt", "cb_per_prog", "lt_per_prog", "split_l", "n_split"]


# ----------------------------------------------------------------------------------------------
# Triton kernels
#
# Addressing: a scalar pointer to the group's current channel block (sample and channels in int64
# scalar arithmetic, safe at any size), moved to each row s0 (+ s0 * stride_s0), plus an int32 offset
# tile per tensor, c * stride_c + l * stride_s1, computed once per program, to which each tile adds
# its position (l0 * stride_s1) before the pointer: int64 induction variables, or adding l0 to the
# pointer, each made ptxas keep a 64-bit address per element live (2.5x the registers). Where a
# tensor's strides are x's (the launcher says so with Y_LIKE_X, DY_LIKE_X, DX_LIKE_X), it shares x's
# offset tile. Tiles are 1024 elements over 4 warps: 16 elements per thread took up to 255 registers
# in the backward. A tile never straddles two rows s0, so no element needs an integer division.
#
# Helpers: Triton's CPU interpreter, which runs these kernels in the tests, re-patches
# triton.language on every @triton.jit helper call (on a GPU they are inlined). Measured on the 2-core
# CPU VM under TRITON_INTERPRET=1: a trivial loop step took 35 us inlined and 190 us through a helper;
# the per-channel coefficient loads 640 us per channel block inlined, 910 us as a helper; the whole
# backward of (2, 320, 16, 16) fp16 with every option took 4.5 s of CPU written out, 5.0 s with the
# coefficient helper and 5.2 s with the tile helper too (forward: no measurable change). So the helpers
# run once per program (its range), per channel block (the coefficients) or per tile (the activation
# gradient), never per element, at about 15% more interpreter time in the backward.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _group_norm_act_group(G, Cg, n_bg=0, REVERSE: tl.constexpr = False):
    """``(pid_bg, b, ch_base)`` in int64 (for offsets): this program's group ``b * G + g`` (grid dim 0),
    its sample and its first channel ``g * Cg``, divided out in int32 (64-bit division is slow).
    ``REVERSE`` numbers the groups from the end of the grid (of ``n_bg``): the second kernel of a pair
    starts where the first ended, on what it left in L2."""
    pid = tl.program_id(0)
    if REVERSE:
        pid = n_bg - 1 - pid
    b = pid // G
    return pid.to(tl.int64), b.to(tl.int64), ((pid - b * G) * Cg).to(tl.int64)


@triton.jit
def _group_norm_act_program_range(pid_s, Cg, n_lt1, n_lt, cb_per_prog, lt_per_prog, split_l, BLOCK_C: tl.constexpr,
                                  BLOCK_L: tl.constexpr):
    """``(c_lo, c_hi, t_hi, s0_lo, s0_hi, l0_lo)``: the channels (within the group) that program
    ``pid_s`` along grid dim 1 covers, and its spatial tiles ``[t_lo, t_hi)`` (channel-block ranges
    times spatial-tile ranges; rows hold ``n_lt1`` tiles) as the rows ``[s0_lo, s0_hi)`` it touches
    and the first position in its first row. The kernels loop over rows, then positions: a tile index
    divided into (row, position) in the loop cost up to 32 registers and spills in the backward."""
    c_lo = (pid_s // split_l) * cb_per_prog * BLOCK_C
    t_lo = (pid_s % split_l) * lt_per_prog
    t_hi = tl.minimum(t_lo + lt_per_prog, n_lt)
    s0_lo = t_lo // n_lt1
    return (c_lo, tl.minimum(c_lo + cb_per_prog * BLOCK_C, Cg), t_hi, s0_lo, (t_hi - 1) // n_lt1 + 1,
            (t_lo - s0_lo * n_lt1) * BLOCK_L)


@triton.jit
def _group_norm_act_channel_coefs(weight_ptr, bias_ptr, scale_ptr, shift_ptr, add_ptr, ch, bc, c_lanes, cmask, mean,
                                  HAS_ADD: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                                  HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, BLOCK_C: tl.constexpr):
    """fp32 per-channel coefficients of channels ``ch + c_lanes`` (``bc + c_lanes`` in the (B, C)
    vectors): ``(gain, offset, centre)`` with ``u = (x - centre) * gain * rstd + offset``,
    ``gain = w (1 + scale)``, ``offset = bias (1 + scale) + shift``, ``centre = mean - add``."""
    w = tl.full([BLOCK_C], 1.0, tl.float32)
    bia = tl.full([BLOCK_C], 0.0, tl.float32)
    s1p = tl.full([BLOCK_C], 1.0, tl.float32)
    centre = tl.full([BLOCK_C], 0.0, tl.float32) + mean
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + ch + c_lanes, mask=cmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bia = tl.load(bias_ptr + ch + c_lanes, mask=cmask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        s1p += tl.load(scale_ptr + bc + c_lanes, mask=cmask, other=0.0).to(tl.float32)
    offset = bia * s1p
    if HAS_SHIFT:
        offset += tl.load(shift_ptr + bc + c_lanes, mask=cmask, other=0.0).to(tl.float32)
    if HAS_ADD:
        centre -= tl.load(add_ptr + bc + c_lanes, mask=cmask, other=0.0).to(tl.float32)
    return w * s1p, offset, centre


@triton.jit
def _group_norm_act_pivot(x_ptr, add_ptr, b, ch_base, pid_bg, Cg, stride_x_b, stride_x_c, HAS_ADD: tl.constexpr):
    """fp32 ``x + add`` at the group's first element: the shift of the statistics. The moments are
    accumulated of ``h - pivot`` (shifted data), so a group whose mean is large against its spread
    (constant + 1e-4 noise, or exactly constant, where rstd = rsqrt(eps) magnifies any error in
    ``x - mean``) keeps its mean to the rounding of one addition: an exactly constant group gets
    ``x - mean = 0`` exactly, as F.group_norm does."""
    pivot = tl.load(x_ptr + (b * stride_x_b + ch_base * stride_x_c)).to(tl.float32)
    if HAS_ADD:
        pivot += tl.load(add_ptr + pid_bg * Cg).to(tl.float32)
    return pivot


@triton.jit
def _group_norm_act_grad_u(x_ptrs, dy_ptrs, mask, centre, gain_r, offset, ACTIVATION: tl.constexpr):
    """One tile of the backward: ``xc = x - centre`` and ``du = dL/du`` from ``dL/dy``, with
    ``u = xc * gain_r + offset`` recomputed. Masked lanes get ``du = 0`` (and an arbitrary ``xc``)."""
    xc = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32) - centre
    du = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = xc * gain_r + offset
    if ACTIVATION == "silu":
        sig = 1.0 / (1.0 + tl.exp(-u))
        du *= sig * (1.0 + u * (1.0 - sig))
    elif ACTIVATION == "gelu":
        du *= 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476)) + u * tl.exp(-0.5 * u * u) * 0.3989422804014327
    elif ACTIVATION == "mish":
        # mish'(u) = t + u sigmoid(u) (1 - t^2), t = n / (n + 2), n = e^u (e^u + 2); with
        # sigmoid(u) = e / (1 + e) and n + 1 = (e + 1)^2 it is (n d + 4 u e (e + 1)) / d^2,
        # d = n + 2. u is clamped at 20 where the second term no longer counts in fp32; the clamp keeps
        # a NaN u NaN (a plain minimum returns 20 for it and would hide it in du and the sums).
        uc = tl.minimum(u, 20.0, propagate_nan=tl.PropagateNan.ALL)
        e = tl.exp(uc)
        n = e * (e + 2.0)
        d = n + 2.0
        du *= (n * d + 4.0 * uc * e * (e + 1.0)) / (d * d)
    return xc, du


@triton.jit
def _group_norm_act_activate(u, ACTIVATION: tl.constexpr):
    """``act(u)`` of one tile, fp32."""
    if ACTIVATION == "silu":
        u = u / (1.0 + tl.exp(-u))
    elif ACTIVATION == "gelu":
        u = 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))
    elif ACTIVATION == "mish":
        # tanh(softplus(u)) = n / (n + 2) with n = e^u (e^u + 2); it is 1 in fp32 beyond u = 20
        e = tl.exp(tl.minimum(u, 20.0))
        n = e * (e + 2.0)
        u = u * (n / (n + 2.0))
    return u


@triton.jit
def _group_norm_act_group_offsets(c_lanes, n_lanes, S1, stride_c, stride_s0, stride_s1, ONE_ROW: tl.constexpr):
    """int32 offsets of a whole group's ``[BLOCK_C, BLOCK_N]`` tile (position ``n = s0 * S1 + s1``)
    within its first channel, for the one-pass kernels; the division by S1 runs once per program."""
    if ONE_ROW:
        pos = n_lanes * stride_s1
    else:
        s0 = n_lanes // S1
        pos = s0 * stride_s0 + (n_lanes - s0 * S1) * stride_s1
    return c_lanes[:, None] * stride_c + pos[None, :]


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _group_norm_act_stats_kernel(
    x_ptr,     # (B, C, S0, S1) input, strides stride_x_*
    add_ptr,   # (B, C) per-channel addend, read when HAS_ADD
    part_ptr,  # (3, B*G, n_split) fp32 out: count, mean, M2 of each program's elements
    stride_x_b, stride_x_c, stride_x_s0, stride_x_s1,
    n_bg, G, Cg, S1, n_lt1, n_lt, cb_per_prog, lt_per_prog, split_l, n_split,
    HAS_ADD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, ONE_ROW: tl.constexpr,
):
    pid_bg, b, ch_base = _group_norm_act_group(G, Cg)
    pid_s = tl.program_id(1)
    c_lo, c_hi, t_hi, s0_lo, s0_hi, l0_lo = _group_norm_act_program_range(pid_s, Cg, n_lt1, n_lt, cb_per_prog,
                                                                          lt_per_prog, split_l, BLOCK_C, BLOCK_L)
    if ONE_ROW:  # S0 == 1 (every 2-D layout): the loop over rows folds away
        s0_lo, s0_hi = 0, 1
    c_lanes = tl.arange(0, BLOCK_C)
    l_lanes = tl.arange(0, BLOCK_L)
    tile_x = c_lanes[:, None] * stride_x_c + l_lanes[None, :] * stride_x_s1
    # Shifted sums per lane of d = h - pivot, and the program's element count in scalar arithmetic.
    # (A per-lane Welford count, count += mask, lived in another layout than the data tile: each
    # 1024-element step converted it through shared memory, 2 STSM + 2 LDS + 2 BAR.SYNC on sm_90.)
    # The shift is an element of the group, so sum(d^2) - sum(d)^2 / n cancels only as far as the
    # group's mean lies from that element in units of its spread: nothing for x = 1000 + noise, and
    # an exactly constant group sums zeros.
    pivot = _group_norm_act_pivot(x_ptr, add_ptr, b, ch_base, pid_bg, Cg, stride_x_b, stride_x_c, HAS_ADD)
    acc_d = tl.full([BLOCK_C, BLOCK_L], 0.0, tl.float32)
    acc_d2 = tl.full([BLOCK_C, BLOCK_L], 0.0, tl.float32)
    count = 0
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cmask = (c_lanes < (c_hi - c0))[:, None]
        if HAS_ADD:
            addv = tl.load(add_ptr + pid_bg * Cg + c0 + c_lanes, mask=c_lanes < (c_hi - c0),
                           other=0.0).to(tl.float32)[:, None]
        x_rows = x_ptr + (b * stride_x_b + (ch_base + c0) * stride_x_c)
        for s0 in range(s0_lo, s0_hi):
            # this row's positions: from l0_lo in the first row, up to the program's last tile in the last
            l_end = tl.minimum(S1, (t_hi - s0 * n_lt1) * BLOCK_L)
            for l0 in range(tl.where(s0 == s0_lo, l0_lo, 0), l_end, BLOCK_L):
                mask = cmask & (l_lanes < (l_end - l0))[None, :]
                h = tl.load(x_rows + s0 * stride_x_s0 + (l0 * stride_x_s1 + tile_x), mask=mask, other=0.0)
                h = h.to(tl.float32)
                if HAS_ADD:
                    h += addv
                d = tl.where(mask, h - pivot, 0.0)
                acc_d += d
                acc_d2 += d * d
                count += tl.minimum(c_hi - c0, BLOCK_C) * tl.minimum(l_end - l0, BLOCK_L)
    total = count.to(tl.float32)
    sum_d = tl.sum(acc_d)
    prog_mean = sum_d / total
    # rounding can leave the difference a hair below 0; the clamp keeps a NaN (inf - inf) NaN
    prog_m2 = tl.maximum(tl.sum(acc_d2) - sum_d * prog_mean, 0.0, propagate_nan=tl.PropagateNan.ALL)
    out = part_ptr + pid_bg * n_split + pid_s
    tl.store(out, total)
    tl.store(out + n_bg * n_split, prog_mean)
    tl.store(out + 2 * n_bg * n_split, prog_m2)


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _group_norm_act_fwd_kernel(
    x_ptr,       # (B, C, S0, S1) input, strides stride_x_*
    add_ptr,     # (B, C) addend, read when HAS_ADD
    weight_ptr,  # (C,) weight, read when HAS_WEIGHT
    bias_ptr,    # (C,) bias, read when HAS_BIAS
    scale_ptr,   # (B, C) scale, read when HAS_SCALE
    shift_ptr,   # (B, C) shift, read when HAS_SHIFT
    y_ptr,       # (B, C, S0, S1) output, x's dtype, strides stride_y_*
    part_ptr,    # (3, B*G, n_split) fp32 partial count/mean/M2 from the stats kernel
    mean_ptr,    # (B*G,) fp32 out: group mean
    rstd_ptr,    # (B*G,) fp32 out: 1 / sqrt(var + eps)
    stride_x_b, stride_x_c, stride_x_s0, stride_x_s1,
    stride_y_b, stride_y_c, stride_y_s0, stride_y_s1,
    n_bg, G, Cg, L, S1, n_lt1, n_lt, cb_per_prog, lt_per_prog, split_l, n_split, eps,
    HAS_ADD: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, ACTIVATION: tl.constexpr, Y_LIKE_X: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, ONE_ROW: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    if ONE_PASS:  # the whole group in one (BLOCK_C, BLOCK_L) tile of this program: see the helper
        _group_norm_act_fwd_one_pass(
            x_ptr, add_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, y_ptr, mean_ptr, rstd_ptr,
            stride_x_b, stride_x_c, stride_x_s0, stride_x_s1, stride_y_b, stride_y_c, stride_y_s0, stride_y_s1,
            G, Cg, L, S1, eps, HAS_ADD, HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, ACTIVATION, Y_LIKE_X,
            BLOCK_C, BLOCK_L, ONE_ROW)
    else:
        pid_bg, b, ch_base = _group_norm_act_group(G, Cg, n_bg, True)
        pid_s = n_split - 1 - tl.program_id(1)
        if Y_LIKE_X:  # y's strides are x's: one offset tile serves both
            stride_y_b, stride_y_c, stride_y_s0, stride_y_s1 = stride_x_b, stride_x_c, stride_x_s0, stride_x_s1

        # merge the group's partial moments of h - pivot (Chan, all at once)
        offs = tl.arange(0, BLOCK_SPLIT)
        smask = offs < n_split
        part = part_ptr + pid_bg * n_split + offs
        p_count = tl.load(part, mask=smask, other=0.0)
        p_mean = tl.load(part + n_bg * n_split, mask=smask, other=0.0)
        p_m2 = tl.load(part + 2 * n_bg * n_split, mask=smask, other=0.0)
        total = tl.sum(p_count)
        mean = tl.sum(p_count * p_mean) / total
        dev = p_mean - mean
        mean += _group_norm_act_pivot(x_ptr, add_ptr, b, ch_base, pid_bg, Cg, stride_x_b, stride_x_c, HAS_ADD)
        # Every term is non-negative, so var needs no clamp at 0; a clamp by tl.maximum would also turn
        # the NaN of a group holding an Inf (inf - inf in the moments) into 0, and x - mean into a finite
        # or infinite result where F.group_norm gives NaN for the whole group.
        var = tl.sum(p_m2 + p_count * dev * dev) / total
        rstd = 1.0 / tl.sqrt(var + eps)
        if pid_s == 0:
            tl.store(mean_ptr + pid_bg, mean)
            tl.store(rstd_ptr + pid_bg, rstd)

        c_lo, c_hi, t_hi, s0_lo, s0_hi, l0_lo = _group_norm_act_program_range(pid_s, Cg, n_lt1, n_lt, cb_per_prog,
                                                                              lt_per_prog, split_l, BLOCK_C, BLOCK_L)
        if ONE_ROW:  # S0 == 1 (every 2-D layout): the loop over rows folds away
            s0_lo, s0_hi = 0, 1
        c_lanes = tl.arange(0, BLOCK_C)
        l_lanes = tl.arange(0, BLOCK_L)
        tile_x = c_lanes[:, None] * stride_x_c + l_lanes[None, :] * stride_x_s1
        tile_y = c_lanes[:, None] * stride_y_c + l_lanes[None, :] * stride_y_s1
        for c0 in range(c_lo, c_hi, BLOCK_C):
            cmask = c_lanes < (c_hi - c0)
            # u = (x - centre) * gain * rstd + offset
            gain, offset, centre = _group_norm_act_channel_coefs(
                weight_ptr, bias_ptr, scale_ptr, shift_ptr, add_ptr, ch_base + c0, pid_bg * Cg + c0, c_lanes, cmask, mean,
                HAS_ADD, HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, BLOCK_C)
            gain = (gain * rstd)[:, None]
            offset = offset[:, None]
            centre = centre[:, None]
            cmask = cmask[:, None]
            x_rows = x_ptr + (b * stride_x_b + (ch_base + c0) * stride_x_c)
            y_rows = y_ptr + (b * stride_y_b + (ch_base + c0) * stride_y_c)
            for s0 in range(s0_lo, s0_hi):
                # this row's positions: from l0_lo in the first row, up to the program's last tile in the last
                l_end = tl.minimum(S1, (t_hi - s0 * n_lt1) * BLOCK_L)
                for l0 in range(tl.where(s0 == s0_lo, l0_lo, 0), l_end, BLOCK_L):
                    mask = cmask & (l_lanes < (l_end - l0))[None, :]
                    x_tile = x_rows + s0 * stride_x_s0 + (l0 * stride_x_s1 + tile_x)
                    u = (tl.load(x_tile, mask=mask, other=0.0).to(tl.float32) - centre) * gain + offset
                    u = _group_norm_act_activate(u, ACTIVATION)
                    tl.store(y_rows + s0 * stride_y_s0 + (l0 * stride_y_s1 + tile_y), u.to(y_ptr.dtype.element_ty),
                             mask=mask)


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _group_norm_act_bwd_reduce_kernel(
    x_ptr,       # (B, C, S0, S1) input, strides stride_x_*
    add_ptr,     # (B, C) addend, read when HAS_ADD
    dy_ptr,      # (B, C, S0, S1) gradient of y, strides stride_dy_*
    weight_ptr,  # (C,) weight, read when HAS_WEIGHT
    bias_ptr,    # (C,) bias, read when HAS_BIAS
    scale_ptr,   # (B, C) scale, read when HAS_SCALE
    shift_ptr,   # (B, C) shift, read when HAS_SHIFT
    mean_ptr,    # (B*G,) fp32 group mean
    rstd_ptr,    # (B*G,) fp32 group 1 / sqrt(var + eps)
    gpart_ptr,   # (2, B*G, n_split) fp32 out: per-program sums of gain*du and gain*du*xhat
    cpart_ptr,   # (2 or 3, B*C, split_l) fp32 out: per-channel, per-spatial-range sums of du, du*xhat, xhat
    stride_x_b, stride_x_c, stride_x_s0, stride_x_s1,
    stride_dy_b, stride_dy_c, stride_dy_s0, stride_dy_s1,
    n_bg, G, Cg, S1, n_lt1, n_lt, cb_per_prog, lt_per_prog, split_l, n_split,
    HAS_ADD: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, ACTIVATION: tl.constexpr, DY_LIKE_X: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, ONE_ROW: tl.constexpr,
):
    pid_bg, b, ch_base = _group_norm_act_group(G, Cg)
    pid_s = tl.program_id(1)
    if DY_LIKE_X:  # dy's strides are x's: one offset tile serves both
        stride_dy_b, stride_dy_c, stride_dy_s0, stride_dy_s1 = stride_x_b, stride_x_c, stride_x_s0, stride_x_s1
    mean = tl.load(mean_ptr + pid_bg)
    rstd = tl.load(rstd_ptr + pid_bg)
    c_lo, c_hi, t_hi, s0_lo, s0_hi, l0_lo = _group_norm_act_program_range(pid_s, Cg, n_lt1, n_lt, cb_per_prog,
                                                                          lt_per_prog, split_l, BLOCK_C, BLOCK_L)
    if ONE_ROW:  # S0 == 1 (every 2-D layout): the loop over rows folds away
        s0_lo, s0_hi = 0, 1
    c_lanes = tl.arange(0, BLOCK_C)
    l_lanes = tl.arange(0, BLOCK_L)
    tile_x = c_lanes[:, None] * stride_x_c + l_lanes[None, :] * stride_x_s1
    tile_dy = c_lanes[:, None] * stride_dy_c + l_lanes[None, :] * stride_dy_s1
    cpart_lanes = c_lanes * split_l
    cpart_stride = n_bg * Cg * split_l
    g_du = tl.full([], 0.0, tl.float32)
    g_du_xhat = tl.full([], 0.0, tl.float32)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cmask = c_lanes < (c_hi - c0)
        gain, offset, centre = _group_norm_act_channel_coefs(
            weight_ptr, bias_ptr, scale_ptr, shift_ptr, add_ptr, ch_base + c0, pid_bg * Cg + c0, c_lanes, cmask, mean,
            HAS_ADD, HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, BLOCK_C)
        gain_r = (gain * rstd)[:, None]
        offset2 = offset[:, None]
        centre = centre[:, None]
        cmask2 = cmask[:, None]
        x_rows = x_ptr + (b * stride_x_b + (ch_base + c0) * stride_x_c)
        dy_rows = dy_ptr + (b * stride_dy_b + (ch_base + c0) * stride_dy_c)
        acc_du = tl.full([BLOCK_C, BLOCK_L], 0.0, tl.float32)
        acc_du_xc = tl.full([BLOCK_C, BLOCK_L], 0.0, tl.float32)
        acc_xc = tl.full([BLOCK_C, BLOCK_L], 0.0, tl.float32)
        for s0 in range(s0_lo, s0_hi):
            # this row's positions: from l0_lo in the first row, up to the program's last tile in the last
            l_end = tl.minimum(S1, (t_hi - s0 * n_lt1) * BLOCK_L)
            for l0 in range(tl.where(s0 == s0_lo, l0_lo, 0), l_end, BLOCK_L):
                mask = cmask2 & (l_lanes < (l_end - l0))[None, :]
                xc, du = _group_norm_act_grad_u(x_rows + s0 * stride_x_s0 + (l0 * stride_x_s1 + tile_x),
                                                dy_rows + s0 * stride_dy_s0 + (l0 * stride_dy_s1 + tile_dy),
                                                mask, centre, gain_r, offset2, ACTIVATION)
                acc_du += du
                acc_du_xc += du * xc
                if HAS_ADD:
                    acc_xc += tl.where(mask, xc, 0.0)
        s_du = tl.sum(acc_du, axis=1)
        s_du_xhat = tl.sum(acc_du_xc, axis=1) * rstd
        out = cpart_ptr + (pid_bg * Cg + c0) * split_l + pid_s % split_l + cpart_lanes
        tl.store(out, s_du, mask=cmask)
        tl.store(out + cpart_stride, s_du_xhat, mask=cmask)
        if HAS_ADD:
            tl.store(out + 2 * cpart_stride, tl.sum(acc_xc, axis=1) * rstd, mask=cmask)
        g_du += tl.sum(gain * s_du)
        g_du_xhat += tl.sum(gain * s_du_xhat)
    out = gpart_ptr + pid_bg * n_split + pid_s
    tl.store(out, g_du)
    tl.store(out + n_bg * n_split, g_du_xhat)


@triton.jit(do_not_specialize=_SIZE_ARGS)
def _group_norm_act_bwd_dx_kernel(
    x_ptr,        # (B, C, S0, S1) input, strides stride_x_*
    add_ptr,      # (B, C) addend, read when HAS_ADD
    dy_ptr,       # (B, C, S0, S1) gradient of y, strides stride_dy_*
    weight_ptr,   # (C,) weight, read when HAS_WEIGHT
    bias_ptr,     # (C,) bias, read when HAS_BIAS
    scale_ptr,    # (B, C) scale, read when HAS_SCALE
    shift_ptr,    # (B, C) shift, read when HAS_SHIFT
    mean_ptr,     # (B*G,) fp32 group mean
    rstd_ptr,     # (B*G,) fp32 group 1 / sqrt(var + eps)
    gpart_ptr,    # (2, B*G, n_split) fp32 per-program group sums from the reduce kernel
    cpart_ptr,    # (2 or 3, B*C, split_l) fp32 per-channel partial sums from the reduce kernel
    dx_ptr,       # (B, C, S0, S1) out: gradient of x, x's dtype, strides stride_dx_*
    dadd_ptr,     # (B, C) fp32 out when HAS_ADD: gradient of add
    dscale_ptr,   # (B, C) fp32 out when HAS_SCALE: gradient of scale
    dshift_ptr,   # (B, C) fp32 out when HAS_SHIFT: gradient of shift
    dweight_ptr,  # (B, C) fp32 out when HAS_WEIGHT: per-sample gradient of weight
    dbias_ptr,    # (B, C) fp32 out when HAS_BIAS: per-sample gradient of bias
    stride_x_b, stride_x_c, stride_x_s0, stride_x_s1,
    stride_dy_b, stride_dy_c, stride_dy_s0, stride_dy_s1,
    stride_dx_b, stride_dx_c, stride_dx_s0, stride_dx_s1,
    n_bg, G, Cg, L, S1, n_lt1, n_lt, cb_per_prog, lt_per_prog, split_l, n_split,
    HAS_ADD: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, ACTIVATION: tl.constexpr, DY_LIKE_X: tl.constexpr, DX_LIKE_X: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, ONE_ROW: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
    BLOCK_SPLIT_L: tl.constexpr, ONE_PASS: tl.constexpr,
):
    if ONE_PASS:  # the whole group in one (BLOCK_C, BLOCK_L) tile of this program: see the helper
        _group_norm_act_bwd_one_pass(
            x_ptr, add_ptr, dy_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, dx_ptr,
            dadd_ptr, dscale_ptr, dshift_ptr, dweight_ptr, dbias_ptr,
            stride_x_b, stride_x_c, stride_x_s0, stride_x_s1, stride_dy_b, stride_dy_c, stride_dy_s0, stride_dy_s1,
            stride_dx_b, stride_dx_c, stride_dx_s0, stride_dx_s1, G, Cg, L, S1,
            HAS_ADD, HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, ACTIVATION, DY_LIKE_X, DX_LIKE_X,
            BLOCK_C, BLOCK_L, ONE_ROW)
    else:
        pid_bg, b, ch_base = _group_norm_act_group(G, Cg, n_bg, True)
        pid_s = n_split - 1 - tl.program_id(1)
        if DY_LIKE_X:  # dy's (dx's) strides are x's: one offset tile serves both
            stride_dy_b, stride_dy_c, stride_dy_s0, stride_dy_s1 = stride_x_b, stride_x_c, stride_x_s0, stride_x_s1
        if DX_LIKE_X:
            stride_dx_b, stride_dx_c, stride_dx_s0, stride_dx_s1 = stride_x_b, stride_x_c, stride_x_s0, stride_x_s1
        mean = tl.load(mean_ptr + pid_bg)
        rstd = tl.load(rstd_ptr + pid_bg)
        n_elem = (Cg * L).to(tl.float32)

        # c1 = mean over the group of gain*du, c2 = mean of gain*du*xhat
        offs = tl.arange(0, BLOCK_SPLIT)
        smask = offs < n_split
        gpart = gpart_ptr + pid_bg * n_split + offs
        c1 = tl.sum(tl.load(gpart, mask=smask, other=0.0)) / n_elem
        c2 = tl.sum(tl.load(gpart + n_bg * n_split, mask=smask, other=0.0)) / n_elem
        # dx = rstd (gain du - c1 - xhat c2) = du gain_r - xc q - r
        q = rstd * rstd * c2
        r = rstd * c1

        c_lo, c_hi, t_hi, s0_lo, s0_hi, l0_lo = _group_norm_act_program_range(pid_s, Cg, n_lt1, n_lt, cb_per_prog,
                                                                              lt_per_prog, split_l, BLOCK_C, BLOCK_L)
        if ONE_ROW:  # S0 == 1 (every 2-D layout): the loop over rows folds away
            s0_lo, s0_hi = 0, 1
        c_lanes = tl.arange(0, BLOCK_C)
        l_lanes = tl.arange(0, BLOCK_L)
        tile_x = c_lanes[:, None] * stride_x_c + l_lanes[None, :] * stride_x_s1
        tile_dy = c_lanes[:, None] * stride_dy_c + l_lanes[None, :] * stride_dy_s1
        tile_dx = c_lanes[:, None] * stride_dx_c + l_lanes[None, :] * stride_dx_s1
        owner = pid_s % split_l == 0
        for c0 in range(c_lo, c_hi, BLOCK_C):
            cmask = c_lanes < (c_hi - c0)
            # _group_norm_act_channel_coefs written out (this kernel needs w, bias and 1 + scale too):
            # through the helper, ptxas spilled 8 bytes here (sm_90, fp16, gelu, BLOCK_C 16 x BLOCK_L 64:
            # STL.64/LDL.64 of an address, at 96 registers)
            ch = ch_base + c0
            w = tl.full([BLOCK_C], 1.0, tl.float32)
            bia = tl.full([BLOCK_C], 0.0, tl.float32)
            s1p = tl.full([BLOCK_C], 1.0, tl.float32)
            centre = tl.full([BLOCK_C], 0.0, tl.float32) + mean
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + ch + c_lanes, mask=cmask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                bia = tl.load(bias_ptr + ch + c_lanes, mask=cmask, other=0.0).to(tl.float32)
            if HAS_SCALE:
                s1p += tl.load(scale_ptr + pid_bg * Cg + c0 + c_lanes, mask=cmask, other=0.0).to(tl.float32)
            gain = w * s1p
            offset = bia * s1p
            if HAS_SHIFT:
                offset += tl.load(shift_ptr + pid_bg * Cg + c0 + c_lanes, mask=cmask, other=0.0).to(tl.float32)
            if HAS_ADD:
                centre -= tl.load(add_ptr + pid_bg * Cg + c0 + c_lanes, mask=cmask, other=0.0).to(tl.float32)
            if owner:
                # this program owns channels c0 + c_lanes: merge their spatial partial sums, store small grads
                j_lanes = tl.arange(0, BLOCK_SPLIT_L)
                pmask = cmask[:, None] & (j_lanes < split_l)[None, :]
                part = cpart_ptr + (pid_bg * Cg + c0) * split_l + ((c_lanes * split_l)[:, None] + j_lanes[None, :])
                cpart_stride = n_bg * Cg * split_l
                s_du = tl.sum(tl.load(part, mask=pmask, other=0.0), axis=1)
                s_du_xhat = tl.sum(tl.load(part + cpart_stride, mask=pmask, other=0.0), axis=1)
                out = pid_bg * Cg + c0 + c_lanes
                if HAS_ADD:
                    s_xhat = tl.sum(tl.load(part + 2 * cpart_stride, mask=pmask, other=0.0), axis=1)
                    tl.store(dadd_ptr + out, rstd * (gain * s_du - L * c1 - c2 * s_xhat), mask=cmask)
                if HAS_SCALE:
                    tl.store(dscale_ptr + out, w * s_du_xhat + bia * s_du, mask=cmask)
                if HAS_SHIFT:
                    tl.store(dshift_ptr + out, s_du, mask=cmask)
                if HAS_WEIGHT:
                    tl.store(dweight_ptr + out, s1p * s_du_xhat, mask=cmask)
                if HAS_BIAS:
                    tl.store(dbias_ptr + out, s1p * s_du, mask=cmask)
            gain_r = (gain * rstd)[:, None]
            offset = offset[:, None]
            centre = centre[:, None]
            cmask2 = cmask[:, None]
            x_rows = x_ptr + (b * stride_x_b + (ch_base + c0) * stride_x_c)
            dy_rows = dy_ptr + (b * stride_dy_b + (ch_base + c0) * stride_dy_c)
            dx_rows = dx_ptr + (b * stride_dx_b + (ch_base + c0) * stride_dx_c)
            for s0 in range(s0_lo, s0_hi):
                # this row's positions: from l0_lo in the first row, up to the program's last tile in the last
                l_end = tl.minimum(S1, (t_hi - s0 * n_lt1) * BLOCK_L)
                for l0 in range(tl.where(s0 == s0_lo, l0_lo, 0), l_end, BLOCK_L):
                    mask = cmask2 & (l_lanes < (l_end - l0))[None, :]
                    xc, du = _group_norm_act_grad_u(x_rows + s0 * stride_x_s0 + (l0 * stride_x_s1 + tile_x),
                                                    dy_rows + s0 * stride_dy_s0 + (l0 * stride_dy_s1 + tile_dy),
                                                    mask, centre, gain_r, offset, ACTIVATION)
                    tl.store(dx_rows + s0 * stride_dx_s0 + (l0 * stride_dx_s1 + tile_dx),
                             (du * gain_r - xc * q - r).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_act_fwd_one_pass(
    x_ptr,       # (B, C, S0, S1) input, strides stride_x_*
    add_ptr,     # (B, C) addend, read when HAS_ADD
    weight_ptr,  # (C,) weight, read when HAS_WEIGHT
    bias_ptr,    # (C,) bias, read when HAS_BIAS
    scale_ptr,   # (B, C) scale, read when HAS_SCALE
    shift_ptr,   # (B, C) shift, read when HAS_SHIFT
    y_ptr,       # (B, C, S0, S1) output, x's dtype, strides stride_y_*
    mean_ptr,    # (B*G,) fp32 out: group mean
    rstd_ptr,    # (B*G,) fp32 out: 1 / sqrt(var + eps)
    stride_x_b, stride_x_c, stride_x_s0, stride_x_s1,
    stride_y_b, stride_y_c, stride_y_s0, stride_y_s1,
    G, Cg, L, S1, eps,
    HAS_ADD: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, ACTIVATION: tl.constexpr, Y_LIKE_X: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, ONE_ROW: tl.constexpr,
):
    """The ``ONE_PASS`` forward: one program per group, the whole group in one register tile: x is read once, y written once.
    The moments are those of ``h - pivot`` taken about their own mean (two reductions over the
    registers), so a large mean does not cancel and an exactly constant group gives ``h - mean = 0``."""
    pid_bg, b, ch_base = _group_norm_act_group(G, Cg)
    if Y_LIKE_X:
        stride_y_b, stride_y_c, stride_y_s0, stride_y_s1 = stride_x_b, stride_x_c, stride_x_s0, stride_x_s1
    c_lanes = tl.arange(0, BLOCK_C)
    n_lanes = tl.arange(0, BLOCK_N)
    cmask = c_lanes < Cg
    mask = cmask[:, None] & (n_lanes < L)[None, :]
    tile_x = _group_norm_act_group_offsets(c_lanes, n_lanes, S1, stride_x_c, stride_x_s0, stride_x_s1, ONE_ROW)
    pivot = _group_norm_act_pivot(x_ptr, add_ptr, b, ch_base, pid_bg, Cg, stride_x_b, stride_x_c, HAS_ADD)
    h = tl.load(x_ptr + (b * stride_x_b + ch_base * stride_x_c) + tile_x, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        h += tl.load(add_ptr + pid_bg * Cg + c_lanes, mask=cmask, other=0.0).to(tl.float32)[:, None]
    n_elem = (Cg * L).to(tl.float32)
    h = tl.where(mask, h - pivot, 0.0)
    mean_s = tl.sum(h) / n_elem
    d = tl.where(mask, h - mean_s, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d) / n_elem + eps)
    tl.store(mean_ptr + pid_bg, mean_s + pivot)
    tl.store(rstd_ptr + pid_bg, rstd)
    # centre 0: d is already centred
    gain, offset, _ = _group_norm_act_channel_coefs(
        weight_ptr, bias_ptr, scale_ptr, shift_ptr, add_ptr, ch_base, pid_bg * Cg, c_lanes, cmask, 0.0,
        False, HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, BLOCK_C)
    u = _group_norm_act_activate(d * (gain * rstd)[:, None] + offset[:, None], ACTIVATION)
    if Y_LIKE_X:
        tile_y = tile_x
    else:
        tile_y = _group_norm_act_group_offsets(c_lanes, n_lanes, S1, stride_y_c, stride_y_s0, stride_y_s1, ONE_ROW)
    tl.store(y_ptr + (b * stride_y_b + ch_base * stride_y_c) + tile_y, u.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_act_bwd_one_pass(
    x_ptr,        # (B, C, S0, S1) input, strides stride_x_*
    add_ptr,      # (B, C) addend, read when HAS_ADD
    dy_ptr,       # (B, C, S0, S1) gradient of y, strides stride_dy_*
    weight_ptr,   # (C,) weight, read when HAS_WEIGHT
    bias_ptr,     # (C,) bias, read when HAS_BIAS
    scale_ptr,    # (B, C) scale, read when HAS_SCALE
    shift_ptr,    # (B, C) shift, read when HAS_SHIFT
    mean_ptr,     # (B*G,) fp32 group mean
    rstd_ptr,     # (B*G,) fp32 group 1 / sqrt(var + eps)
    dx_ptr,       # (B, C, S0, S1) out: gradient of x, x's dtype, strides stride_dx_*
    dadd_ptr,     # (B, C) fp32 out when HAS_ADD: gradient of add
    dscale_ptr,   # (B, C) fp32 out when HAS_SCALE: gradient of scale
    dshift_ptr,   # (B, C) fp32 out when HAS_SHIFT: gradient of shift
    dweight_ptr,  # (B, C) fp32 out when HAS_WEIGHT: per-sample gradient of weight
    dbias_ptr,    # (B, C) fp32 out when HAS_BIAS: per-sample gradient of bias
    stride_x_b, stride_x_c, stride_x_s0, stride_x_s1,
    stride_dy_b, stride_dy_c, stride_dy_s0, stride_dy_s1,
    stride_dx_b, stride_dx_c, stride_dx_s0, stride_dx_s1,
    G, Cg, L, S1,
    HAS_ADD: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, ACTIVATION: tl.constexpr, DY_LIKE_X: tl.constexpr, DX_LIKE_X: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, ONE_ROW: tl.constexpr,
):
    """The ``ONE_PASS`` backward: one program per group, ``xc`` and ``du`` of the whole group held in registers between the
    reductions and ``dx``: x and dy are read once, dx written once. Same algebra as the two-kernel
    backward, each sum a fixed-order tree over the tile."""
    pid_bg, b, ch_base = _group_norm_act_group(G, Cg)
    mean = tl.load(mean_ptr + pid_bg)
    rstd = tl.load(rstd_ptr + pid_bg)
    c_lanes = tl.arange(0, BLOCK_C)
    n_lanes = tl.arange(0, BLOCK_N)
    cmask = c_lanes < Cg
    mask = cmask[:, None] & (n_lanes < L)[None, :]
    bc = pid_bg * Cg + c_lanes
    w = tl.full([BLOCK_C], 1.0, tl.float32)
    bia = tl.full([BLOCK_C], 0.0, tl.float32)
    s1p = tl.full([BLOCK_C], 1.0, tl.float32)
    centre = tl.full([BLOCK_C], 0.0, tl.float32) + mean
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + ch_base + c_lanes, mask=cmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bia = tl.load(bias_ptr + ch_base + c_lanes, mask=cmask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        s1p += tl.load(scale_ptr + bc, mask=cmask, other=0.0).to(tl.float32)
    gain = w * s1p
    offset = bia * s1p
    if HAS_SHIFT:
        offset += tl.load(shift_ptr + bc, mask=cmask, other=0.0).to(tl.float32)
    if HAS_ADD:
        centre -= tl.load(add_ptr + bc, mask=cmask, other=0.0).to(tl.float32)
    gain_r = (gain * rstd)[:, None]
    tile_x = _group_norm_act_group_offsets(c_lanes, n_lanes, S1, stride_x_c, stride_x_s0, stride_x_s1, ONE_ROW)
    if DY_LIKE_X:
        stride_dy_b, stride_dy_c = stride_x_b, stride_x_c
        tile_dy = tile_x
    else:
        tile_dy = _group_norm_act_group_offsets(c_lanes, n_lanes, S1, stride_dy_c, stride_dy_s0, stride_dy_s1,
                                                ONE_ROW)
    xc, du = _group_norm_act_grad_u(x_ptr + (b * stride_x_b + ch_base * stride_x_c) + tile_x,
                                    dy_ptr + (b * stride_dy_b + ch_base * stride_dy_c) + tile_dy,
                                    mask, centre[:, None], gain_r, offset[:, None], ACTIVATION)
    xc = tl.where(mask, xc, 0.0)
    s_du = tl.sum(du, axis=1)
    s_du_xhat = tl.sum(du * xc, axis=1) * rstd
    n_elem = (Cg * L).to(tl.float32)
    c1 = tl.sum(gain * s_du) / n_elem
    c2 = tl.sum(gain * s_du_xhat) / n_elem
    if HAS_ADD:
        s_xhat = tl.sum(xc, axis=1) * rstd
        tl.store(dadd_ptr + bc, rstd * (gain * s_du - L * c1 - c2 * s_xhat), mask=cmask)
    if HAS_SCALE:
        tl.store(dscale_ptr + bc, w * s_du_xhat + bia * s_du, mask=cmask)
    if HAS_SHIFT:
        tl.store(dshift_ptr + bc, s_du, mask=cmask)
    if HAS_WEIGHT:
        tl.store(dweight_ptr + bc, s1p * s_du_xhat, mask=cmask)
    if HAS_BIAS:
        tl.store(dbias_ptr + bc, s1p * s_du, mask=cmask)
    # dx = rstd (gain du - c1 - xhat c2) = du gain_r - xc q - r
    dx = du * gain_r - xc * (rstd * rstd * c2) - rstd * c1
    if DX_LIKE_X:
        stride_dx_b, stride_dx_c = stride_x_b, stride_x_c
        tile_dx = tile_x
    else:
        tile_dx = _group_norm_act_group_offsets(c_lanes, n_lanes, S1, stride_dx_c, stride_dx_s0, stride_dx_s1,
                                                ONE_ROW)
    tl.store(dx_ptr + (b * stride_dx_b + ch_base * stride_dx_c) + tile_dx, dx.to(dx_ptr.dtype.element_ty),
             mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=256)
def _group_norm_act_config(Cg: int, S1: int, channels_inner: bool = False) -> dict:
    """Tile shape and warps for a group of ``Cg`` channels by rows of ``S1`` positions.

    Tiles hold ``_TILE`` elements (eight per thread); the width along S1 is one of
    ``_BLOCK_L_CHOICES``, the one that wastes the fewest masked lanes on this group (ties to the wider
    one), so there are only three configs and sizes a few elements apart share them. Where a tensor
    of the launch has the channels innermost (``channels_inner``: channels-last, or the video
    ``out_layout``), a tile spans as many of the group's channels as one config allows (up to 16), so
    that its accesses to that tensor run along whole channel rows instead of one element per row.
    """
    if channels_inner:
        widths = sorted(_TILE // bl for bl in _BLOCK_L_CHOICES)  # channels per tile: 1, 4, 16
        block_c = next(bc for bc in widths if bc >= min(Cg, widths[-1]))
        return {"BLOCK_C": block_c, "BLOCK_L": _TILE // block_c, "num_warps": _NUM_WARPS}

    def used_fraction(block_l: int) -> float:
        block_c = _TILE // block_l
        return round((Cg / (_cdiv(Cg, block_c) * block_c)) * (S1 / (_cdiv(S1, block_l) * block_l)), 2)

    block_l = max(_BLOCK_L_CHOICES, key=lambda bl: (used_fraction(bl), bl))
    return {"BLOCK_C": _TILE // block_l, "BLOCK_L": block_l, "num_warps": _NUM_WARPS}


@functools.lru_cache(maxsize=256)
def _group_norm_act_one_pass_config(Cg: int, L: int, backward: bool = False) -> dict | None:
    """Tile, warps and register cap of a ONE_PASS launch, or None where a group does not fit one
    program's registers.

    The tile is the whole group, ``(next_pow2(Cg), next_pow2(L))`` as ``BLOCK_C`` x ``BLOCK_N``, over
    enough warps (4 to 16) that a thread holds at most ``_ONE_PASS_PER_THREAD`` lanes of it: 16 in the
    forward (the tile of ``h``), 8 in the backward, which holds two tiles (``x - mean`` and ``du``)
    and the offsets of three tensors between its reductions and ``dx``; at 16 a thread it spilled
    8 to 72 bytes in 4 of 7 tiles on sm_90. The cap is what the warps leave of an SM's 64K registers
    (at most 255)."""
    per_thread = _ONE_PASS_PER_THREAD[backward]
    block_c, block_n = triton.next_power_of_2(Cg), triton.next_power_of_2(L)
    if block_c * block_n > 16 * 32 * per_thread:
        return None
    warps = min(16, max(_NUM_WARPS, block_c * block_n // (32 * per_thread)))
    return {"BLOCK_C": block_c, "BLOCK_N": block_n, "num_warps": warps, "maxnreg": min(255, 65536 // (32 * warps))}


def _group_norm_act_configs() -> list[dict]:
    """Every config ``_group_norm_act_config`` can return (for the GPU compile test)."""
    return [{"BLOCK_C": _TILE // bl, "BLOCK_L": bl, "num_warps": _NUM_WARPS} for bl in _BLOCK_L_CHOICES]


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return _CPU_PROGRAMS


@functools.lru_cache(maxsize=1024)
def _group_norm_act_split(n_bg: int, Cg: int, S1: int, block_c: int, block_l: int, target_programs: int,
                          S0: int = 1) -> dict:
    """How many programs share one group, so that ``n_bg = B * G`` groups make about
    ``target_programs`` programs: channel-block ranges times ranges of the ``S0 * cdiv(S1, block_l)``
    spatial tiles, none of them empty."""
    n_cb, n_lt = _cdiv(Cg, block_c), S0 * _cdiv(S1, block_l)
    want = max(1, min(_MAX_SPLIT, n_cb * n_lt, _cdiv(target_programs, n_bg)))
    split_l = min(n_lt, want, _MAX_SPLIT_L)
    split_c = min(n_cb, _cdiv(want, split_l), _MAX_SPLIT // split_l)
    lt_per_prog = _cdiv(n_lt, split_l)
    cb_per_prog = _cdiv(n_cb, split_c)
    split_l = _cdiv(n_lt, lt_per_prog)
    split_c = _cdiv(n_cb, cb_per_prog)
    return {"cb_per_prog": cb_per_prog, "lt_per_prog": lt_per_prog, "split_l": split_l,
            "n_split": split_c * split_l}


def _alloc_out(x: torch.Tensor, out_layout: Sequence[int] | None) -> torch.Tensor:
    """Uninitialised ``y``: x's shape and dtype, dims in memory in the order ``out_layout``."""
    return torch.empty_strided(x.shape, dense_strides(x.shape, out_layout), dtype=x.dtype, device=x.device)


def _spatial_plan(shape, tensors: Sequence[torch.Tensor]):
    """``(S0, S1, strides)``: the spatial dims of ``shape`` (``(B, C, *spatial)``) merged into two,
    ``S0`` outer and ``S1`` inner, and per tensor ``(stride_b, stride_c, stride_s0, stride_s1)``. Two
    neighbouring dims merge where they do in every tensor (the outer one's stride is the inner one's
    times its size); size-1 dims drop out. None where more than two dims remain."""
    return _spatial_plan_of_strides(tuple(shape), tuple(t.stride() for t in tensors))


def _spatial_plan_of_strides(shape: tuple, all_strides: tuple):
    """``_spatial_plan`` from each tensor's ``stride()`` tuple."""
    runs = []  # [size, innermost stride per tensor] of each run of merged dims
    for d in range(2, len(shape)):
        if shape[d] == 1:
            continue
        strides = [st[d] for st in all_strides]
        if runs and all(outer == s * shape[d] for outer, s in zip(runs[-1][1], strides)):
            runs[-1] = [runs[-1][0] * shape[d], strides]
        else:
            runs.append([shape[d], strides])
    if len(runs) > 2:
        return None
    runs = [[1, [0] * len(all_strides)]] * (2 - len(runs)) + runs
    (S0, outer), (S1, inner) = runs
    return S0, S1, [(st[0], st[1], so, si) for st, so, si in zip(all_strides, outer, inner)]


@functools.lru_cache(maxsize=1024)
def _layout_plan(shape: tuple, all_strides: tuple, Cg: int):
    """``(S0, S1, strides, cfg)`` for tensors of ``shape`` in these strides, or None where the kernels
    cannot address them in place (see ``_kernel_operands``). Cached: a UNet step calls GroupNorm on a
    few dozen shapes, again and again."""
    plan = _spatial_plan_of_strides(shape, all_strides)
    if plan is None:
        return None
    S0, S1, strides = plan
    channels_inner = any(st[1] == 1 and st[3] != 1 for st in strides)
    cfg = _group_norm_act_config(Cg, S1, channels_inner)
    if not all(_fits_int32(Cg, S0, S1, st, cfg) for st in strides):
        return None
    return S0, S1, tuple(strides), cfg


def _fits_int32(Cg: int, S0: int, S1: int, strides, cfg: dict) -> bool:
    """Whether the kernels' int32 offsets within a sample (a group's channels, the rows, a tile's
    lanes past the last position) stay below 2**31 for a tensor of these strides."""
    _, s_c, s_0, s_1 = strides
    return (Cg + cfg["BLOCK_C"]) * s_c + S0 * s_0 + (S1 + cfg["BLOCK_L"]) * s_1 < _MAX_OFFSET


def _kernel_operands(inputs: list, outputs: list, Cg: int):
    """Operands the kernels can address, their layout plan and config:
    ``(inputs, buffers, S0, S1, strides, cfg)``.

    The tensors themselves, read and written in place, whenever their spatial dims merge into two and
    their offsets fit int32: the usual case, any dense layout of (B, C, H, W) or (B, C, F, H, W)
    included. Otherwise contiguous copies of the inputs and contiguous buffers for the outputs (the
    caller copies a buffer into its output where they differ)."""
    shape = inputs[0].shape
    for attempt in range(2):
        plan = _layout_plan(tuple(shape), tuple(t.stride() for t in inputs + outputs), Cg)
        if plan is not None:
            S0, S1, strides, cfg = plan
            return inputs, outputs, S0, S1, strides, cfg
        if attempt == 0:
            inputs = [t.contiguous() for t in inputs]
            outputs = [t if t.is_contiguous() else torch.empty(shape, dtype=t.dtype, device=t.device)
                       for t in outputs]
    raise ValueError(f"the Triton kernels index within a sample with int32: expected C / num_groups * L < 2**31 "
                     f"for x of shape {tuple(shape)}; got {Cg} * {inputs[0].numel() // max(1, shape[0] * shape[1])}")


def _contiguous_or_dummy(t: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    """``t`` made contiguous (a no-op unless it is a strided view, e.g. ``emb.chunk(2, 1)``), or a
    placeholder pointer for an absent input whose HAS_* flag is off."""
    return t.contiguous() if t is not None else dummy


def _group_norm_act_fwd(x, weight, bias, add, scale, shift, num_groups, eps, activation, out_layout=None, y=None):
    """Triton forward. Returns ``(y, mean, rstd)``; ``y`` (laid out per ``out_layout``) may be given
    as a preallocated buffer of ``x``'s shape and dtype in any strides (every element is overwritten).
    ``x`` is read in place in its own strides."""
    B, C = x.shape[:2]
    G = num_groups
    Cg = C // G
    dev = x.device
    if y is None:
        y = _alloc_out(x, out_layout)
    (xk,), (yk,), S0, S1, (sx, sy), cfg = _kernel_operands([x], [y], Cg)
    # two tensors: the custom op's outputs may not alias one another
    mean = torch.empty((B, G), dtype=torch.float32, device=dev)
    rstd = torch.empty((B, G), dtype=torch.float32, device=dev)
    add_c = _contiguous_or_dummy(add, xk)
    one = _group_norm_act_one_pass_config(Cg, S0 * S1)
    if one is not None:
        # the fwd kernel alone (ONE_PASS): the split arguments are unused
        _group_norm_act_fwd_kernel[(B * G,)](
            xk, add_c, *(_contiguous_or_dummy(t, xk) for t in (weight, bias, scale, shift)), yk, mean, mean, rstd,
            *sx, *sy, B * G, G, Cg, S0 * S1, S1, 1, 1, 1, 1, 1, 1, eps,
            HAS_ADD=add is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, ACTIVATION=activation, Y_LIKE_X=sy == sx,
            BLOCK_C=one["BLOCK_C"], BLOCK_L=one["BLOCK_N"], ONE_ROW=S0 == 1, BLOCK_SPLIT=1, ONE_PASS=True,
            num_warps=one["num_warps"], maxnreg=one["maxnreg"])
        record_launch("_group_norm_act_fwd_kernel")
        if yk is not y:
            y.copy_(yk)
        return y, mean, rstd
    split = _group_norm_act_split(B * G, Cg, S1, cfg["BLOCK_C"], cfg["BLOCK_L"], _target_programs(dev), S0)
    part = torch.empty((3, B * G, split["n_split"]), dtype=torch.float32, device=dev)
    grid = (B * G, split["n_split"])
    n_lt1 = _cdiv(S1, cfg["BLOCK_L"])
    dims = (B * G, G, Cg, S1, n_lt1, S0 * n_lt1, split["cb_per_prog"], split["lt_per_prog"], split["split_l"],
            split["n_split"])
    _group_norm_act_stats_kernel[grid](
        xk, add_c, part, *sx, *dims,
        HAS_ADD=add is not None, BLOCK_C=cfg["BLOCK_C"], BLOCK_L=cfg["BLOCK_L"], ONE_ROW=S0 == 1,
        num_warps=cfg["num_warps"], maxnreg=_MAX_REGISTERS["_group_norm_act_stats_kernel"])
    record_launch("_group_norm_act_stats_kernel")
    _group_norm_act_fwd_kernel[grid](
        xk, add_c, *(_contiguous_or_dummy(t, xk) for t in (weight, bias, scale, shift)), yk, part, mean, rstd,
        *sx, *sy, dims[0], G, Cg, S0 * S1, *dims[3:], eps,
        HAS_ADD=add is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, ACTIVATION=activation, Y_LIKE_X=sy == sx,
        BLOCK_C=cfg["BLOCK_C"], BLOCK_L=cfg["BLOCK_L"], ONE_ROW=S0 == 1, BLOCK_SPLIT=_MAX_SPLIT, ONE_PASS=False,
        num_warps=cfg["num_warps"], maxnreg=_MAX_REGISTERS["_group_norm_act_fwd_kernel"])
    record_launch("_group_norm_act_fwd_kernel")
    if yk is not y:
        y.copy_(yk)
    return y, mean, rstd


def _group_norm_act_bwd(dy, x, weight, bias, add, scale, shift, mean, rstd, num_groups, activation, dx=None):
    """Triton backward. Returns ``(dx, dweight, dbias, dadd, dscale, dshift)``, ``None`` for absent
    inputs. ``x`` and ``dy`` are read in place in their own strides; ``dx`` is laid out as
    ``torch.empty_like(x)`` unless given as a preallocated buffer (any strides)."""
    B, C = x.shape[:2]
    L = x.numel() // (B * C)
    G = num_groups
    Cg = C // G
    dev = x.device
    if dx is None:
        dx = torch.empty_like(x)
    (xk, dyk), (dxk,), S0, S1, (sx, sdy, sdx), cfg = _kernel_operands([x, dy], [dx], Cg)
    add_c = _contiguous_or_dummy(add, xk)
    one = _group_norm_act_one_pass_config(Cg, S0 * S1, True)
    if one is not None:
        # dadd/dscale/dshift are returned as they are (the op's outputs may not alias one another): one
        # buffer each; the per-sample rows of dweight and dbias, summed over the batch below, share one
        rows = torch.empty((2, B, C), dtype=torch.float32, device=dev) if weight is not None or bias is not None \
            else None
        dadd, dscale, dshift = (torch.empty((B, C), dtype=torch.float32, device=dev) if t is not None else mean
                                for t in (add, scale, shift))
        dweight_rows, dbias_rows = (rows[0], rows[1]) if rows is not None else (mean, mean)
        # the dx kernel alone (ONE_PASS): the partial-sum and split arguments are unused
        _group_norm_act_bwd_dx_kernel[(B * G,)](
            xk, add_c, dyk, *(_contiguous_or_dummy(t, xk) for t in (weight, bias, scale, shift)), mean, rstd,
            mean, mean, dxk, dadd, dscale, dshift, dweight_rows, dbias_rows, *sx, *sdy, *sdx,
            B * G, G, Cg, S0 * S1, S1, 1, 1, 1, 1, 1, 1,
            HAS_ADD=add is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, ACTIVATION=activation,
            DY_LIKE_X=sdy == sx, DX_LIKE_X=sdx == sx, BLOCK_C=one["BLOCK_C"], BLOCK_L=one["BLOCK_N"],
            ONE_ROW=S0 == 1, BLOCK_SPLIT=1, BLOCK_SPLIT_L=1, ONE_PASS=True, num_warps=one["num_warps"],
            maxnreg=one["maxnreg"])
        record_launch("_group_norm_act_bwd_dx_kernel")
        if dxk is not dx:
            dx.copy_(dxk)
        return _small_grads(dx, weight, bias, add, scale, shift, dweight_rows, dbias_rows, dadd, dscale, dshift)
    split = _group_norm_act_split(B * G, Cg, S1, cfg["BLOCK_C"], cfg["BLOCK_L"], _target_programs(dev), S0)
    # the two partial-sum buffers in one allocation
    g_shape = (2, B * G, split["n_split"])
    c_shape = (3 if add is not None else 2, B * C, split["split_l"])
    n_g = g_shape[0] * g_shape[1] * g_shape[2]
    parts = torch.empty(n_g + c_shape[0] * c_shape[1] * c_shape[2], dtype=torch.float32, device=dev)
    gpart, cpart = parts[:n_g].view(g_shape), parts[n_g:].view(c_shape)

    def small_grad(t):
        return torch.empty((B, C), dtype=torch.float32, device=dev) if t is not None else gpart

    grid = (B * G, split["n_split"])
    n_lt1 = _cdiv(S1, cfg["BLOCK_L"])
    dims = (B * G, G, Cg, S1, n_lt1, S0 * n_lt1, split["cb_per_prog"], split["lt_per_prog"], split["split_l"],
            split["n_split"])
    vectors = (*(_contiguous_or_dummy(t, xk) for t in (weight, bias, scale, shift)), mean, rstd, gpart, cpart)
    flags = dict(HAS_ADD=add is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                 HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, ACTIVATION=activation,
                 BLOCK_C=cfg["BLOCK_C"], BLOCK_L=cfg["BLOCK_L"], ONE_ROW=S0 == 1, num_warps=cfg["num_warps"])
    _group_norm_act_bwd_reduce_kernel[grid](xk, add_c, dyk, *vectors, *sx, *sdy, *dims, DY_LIKE_X=sdy == sx,
                                            maxnreg=_MAX_REGISTERS["_group_norm_act_bwd_reduce_kernel"], **flags)
    record_launch("_group_norm_act_bwd_reduce_kernel")
    dadd, dscale, dshift, dweight_rows, dbias_rows = (small_grad(t) for t in (add, scale, shift, weight, bias))
    _group_norm_act_bwd_dx_kernel[grid](xk, add_c, dyk, *vectors, dxk, dadd, dscale, dshift, dweight_rows,
                                        dbias_rows, *sx, *sdy, *sdx, dims[0], G, Cg, L, *dims[3:], **flags,
                                        DY_LIKE_X=sdy == sx, DX_LIKE_X=sdx == sx, BLOCK_SPLIT=_MAX_SPLIT,
                                        BLOCK_SPLIT_L=_MAX_SPLIT_L, ONE_PASS=False,
                                        maxnreg=_MAX_REGISTERS["_group_norm_act_bwd_dx_kernel"])
    record_launch("_group_norm_act_bwd_dx_kernel")
    if dxk is not dx:
        dx.copy_(dxk)
    return _small_grads(dx, weight, bias, add, scale, shift, dweight_rows, dbias_rows, dadd, dscale, dshift)


def _small_grads(dx, weight, bias, add, scale, shift, dweight_rows, dbias_rows, dadd, dscale, dshift):
    """The backward's result: dx, and the small gradients from the kernels' fp32 per-sample rows."""
    return (
        dx,
        dweight_rows.sum(0).to(weight.dtype) if weight is not None else None,
        dbias_rows.sum(0).to(bias.dtype) if bias is not None else None,
        dadd.to(add.dtype) if add is not None else None,
        dscale.to(scale.dtype) if scale is not None else None,
        dshift.to(shift.dtype) if shift is not None else None,
    )


# ----------------------------------------------------------------------------------------------
# Torch reference, and the torch forward/backward used where Triton does not run
# ----------------------------------------------------------------------------------------------

_TORCH_ACTIVATIONS = {None: lambda t: t, "silu": F.silu, "gelu": F.gelu, "mish": F.mish}


def group_norm_act_reference(x, num_groups, weight=None, bias=None, eps=1e-5, activation="silu",
                             add=None, scale=None, shift=None):
    """``act(GroupNorm(x + add) * (1 + scale) + shift)`` spelled with ``F.group_norm``; differentiable
    by autograd, computed in the inputs' (promoted) dtype. The oracle of the tests."""
    if activation not in _TORCH_ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATION_NAMES}; got {activation!r}")

    def per_channel(t):
        return t.reshape(*t.shape, *([1] * (x.dim() - 2)))

    h = x + per_channel(add) if add is not None else x
    z = F.group_norm(h, num_groups, weight, bias, eps)
    if scale is not None:
        z = z * (1 + per_channel(scale))
    if shift is not None:
        z = z + per_channel(shift)
    return _TORCH_ACTIVATIONS[activation](z)


# On the CPU the torch path is bound by memory traffic and by first-touch page faults on fresh
# buffers, so it runs on aten's fused kernels and works in place on buffers it owns.

_TORCH_ACTIVATIONS_INPLACE = {
    None: lambda u: u,
    "silu": lambda u: F.silu(u, inplace=True),
    "gelu": torch.ops.aten.gelu_,
    "mish": lambda u: F.mish(u, inplace=True),
}


def _activation_grad_torch(dy, u, activation):
    """dL/du from dL/dy and u, one fused aten kernel, written over ``u`` where aten allows."""
    if activation == "silu":
        return torch.ops.aten.silu_backward.grad_input(dy, u, grad_input=u)
    if activation == "gelu":
        return torch.ops.aten.gelu_backward.grad_input(dy, u, approximate="none", grad_input=u)
    if activation == "mish":
        return torch.ops.aten.mish_backward(dy, u)
    return dy.clone()


def _channel_coefs_torch(weight, bias, scale, shift, B, C, device):
    """fp32 ``(w, bias, 1 + scale, gain, offset)``; the last three ``(B, C)``, the first two ``(C,)``."""
    w = weight.float() if weight is not None else torch.ones(C, device=device)
    bia = bias.float() if bias is not None else torch.zeros(C, device=device)
    s1p = 1 + scale.float() if scale is not None else torch.ones(B, C, device=device)
    offset = bia * s1p + (shift.float() if shift is not None else 0)
    return w, bia, s1p, w * s1p, offset


def _input_torch(x, add):
    """fp32 ``x + add`` as ``(B, C, L)`` (x itself when it is already fp32 and there is no add)."""
    B, C = x.shape[:2]
    # aten's GroupNorm needs a contiguous (B, C, L): a strided x (a transposed attention output, the
    # video UNets' (B, C, F, H, W) view of (B*F, C, H, W) memory, channels-last) is copied here
    h = x.reshape(B, C, x.numel() // (B * C)).float().contiguous()
    return h + add.float()[:, :, None] if add is not None else h


def _as_layout(y: torch.Tensor, x: torch.Tensor, strides: tuple[int, ...]) -> torch.Tensor:
    """``y``, a contiguous result with x's number of elements, as a tensor of x's shape and dtype with
    ``strides``: a view (cast if needed) where the strides are already those, else one copy into a
    tensor that has them (the copy casts too)."""
    y = y.view(x.shape)
    if y.stride() == tuple(strides):
        return y.to(x.dtype)
    return torch.empty_strided(x.shape, strides, dtype=x.dtype, device=x.device).copy_(y)


def _group_norm_act_fwd_torch(x, weight, bias, add, scale, shift, num_groups, eps, activation, out_layout=None):
    """Torch forward with the kernels' outputs ``(y, mean, rstd)``, in fp32 on aten's fused GroupNorm;
    ``y`` laid out per ``out_layout`` (a copy of the contiguous result where that is not contiguous)."""
    B, C = x.shape[:2]
    h = _input_torch(x, add)
    if scale is None and shift is None:
        u, mean, rstd = torch.native_group_norm(
            h, weight.float() if weight is not None else None, bias.float() if bias is not None else None,
            B, C, h.shape[-1], num_groups, eps)
    else:
        u, mean, rstd = torch.native_group_norm(h, None, None, B, C, h.shape[-1], num_groups, eps)
        _, _, _, gain, offset = _channel_coefs_torch(weight, bias, scale, shift, B, C, x.device)
        torch.addcmul(offset[..., None], u, gain[..., None], out=u)
    y = _TORCH_ACTIVATIONS_INPLACE[activation](u)
    return _as_layout(y, x, dense_strides(x.shape, out_layout)), mean, rstd


def _grad_like(dh: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dh`` (contiguous, x's number of elements) as x's gradient: x's shape and dtype, laid out as
    ``torch.empty_like(x)`` (a view of ``dh`` when x is contiguous, the common case)."""
    dh = dh.view(x.shape)
    if dh.stride() == x.stride():  # empty_like keeps a dense x's strides, those of size-1 dims included
        return dh.to(x.dtype)
    return _as_layout(dh, x, torch.empty_like(x, device="meta").stride())


# The torch backward sums du * x over each (sample, group). Centred first (x - mean), those sums are
# exact to rounding whatever the mean; read as aten's own GroupNorm backward reads them, from x and the
# mean (sum(du x) - mean sum(du)), they lose about log2(1 + |mean| / std) bits to cancellation, and save
# the pass and the buffer that centring costs. Uncentred where every (sample, group) has a mean within
# this many standard deviations of zero (those of DDPM- and SD-structured UNets stay under 1.5), i.e.
# at most ~3 bits; centred beyond (x = 1000 + noise: 10 bits, 8e-4 relative error in dweight).
_UNCENTRED_MEAN_OVER_STD = 8.0


class _PreActivation(NamedTuple):
    """What the torch backward keeps of a recomputed pre-activation ``u = (x + add - mean) rstd w + bias``:
    ``u`` (an fp32 ``(B, C, L)`` buffer of our own), the centred input ``xc`` (or None: the GroupNorm
    backward reads ``source`` with ``mean``), ``source``, the fp32 ``(B, C, L)`` input the statistics
    are of (``x + add``; x itself where that is x; x as ``(B, C, L)``, unread, where ``xc`` is kept),
    the weight (ones for none) and the activation."""

    u: torch.Tensor
    xc: Optional[torch.Tensor]
    source: torch.Tensor
    w: torch.Tensor
    activation: Optional[str]


def _pre_activation_torch(x, weight, bias, add, mean, rstd, num_groups, activation, eps=None) -> _PreActivation:
    """From the saved statistics, without scale/shift: the pre-activation ``u``.

    With ``eps`` (norm_act_conv's recompute knows it) and means within ``_UNCENTRED_MEAN_OVER_STD``
    standard deviations on the CPU, u is aten's GroupNorm forward run again: the forward's u bit for
    bit, and on the CPU faster than the affine map below, whose (B, C, 1) factors broadcast slowly.
    Otherwise u comes from the saved statistics: one pass over x where x is read as it is, two where
    it is centred first. Per-channel factors broadcast over ``(B, G, Cg)`` views rather than repeated
    tensors: on small layers this Python is part of a step."""
    B, C = x.shape[:2]
    G = num_groups
    Cg = C // G
    L = x.numel() // (B * C)
    weight32 = weight.float() if weight is not None else None
    bias32 = bias.float() if bias is not None else None
    # aten's CPU backward wants a weight whenever it returns dbias: ones stand in for a missing one
    w = weight32 if weight32 is not None else torch.ones(C, device=x.device)
    act = _activation_of(activation)
    x3 = x.reshape(B, C, L)
    as_is = eps is not None or (add is None and x.dtype == torch.float32 and x3.is_contiguous())
    uncentred = (as_is and x.device.type == "cpu"
                 and bool((mean * rstd).abs().max() <= _UNCENTRED_MEAN_OVER_STD))
    if uncentred and eps is not None:
        source = _input_torch(x, add)
        u = torch.native_group_norm(source, weight32, bias32, B, C, L, G, eps)[0]
        return _PreActivation(u, None, source, w, act)
    gain = (rstd[..., None] * w.view(G, Cg)).view(B, C, 1)
    if uncentred:
        offset = (gain.view(B, G, Cg) * -mean[..., None]).view(B, C, 1)
        if bias32 is not None:
            offset = offset + bias32[:, None]
        return _PreActivation(torch.addcmul(offset, x3, gain), None, x3, w, act)
    xc = torch.empty((B, C, L), dtype=torch.float32, device=x.device)
    if add is None:
        torch.sub(x.reshape(B, G, Cg * L), mean[..., None], out=xc.view(B, G, Cg * L))
    else:
        shift_c = (add.float().view(B, G, Cg) - mean[..., None]).view(B, C)
        torch.add(x3, shift_c[..., None], out=xc)
    u = torch.mul(xc, gain) if bias32 is None else torch.addcmul(bias32[:, None], xc, gain)
    return _PreActivation(u, xc, x3, w, act)


def _norm_grads_torch(du, state: _PreActivation, x, weight, bias, add, mean, rstd, num_groups):
    """``(dx, dweight, dbias, dadd, None, None)`` from dL/du, on aten's fused GroupNorm backward fed the
    centred input with zero means, or x with its means (``_UNCENTRED_MEAN_OVER_STD``)."""
    B, C, L = du.shape
    # aten's GroupNorm backward reads its gradient as contiguous: mish_backward (and the identity's
    # clone) keep the strides of a strided dy
    if state.xc is None:
        source, means = state.source, mean
    else:
        source, means = state.xc, torch.zeros_like(rstd)
    dh, dw, db = torch.ops.aten.native_group_norm_backward(
        du.contiguous(), source, means, rstd, state.w, B, C, L, num_groups,
        [True, weight is not None, bias is not None])
    return (
        _grad_like(dh, x),
        dw.to(weight.dtype) if weight is not None else None,
        db.to(bias.dtype) if bias is not None else None,
        dh.sum(-1).to(add.dtype) if add is not None else None,
        None,
        None,
    )


def _group_norm_act_bwd_torch_aten(dy, x, weight, bias, add, mean, rstd, num_groups, activation, eps=None):
    """Torch backward without scale/shift: ``(dx, dweight, dbias, dadd, None, None)``. Passes over
    memory: ``u`` (``_pre_activation_torch``: two, aten's GroupNorm forward again; or one from the saved
    statistics, two with centring), the activation's gradient over ``u`` (one),
    ``native_group_norm_backward`` (two) and, with ``add``, ``dadd = sum(dx)``."""
    state = _pre_activation_torch(x, weight, bias, add, mean, rstd, num_groups, activation, eps)
    return group_norm_act_recomputed_bwd_torch(dy, state, x, weight, bias, add, mean, rstd, num_groups)


def group_norm_act_recompute_torch(x, weight, bias, add, mean, rstd, num_groups, eps, activation):
    """For a backward that needs the forward's output again (a convolution after the GroupNorm):
    ``(y, state)``, y recomputed (contiguous, x's dtype; the forward's y bit for bit on the CPU with
    moderate means, else up to rounding) and the state ``group_norm_act_recomputed_bwd_torch``
    continues from, which keeps the pre-activation beside y so that nothing is recomputed twice.
    Torch path without scale/shift only; ``activation`` as the op takes it (``"none"`` for none)."""
    state = _pre_activation_torch(x, weight, bias, add, mean, rstd, num_groups, activation, eps)
    return _TORCH_ACTIVATIONS[state.activation](state.u).view(x.shape).to(x.dtype), state


def group_norm_act_recomputed_bwd_torch(dy, state, x, weight, bias, add, mean, rstd, num_groups):
    """The GroupNorm+activation backward from ``group_norm_act_recompute_torch``'s (or
    ``_pre_activation_torch``'s) state: ``(dx, dweight, dbias, dadd, None, None)``. The activation's
    gradient is written over the pre-activation's buffer."""
    du = _activation_grad_torch(dy.reshape(state.u.shape).float(), state.u, state.activation)
    return _norm_grads_torch(du, state, x, weight, bias, add, mean, rstd, num_groups)


def _group_norm_act_bwd_torch(dy, x, weight, bias, add, scale, shift, mean, rstd, num_groups, activation,
                              eps=None):
    """Torch backward from ``x``, ``mean``, ``rstd``: ``(dx, dweight, dbias, dadd, dscale, dshift)``.
    Without scale/shift, aten's GroupNorm backward (``_group_norm_act_bwd_torch_aten``); with them,
    the same algebra as the kernels: dx = rstd (gain du - c1 - xhat c2). ``dy`` may have any strides
    (copied to a contiguous fp32 buffer); ``dx`` is laid out as ``torch.empty_like(x)``."""
    if scale is None and shift is None:
        return _group_norm_act_bwd_torch_aten(dy, x, weight, bias, add, mean, rstd, num_groups, activation, eps)
    B, C = x.shape[:2]
    Cg = C // num_groups
    w, bia, s1p, gain, offset = _channel_coefs_torch(weight, bias, scale, shift, B, C, x.device)
    rstd_c = rstd.repeat_interleave(Cg, dim=1)
    mean_c = mean.repeat_interleave(Cg, dim=1)
    h = _input_torch(x, add)
    # Centre the input itself (in place where h is a buffer of our own) rather than folding the mean
    # into per-channel coefficients: sum(du h) - mean sum(du) cancels catastrophically when the mean
    # is large against the spread (x = 1000 + noise), which cost 4x torch's own error in dweight.
    xc = h.sub_(mean_c[..., None]) if h.data_ptr() != x.data_ptr() else h - mean_c[..., None]
    gain_r = gain * rstd_c
    du = _activation_grad_torch(dy.reshape(xc.shape).float(),
                                torch.addcmul(offset[..., None], xc, gain_r[..., None]), activation)
    s_du = du.sum(-1)
    s_du_xhat = torch.einsum("bcl,bcl->bc", du, xc) * rstd_c
    n = Cg * xc.shape[-1]
    c1 = (gain * s_du).reshape(B, num_groups, Cg).sum(-1) / n
    c2 = (gain * s_du_xhat).reshape(B, num_groups, Cg).sum(-1) / n
    # dx = du gain_r - rstd c1 - xc rstd^2 c2, in du's buffer
    q = (rstd * rstd * c2).repeat_interleave(Cg, dim=1)
    dh = du.mul_(gain_r[..., None]).sub_((rstd_c * c1.repeat_interleave(Cg, dim=1))[..., None])
    dh.addcmul_(xc, q[..., None], value=-1)
    return (
        _grad_like(dh, x),
        (s1p * s_du_xhat).sum(0).to(weight.dtype) if weight is not None else None,
        (s1p * s_du).sum(0).to(bias.dtype) if bias is not None else None,
        dh.sum(-1).to(add.dtype) if add is not None else None,
        (w * s_du_xhat + bia * s_du).to(scale.dtype) if scale is not None else None,
        s_du.to(shift.dtype) if shift is not None else None,
    )


# ----------------------------------------------------------------------------------------------
# Custom ops, autograd, public function
# ----------------------------------------------------------------------------------------------

_NO_ACTIVATION = "none"  # how activation=None travels through the op schema


def _activation_of(name: str) -> str | None:
    return None if name == _NO_ACTIVATION else name


def _group_norm_act_fwd_op(x, weight, bias, add, scale, shift, num_groups, eps, activation, out_layout):
    """``(y, mean, rstd)``: y of x's shape and dtype laid out per ``out_layout``, mean/rstd ``(B, G)`` fp32."""
    act = _activation_of(activation)
    if x.numel() == 0:  # an empty batch
        stats = x.new_empty((0, num_groups), dtype=torch.float32)
        return _alloc_out(x, out_layout), stats, stats.clone()
    if use_triton(x, weight, bias, add, scale, shift):
        return _group_norm_act_fwd(x, weight, bias, add, scale, shift, num_groups, eps, act, out_layout)
    return _group_norm_act_fwd_torch(x, weight, bias, add, scale, shift, num_groups, eps, act, out_layout)


def _group_norm_act_fwd_fake(x, weight, bias, add, scale, shift, num_groups, eps, activation, out_layout):
    stats = (x.shape[0], num_groups)
    return (_alloc_out(x, out_layout), x.new_empty(stats, dtype=torch.float32),
            x.new_empty(stats, dtype=torch.float32))


def _group_norm_act_bwd_op(dy, x, weight, bias, add, scale, shift, mean, rstd, num_groups, activation, eps=None):
    """``(dx, dweight, dbias, dadd, dscale, dshift)``; an absent input's gradient is an empty tensor.
    ``eps`` (the forward's; optional) lets the torch path run the forward's GroupNorm again for the
    pre-activation rather than map x through the saved statistics (``_pre_activation_torch``)."""
    act = _activation_of(activation)
    if x.numel() == 0:  # an empty batch
        grads = (torch.empty_like(x), *(t.new_zeros(t.shape) if t is not None else None
                                         for t in (weight, bias, add, scale, shift)))
    elif use_triton(x, dy, weight, bias, add, scale, shift):
        grads = _group_norm_act_bwd(dy, x, weight, bias, add, scale, shift, mean, rstd, num_groups, act)
    else:
        grads = _group_norm_act_bwd_torch(dy, x, weight, bias, add, scale, shift, mean, rstd, num_groups, act,
                                          eps)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


def _group_norm_act_bwd_fake(dy, x, weight, bias, add, scale, shift, mean, rstd, num_groups, activation,
                             eps=None):
    return (torch.empty_like(x),) + tuple(
        t.new_empty(t.shape) if t is not None else x.new_empty(0) for t in (weight, bias, add, scale, shift))


def _group_norm_act_setup_context(ctx, inputs, output):
    x, weight, bias, add, scale, shift, num_groups, eps, activation, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, add, scale, shift, mean, rstd)
    ctx.num_groups = num_groups
    ctx.eps = eps
    ctx.activation = activation
    ctx.mark_non_differentiable(mean, rstd)


def _group_norm_act_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, add, scale, shift, mean, rstd = ctx.saved_tensors
    grads = group_norm_act_bwd_call(dy, x, weight, bias, add, scale, shift, mean, rstd, ctx.num_groups,
                                    ctx.activation, ctx.eps)
    present = (x, weight, bias, add, scale, shift)
    grads = [g if t is not None else None for g, t in zip(grads, present)]
    return (*grads, None, None, None, None)


def _register_ops() -> None:
    fwd = torch.library.custom_op(
        "fastunet::group_norm_act_fwd", _group_norm_act_fwd_op, mutates_args=(),
        schema="(Tensor x, Tensor? weight, Tensor? bias, Tensor? add, Tensor? scale, Tensor? shift, "
               "int num_groups, float eps, str activation, int[]? out_layout) -> (Tensor, Tensor, Tensor)")
    fwd.register_fake(_group_norm_act_fwd_fake)
    fwd.register_autograd(_group_norm_act_backward, setup_context=_group_norm_act_setup_context)
    bwd = torch.library.custom_op(
        "fastunet::group_norm_act_bwd", _group_norm_act_bwd_op, mutates_args=(),
        schema="(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor? add, Tensor? scale, Tensor? shift, "
               "Tensor mean, Tensor rstd, int num_groups, str activation, float? eps=None) "
               "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
    bwd.register_fake(_group_norm_act_bwd_fake)


register_once(__name__, "fastunet::group_norm_act_fwd", _register_ops)


class _GroupNormActEager(torch.autograd.Function):
    """``fastunet::group_norm_act_fwd`` with its registered autograd, minus the dispatcher: what an
    eager call runs (``direct_call``). Same outputs, same saved tensors, same backward. (A forward
    taking ``ctx``: the separate-``setup_context`` form binds default arguments through ``inspect``
    on every call.)"""

    @staticmethod
    def forward(ctx, *args):
        output = _group_norm_act_fwd_op(*args)
        _group_norm_act_setup_context(ctx, args, output)
        return output

    backward = staticmethod(_group_norm_act_backward)


# the package's module only: a stray top-level ``kernels`` import (see register_once) goes through the ops
_DIRECT = __name__.startswith("fastunet.kernels.")


def group_norm_act_fwd_call(x, weight, bias, add, scale, shift, num_groups, eps, activation, out_layout):
    """``torch.ops.fastunet.group_norm_act_fwd(...)``, differentiable, with the dispatcher skipped where
    ``direct_call`` allows (the layers call this, not the op)."""
    return forward_call(_DIRECT, "group_norm_act_fwd", _GroupNormActEager, _group_norm_act_fwd_op,
                        (x, weight, bias, add, scale, shift, num_groups, eps, activation, out_layout), 6)


def group_norm_act_bwd_call(dy, x, weight, bias, add, scale, shift, mean, rstd, num_groups, activation, eps=None):
    """``torch.ops.fastunet.group_norm_act_bwd(...)``, with the dispatcher skipped where ``direct_call`` allows."""
    return backward_call(_DIRECT, "group_norm_act_bwd", _group_norm_act_bwd_op,
                         (dy, x, weight, bias, add, scale, shift, mean, rstd, num_groups, activation, eps), (x, dy))


def _check_inputs(x, num_groups, weight, bias, eps, activation, add, scale, shift, out_layout=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    if x.dim() not in (3, 4, 5):
        raise ValueError(f"x must be (B, C, *spatial) with 1 to 3 spatial dims (3 to 5 dims); "
                         f"got {x.dim()} dims, shape {tuple(x.shape)}")
    B, C = x.shape[:2]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"num_groups must be an int; got {type(num_groups).__name__}")
    if num_groups <= 0 or C % num_groups != 0:
        raise ValueError(f"num_groups must be positive and divide the {C} channels of x; got {num_groups}")
    if C == 0 or any(s == 0 for s in x.shape[2:]):
        raise ValueError(f"x must have channels and non-empty spatial dims; got shape {tuple(x.shape)}")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative number; got {eps!r}")
    if activation not in _ACTIVATION_NAMES:
        raise ValueError(f"activation must be one of {_ACTIVATION_NAMES}; got {activation!r}")
    for name, t, shape in (("weight", weight, (C,)), ("bias", bias, (C,)), ("add", add, (B, C)),
                           ("scale", scale, (B, C)), ("shift", shift, (B, C))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None; got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}; got {tuple(t.shape)}")
        if t.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{name} must be {x.dtype} (x's dtype) or torch.float32; got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}; got {t.device}")
    if out_layout is None:
        return
    if (isinstance(out_layout, (str, bytes, torch.Tensor)) or not isinstance(out_layout, Sequence)
            or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) for d in out_layout)):
        raise TypeError(f"out_layout must be None or a sequence of ints; got {out_layout!r}")
    if sorted(int(d) for d in out_layout) != list(range(x.dim())):
        raise ValueError(f"out_layout must be a permutation of x's {x.dim()} dims {tuple(range(x.dim()))}; "
                         f"got {tuple(out_layout)}")


def group_norm_act(x, num_groups, weight=None, bias=None, eps=1e-5, activation="silu",
                   add=None, scale=None, shift=None, *, out_layout=None):
    """``act(GroupNorm(x + add) * (1 + scale) + shift)`` in one pass over memory (two for statistics).

    Args:
        x: ``(B, C, *spatial)``, 1 to 3 spatial dims, float32/float16/bfloat16, any strides (the
            Triton kernels read it in place; the torch path copies a non-contiguous ``x`` once).
        num_groups: ``G``, dividing ``C``.
        weight, bias: optional ``(C,)`` affine parameters of the GroupNorm.
        eps: added to the variance.
        activation: ``"silu"``, ``"gelu"`` (exact erf form), ``"mish"`` or ``None``.
        add: optional ``(B, C)`` added to ``x`` before normalisation (time embedding).
        scale, shift: optional ``(B, C)`` modulation ``* (1 + scale) + shift`` after the affine.
        out_layout: optional permutation of x's dims, the memory order of the result, outermost
            first: ``y.permute(*out_layout)`` is contiguous. None: a contiguous result. For a video
            ``x`` of shape ``(B, C, F, H, W)``, ``(0, 3, 4, 2, 1)`` makes
            ``y.permute(0, 3, 4, 2, 1).reshape(B * H * W, F, C)`` a view.

    The optional tensors are in ``x``'s dtype or float32. Returns a tensor shaped and typed like
    ``x``, laid out per ``out_layout``. Differentiable in every tensor argument (the incoming
    gradient may have any strides; x's gradient is laid out as ``torch.empty_like(x)``);
    deterministic.
    """
    _check_inputs(x, num_groups, weight, bias, eps, activation, add, scale, shift, out_layout)
    layout = None if out_layout is None else [int(d) for d in out_layout]
    y, _, _ = group_norm_act_fwd_call(x, weight, bias, add, scale, shift, num_groups, float(eps),
                                      activation if activation is not None else _NO_ACTIVATION, layout)
    return y
