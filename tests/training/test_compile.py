"""``torch.compile(model, fullgraph=True)`` on every UNet family, forward and backward, on the CPU.

``fullgraph=True`` turns any graph break into an error, so each test proves the whole forward (time and
added embeddings, every block, the output dataclass) is one graph. The compiled forward and backward are
compared with eager on the same weights and inputs: ``aot_eager`` runs the same aten ops, so outputs and
every gradient agree to 1e-6 (measured: bit-identical); one model also goes through inductor, whose fused
kernels round differently. A second batch of new values with the same shapes must reuse the graph
(``error_on_recompile``). The Triton backend is not compiled here: the CPU interpreter cannot.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from training_parts import NAMES, grads, make, make_inputs, target_for  # tests/training is on sys.path

from fastunet.testing import gradient_errors, rel_err

AOT_EAGER_TOL = 1e-6
# inductor fuses and reorders reductions: measured max-abs errors 6e-7 (output) and 3e-6 (gradients)
# relative to each tensor's largest value
INDUCTOR_OUT_TOL, INDUCTOR_GRAD_TOL = 1e-5, 1e-4


def _check(compiled, model, name, inputs, out_tol, grad_tol):
    target = target_for(name, inputs)
    expected_out, expected = grads(model, inputs, target)
    out, got = grads(model, inputs, target, forward=compiled)
    assert rel_err(out, expected_out, norm="max") <= out_tol, rel_err(out, expected_out, norm="max")
    gradient_errors(got, expected, norm="max").check(grad_tol)


@pytest.mark.parametrize("name", NAMES)
def test_fullgraph_aot_eager_forward_and_backward_match_eager(name, fused_nodes):
    model, inputs = make(name)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    # a sample that requires grad, as in the backward checks below: one graph serves both
    eager_output = model(**dict(inputs, sample=inputs["sample"].clone().requires_grad_(True)))
    compiled_output = compiled(**dict(inputs, sample=inputs["sample"].clone().requires_grad_(True)))
    # the output dataclass comes back as itself, not as a plain dict or tuple
    assert type(compiled_output) is type(eager_output)
    assert list(compiled_output.keys()) == ["sample"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        _check(compiled, model, name, inputs, AOT_EAGER_TOL, AOT_EAGER_TOL)
        _check(compiled, model, name, make_inputs(name, "again"), AOT_EAGER_TOL, AOT_EAGER_TOL)


def test_fullgraph_inductor_forward_and_backward_match_eager(fused_nodes):
    name = "unet_1d"  # the smallest graph: inductor's CPU code generation is the slow part
    model, inputs = make(name)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    _check(compiled, model, name, inputs, INDUCTOR_OUT_TOL, INDUCTOR_GRAD_TOL)
