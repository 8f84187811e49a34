"""The Triton path where users run it: whole models on the ``triton`` backend (the interpreter on CPU)
against the same models on the ``torch`` backend, forward and every gradient.

One tiny model per family (``tests/training/training_parts.py``), each with the options that change what
the kernels see: attention masks, FreeU (the Fourier filter), ControlNet residuals,
attention slicing, forward chunking. Every case also checks that the Triton kernels actually launched
(``fastunet.kernels.launch_counts``), so a silent fallback to torch fails.

Tolerance: fp32 on both sides, each compared with ``rel_err`` (max-abs over the reference's largest
value) below 1e-5; the two backends differ only in summation order. Attention
key-bias gradients vanish in exact arithmetic (a shift of every score of a row) and are measured
against 1e-3 of the largest gradient.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import fastunet
from fastunet.kernels import launch_counts
from fastunet.testing import gradient_errors, rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from training_parts import BATCH, TOKENS, grads, make, make_inputs, target_for  # noqa: E402

TOL, KEY_BIAS_FLOOR = 1e-5, 1e-3
VIDEO = ("unet_3d_condition", "unet_motion")


def _controlnet() -> dict:
    """ControlNet residuals for the tiny ``unet_2d_condition`` (block_out_channels (16, 32), one layer per
    block, 8x8 samples): the stem, each resnet and the downsampler, then the mid block."""
    g = torch.Generator().manual_seed(7)
    down = [(16, 8, 8), (16, 8, 8), (16, 4, 4), (32, 4, 4)]
    return dict(down_block_additional_residuals=tuple(torch.randn(BATCH, *s, generator=g) for s in down),
                mid_block_additional_residual=torch.randn(BATCH, 32, 4, 4, generator=g))


def _case(name: str, options: tuple[str, ...]):
    """``(model, inputs)`` of family ``name`` with ``options`` switched on."""
    model, inputs = make(name)
    if name in VIDEO:
        # one sample of 2 frames at 4x4: the temporal layers launch one program per pixel and head, and
        # the interpreter runs programs one after another
        inputs = make_inputs(name, batch=1)
        inputs["sample"] = inputs["sample"][:, :, :2, :4, :4].contiguous()
    if "mask" in options:
        mask = torch.ones(BATCH, TOKENS, dtype=torch.bool)
        mask[0, -2:] = False
        inputs["encoder_attention_mask"] = mask
    if "freeu" in options:
        model.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    if "controlnet" in options:
        inputs.update(_controlnet())
    if "slicing" in options:
        model.set_attention_slice("max")
    if "chunking" in options:
        model.enable_forward_chunking(chunk_size=1, dim=1)
    return model, inputs


# one case per family, the options combined (a whole-model run under the interpreter costs 1-3 min; slicing
# is on the 2-D model only: "max" slicing of the video models' temporal attention is one launch per pixel and head)
CASES = [
    ("unet_1d", ()),
    ("unet_2d", ("slicing",)),
    ("unet_2d_condition", ("mask", "freeu", "controlnet")),
    ("unet_3d_condition", ()),
    ("unet_motion", ("chunking",)),
]
# the kernels each case must launch, each as alternatives (attention picks its short-sequence kernels for
# short keys): the fused GroupNorm forward and backward everywhere, attention forward and backward where the
# family has attention, the Fourier filter with FreeU
GROUP_NORM = [("_group_norm_act_fwd_kernel",), ("_group_norm_act_bwd_dx_kernel",)]
ATTENTION = [("_attention_fwd_kernel", "_attention_short_fwd_kernel"),
             ("_attention_bwd_dq_kernel", "_attention_short_bwd_kernel")]
FOURIER = [("_fourier_filter_fwd_kernel",)]


@pytest.mark.parametrize("name,options", CASES, ids=["-".join((n, *o)) for n, o in CASES])
def test_triton_backend_matches_torch_backend(name, options):
    model, inputs = _case(name, options)
    target = target_for(name, inputs)
    with fastunet.use_backend("torch"):
        expected_out, expected = grads(model, inputs, target)
    before = Counter(launch_counts)
    with fastunet.use_backend("triton"):
        out, actual = grads(model, inputs, target)
    launched = {k for k, count in (launch_counts - before).items() if count > 0}
    wanted = GROUP_NORM + (ATTENTION if name != "unet_1d" else []) + (FOURIER if "freeu" in options else [])
    missing = [names for names in wanted if not launched.intersection(names)]
    assert not missing, f"not launched on the triton backend: {missing}; launched {sorted(launched)}"

    assert rel_err(out, expected_out, norm="max") < TOL
    largest = max(g.abs().max().item() for g in expected.values())
    floors = {n: KEY_BIAS_FLOOR * largest for n in expected if n.endswith("to_k.bias")}
    gradient_errors(actual, expected, norm="max", floors=floors).check(TOL)
