"""Gradient checkpointing on every UNet family: the same output and gradients as without, with the
checkpointed layers really run again in backward; and checkpointing under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from training_parts import NAMES, grads, make, target_for  # tests/training is on sys.path

from fastunet.testing import gradient_errors, rel_err

# recomputation repeats the same ops on the same values: measured bit-identical
TOL = 1e-6


def _count_module_calls(model: torch.nn.Module) -> tuple[list[int], list]:
    calls = [0]

    def hook(module, args, output):
        calls[0] += 1

    return calls, [m.register_forward_hook(hook) for m in model.modules() if m is not model]


@pytest.mark.parametrize("name", NAMES)
def test_gradient_checkpointing_gives_the_same_gradients(name):
    model, inputs = make(name)
    target = target_for(name, inputs)
    calls, handles = _count_module_calls(model)
    plain_out, plain = grads(model, inputs, target)
    plain_calls, calls[0] = calls[0], 0

    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    out, got = grads(model, inputs, target)
    for handle in handles:
        handle.remove()
    assert calls[0] > plain_calls, "no layer ran again in backward"
    assert rel_err(out, plain_out, norm="max") <= TOL
    gradient_errors(got, plain, norm="max").check(TOL)

    model.disable_gradient_checkpointing()
    assert not model.is_gradient_checkpointing


def test_gradient_checkpointing_under_fullgraph_compile(fused_nodes):
    name = "unet_2d"
    model, inputs = make(name)
    target = target_for(name, inputs)
    plain_out, plain = grads(model, inputs, target)
    model.enable_gradient_checkpointing()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out, got = grads(model, inputs, target, forward=compiled)
    assert rel_err(out, plain_out, norm="max") <= TOL
    gradient_errors(got, plain, norm="max").check(TOL)
