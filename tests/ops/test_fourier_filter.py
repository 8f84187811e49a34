"""fastunet.kernels.fourier_filter against a float64 FFT oracle and diffusers' own filter.

The Triton kernel runs on CPU tensors through Triton's interpreter (backend "triton"); the torch path
is the direct-DFT reference (backend "torch").  Its configs are also compiled for sm_80 and sm_90.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
from diffusers.utils.torch_utils import fourier_filter as diffusers_fourier_filter
from gpu_compile import check_fits, compile_cases  # tests/ is on sys.path (rootdir conftest)

import fastunet
from fastunet.kernels import fourier_filter, fourier_filter_reference, launch_counts
from fastunet.kernels._backend import KernelFallbackWarning, fallbacks_warned
from fastunet.testing import check_against_oracle

# the package attribute `fourier_filter` is the function; the module itself lives in sys.modules
ff_module = sys.modules["fastunet.kernels.fourier_filter"]

KERNEL = "_fourier_filter_fwd_kernel"
BACKENDS = ("triton", "torch")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SIZES = ((1, 1), (2, 5), (3, 3), (15, 9), (64, 64), (96, 96))
# Tolerance: twice diffusers' own error in the same dtype plus a floor: 2e-6 in fp32, half a unit in
# the last place at the output's largest magnitude in fp16/bf16 (Triton's interpreter rounds fp32 ->
# bf16 toward zero, GPUs to nearest, so under the interpreter bf16 results may be one ulp off).
HALF_ULP = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def tolerance_floor(dtype: torch.dtype, exact: torch.Tensor) -> float:
    return 2e-6 if dtype == torch.float32 else HALF_ULP[dtype] * exact.abs().max().item()


def fft_oracle(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """FreeU's filter in float64 through the FFT, written from its definition (the test oracle)."""
    x = x.double()
    H, W = x.shape[-2:]
    spectrum = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
    mask = torch.ones(H, W, dtype=torch.float64)
    mask[H // 2 - threshold: H // 2 + threshold, W // 2 - threshold: W // 2 + threshold] = scale
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum * mask, dim=(-2, -1))).real


def run(backend: str, x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    launch_counts[KERNEL] = 0
    with fastunet.use_backend(backend):
        y = fourier_filter(x, threshold, scale)
    return y


def assert_kernel_ran(backend: str) -> None:
    if backend == "triton":
        assert launch_counts[KERNEL] > 0, "the Triton kernel did not run"
    else:
        assert launch_counts[KERNEL] == 0, "the torch path launched the Triton kernel"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threshold", (1, 2))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_fft_oracle(size, threshold, dtype, backend):
    H, W = size
    planes = (2, 3) if H * W < 1024 else (1, 2)  # the interpreter's time grows with the planes
    x = (torch.randn(*planes, H, W) * 2 + 0.5).to(dtype)
    scale = 0.6 + 0.3 * torch.rand(()).item()
    x_before = x.clone()
    y = run(backend, x, threshold, scale)
    assert_kernel_ran(backend)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(x, x_before), "the input was modified"
    exact = fft_oracle(x, threshold, scale)
    check_against_oracle(y, exact, diffusers_fourier_filter(x, threshold, scale), floor=tolerance_floor(dtype, exact))
    if dtype == torch.float32:
        torch.testing.assert_close(y, diffusers_fourier_filter(x, threshold, scale), rtol=0, atol=4e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_small_plane_and_threshold(backend):
    """Python's slice rules on tiny planes (negative starts wrap, ends clamp), exhaustively."""
    sides, thresholds = ((1, 2, 3, 4, 5, 6), range(5)) if backend == "torch" else ((1, 2, 3, 5), range(1, 4))
    for H in sides:
        for W in sides:
            x = torch.randn(1, 2, H, W)
            for threshold in thresholds:
                y = run(backend, x, threshold, 0.7)
                torch.testing.assert_close(y.double(), fft_oracle(x, threshold, 0.7), rtol=0, atol=2e-6,
                                           msg=lambda m: f"H={H} W={W} threshold={threshold}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_zero_copies_and_wide_threshold(backend):
    x = torch.randn(2, 3, 8, 8)
    y = run(backend, x, 0, 0.5)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    # a square covering the whole spectrum scales everything; past 8 frequencies per axis the
    # reference runs (under "triton" with a KernelFallbackWarning, see test_fallback_warns_once)
    torch.testing.assert_close(run(backend, x, 4, 0.5), 0.5 * x, rtol=0, atol=2e-6)
    assert_kernel_ran(backend)
    x = torch.randn(1, 2, 20, 18)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KernelFallbackWarning)
        torch.testing.assert_close(run(backend, x, 50, 0.5), 0.5 * x, rtol=0, atol=2e-6)
    assert launch_counts[KERNEL] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_input_and_int_scale(backend):
    base = torch.randn(2, 17, 12, 4)
    x = base.permute(0, 3, 1, 2)[:, :, ::2, :]  # (2, 4, 9, 12), no unit stride anywhere but w
    x = x.contiguous(memory_format=torch.channels_last)[:, 1:3]
    y = run(backend, x, 1, 2)
    assert_kernel_ran(backend)
    torch.testing.assert_close(y.double(), fft_oracle(x, 1, 2.0), rtol=0, atol=4e-6)


def test_kernel_writes_every_element():
    """Poison the output before the kernel writes it, on one-tile and multi-tile planes."""
    for size in ((5, 7), (64, 64), (65, 40), (96, 96)):
        x = torch.randn(1, 2, *size)
        y = ff_module._fourier_filter_fwd(x, 1, 0.8, out=torch.full_like(x, float("nan")))
        assert not y.isnan().any(), f"{size}: elements left unwritten"
        torch.testing.assert_close(y.double(), fft_oracle(x, 1, 0.8), rtol=0, atol=4e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", ((15, 9), (40, 72)), ids=lambda s: f"{s[0]}x{s[1]}")
def test_gradient_matches_float64(size, backend):
    """One-tile and row-block planes; the filter is self-adjoint, so the backward reruns it."""
    x = torch.randn(2, 3, *size, requires_grad=True)
    grad_out = torch.randn(2, 3, *size)
    launch_counts[KERNEL] = 0
    with fastunet.use_backend(backend):
        (gx,) = torch.autograd.grad(fourier_filter(x, 2, 0.7), x, grad_out)
    if backend == "triton":
        assert launch_counts[KERNEL] == 2, "forward and backward should both run the kernel"
    x64 = x.detach().double().requires_grad_()
    (gx64,) = torch.autograd.grad(fft_oracle(x64, 2, 0.7), x64, grad_out.double())
    torch.testing.assert_close(gx.double(), gx64, rtol=0, atol=4e-6)


def test_torch_path_gradcheck_float64():
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fourier_filter_reference(t, 1, 0.3), (x,))
    assert torch.autograd.gradgradcheck(lambda t: fourier_filter_reference(t, 1, 0.3), (x,))


def test_float64_runs_the_reference_on_every_backend():
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    fallbacks_warned.clear()
    with pytest.warns(KernelFallbackWarning, match="torch.float64 inputs"):
        y = run("triton", x, 1, 0.4)
    assert y.dtype == torch.float64 and launch_counts[KERNEL] == 0
    torch.testing.assert_close(y, fft_oracle(x, 1, 0.4), rtol=0, atol=1e-12)


# (input, threshold, the limit named in the warning): each beyond the kernel in one way
BEYOND_KERNEL = [
    (lambda: torch.randn(1, 2, 7, 6, dtype=torch.float64), 1, "torch.float64 inputs"),
    (lambda: torch.randn(1, 2, 20, 18), 5, "more than 8 scaled frequencies per axis"),
    (lambda: torch.randn(1, 1, 2049, 3), 1, "planes over 2048 on a side"),
]


@pytest.mark.parametrize("make, threshold, limit", BEYOND_KERNEL, ids=("float64", "threshold-5", "side-2049"))
def test_fallback_warns_once_under_triton_and_never_under_auto(make, threshold, limit):
    """No silent fallback under "triton": the reference runs with one KernelFallbackWarning per limit;
    "auto" and "torch" fall back without a word."""
    x = make()
    fallbacks_warned.clear()
    with pytest.warns(KernelFallbackWarning, match=f"does not take {limit}") as record:
        y = run("triton", x, threshold, 0.6)
        run("triton", x, threshold, 0.6)  # the second call is silent
    assert len([w for w in record if issubclass(w.category, KernelFallbackWarning)]) == 1
    assert launch_counts[KERNEL] == 0
    torch.testing.assert_close(y.double(), fft_oracle(x, threshold, 0.6), rtol=0, atol=4e-6)
    fallbacks_warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        for backend in ("auto", "torch"):
            run(backend, x, threshold, 0.6)


def test_kernel_takes_threshold_4_and_any_threshold_on_small_planes():
    """The limit is 8 frequencies per axis, not the threshold: threshold 4 anywhere, and any threshold
    on planes of at most 8 a side, run the kernel without a warning."""
    fallbacks_warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        for size, threshold in (((33, 20), 4), ((8, 5), 9), ((1100, 1), 4)):  # the last: 512-row blocks
            x = torch.randn(1, 2, *size)
            y = run("triton", x, threshold, 0.3)
            assert_kernel_ran("triton")
            torch.testing.assert_close(y.double(), fft_oracle(x, threshold, 0.3), rtol=0, atol=4e-6)


def test_auto_backend_on_cpu_uses_torch():
    x = torch.randn(1, 2, 8, 8)
    run("auto", x, 1, 0.5)
    assert launch_counts[KERNEL] == 0


def _freeu_skip(x: torch.Tensor) -> torch.Tensor:
    """The filter between other ops, as in FreeU's skip path, so a compiler has something to fuse."""
    return fourier_filter(x * 1.5 + 0.25, 1, 0.7).sin()


@pytest.mark.parametrize("compiler, backend", [("aot_eager", "triton"), ("aot_eager", "torch"), ("inductor", "torch")])
def test_torch_compile_fullgraph(compiler, backend):
    """torch.compile(fullgraph=True) traces the custom op, forward and backward, with inductor (C++ on
    the CPU) and aot_eager; both agree with eager, on a contiguous and on a channels_last input."""
    torch._dynamo.reset()
    compiled_fn = torch.compile(_freeu_skip, fullgraph=True, backend=compiler)
    for x in (torch.randn(2, 3, 12, 10), torch.randn(2, 4, 9, 8).contiguous(memory_format=torch.channels_last)):
        grad_out = torch.randn(x.shape)
        results = []
        for fn in (_freeu_skip, compiled_fn):
            leaf = x.clone().requires_grad_()
            launch_counts[KERNEL] = 0
            with fastunet.use_backend(backend):
                y = fn(leaf)
                (gx,) = torch.autograd.grad(y, leaf, grad_out)
            assert_kernel_ran(backend)
            results.append((y, gx))
        (y_eager, gx_eager), (y_compiled, gx_compiled) = results
        torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx_compiled, gx_eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_op_registration(backend):
    """Schema, fake tensor (output layout included) and autograd registration as torch.library checks
    them, and a double backward through the registered autograd."""
    op = torch.ops.fastunet.fourier_filter.default
    with fastunet.use_backend(backend):
        for x in (torch.randn(1, 2, 7, 6), torch.randn(1, 2, 6, 5).contiguous(memory_format=torch.channels_last)):
            torch.library.opcheck(op, (x.requires_grad_(), 1, 0.4))
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: fourier_filter(t, 1, 0.3), (x,))


@pytest.mark.parametrize("fn", (fourier_filter, fourier_filter_reference), ids=("public", "reference"))
def test_bad_inputs(fn):
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn(x.numpy(), 1, 0.5)
    with pytest.raises(ValueError, match="4-D"):
        fn(x[0], 1, 0.5)
    with pytest.raises(TypeError, match="floating dtype"):
        fn(x.to(torch.int32), 1, 0.5)
    with pytest.raises(TypeError, match="threshold must be an int"):
        fn(x, 1.0, 0.5)
    with pytest.raises(TypeError, match="threshold must be an int"):
        fn(x, True, 0.5)
    with pytest.raises(ValueError, match=">= 0; got -1"):
        fn(x, -1, 0.5)
    with pytest.raises(TypeError, match="scale must be a real number"):
        fn(x, 1, "0.5")
    with pytest.raises(ValueError, match="finite"):
        fn(x, 1, float("nan"))


def launcher_configs() -> dict[tuple, int]:
    """Every config the launcher can select, from its config table, mapped to the largest column pad it
    can run with (the static report's :func:`fastunet.static_report.fourier_config_space`).  Registers
    only grow with the pads, so that one compile per config is its worst case."""
    from fastunet import static_report

    return static_report.fourier_config_space()


def thread_load(key: tuple) -> tuple[float, float]:
    """(tile elements, row twiddles) a thread holds in config ``key``."""
    block_h, block_w, _, num_warps, r_pad = key
    threads = 32 * num_warps
    return block_h * block_w / threads, 2 * r_pad * block_h / threads


def _compile_case(key: tuple, k_pad: int, dtype: str, cc: int) -> dict:
    block_h, block_w, one_tile, num_warps, r_pad = key
    signature = {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}"}
    signature.update({name: "i32" for name in ("C", "H", "W", "stride_x_b", "stride_x_c", "stride_x_h")})
    signature["stride_x_w"] = "constexpr"
    signature.update({name: "i32" for name in ("stride_y_b", "stride_y_c", "stride_y_h")})
    signature["stride_y_w"] = "constexpr"
    signature.update({name: "i32" for name in ("u0", "n_rows", "v0", "n_cols")})
    signature["factor"] = "fp32"
    signature.update({name: "constexpr" for name in ("BLOCK_H", "BLOCK_W", "R_PAD", "K_PAD", "ONE_TILE")})
    constexprs = dict(BLOCK_H=block_h, BLOCK_W=block_w, ONE_TILE=one_tile, R_PAD=r_pad, K_PAD=k_pad,
                      stride_x_w=1, stride_y_w=1)
    # what the launcher's tensors get on a plane of this padded size, contiguous: 16-byte aligned
    # pointers, every stride a multiple of 16 (B, C and H*W planes from 16 elements up: the row stride
    # is W), and W itself (specialised) divisible by 16 from 16 wide
    names = list(ff_module._fourier_filter_fwd_kernel.arg_names)
    divisible = {"x_ptr", "y_ptr", "stride_x_b", "stride_x_c", "stride_y_b", "stride_y_c"} if block_h * block_w >= 16 \
        else {"x_ptr", "y_ptr"}
    if block_w >= 16:
        divisible |= {"W", "stride_x_h", "stride_y_h"}
    attrs = [[names.index(n), [["tt.divisibility", 16]]] for n in sorted(divisible)]
    return {"module": ff_module.__name__, "kernel": KERNEL, "signature": signature, "constexprs": constexprs,
            "attrs": attrs, "cc": cc, "num_warps": num_warps, "num_stages": 1}


def test_config_table_bounds_what_a_thread_holds():
    """Over every config the launcher selects: at most 8 tile elements and 32 row twiddles a thread
    (a one-tile 2048x1 plane at R_PAD 8 used to hold 128 twiddles a thread and spilled 104 B on sm_80),
    row-block tiles that cover the width, and the one-tile path exactly when the plane fits it."""
    configs = launcher_configs()
    assert len(configs) > 250  # 288 since the 4096-element planes left the one-tile path (325 before)
    for key in configs:
        tile, twiddles = thread_load(key)
        assert tile <= 8 and twiddles <= 32, f"{key}: {tile} tile elements, {twiddles} twiddles a thread"
        assert key[3] in (1, 2, 4, 8, 16)
        # 4096-element one-tile planes on 16 warps spilled 184-400 B at K_PAD 8 (16x256 and 32x128 at
        # R_PAD 8 in the captured launches, 64x64 and 256x16 at every R_PAD): none may come back
        assert not (key[2] and key[0] * key[1] > 2048), f"{key}: a one-tile plane over 2048 elements"


def _worst_per_class(configs: dict) -> list[tuple]:
    """The heaviest config (tile plus twiddles a thread, then the tile) of each (ONE_TILE, num_warps)."""
    worst = {}
    for key in configs:
        cls = (key[2], key[3])
        tile, twiddles = thread_load(key)
        if cls not in worst or (tile + twiddles, tile) > worst[cls][0]:
            worst[cls] = ((tile + twiddles, tile), key)
    return [key for _, key in worst.values()]


def _check_compiles(cases: list[dict]) -> None:
    results = compile_cases(cases)
    problems = [p for case, res in zip(cases, results) for p in check_fits(case, res)]
    assert not problems, "\n".join(problems)


def test_configs_compile_for_sm80_and_sm90_without_spills():
    """The heaviest config of the 1- and 16-warp one-tile classes and the row-block class of the
    launcher's table at its largest pads (tall narrow tiles, the row twiddles' worst case), the widest plane at 8 column pads (the
    column loop's), the 16x256 and 32x128 planes at 8 x 8 pads (one-tile on 16 warps they spilled 248-296 B),
    8x1024 at 4 x 8 in fp32, 32x32 at 2 x 8 (bf16) and 8 x 8 (fp16) and 1024x8 at 8 x 8 (fp32; one-tile on 4
    warps and 256x8 row blocks they spilled 8-32 B), the three row blocks of ``_ROW_BLOCKS_ON_4_WARPS`` (128x32
    at 8 x 8, 64x64 and 16x256 at 4 x 4) and FreeU's 64x64 plane at pads 2, for sm_80 and sm_90, the dtypes rotating.  Every
    config of the table compiles in test_every_config_compiles_without_spills (opt-in: 620 compiles)."""
    configs = launcher_configs()
    # the classes hold the same load a thread; the fewest and most warps of one tile, and the row blocks
    cases = [(key, configs[key]) for key in _worst_per_class(configs) if key[3] in (1, 16) or not key[2]]
    cases += [((1, 2048, True, 8, 1), 8)]
    # the 4096-element planes whose one-tile 16-warp configs spilled at 8 x 8 (16x256, 32x128), and
    # FreeU's 64x64 at pads 2: what the launcher selects for them now, at their largest column pads
    # (and 8x1024 at 4 x 8 in fp32, whose 2x1024 8-warp row blocks spilled 16 B on sm_80, as did 16x128 ones
    # at 8 x 8 in fp32, 24 B on sm_90: the 32x128 plane's case)
    planes = []
    for h, w, r_pad, k_pad, dtype in ((16, 256, 8, 8, "fp16"), (32, 128, 8, 8, "fp32"), (64, 64, 2, 2, "bf16"),
                                      (8, 1024, 4, 8, "fp32"), (32, 32, 2, 8, "bf16"), (32, 32, 8, 8, "fp16"),
                                      (1024, 8, 8, 8, "fp32"),
                                      # the whole static set's row-block spills, now 1,024-element blocks on 4
                                      # warps (_ROW_BLOCKS_ON_4_WARPS), each in the dtype that spilled
                                      (128, 32, 8, 8, "fp16"), (64, 64, 4, 4, "fp32"), (16, 256, 4, 4, "fp32")):
        cfg = ff_module._fourier_filter_config(h, w, r_pad, k_pad)
        planes.append(((cfg["BLOCK_H"], cfg["BLOCK_W"], cfg["ONE_TILE"], cfg["num_warps"], r_pad), k_pad, dtype))
    assert all(key in configs for key, _ in cases) and all(key in configs for key, _, _ in planes)
    dtypes = ("fp32", "fp16", "bf16")
    _check_compiles([_compile_case(key, k_pad, dtypes[i % 3], cc)
                     for cc in (80, 90) for i, (key, k_pad) in enumerate(cases)]
                    + [_compile_case(key, k_pad, dtype, cc) for cc in (80, 90) for key, k_pad, dtype in planes])


@pytest.mark.skipif(os.environ.get("FASTUNET_COMPILE_ALL") != "1",
                    reason="every config of the table, sm_80 and sm_90: set FASTUNET_COMPILE_ALL=1 (620 compiles, "
                           "about 20 minutes on 2 cores)")
def test_every_config_compiles_without_spills():
    configs = launcher_configs()
    dtypes = ("fp32", "fp16", "bf16")
    _check_compiles([_compile_case(key, k_pad, dtypes[i % 3], cc)
                     for cc in (80, 90) for i, (key, k_pad) in enumerate(sorted(configs.items()))])
