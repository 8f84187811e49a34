"""A few SGD steps of tiny UNets, under DistributedDataParallel or in one process.

``python -m torch.distributed.run --standalone --nproc-per-node 2 ddp_train.py OUT_DIR`` trains on the gloo
backend, each rank on its slice of every global batch, and each rank writes
``OUT_DIR/<case>.rank<r>.pt``: the parameters after the last step and the gradients of the last step.
``test_ddp.py`` runs the same :func:`train` in one process on the whole batches and compares.

Cases: ``unet_2d`` (every parameter trained) and ``lora`` (a UNet2DConditionModel with a LoRA adapter
on the attention projections; the frozen base weights have no gradients for DDP to reduce).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from training_parts import loss, make, make_inputs, target_for  # noqa: E402

STEPS, LR, GLOBAL_BATCH = 3, 0.05, 4
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CASES = ("unet_2d", "lora")


def build(case: str) -> torch.nn.Module:
    """The model of ``case``, with the same weights in every process."""
    if case == "unet_2d":
        return make("unet_2d")[0]
    from peft import LoraConfig

    model = make("unet_2d_condition")[0]
    torch.manual_seed(0)  # peft draws the lora_A weights from the global generator
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=True, target_modules=LORA_TARGETS))
    return model


def batches(case: str) -> list[tuple[dict, torch.Tensor]]:
    """``STEPS`` global batches of ``(inputs, target)``, new values at every step."""
    name = "unet_2d" if case == "unet_2d" else "unet_2d_condition"
    out = []
    for step in range(STEPS):
        inputs = make_inputs(name, f"step{step}", batch=GLOBAL_BATCH)
        out.append((inputs, target_for(name, inputs) + step))
    return out


def shard(value, rank: int, world: int):
    """Rank ``rank``'s contiguous slice of every batch-major tensor in ``value`` (dicts recursed)."""
    if isinstance(value, dict):
        return {k: shard(v, rank, world) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == GLOBAL_BATCH:
        per = GLOBAL_BATCH // world
        return value[rank * per:(rank + 1) * per]
    return value


def train(model: torch.nn.Module, steps: list[tuple[dict, torch.Tensor]], forward=None, rank: int = 0,
          world: int = 1) -> dict[str, dict[str, torch.Tensor]]:
    """SGD on :func:`training_parts.loss` (a mean over the batch, so DDP's averaged gradients equal the
    whole batch's); returns the trainable parameters after the last step and that step's gradients."""
    forward = model if forward is None else forward
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(trainable.values(), lr=LR)
    for inputs, target in steps:
        inputs, target = shard(inputs, rank, world), shard(target, rank, world)
        optimizer.zero_grad(set_to_none=True)
        loss(forward(**inputs).sample, target).backward()
        optimizer.step()
    return {"params": {n: p.detach().clone() for n, p in trainable.items()},
            "grads": {n: p.grad.detach().clone() for n, p in trainable.items()}}


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        for case in CASES:
            model = build(case)
            ddp = DistributedDataParallel(model)
            result = train(model, batches(case), forward=ddp, rank=rank, world=world)
            torch.save(result, os.path.join(out_dir, f"{case}.rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
