"""ResnetBlock2D and the resampling layers against diffusers with the same (perturbed) weights."""

from __future__ import annotations

import pytest
import torch
from diffusers.models import downsampling as d_down
from diffusers.models import upsampling as d_up
from diffusers.models.resnet import ResnetBlock2D as DResnetBlock2D

import fastunet
from fastunet.kernels import launch_counts
from fastunet.layers.resampling import (
    Downsample2D,
    FirDownsample2D,
    FirUpsample2D,
    Upsample2D,
    downsample_2d,
    upfirdn2d,
    upsample_2d,
)
from fastunet.layers.resnet import ResnetBlock2D
from fastunet.testing import gradient_errors, named_gradients, perturb_, perturbed_pair, rel_err


def twin(ours_cls, theirs_cls, *args, **kwargs):
    """Build both layers, perturb diffusers' weights and load them strict into both."""
    theirs, ours = perturbed_pair(theirs_cls(*args, **kwargs), ours_cls(*args, **kwargs))
    return ours, theirs


def check_parity(ours, theirs, inputs: list[torch.Tensor | None], call=None, tol=1e-5, grad_tol=1e-4):
    """Outputs and all gradients (floating inputs and parameters) agree."""
    call = call or (lambda m, *xs: m(*xs))
    results = []
    for model in (ours, theirs):
        xs = [None if x is None else x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        model.zero_grad(set_to_none=True)
        out = call(model, *xs)
        cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (out * cotangent).sum().backward()
        grads = {f"<input {i}>": x.grad for i, x in enumerate(xs) if x is not None and x.requires_grad}
        results.append((out, {**grads, **named_gradients(model)}))
    (out_a, grads_a), (out_b, grads_b) = results
    assert out_a.shape == out_b.shape
    assert rel_err(out_a, out_b) < tol, rel_err(out_a, out_b)
    gradient_errors(grads_a, grads_b).check(grad_tol)
    return out_a


RESNET_CASES = {
    "default": dict(in_channels=32, out_channels=32, temb_channels=16, groups=8),
    "shortcut": dict(in_channels=32, out_channels=64, temb_channels=16, groups=8, groups_out=16),
    "scale_shift": dict(in_channels=32, out_channels=32, temb_channels=16, groups=4,
                        time_embedding_norm="scale_shift"),
    "up": dict(in_channels=32, out_channels=48, temb_channels=16, groups=8, up=True),
    "down": dict(in_channels=32, out_channels=32, temb_channels=16, groups=8, down=True),
    "fir_up": dict(in_channels=32, out_channels=32, temb_channels=16, groups=8, up=True, kernel="fir",
                   use_in_shortcut=True, output_scale_factor=2**0.5),
    "fir_down": dict(in_channels=32, out_channels=32, temb_channels=16, groups=8, down=True, kernel="fir",
                     use_in_shortcut=True, time_embedding_norm="scale_shift"),
    "sde_vp_up": dict(in_channels=16, out_channels=16, temb_channels=16, groups=4, up=True, kernel="sde_vp"),
    "sde_vp_down": dict(in_channels=16, out_channels=16, temb_channels=16, groups=4, down=True, kernel="sde_vp"),
    "no_temb_mish": dict(in_channels=32, temb_channels=None, groups=8, non_linearity="mish"),
    "gelu_skip_time_act": dict(in_channels=32, out_channels=16, temb_channels=8, groups=4, non_linearity="gelu",
                               skip_time_act=True, conv_shortcut_bias=False),
    "relu_conv2d_out": dict(in_channels=16, out_channels=32, temb_channels=8, groups=4, non_linearity="relu",
                            conv_2d_out_channels=24, eps=1e-5),
}


@pytest.mark.parametrize("case", sorted(RESNET_CASES))
def test_resnet_block_matches_diffusers(case):
    kwargs = RESNET_CASES[case]
    ours, theirs = twin(ResnetBlock2D, DResnetBlock2D, **kwargs)
    x = torch.randn(2, kwargs["in_channels"], 8, 10)
    temb = torch.randn(2, kwargs["temb_channels"]) if kwargs.get("temb_channels") else None
    out = check_parity(ours, theirs, [x, temb])
    expect_hw = (16, 20) if kwargs.get("up") else (4, 5) if kwargs.get("down") else (8, 10)
    assert out.shape[-2:] == expect_hw


def test_resnet_block_does_not_mutate_inputs_and_validates():
    block = ResnetBlock2D(in_channels=16, out_channels=16, temb_channels=8, groups=4)
    perturb_(block)
    x, temb = torch.randn(2, 16, 6, 6), torch.randn(2, 8)
    x0, t0 = x.clone(), temb.clone()
    block(x, temb)
    assert torch.equal(x, x0) and torch.equal(temb, t0)
    with pytest.raises(ValueError, match="16"):
        block(torch.randn(2, 12, 6, 6), temb)
    with pytest.raises(ValueError, match="temb"):
        block(x, None)
    with pytest.raises(ValueError, match="groups"):
        ResnetBlock2D(in_channels=20, groups=8)
    with pytest.raises(ValueError, match="time_embedding_norm"):
        ResnetBlock2D(in_channels=16, groups=4, time_embedding_norm="spatial")
    with pytest.raises(ValueError, match="act_fn"):
        ResnetBlock2D(in_channels=16, groups=4, non_linearity="tanhh")


DOWN_CASES = {
    "conv_pad1": dict(channels=16, use_conv=True, padding=1),
    "conv_pad0_out": dict(channels=16, use_conv=True, out_channels=24, padding=0),
    "conv_named_op": dict(channels=16, use_conv=True, name="op"),
    "conv_named_Conv2d_0_k1": dict(channels=16, use_conv=True, name="Conv2d_0", kernel_size=1, padding=0),
    "avgpool": dict(channels=16),
    "ln_norm_nobias": dict(channels=16, use_conv=True, norm_type="ln_norm", eps=1e-5, elementwise_affine=True,
                           bias=False),
    "rms_norm": dict(channels=16, use_conv=True, norm_type="rms_norm", eps=1e-6, elementwise_affine=True),
}


@pytest.mark.parametrize("case", sorted(DOWN_CASES))
def test_downsample2d_matches_diffusers(case):
    kwargs = DOWN_CASES[case]
    ours, theirs = twin(Downsample2D, d_down.Downsample2D, **kwargs)
    check_parity(ours, theirs, [torch.randn(2, 16, 9, 10)])


UP_CASES = {
    "conv": dict(channels=16, use_conv=True),
    "conv_out_named": dict(channels=16, use_conv=True, out_channels=8, name="Conv2d_0"),
    "nearest_only": dict(channels=16),
    "conv_transpose": dict(channels=16, use_conv_transpose=True, out_channels=8),
    "no_interpolate_rms": dict(channels=16, use_conv=True, interpolate=False, norm_type="rms_norm", eps=1e-6,
                               elementwise_affine=True, kernel_size=1, padding=0),
}


@pytest.mark.parametrize("case", sorted(UP_CASES))
def test_upsample2d_matches_diffusers(case):
    kwargs = UP_CASES[case]
    ours, theirs = twin(Upsample2D, d_up.Upsample2D, **kwargs)
    check_parity(ours, theirs, [torch.randn(2, 16, 5, 7)])


def test_upsample2d_output_size():
    ours, theirs = twin(Upsample2D, d_up.Upsample2D, channels=8, use_conv=True)
    call = lambda m, x: m(x, output_size=(11, 13))  # noqa: E731
    out = check_parity(ours, theirs, [torch.randn(2, 8, 5, 7)], call=call)
    assert out.shape == (2, 8, 11, 13)


@pytest.mark.parametrize("use_conv", [False, True])
@pytest.mark.parametrize("fir", [(1, 3, 3, 1), (1, 2, 1), (1, 1)])
def test_fir_resampling_matches_diffusers(use_conv, fir):
    kwargs = dict(channels=8, out_channels=12 if use_conv else None, use_conv=use_conv, fir_kernel=fir)
    x = torch.randn(2, 8, 8, 6)
    ours, theirs = twin(FirDownsample2D, d_down.FirDownsample2D, **kwargs)
    assert check_parity(ours, theirs, [x]).shape[-2:] == (4, 3)
    ours, theirs = twin(FirUpsample2D, d_up.FirUpsample2D, **kwargs)
    assert check_parity(ours, theirs, [x]).shape[-2:] == (16, 12)


@pytest.mark.parametrize("factor", [2, 3])
@pytest.mark.parametrize("kernel", [None, (1, 3, 3, 1), [[1, 2, 1], [2, 4, 2], [1, 2, 1]]])
def test_fir_functions_match_diffusers(factor, kernel):
    x = torch.randn(2, 3, 12, 9)
    gain = 1.5
    torch.testing.assert_close(upsample_2d(x, kernel, factor, gain), d_up.upsample_2d(x, kernel, factor, gain))
    torch.testing.assert_close(downsample_2d(x, kernel, factor, gain), d_down.downsample_2d(x, kernel, factor, gain))


@pytest.mark.parametrize("up,down,pad", [(1, 1, (1, 2)), (2, 1, (2, -1)), (1, 2, (-1, 0)), (3, 2, (1, 1))])
def test_upfirdn2d_matches_diffusers(up, down, pad):
    x = torch.randn(2, 4, 7, 6)
    k = torch.randn(3, 3)
    torch.testing.assert_close(upfirdn2d(x, k, up, down, pad), d_up.upfirdn2d_native(x, k, up, down, pad))


def test_resampling_validates_channels():
    with pytest.raises(ValueError, match="16"):
        Downsample2D(16, use_conv=True)(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="16"):
        Upsample2D(16)(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="out_channels"):
        Downsample2D(16, use_conv=False, out_channels=8)
    with pytest.raises(ValueError, match="norm_type"):
        Upsample2D(16, norm_type="batch")


@pytest.mark.parametrize("time_embedding_norm", ["default", "scale_shift"])
def test_resnet_block_triton_backend_matches_torch(time_embedding_norm):
    block = ResnetBlock2D(in_channels=16, out_channels=24, temb_channels=8, groups=4, groups_out=8,
                          time_embedding_norm=time_embedding_norm)
    perturb_(block)
    x, temb = torch.randn(2, 16, 6, 5), torch.randn(2, 8)
    results = []
    for backend in ("torch", "triton"):
        launch_counts.clear()
        with fastunet.use_backend(backend):
            xs = [x.clone().requires_grad_(True), temb.clone().requires_grad_(True)]
            block.zero_grad(set_to_none=True)
            out = block(*xs)
            (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
        results.append([out.detach(), *(t.grad for t in xs), *(p.grad for p in block.parameters())])
        if backend == "triton":
            assert launch_counts["_group_norm_act_fwd_kernel"] >= 2, dict(launch_counts)
    for got, expected in zip(results[1], results[0]):
        assert rel_err(got, expected) < 1e-4
