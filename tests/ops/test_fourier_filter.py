"""fastunet.kernels.fourier_filter against a float64 FFT oracle and diffusers' own filter.

The Triton kernel runs on CPU tensors through Triton's interpreter (backend "triton"); the torch path
is the direct-DFT reference (backend "torch").  Its configs are also compiled for sm_80 and sm_90.
"""

from __future__ import annotations

import sys

import pytest
import torch
from diffusers.utils.torch_utils import fourier_filter as diffusers_fourier_filter
from gpu_compile import check_fits, compile_cases  # tests/ is on sys.path (rootdir conftest)

import fastunet
from fastunet.kernels import fourier_filter, fourier_filter_reference, launch_counts
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
    # reference runs on every backend
    torch.testing.assert_close(run(backend, x, 4, 0.5), 0.5 * x, rtol=0, atol=2e-6)
    assert_kernel_ran(backend)
    x = torch.randn(1, 2, 20, 18)
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
    y = run("triton", x, 1, 0.4)
    assert y.dtype == torch.float64 and launch_counts[KERNEL] == 0
    torch.testing.assert_close(y, fft_oracle(x, 1, 0.4), rtol=0, atol=1e-12)


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


def _compile_case(dtype: str, H: int, W: int, pad: int, cc: int) -> dict:
    cfg = ff_module._fourier_filter_config(H, W)
    num_warps = cfg.pop("num_warps")
    signature = {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}"}
    signature.update({name: "i32" for name in ("C", "H", "W", "stride_x_b", "stride_x_c", "stride_x_h")})
    signature["stride_x_w"] = "constexpr"
    signature.update({name: "i32" for name in ("stride_y_b", "stride_y_c", "stride_y_h")})
    signature["stride_y_w"] = "constexpr"
    signature.update({name: "i32" for name in ("u0", "n_rows", "v0", "n_cols")})
    signature["factor"] = "fp32"
    signature.update({name: "constexpr" for name in ("BLOCK_H", "BLOCK_W", "R_PAD", "K_PAD", "ONE_TILE")})
    return {"module": ff_module.__name__, "kernel": KERNEL, "signature": signature,
            "constexprs": dict(cfg, R_PAD=pad, K_PAD=pad, stride_x_w=1, stride_y_w=1),
            "cc": cc, "num_warps": num_warps, "num_stages": 1}


def test_configs_compile_for_sm80_and_sm90_without_spills():
    """One case per config family: 1-warp and 16-warp single tiles, row-block loops; FreeU's pad (2)
    and the largest the kernel takes (8)."""
    cases = [_compile_case(dtype, H, W, pad, cc)
             for cc in (80, 90)
             for dtype, H, W, pad in (("fp16", 16, 16, 2), ("fp32", 64, 64, 8), ("bf16", 128, 128, 2),
                                      ("fp32", 96, 96, 8))]
    results = compile_cases(cases)
    problems = [p for case, res in zip(cases, results) for p in check_fits(case, res)]
    assert not problems, "\n".join(problems)
