"""Memory traffic of the Triton kernels, measured under Triton's interpreter (issue 13).

``traffic.count_traffic`` counts the bytes each launch loads and stores (active lanes times element
size), per kernel argument. Each op is compared with its minimum, every input read once and every
output written once; the big tensors' passes are asserted as exact counts (a change that adds a pass
fails them, and so does one that removes a pass without updating the figures here), and the small
buffers (affine vectors, statistics, partial sums) as at most two touches of each
(written once, read once). Run with ``-s`` to print the measured table.

Figures are what the kernels ask for, one load per lane: no cache is modelled, so a second read that
would hit L2 on a GPU still counts. That is the point: the counts are passes over memory.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import fastunet
from fastunet.kernels import attention, fourier_filter, group_norm_act
from fastunet.kernels._backend import interpreter_enabled

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from traffic import count_traffic  # noqa: E402, tests/ops/traffic.py (pytest puts tests/ops on sys.path)

pytestmark = pytest.mark.skipif(not interpreter_enabled(), reason="counts loads/stores in Triton's interpreter")

att = importlib.import_module("fastunet.kernels.attention")
ff = importlib.import_module("fastunet.kernels.fourier_filter")
group_norm_act_module = importlib.import_module("fastunet.kernels.group_norm_act")

GN_BIG_FWD = {"x_ptr", "y_ptr"}
GN_BIG_BWD = {"x_ptr", "dy_ptr", "dx_ptr"}
# Eager baseline (F.group_norm then F.silu), counted by hand: aten's GroupNorm reads x for the
# statistics, reads it again to normalise and writes its output (3x), SiLU reads that and writes y (2x).
EAGER_GN_SILU_FWD = 5


def report(name: str, measured: float, minimum: float, note: str = "") -> None:
    print(f"\n[traffic] {name}: {measured:.3f}x of the tensor size, minimum {minimum:g}x {note}".rstrip())


def big_and_small(counter, big: set[str]) -> tuple[int, dict[tuple[str, str], list[int]]]:
    """Bytes moved for the big-tensor arguments, and per (kernel, small argument) [bytes moved, its size]."""
    big_bytes = 0
    small: dict[tuple[str, str], list[int]] = {}
    for launch in counter.launches:
        for counts in (launch.loads, launch.stores):
            for name, n in counts.items():
                assert name != "?", f"{launch.kernel} touched memory outside its arguments"
                if name in big:
                    big_bytes += n
                else:
                    entry = small.setdefault((launch.kernel, name), [0, launch.args[name][2]])
                    entry[0] += n
    return big_bytes, small


@triton.jit
def _masked_copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    first = tl.load(x_ptr)  # an unmasked scalar load: one element per program
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + first, mask=offs < n)


def test_counter_counts_active_lanes_per_argument():
    """The counter itself: only mask-true lanes count, at the pointee's size, under the argument whose
    memory they address; and nothing is counted once the block is left."""
    x = torch.randn(50, dtype=torch.float16)
    y = torch.empty_like(x)
    with count_traffic() as c:
        _masked_copy_kernel[(2,)](x, y, 50, BLOCK=32)
    assert c.kernels() == ["_masked_copy_kernel"] and c.programs("_masked_copy_kernel") == 2
    assert c.loaded(arg="x_ptr") == (50 + 2) * 2 and c.stored(arg="y_ptr") == 50 * 2, c.table()
    assert c.loaded(arg="y_ptr") == 0 and c.stored(arg="x_ptr") == 0 and c.total() == 204
    torch.testing.assert_close(y, x + x[0])
    _masked_copy_kernel[(2,)](x, y, 50, BLOCK=32)
    assert c.total() == 204 and len(c.launches) == 1


GN_CASES = [  # (shape, groups, dtype, with add/scale/shift)
    ((2, 64, 16, 16), 32, torch.float32, False),  # SD's 32 groups, scaled down: one pass (2 x 256 a group)
    ((1, 128, 8, 8), 32, torch.float16, True),  # resnet norm1 with the time embedding, half precision: one pass
    ((1, 40, 7, 9), 4, torch.float32, True),  # odd: 10 channels x 63 positions a group, one pass
    ((1, 64, 32, 32), 4, torch.float32, False),  # few groups (16 x 1024): two kernels, each group split
    ((1, 32, 4, 8, 8), 8, torch.float32, False),  # video (B, C, F, H, W): one pass
]


@pytest.mark.parametrize("shape,groups,dtype,modulated", GN_CASES, ids=lambda v: str(v))
def test_group_norm_silu_traffic(shape, groups, dtype, modulated):
    B, C = shape[:2]
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    weight = torch.randn(C, dtype=dtype, requires_grad=True)
    bias = torch.randn(C, dtype=dtype, requires_grad=True)
    extra = {}
    if modulated:
        extra = {k: (torch.randn(B, C, dtype=dtype) * 0.1).requires_grad_() for k in ("add", "scale", "shift")}
    size = x.numel() * x.element_size()
    one_pass = group_norm_act_module._group_norm_act_one_pass_config(C // groups, math.prod(shape[2:])) is not None
    with fastunet.use_backend("triton"):
        with count_traffic() as fwd:
            y = group_norm_act(x, groups, weight, bias, activation="silu", **extra)
        dy = torch.randn_like(y)
        with count_traffic() as bwd:
            y.backward(dy)
    if one_pass:  # a group fits one program's registers: the fwd and dx kernels alone, one pass each
        assert fwd.kernels() == ["_group_norm_act_fwd_kernel"]
        assert bwd.kernels() == ["_group_norm_act_bwd_dx_kernel"]
    else:
        assert fwd.kernels() == ["_group_norm_act_stats_kernel", "_group_norm_act_fwd_kernel"]
        assert bwd.kernels() == ["_group_norm_act_bwd_reduce_kernel", "_group_norm_act_bwd_dx_kernel"]

    # Forward: one pass reads x once and writes y once, 2x (the minimum; eager GroupNorm + SiLU: 5x);
    # two kernels read x twice (statistics, then normalise), 3x. Besides, every program reads its
    # group's first element once more, the statistics' pivot: exactly one element per program.
    reads = 1 if one_pass else 2
    big, small = big_and_small(fwd, GN_BIG_FWD)
    pivots = sum(fwd.programs(kernel) for kernel in fwd.kernels()) * x.element_size()
    assert fwd.loaded(arg="x_ptr") == reads * size + pivots, fwd.table()
    assert fwd.stored(arg="y_ptr") == size, fwd.table()
    assert big == (reads + 1) * size + pivots, fwd.table()
    for (kernel, name), (moved, nbytes) in small.items():
        assert moved <= 2 * nbytes, f"{kernel} moved {moved} B of {name} ({nbytes} B)\n{fwd.table()}"
    report(f"group_norm_act silu fwd {tuple(shape)} G={groups} {dtype} mod={modulated}", fwd.total() / size, 2,
           f"(x,y only {big / size:.3f}x; eager GroupNorm+SiLU {EAGER_GN_SILU_FWD}x)")

    # Backward: one pass reads x and dy once and writes dx once, 3x (the minimum). Two kernels:
    # _bwd_reduce reads x and dy, _bwd_dx reads both again (in reverse program order, so on a GPU it
    # starts on what the first left in L2) and writes dx: 5x counted here.
    big, small = big_and_small(bwd, GN_BIG_BWD)
    assert bwd.loaded(arg="x_ptr") == reads * size and bwd.loaded(arg="dy_ptr") == reads * size, bwd.table()
    assert bwd.stored(arg="dx_ptr") == size, bwd.table()
    assert big == (2 * reads + 1) * size, bwd.table()
    for (kernel, name), (moved, nbytes) in small.items():
        assert moved <= 2 * nbytes, f"{kernel} moved {moved} B of {name} ({nbytes} B)\n{bwd.table()}"
    report(f"group_norm_act silu bwd {tuple(shape)} G={groups} {dtype} mod={modulated}", bwd.total() / size, 3,
           f"(x,dy,dx only {big / size:.3f}x; one pass: {one_pass})")


FF_CASES = [  # (shape, dtype): one-tile planes read x once; larger planes twice (two passes)
    ((1, 4, 32, 32), torch.float32),
    ((2, 2, 16, 24), torch.float16),
    ((1, 1, 64, 96), torch.float16),  # 64 x 128 padded > 4096 elements: two passes over the plane
]


@pytest.mark.parametrize("shape,dtype", FF_CASES, ids=lambda v: str(v))
def test_fourier_filter_traffic(shape, dtype):
    x = torch.randn(shape, dtype=dtype)
    size = x.numel() * x.element_size()
    H, W = shape[2:]
    r_pad = 1 << (ff._scaled_frequencies(H, 1)[1] - 1).bit_length()
    one_tile = ff._fourier_filter_config(H, W, r_pad)["ONE_TILE"]
    with fastunet.use_backend("triton"), count_traffic() as c:
        fourier_filter(x, 1, 0.9)
    assert c.kernels() == ["_fourier_filter_fwd_kernel"]
    reads = 1 if one_tile else 2
    assert c.loaded(arg="x_ptr") == reads * size, c.table()
    assert c.stored(arg="y_ptr") == size, c.table()
    assert c.total() == (reads + 1) * size, c.table()
    report(f"fourier_filter {tuple(shape)} {dtype} one_tile={one_tile}", c.total() / size, 2)


ATT_CASES = [  # (B, H, N, M, D, dtype)
    (1, 2, 100, 48, 64, torch.float32),  # N not a multiple of the query tile
    (1, 1, 200, 64, 40, torch.float16),  # half precision: 128-query tiles; D padded to 64
    (2, 2, 16, 16, 64, torch.float32),  # short sequences: one tile per sequence
]


@pytest.mark.parametrize("B,H,N,M,D,dtype", ATT_CASES, ids=lambda v: str(v))
def test_attention_traffic(B, H, N, M, D, dtype):
    q = torch.randn(B, H, N, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H, M, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, M, D, dtype=dtype, requires_grad=True)
    item = q.element_size()
    q_size, kv_size = q.numel() * item, (k.numel() + v.numel()) * item
    with fastunet.use_backend("triton"):
        with count_traffic() as fwd:
            out = attention(q, k, v)
        with count_traffic() as bwd:
            out.backward(torch.randn_like(out))
    block_d = att._block_d(D)

    def kv_loaded(counter, kernel):
        return counter.loaded(kernel, "k_ptr") + counter.loaded(kernel, "v_ptr")

    if att._attention_short_config(block_d, N, M, dtype) is not None:
        assert fwd.kernels() == ["_attention_short_fwd_kernel"]
        assert kv_loaded(fwd, "_attention_short_fwd_kernel") == kv_size, fwd.table()
        assert fwd.loaded(arg="q_ptr") == q_size and fwd.stored(arg="out_ptr") == q_size, fwd.table()
        report(f"attention short fwd B{B} H{H} N{N} M{M} D{D} {dtype} K/V", kv_loaded(fwd, None) / kv_size, 1)
        assert bwd.kernels() == ["_attention_short_bwd_kernel"]
        assert kv_loaded(bwd, None) == kv_size, bwd.table()
        report(f"attention short bwd B{B} H{H} N{N} M{M} D{D} {dtype} K/V", kv_loaded(bwd, None) / kv_size, 1)
        return

    # Forward: each program owns BLOCK_M queries and streams all of its (batch, head)'s keys, so K and V
    # are read once per query tile, ceil(N / BLOCK_M) times; q is read and out written once.
    fwd_tiles = math.ceil(N / att._attention_fwd_config(block_d, dtype).block_m)
    assert fwd.kernels() == ["_attention_fwd_kernel"]
    assert kv_loaded(fwd, "_attention_fwd_kernel") == fwd_tiles * kv_size, fwd.table()
    assert fwd.loaded(arg="q_ptr") == q_size and fwd.stored(arg="out_ptr") == q_size, fwd.table()
    report(f"attention fwd B{B} H{H} N{N} M{M} D{D} {dtype} K/V", kv_loaded(fwd, None) / kv_size, 1,
           f"(= ceil(N/BLOCK_M) = {fwd_tiles}; whole call {fwd.total() / (2 * q_size + kv_size):.3f}x of "
           "its minimum, q+k+v read and out written once)")

    # Backward: dK/dV programs read their key tile once and stream the queries (q, dO re-read once per
    # key tile); dQ programs read their query tile once and stream K, V once per query tile.
    dkdv, dq = att._attention_bwd_dkdv_config(block_d, dtype), att._attention_bwd_dq_config(block_d, dtype)
    assert bwd.kernels() == ["_attention_bwd_preprocess_kernel", "_attention_bwd_dkdv_kernel",
                             "_attention_bwd_dq_kernel"]
    dq_tiles, key_tiles = math.ceil(N / dq.block_m), math.ceil(M / dkdv.block_n)
    assert kv_loaded(bwd, "_attention_bwd_dkdv_kernel") == kv_size, bwd.table()
    assert kv_loaded(bwd, "_attention_bwd_dq_kernel") == dq_tiles * kv_size, bwd.table()
    assert bwd.loaded("_attention_bwd_dkdv_kernel", "q_ptr") == key_tiles * q_size, bwd.table()
    assert bwd.loaded("_attention_bwd_dq_kernel", "q_ptr") == q_size, bwd.table()
    assert bwd.stored(arg="dq_ptr") == q_size, bwd.table()
    assert bwd.stored(arg="dk_ptr") + bwd.stored(arg="dv_ptr") == kv_size, bwd.table()
    report(f"attention bwd B{B} H{H} N{N} M{M} D{D} {dtype} K/V", kv_loaded(bwd, None) / kv_size, 1,
           f"(= 1 + ceil(N/BLOCK_M_dq) = 1 + {dq_tiles}; q re-read ceil(M/BLOCK_N_dkdv) = {key_tiles} in dK/dV; "
           f"whole call {bwd.total() / (4 * q_size + 2 * kv_size):.3f}x of its minimum, q, k, v, out, dO "
           "read and dq, dk, dv written once)")
