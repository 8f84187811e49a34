"""fastunet.layers.freeu.apply_freeu against diffusers' apply_freeu (which writes into its inputs, so it
gets clones)."""

from __future__ import annotations

import pytest
import torch
from diffusers.utils.torch_utils import apply_freeu as diffusers_apply_freeu

import fastunet
from fastunet.kernels import launch_counts
from fastunet.layers.freeu import FreeUConfig, apply_freeu

CONFIG = FreeUConfig(s1=0.9, s2=0.2, b1=1.3, b2=1.4)  # SD 1.x settings from the FreeU paper
FACTORS = {"s1": 0.9, "s2": 0.2, "b1": 1.3, "b2": 1.4}
TOL = {torch.float32: 4e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("backend", ("triton", "torch"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("resolution_idx", (0, 1, 2, None))
def test_matches_diffusers_and_leaves_inputs_alone(resolution_idx, dtype, backend):
    hidden = torch.randn(2, 10, 8, 8).to(dtype)
    res = torch.randn(2, 6, 8, 8).to(dtype)
    hidden_before, res_before = hidden.clone(), res.clone()
    launch_counts["_fourier_filter_fwd_kernel"] = 0
    with fastunet.use_backend(backend):
        out_hidden, out_res = apply_freeu(resolution_idx, hidden, res, CONFIG)
    assert torch.equal(hidden, hidden_before) and torch.equal(res, res_before), "inputs were modified"
    ref_hidden, ref_res = diffusers_apply_freeu(resolution_idx, hidden.clone(), res.clone(), **FACTORS)
    assert out_hidden.dtype == dtype and out_res.dtype == dtype
    # the backbone scaling is the same fp32 product rounded once: bit for bit
    assert torch.equal(out_hidden, ref_hidden)
    torch.testing.assert_close(out_res, ref_res, rtol=0, atol=TOL[dtype])
    filtered = resolution_idx in (0, 1)
    assert launch_counts["_fourier_filter_fwd_kernel"] == (1 if filtered and backend == "triton" else 0)
    if not filtered:
        assert out_hidden is hidden and out_res is res


def test_odd_channels_and_channels_last():
    hidden = torch.randn(1, 7, 5, 6).contiguous(memory_format=torch.channels_last)
    res = torch.randn(1, 3, 5, 6)
    out_hidden, out_res = apply_freeu(0, hidden, res, CONFIG)
    ref_hidden, ref_res = diffusers_apply_freeu(0, hidden.clone(), res.clone(), **FACTORS)
    assert torch.equal(out_hidden, ref_hidden)
    torch.testing.assert_close(out_res, ref_res, rtol=0, atol=4e-6)


@pytest.mark.parametrize("backend", ("triton", "torch"))
def test_gradients(backend):
    hidden = torch.randn(2, 4, 6, 6, requires_grad=True)
    res = torch.randn(2, 4, 6, 6, requires_grad=True)
    g_hidden, g_res = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    with fastunet.use_backend(backend):
        out = apply_freeu(1, hidden, res, CONFIG)
    grads = torch.autograd.grad(out, (hidden, res), (g_hidden, g_res))
    h64 = hidden.detach().double().requires_grad_()
    r64 = res.detach().double().requires_grad_()
    ref = diffusers_apply_freeu(1, h64.clone(), r64, **FACTORS)
    ref_grads = torch.autograd.grad(ref, (h64, r64), (g_hidden.double(), g_res.double()))
    for ours, exact in zip(grads, ref_grads):
        torch.testing.assert_close(ours.double(), exact, rtol=0, atol=4e-6)


def test_config_validation():
    assert FreeUConfig(1, 2, 3, 4).s1 == 1.0 and isinstance(FreeUConfig(1, 2, 3, 4).s1, float)
    with pytest.raises(TypeError, match="s2 must be a real number"):
        FreeUConfig(0.9, "0.2", 1.3, 1.4)
    with pytest.raises(TypeError, match="b1 must be a real number"):
        FreeUConfig(0.9, 0.2, True, 1.4)
    with pytest.raises(ValueError, match="b2 must be finite"):
        FreeUConfig(0.9, 0.2, 1.3, float("inf"))
    with pytest.raises(Exception):
        CONFIG.s1 = 0.5  # frozen
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(TypeError, match="config must be a FreeUConfig"):
        apply_freeu(0, x, x, FACTORS)
    with pytest.raises(TypeError, match="resolution_idx must be an int or None"):
        apply_freeu(0.0, x, x, CONFIG)
