"""FreeU's Fourier filter as a direct DFT over the few frequencies it touches.

The filter takes each ``(H, W)`` plane of ``x`` (``(B, C, H, W)``), multiplies the centred
``2 * threshold`` square of its (shifted) 2-D spectrum by ``scale`` and transforms back, keeping the
real part.  Only the frequencies in that square change, so with ``S = R x K`` the set of scaled
frequencies (``R`` rows ``u`` of ``H``, ``K`` columns ``v`` of ``W``)::

    y = x + (scale - 1) * Re(IDFT(1_S * DFT(x)))
    X[u, v] = sum_{h, w} x[h, w] exp(-2 pi i (u h / H + v w / W))                 (u, v) in S
    y[h, w] = x[h, w] + (scale - 1) / (H W) * Re sum_{(u, v) in S} X[u, v] exp(+2 pi i (u h / H + v w / W))

which costs ``O(H W (|R| + |K|))`` per plane instead of two FFTs and a full-size mask.  Both sums are
separable: along ``W`` for the few ``v`` first, then along ``H`` for the few ``u``.

The scaled set follows the FFT formulation exactly, including Python's slice rules on small planes:
the shifted rows ``p`` are ``range(H)[H // 2 - threshold : H // 2 + threshold]`` (a negative start
wraps, an end past ``H`` clamps) and map to frequencies ``u = (p - H // 2) mod H``; columns likewise.
The result is a contiguous cyclic run of frequencies ``u0, u0 + 1, ... (mod H)`` on each axis.

Triton kernel: one program per ``(b, c)`` plane.  Pass 1 walks the plane in blocks of ``BLOCK_H``
full rows and accumulates the ``|R| x |K|`` complex coefficients in fp32; pass 2 walks it again and
writes ``x + (scale - 1) / (H W) * correction``.  A plane of up to 2048 (padded) elements is one tile,
loaded once.  Twiddles are computed in the kernel from the integer phase ``(u h) mod H``: the quarter
turn is split off in integers and a short polynomial does the rest, so phases stay exact however large
the plane and no float range reduction (libdevice's slow path spills to local memory) is needed.
Inputs are read in their own dtype (fp16, bf16, fp32; any strides) and the output is written in it.

The map ``x -> Re(IDFT(1_S DFT(x)))`` is self-adjoint on real planes (the DFT matrix is symmetric,
so the real part of ``A^H D A / (H W)`` is a symmetric matrix), so the backward pass is the same
filter applied to the incoming gradient. The filter is a ``torch.library`` custom op
(``fastunet::fourier_filter``) with a fake implementation and that backward registered as its
autograd, so ``torch.compile(fullgraph=True)`` traces it; the backend is picked inside the op.

Limits: the kernel takes up to 8 scaled frequencies per axis (any plane with ``threshold <= 4``;
FreeU uses 1) and planes up to 2048 on a side, in float16, bfloat16 and float32.  Wider masks, larger
planes and float64 inputs run :func:`fourier_filter_reference` instead: past a few frequencies an FFT
is the better algorithm, UNet feature maps are far smaller, and float64 is a checking dtype, not a fast
path.  Backend ``"auto"`` does so silently; under ``"triton"`` the first such call per limit emits a
``KernelFallbackWarning`` (``fastunet.kernels._backend``) naming the limit.
"""

from __future__ import annotations

import math
import numbers

import torch

from ._backend import get_backend, record_launch, register_once, tl, triton, use_triton, warn_fallback

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_FREQS = 8  # scaled frequencies per axis the kernel takes
_MAX_SIDE = 2048  # plane height and width the kernel takes (widths above it would need a column loop)
# planes up to this many padded elements are loaded once (8 warps at 8 elements a thread). 4096-element
# one-tile planes on 16 warps (128 registers a thread) spilled at K_PAD 8 whatever R_PAD: 16x256, 32x128,
# 64x64 and 256x16 at R_PAD 1, 2, 4 and 8 held 184-400 B of stack on sm_80 and sm_90; they now take the
# row blocks (two reads of x instead of one). On 8 warps they fit but for 256x16 at 8 x 8 (8 B on sm_90),
# untested below R_PAD 8.
_ONE_TILE_ELEMENTS = 2048
_TILE_ELEMENTS = 2048  # tile size for larger planes
# Tile elements a thread holds on the one-tile path. Every step of the unrolled transform is a
# reduction across the tile, so fewer warps would issue fewer instructions a plane (64x64 fp16 at 2 x 2
# frequencies, sm_90: 1488 a warp at 16 warps, 1704 at 8, 2024 at 4: 23.8K, 13.6K, 8.1K warp-instructions),
# but at 32 a thread long rows spill: 1x2048 at K_PAD 8 on 2 warps, 2.2 KB of stack on sm_80 and
# sm_90; 64x16 at 8 x 8 on 1 warp, 48 B. Kept at 8 until a config table is tuned on a GPU.
_ONE_TILE_PER_THREAD = 8
# r_pad * BLOCK_H per warp: 2 * 512 row twiddles (cos and sin) over 32 threads is 32 per thread
_TWIDDLE_ROWS_PER_WARP = 512


@triton.jit
def _fourier_filter_sincos(phase, n):
    """cos and sin of ``2 pi phase / n`` for integer ``phase`` in ``[0, n)``, ``n < 2**15``.

    The quarter turn is split off exactly in integers, ``4 phase = q n + r`` with ``|r| <= n / 2``, so
    the polynomials only see ``theta = (pi / 2) r / n`` in ``[-pi / 4, pi / 4]`` (Taylor to 1e-9 there).
    No range reduction of a float angle, hence no slow path with local memory as in libdevice.
    """
    q = (4 * phase + n // 2) // n
    theta = (4 * phase - q * n).to(tl.float32) * (1.5707963267948966 / n)
    t2 = theta * theta
    s = theta * (1.0 + t2 * (-1.0 / 6 + t2 * (1.0 / 120 + t2 * (-1.0 / 5040 + t2 * (1.0 / 362880)))))
    c = 1.0 + t2 * (-0.5 + t2 * (1.0 / 24 + t2 * (-1.0 / 720 + t2 * (1.0 / 40320 + t2 * (-1.0 / 3628800)))))
    q = q % 4
    cos = tl.where(q == 0, c, tl.where(q == 1, -s, tl.where(q == 2, -c, s)))
    sin = tl.where(q == 0, s, tl.where(q == 1, c, tl.where(q == 2, -s, -c)))
    return cos, sin


@triton.jit
def _fourier_filter_row_twiddles(rows, u0, n_rows, H, R_PAD: tl.constexpr):
    """cos and sin of ``2 pi u h / H`` for the scaled rows ``u`` (``[R_PAD, BLOCK_H]``), zero past
    ``n_rows`` so padded frequencies contribute nothing."""
    j = tl.arange(0, R_PAD)
    u = (u0 + j) % H
    cos, sin = _fourier_filter_sincos((u[:, None] * rows[None, :]) % H, H)
    valid = (j < n_rows)[:, None]
    return tl.where(valid, cos, 0.0), tl.where(valid, sin, 0.0)


@triton.jit
def _fourier_filter_row_block(x_base, rows, cols, H, W, stride_x_h, stride_x_w, u0, n_rows, R_PAD: tl.constexpr):
    """A block of full rows of one plane: its mask, its values in fp32 and its row twiddles."""
    mask = (rows[:, None] < H) & (cols[None, :] < W)
    xt = tl.load(x_base + rows[:, None] * stride_x_h + cols[None, :] * stride_x_w, mask=mask, other=0.0)
    row_cos, row_sin = _fourier_filter_row_twiddles(rows, u0, n_rows, H, R_PAD)
    return xt.to(tl.float32), mask, row_cos, row_sin


@triton.jit
def _fourier_filter_col_twiddles(cols, v, valid, W):
    """cos and sin of ``2 pi v w / W`` for one scaled column ``v`` (``[BLOCK_W]``), zero if not valid."""
    cos, sin = _fourier_filter_sincos((cols * v) % W, W)
    return tl.where(valid, cos, 0.0), tl.where(valid, sin, 0.0)


@triton.jit
def _fourier_filter_analyze(xt, cols, row_cos, row_sin, v0, n_cols, W, coef_re, coef_im,
                            K_PAD: tl.constexpr):
    """Add one tile's share of ``X[u, v]`` to ``(coef_re, coef_im)`` (``[R_PAD, K_PAD]``)."""
    kk = tl.arange(0, K_PAD)[None, :]
    for k in tl.static_range(K_PAD):
        col_cos, col_sin = _fourier_filter_col_twiddles(cols, (v0 + k) % W, k < n_cols, W)
        # Z[h] = sum_w x[h, w] exp(-i beta_w), then X[u] = sum_h exp(-i alpha_u h) Z[h]
        z_re = tl.sum(xt * col_cos[None, :], axis=1)
        z_im = -tl.sum(xt * col_sin[None, :], axis=1)
        x_re = tl.sum(row_cos * z_re[None, :] + row_sin * z_im[None, :], axis=1)
        x_im = tl.sum(row_cos * z_im[None, :] - row_sin * z_re[None, :], axis=1)
        coef_re += tl.where(kk == k, x_re[:, None], 0.0)
        coef_im += tl.where(kk == k, x_im[:, None], 0.0)
    return coef_re, coef_im


@triton.jit
def _fourier_filter_synthesize(cols, row_cos, row_sin, v0, n_cols, W, coef_re, coef_im,
                               BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, K_PAD: tl.constexpr):
    """``Re sum_{u, v} X[u, v] exp(+i (alpha_u h + beta_v w))`` on one tile (``[BLOCK_H, BLOCK_W]``)."""
    kk = tl.arange(0, K_PAD)[None, :]
    corr = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    for k in tl.static_range(K_PAD):
        col_cos, col_sin = _fourier_filter_col_twiddles(cols, (v0 + k) % W, k < n_cols, W)
        c_re = tl.sum(tl.where(kk == k, coef_re, 0.0), axis=1)
        c_im = tl.sum(tl.where(kk == k, coef_im, 0.0), axis=1)
        # U[h] = sum_u X[u] exp(+i alpha_u h), then Re(U[h] exp(+i beta_w))
        u_re = tl.sum(c_re[:, None] * row_cos - c_im[:, None] * row_sin, axis=0)
        u_im = tl.sum(c_re[:, None] * row_sin + c_im[:, None] * row_cos, axis=0)
        corr += u_re[:, None] * col_cos[None, :] - u_im[:, None] * col_sin[None, :]
    return corr


# W is specialised (Triton marks it divisible by 16 when it is, e.g. every SD plane from 16 wide): with
# unit column strides and row strides divisible by 16, the mask cols < W is then constant over 8 (16)
# consecutive lanes and a thread's row segment loads and stores as 16-byte vectors (ld.global.v4.b32)
# instead of 2-byte scalars (ld.global.b16). Sizes that gain nothing from it stay unspecialised.
@triton.jit(do_not_specialize=["C", "H", "u0", "n_rows", "v0", "n_cols"])
def _fourier_filter_fwd_kernel(
    x_ptr,  # (B, C, H, W) input planes, any strides, fp16/bf16/fp32
    y_ptr,  # (B, C, H, W) output planes, same dtype as x, any strides
    C, H, W,
    stride_x_b, stride_x_c, stride_x_h, stride_x_w,
    stride_y_b, stride_y_c, stride_y_h, stride_y_w,
    u0, n_rows,  # scaled frequency rows: u0, u0 + 1, ..., u0 + n_rows - 1 (mod H)
    v0, n_cols,  # scaled frequency columns: v0, ..., v0 + n_cols - 1 (mod W)
    factor,  # (scale - 1) / (H * W), fp32
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    R_PAD: tl.constexpr, K_PAD: tl.constexpr,  # n_rows, n_cols rounded up to powers of two
    ONE_TILE: tl.constexpr,  # the plane fits one tile: load it once
):
    plane = tl.program_id(0)
    b = plane // C
    c = plane % C
    x_base = x_ptr + b.to(tl.int64) * stride_x_b + c.to(tl.int64) * stride_x_c
    y_base = y_ptr + b.to(tl.int64) * stride_y_b + c.to(tl.int64) * stride_y_c
    offs_h = tl.arange(0, BLOCK_H)
    offs_w = tl.arange(0, BLOCK_W)
    coef_re = tl.zeros((R_PAD, K_PAD), dtype=tl.float32)
    coef_im = tl.zeros((R_PAD, K_PAD), dtype=tl.float32)
    if ONE_TILE:
        xt, mask, row_cos, row_sin = _fourier_filter_row_block(x_base, offs_h, offs_w, H, W, stride_x_h, stride_x_w,
                                                               u0, n_rows, R_PAD)
        coef_re, coef_im = _fourier_filter_analyze(xt, offs_w, row_cos, row_sin, v0, n_cols, W, coef_re,
                                                   coef_im, K_PAD)
        corr = _fourier_filter_synthesize(offs_w, row_cos, row_sin, v0, n_cols, W, coef_re, coef_im,
                                          BLOCK_H, BLOCK_W, K_PAD)
        yt = xt + factor * corr
        tl.store(y_base + offs_h[:, None] * stride_y_h + offs_w[None, :] * stride_y_w,
                 yt.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # pass 1: the |R| x |K| coefficients over the whole plane, BLOCK_H full rows at a time
        for h0 in range(0, H, BLOCK_H):
            xt, mask, row_cos, row_sin = _fourier_filter_row_block(x_base, h0 + offs_h, offs_w, H, W, stride_x_h,
                                                                   stride_x_w, u0, n_rows, R_PAD)
            coef_re, coef_im = _fourier_filter_analyze(xt, offs_w, row_cos, row_sin, v0, n_cols, W, coef_re,
                                                       coef_im, K_PAD)
        # pass 2: y = x + (scale - 1) / (H W) * correction (the plane's second read mostly hits L2)
        for h0 in range(0, H, BLOCK_H):
            rows = h0 + offs_h
            xt, mask, row_cos, row_sin = _fourier_filter_row_block(x_base, rows, offs_w, H, W, stride_x_h,
                                                                   stride_x_w, u0, n_rows, R_PAD)
            corr = _fourier_filter_synthesize(offs_w, row_cos, row_sin, v0, n_cols, W, coef_re, coef_im,
                                              BLOCK_H, BLOCK_W, K_PAD)
            yt = xt + factor * corr
            tl.store(y_base + rows[:, None] * stride_y_h + offs_w[None, :] * stride_y_w,
                     yt.to(y_ptr.dtype.element_ty), mask=mask)


def _scaled_frequencies(n: int, threshold: int) -> tuple[int, int]:
    """``(first, count)`` of the scaled frequencies on an axis of length ``n``: the positions that
    ``[n // 2 - threshold : n // 2 + threshold]`` selects in the shifted spectrum, as unshifted
    frequencies ``(p - n // 2) mod n``.  They form the cyclic run ``first, first + 1, ... (mod n)``."""
    positions = range(n)[n // 2 - threshold: n // 2 + threshold]
    if len(positions) == 0:
        return 0, 0
    return (positions.start - n // 2) % n, len(positions)


def _fourier_filter_config(H: int, W: int, r_pad: int, k_pad: int = 1) -> dict:
    """Tile and launch configuration, keyed on the power-of-two buckets of ``H`` and ``W`` and on
    ``r_pad``, the scaled rows rounded up to a power of two (1, 2, 4 or 8).

    A tile always spans the full (padded) width.  Planes up to 2048 padded elements are one tile,
    loaded once; larger ones are walked ``BLOCK_H`` rows at a time in 2048-element tiles
    (1024-element tiles on 4 warps for rows 128 or 1024 wide, where 2048 spilled in fp32).  Either way
    a thread holds about 8 elements of a tile (``_ONE_TILE_PER_THREAD``).  The row twiddles, two ``(r_pad, BLOCK_H)`` arrays, are
    held alongside: on tall narrow planes they outweigh the tile, so the warps grow (and past 16 warps
    the rows per tile shrink) until a thread holds at most 32 twiddles.  Without that a one-tile
    2048x1 plane at ``r_pad = 8`` held 128 per thread and spilled 104 B of stack on sm_80.

    ``k_pad``, the scaled columns rounded up to a power of two (1, 2, 4 or 8; the launcher passes it,
    callers that omit it get the table below 8 column pads), changes two cases at ``k_pad = 8``,
    each of which spilled there (stack bytes, sm_80 / sm_90, before the change):
    1024-element one-tile planes 32 to 128 wide take 8 warps instead of 4 (32x32 on 4 warps: 8 B in bf16 sm_90 at
    ``r_pad`` 2, 8 B in fp16/bf16 sm_80 at ``r_pad`` 8; on 8 warps 102-128 registers, no stack, every
    ``r_pad``, dtype and arch); row blocks hold at most
    ``1024 / r_pad`` rows (256x8 at ``r_pad`` 8: 32 B at 255 registers, every dtype, both archs;
    now 128x8: 145-183 registers, no stack).  The full compile of the table (one dtype per entry)
    then found three more, fixed by a compile of every dtype on both archs: 512-wide row blocks at
    ``k_pad = 8`` run on 16 warps (4x512 on 8 warps: 8 B in fp32 on sm_80 at 80 registers; on 16,
    64-110 registers, no stack, every ``r_pad``); 16-wide row blocks at ``k_pad = r_pad = 8`` hold 64
    rows (128x16: 16 B in fp16/bf16 on sm_90 at 255 registers; 64x16: 112-145, none); 2048-element
    one-tile planes 4 wide run on 16 warps (512x4 on 8: 8 B in fp16/bf16 on sm_90; on 16, 40-69
    registers, none).  The whole static set then found three row blocks spilling in some dtype on one
    arch; ``_ROW_BLOCKS_ON_4_WARPS`` gives them 1,024-element blocks on 4 warps.  FreeU (threshold 1:
    ``r_pad = k_pad = 2``) keeps the configs it had.
    """
    block_w = triton.next_power_of_2(W)
    block_h = triton.next_power_of_2(H)
    twiddle_warps = r_pad * block_h // _TWIDDLE_ROWS_PER_WARP
    wide_pads = k_pad >= 8
    if block_h * block_w <= _ONE_TILE_ELEMENTS and twiddle_warps <= 16:
        tile_warps = block_h * block_w // (32 * _ONE_TILE_PER_THREAD)
        if wide_pads and block_h * block_w == 1024 and block_w in (32, 64, 128):  # 64x16 on 8: 8 B fp32 sm_80
            tile_warps = 8  # 4 tile elements a thread: 4 warps spilled 8 B at 8 column pads (32x32)
        if block_w == 4 and block_h * block_w == 2048:
            tile_warps = 16  # 512x4 on 8 warps: 8 B in fp16/bf16 on sm_90
        return {"BLOCK_H": block_h, "BLOCK_W": block_w, "ONE_TILE": True,
                "num_warps": min(max(tile_warps, twiddle_warps, 1), 16)}
    if block_w in (128, 1024):
        # 2048-element row blocks on 8 warps spilled in fp32 at K_PAD 8: 2x1024 at R_PAD 4, 16 B on sm_80;
        # 16x128 at R_PAD 8, 24 B on sm_90. 1024-element blocks on 4 warps compile with none.
        return {"BLOCK_H": 1024 // block_w, "BLOCK_W": block_w, "ONE_TILE": False, "num_warps": 4}
    rows = min(max(1, _TILE_ELEMENTS // block_w), (2 if wide_pads else 8) * _TWIDDLE_ROWS_PER_WARP // r_pad)
    if wide_pads and r_pad == 8 and block_w == 16:
        rows = 64  # 128x16: 16 B in fp16/bf16 on sm_90
    # 4x512 on 8 warps: 8 B in fp32 on sm_80 at 8 column pads
    warps = 16 if wide_pads and block_w == 512 else 8
    if (r_pad, k_pad, block_w) in _ROW_BLOCKS_ON_4_WARPS:
        rows, warps = _ROW_BLOCKS_ON_4_WARPS[(r_pad, k_pad, block_w)], 4
    return {"BLOCK_H": rows, "BLOCK_W": block_w, "ONE_TILE": False, "num_warps": warps}


#: (r_pad, k_pad, block_w) -> rows of the row blocks that run on 4 warps.  The whole static set (every
#: dtype, both archs) found these row blocks spilling on 8 warps, and 16 warps did not serve both archs:
#: 64x32 at 8 row and column pads (48 B in fp16/bf16 on sm_80; 16 warps: 24 B on sm_90), 32x64 at 4
#: (8 B in fp32 on sm_80), 8x256 at 4 (16 B in fp32 on sm_90).  As 1,024-element blocks on 4 warps
#: (32x32, 16x64, 4x256; 8 elements a thread): 64-194 registers and no stack in every dtype on both
#: archs; per row about as many warp-instructions as before, except 4x256 (fp32 10% more, fp16/bf16
#: 40% more; 8x256 on 4 warps holds 16 elements a thread).
_ROW_BLOCKS_ON_4_WARPS = {(8, 8, 32): 32, (4, 4, 64): 16, (4, 4, 256): 4,
                          # no input reaches a row pad of 1 on a block taller than one row; the opt-in
                          # compile of every table entry found 64x32 at 1 x 8 spilling 32 B in fp16/bf16
                          # on sm_90 (8 warps); 32x32 on 4: 72-188 registers, no stack, every dtype, both archs
                          (1, 8, 32): 32}


def _check_inputs(x, threshold, scale) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (B, C, H, W); got {x.dim()}-D with shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must have a floating dtype (float16, bfloat16, float32, float64); got {x.dtype}")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Integral):
        raise TypeError(f"threshold must be an int; got {type(threshold).__name__}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0; got {threshold}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number (int or float); got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite; got {scale}")


def _fourier_filter_fwd(x: torch.Tensor, threshold: int, scale: float, out: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """Launch the kernel on ``x`` (fp16/bf16/fp32, ``(B, C, H, W)``); returns ``out``, by default a new
    tensor like ``x`` (tests pass a poisoned one to check every element is written)."""
    B, C, H, W = x.shape
    y = torch.empty_like(x) if out is None else out
    if x.numel() == 0:
        return y
    u0, n_rows = _scaled_frequencies(H, threshold)
    v0, n_cols = _scaled_frequencies(W, threshold)
    if n_rows == 0 or n_cols == 0:
        return y.copy_(x)
    for name, t in (("x", x), ("output", y)):
        extent = (H - 1) * abs(t.stride(2)) + (W - 1) * abs(t.stride(3))
        if extent >= 2**31:
            raise ValueError(f"{name} planes must span < 2**31 elements; got {extent + 1}")
    r_pad, k_pad = triton.next_power_of_2(n_rows), triton.next_power_of_2(n_cols)
    cfg = _fourier_filter_config(H, W, r_pad, k_pad)
    num_warps = cfg.pop("num_warps")
    _fourier_filter_fwd_kernel[(B * C,)](
        x, y, C, H, W,
        *x.stride(), *y.stride(),
        u0, n_rows, v0, n_cols, (scale - 1.0) / (H * W),
        R_PAD=r_pad, K_PAD=k_pad, num_warps=num_warps, num_stages=1, **cfg,
    )
    record_launch("_fourier_filter_fwd_kernel")
    return y


def _twiddles(n: int, first: int, count: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``2 pi f i / n`` for the ``count`` frequencies ``f`` from ``first``: ``(count, n)``."""
    freqs = (first + torch.arange(count, dtype=torch.int64)) % n
    phase = torch.outer(freqs, torch.arange(n, dtype=torch.int64)) % n
    angle = phase.to(torch.float64) * (2 * math.pi / n)
    return torch.cos(angle).to(dtype=dtype, device=device), torch.sin(angle).to(dtype=dtype, device=device)


def fourier_filter_reference(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """The filter in plain torch, with the same direct DFT as the kernel done by small matmuls.

    ``x``: ``(B, C, H, W)``, any floating dtype.  Computes in fp32 (float64 for float64 input) and
    returns the input's dtype.  Differentiable.
    """
    _check_inputs(x, threshold, scale)
    B, C, H, W = x.shape
    u0, n_rows = _scaled_frequencies(H, threshold)
    v0, n_cols = _scaled_frequencies(W, threshold)
    if n_rows == 0 or n_cols == 0 or x.numel() == 0:
        return x.clone()
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    row_cos, row_sin = _twiddles(H, u0, n_rows, compute, x.device)  # (|R|, H)
    col_cos, col_sin = _twiddles(W, v0, n_cols, compute, x.device)  # (|K|, W)
    col_basis = torch.cat([col_cos, -col_sin]).t()  # (W, 2|K|): exp(-i beta) split into re | im
    rows_fwd = torch.complex(row_cos, -row_sin)  # (|R|, H): exp(-i alpha)

    x2 = x.to(compute).reshape(B * C * H, W)
    z = (x2 @ col_basis).view(B * C, H, 2 * n_cols)  # per-row partial DFT along W
    z = torch.complex(z[..., :n_cols], z[..., n_cols:])  # (BC, H, |K|)
    coefs = rows_fwd @ z  # (BC, |R|, |K|): X[u, v]
    back = rows_fwd.conj().t() @ coefs  # (BC, H, |K|): sum_u X[u, v] exp(+i alpha_u h)
    back = torch.cat([back.real, back.imag], dim=-1).reshape(B * C * H, 2 * n_cols)
    # Re(U exp(+i beta)) = U_re cos - U_im sin = [U_re | U_im] @ [cos ; -sin], i.e. col_basis^T
    y = torch.addmm(x2, back, col_basis.t(), alpha=(scale - 1.0) / (H * W))
    return y.view(B, C, H, W).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Custom op, autograd, public function
# ----------------------------------------------------------------------------------------------


def _kernel_limit(x: torch.Tensor, threshold: int) -> tuple[str, str] | None:
    """``None`` when the kernel takes ``x`` and ``threshold``, else the limit it exceeds and this call's
    values (see the module docstring's limits)."""
    H, W = x.shape[2], x.shape[3]
    if x.dtype not in _KERNEL_DTYPES:
        return f"{x.dtype} inputs", f"it takes {', '.join(map(str, _KERNEL_DTYPES))}"
    n_freqs = max(_scaled_frequencies(H, threshold)[1], _scaled_frequencies(W, threshold)[1])
    if n_freqs > _MAX_FREQS:
        return (f"more than {_MAX_FREQS} scaled frequencies per axis",
                f"threshold {threshold} on a {H}x{W} plane scales {n_freqs}")
    if max(H, W) > _MAX_SIDE:
        return f"planes over {_MAX_SIDE} on a side", f"got {H}x{W}"
    return None


def _fourier_filter_op(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """The filtered ``x``, laid out as ``torch.empty_like(x)`` on every path (as the fake promises): the
    kernel where it applies and the backend says Triton, else the reference (warned under "triton")."""
    limit = _kernel_limit(x, threshold)
    if limit is None and use_triton(x):
        return _fourier_filter_fwd(x, threshold, scale)
    if limit is not None and get_backend() == "triton":
        warn_fallback("fourier_filter", *limit)
    y = fourier_filter_reference(x, threshold, scale)
    if y.stride() == torch.empty_like(x, device="meta").stride():
        return y
    return torch.empty_like(x).copy_(y)  # the reference computes in (B*C*H, W) rows


def _fourier_filter_fake(x, threshold, scale):
    return torch.empty_like(x)


def _fourier_filter_setup_context(ctx, inputs, output):
    _, ctx.threshold, ctx.scale = inputs


def _fourier_filter_backward(ctx, grad):
    # self-adjoint: the gradient goes through the same filter (itself differentiable again)
    return torch.ops.fastunet.fourier_filter(grad, ctx.threshold, ctx.scale), None, None


def _register_ops() -> None:
    op = torch.library.custom_op("fastunet::fourier_filter", _fourier_filter_op, mutates_args=(),
                                 schema="(Tensor x, int threshold, float scale) -> Tensor")
    op.register_fake(_fourier_filter_fake)
    op.register_autograd(_fourier_filter_backward, setup_context=_fourier_filter_setup_context)


register_once(__name__, "fastunet::fourier_filter", _register_ops)


def fourier_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """FreeU's Fourier filter: scale the centred ``2 * threshold`` square of each plane's spectrum.

    Args:
        x: ``(B, C, H, W)`` float16, bfloat16, float32 or float64, any strides.  Not modified.
        threshold: int ``>= 0``; half the side of the scaled square (0 returns a copy of ``x``).
        scale: real number the scaled frequencies are multiplied by.

    Returns:
        A new ``(B, C, H, W)`` tensor in ``x``'s dtype, laid out like ``torch.empty_like(x)``.  Equals
        ``diffusers.utils.torch_utils.fourier_filter`` on every plane size; computed in fp32 whatever
        the input dtype (float64 in float64).  Differentiable with respect to ``x`` (twice, too).  A
        ``torch.library`` custom op (``fastunet::fourier_filter``, with a fake implementation and
        autograd), so ``torch.compile(fullgraph=True)`` traces through it.

    The Triton kernel takes float16/bfloat16/float32 planes up to 2048 on a side with at most 8 scaled
    frequencies per axis (every plane at ``threshold <= 4``).  Other inputs run
    :func:`fourier_filter_reference`; under backend ``"triton"`` the first such call per limit warns
    (``KernelFallbackWarning``), under ``"auto"`` none does.
    """
    _check_inputs(x, threshold, scale)
    return torch.ops.fastunet.fourier_filter(x, int(threshold), float(scale))
