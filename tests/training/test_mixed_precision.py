"""Mixed-precision training through every UNet family on the CPU.

* ``torch.autocast("cpu", dtype=torch.bfloat16)``: forward and backward give finite outputs and gradients
  close to float32 ones (relative L2 errors below; measured worst cases in the comments);
* a model cast with ``.to(torch.bfloat16)`` runs forward and backward, in bfloat16;
* float16: ``torch.autocast("cpu", dtype=torch.float16)`` with float32 master weights and
  ``torch.amp.GradScaler("cpu")`` (a scaler refuses float16 gradients, so the weights stay float32, as
  in every fp16 recipe): one optimizer step with finite, unscaled gradients close to float32's;
* group-norm statistics stay float32 for bfloat16 inputs far from zero mean.
"""

from __future__ import annotations

import pytest
import torch
from training_parts import NAMES, grads, loss, make, target_for  # tests/training is on sys.path

from fastunet.kernels import group_norm_act
from fastunet.testing import gradient_errors, rel_err

# relative L2 against float32; the floor measures gradients that vanish in exact arithmetic (attention key
# biases) against the typical gradient size. Measured worst over the five tiny models (perturbed weights,
# unit-scale inputs): autocast output 1.6e-2, gradients 5.7e-2 (UNet3D's transformer_in norm); bfloat16
# weights output 1.6e-2, gradients 4.6e-2.
AUTOCAST_OUT_TOL, AUTOCAST_GRAD_TOL = 3e-2, 1e-1
BF16_OUT_TOL, BF16_GRAD_TOL = 3e-2, 1e-1
FP16_GRAD_TOL = 2e-2
GRAD_FLOOR = 1e-2


def _cast_inputs(inputs: dict, dtype: torch.dtype) -> dict:
    """Floating-point tensors (nested dicts too) cast to ``dtype``; integer timesteps and labels kept."""
    def cast(v):
        if isinstance(v, dict):
            return {k: cast(x) for k, x in v.items()}
        return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
    return {k: cast(v) for k, v in inputs.items()}


def _all_finite(tensors: dict) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_forward_backward_close_to_fp32(name):
    model, inputs = make(name)
    target = target_for(name, inputs)
    ref_out, ref = grads(model, inputs, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, got = grads(model, inputs, target)
    assert out.dtype == torch.bfloat16  # autocast really acted on the output convolution
    assert torch.isfinite(out).all() and _all_finite(got)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    assert rel_err(out, ref_out) < AUTOCAST_OUT_TOL, rel_err(out, ref_out)
    gradient_errors(got, ref, floor=GRAD_FLOOR).check(AUTOCAST_GRAD_TOL)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_model_forward_backward(name):
    model, inputs = make(name)
    target = target_for(name, inputs)
    ref_out, ref = grads(model, inputs, target)
    model.to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    out, got = grads(model, _cast_inputs(inputs, torch.bfloat16), target)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in got.values())
    assert torch.isfinite(out).all() and _all_finite(got)
    assert rel_err(out, ref_out) < BF16_OUT_TOL, rel_err(out, ref_out)
    gradient_errors(got, ref, floor=GRAD_FLOOR).check(BF16_GRAD_TOL)


def test_fp16_autocast_grad_scaler_step():
    name = "unet_2d_condition"
    model, inputs = make(name)
    target = target_for(name, inputs)
    _, ref = grads(model, inputs, target)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    initial_scale = scaler.get_scale()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(**inputs).sample
        assert out.dtype == torch.float16
        value = loss(out, target)
    scaler.scale(value).backward()
    scaler.unscale_(optimizer)
    got = {n: p.grad for n, p in model.named_parameters()}
    assert _all_finite(got), "float16 gradients overflowed at the initial scale"
    gradient_errors(got, {n: g for n, g in ref.items() if n in got}, floor=GRAD_FLOOR).check(FP16_GRAD_TOL)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == initial_scale  # no inf/NaN found: the step was taken, the scale kept
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("shape", [(2, 64, 16, 16), (1, 96, 33, 47)])
def test_group_norm_statistics_are_fp32_for_bf16(shape):
    """A bfloat16 input of mean 200 and standard deviation 1: summing x and x^2 in bfloat16 (8 bits of
    mantissa) would lose the variance entirely; float32 statistics normalise it to bfloat16 rounding."""
    channels = shape[1]
    x = (200 + torch.randn(shape)).to(torch.bfloat16)
    weight, bias = torch.randn(channels).to(torch.bfloat16), torch.randn(channels).to(torch.bfloat16)
    y = group_norm_act(x, 32, weight, bias, 1e-5, "silu")
    exact = torch.nn.functional.silu(torch.nn.functional.group_norm(x.double(), 32, weight.double(), bias.double(),
                                                                    1e-5))
    assert y.dtype == torch.bfloat16
    # the bfloat16 rounding of the result is 2^-8 relative
    assert rel_err(y, exact) < 1e-2, rel_err(y, exact)
