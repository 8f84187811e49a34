"""LoRA fine-tuning through peft: ``unet.add_adapter(LoraConfig(...))`` on a tiny UNet2DConditionModel
(SDXL layout), then a few Adam steps on a fixed batch.

Only the adapter trains: every base parameter and buffer stays bit-identical, every LoRA matrix changes,
and the loss goes down. The same steps under ``torch.compile(fullgraph=True, backend="aot_eager")`` follow
the eager trajectory. The two-rank DDP run of the adapter is in ``test_ddp.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from training_parts import loss, make, target_for  # tests/training is on sys.path

pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
STEPS, LR = 5, 1e-2
# aot_eager runs eager's aten ops: losses and adapter weights agree to rounding (measured: bit-identical)
COMPILE_TOL = 1e-6


def lora_model():
    model, inputs = make("unet_2d_condition")
    torch.manual_seed(0)  # peft draws lora_A from the global generator
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS))
    return model, inputs, target_for("unet_2d_condition", inputs)


def fit(model, inputs, target, forward=None) -> list[float]:
    """``STEPS`` Adam steps on the trainable parameters; the loss before each step."""
    forward = model if forward is None else forward
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        value = loss(forward(**inputs).sample, target)
        value.backward()
        optimizer.step()
        losses.append(value.item())
    return losses


def test_add_adapter_trains_only_the_lora_weights():
    model, inputs, target = lora_model()
    state = {n: t.clone() for n, t in model.state_dict().items()}
    lora = {n for n in state if "lora_" in n}
    projections = [n for n, m in model.named_modules() if n.split(".")[-1] in ("to_q", "to_k", "to_v")
                   or n.endswith("to_out.0")]
    assert len(lora) == 2 * len(projections) > 0  # lora_A and lora_B on every targeted projection
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora

    losses = fit(model, inputs, target)

    assert losses[-1] < 0.9 * losses[0], losses
    after = model.state_dict()
    changed_base = [n for n in state if n not in lora and not torch.equal(after[n], state[n])]
    assert not changed_base, f"base weights changed: {changed_base[:5]}"
    unchanged_lora = [n for n in lora if torch.equal(after[n], state[n])]
    assert not unchanged_lora, f"LoRA weights did not train: {unchanged_lora[:5]}"


def test_lora_fine_tuning_under_fullgraph_compile_follows_eager(fused_nodes):
    eager_model, inputs, target = lora_model()
    eager_losses = fit(eager_model, inputs, target)

    model, _, _ = lora_model()
    base = {n: t.clone() for n, t in model.state_dict().items() if "lora_" not in n}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    losses = fit(model, inputs, target, forward=compiled)

    assert losses[-1] < 0.9 * losses[0], losses
    assert max(abs(a - b) / b for a, b in zip(losses, eager_losses)) <= COMPILE_TOL, (losses, eager_losses)
    for name, value in model.state_dict().items():
        if name in base:
            assert torch.equal(value, base[name]), f"base weight {name} changed"
        else:
            reference = eager_model.state_dict()[name]
            assert (value - reference).abs().max() <= COMPILE_TOL * reference.abs().max(), name
