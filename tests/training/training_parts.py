"""Tiny models of the five UNet families and seeded inputs for them, shared by the training tests.

:func:`make(name)` returns ``(model, inputs)``: a fastunet model with perturbed weights (every layer acts,
the zero-initialised output convolutions included) in train mode with dropout off, and keyword inputs
for its ``forward`` drawn from a generator seeded by the name. :func:`loss` is the scalar every test
back-propagates; :func:`grads` runs one forward and backward and returns every gradient by name, with the
sample's gradient under ``"input.sample"``.
"""

from __future__ import annotations

import zlib
from typing import Callable

import torch

from fastunet import UNet1DModel, UNet2DConditionModel, UNet2DModel, UNet3DConditionModel, UNetMotionModel
from fastunet.testing import perturb_

BATCH, TOKENS, CROSS, FRAMES = 2, 5, 16, 3

CONFIGS: dict[str, tuple[type, dict]] = {
    # diffusers' planning UNet (resnet blocks, mish, temporal mid block, 1-D conv output head)
    "unet_1d": (UNet1DModel, dict(
        in_channels=6, out_channels=6, sample_size=16, time_embedding_type="positional", use_timestep_embedding=True,
        flip_sin_to_cos=False, freq_shift=1, act_fn="mish", down_block_types=("DownResnetBlock1D",) * 2,
        up_block_types=("UpResnetBlock1D",), mid_block_type="MidResTemporalBlock1D", out_block_type="OutConv1DBlock",
        block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1)),
    # DDPM layout: a plain and an attention block each way, class-conditional
    "unet_2d": (UNet2DModel, dict(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
        num_class_embeds=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"))),
    # SDXL's layout: text_time added embedding, linear projections, timestep_cond (LCM)
    "unet_2d_condition": (UNet2DConditionModel, dict(
        block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=CROSS, norm_num_groups=8,
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4, time_cond_proj_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))),
    # the video models at one resolution (a cross-attention down block, the mid block, a cross-attention up
    # block): their graphs are the largest, and the resamplers are the 2-D models' own
    "unet_3d_condition": (UNet3DConditionModel, dict(
        block_out_channels=(16,), layers_per_block=1, norm_num_groups=8, cross_attention_dim=CROSS,
        attention_head_dim=4, down_block_types=("CrossAttnDownBlock3D",), up_block_types=("CrossAttnUpBlock3D",))),
    "unet_motion": (UNetMotionModel, dict(
        block_out_channels=(16,), layers_per_block=1, norm_num_groups=8, cross_attention_dim=CROSS,
        num_attention_heads=2, motion_num_attention_heads=2, motion_max_seq_length=8,
        down_block_types=("CrossAttnDownBlockMotion",), up_block_types=("CrossAttnUpBlockMotion",))),
}
NAMES = list(CONFIGS)


def _generator(name: str, salt: str = "") -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{name}/{salt}".encode()))


def make_inputs(name: str, salt: str = "", batch: int = BATCH) -> dict:
    """Seeded ``forward`` keyword inputs of model ``name``: samples at unit scale, two timesteps."""
    g = _generator(name, salt)
    cfg = CONFIGS[name][1]

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    timestep = torch.randint(1, 1000, (batch,), generator=g)
    if name == "unet_1d":
        return dict(sample=randn(batch, cfg["in_channels"], 8), timestep=timestep)
    if name == "unet_2d":
        return dict(sample=randn(batch, 3, 8, 8), timestep=timestep,
                    class_labels=torch.randint(0, cfg["num_class_embeds"], (batch,), generator=g))
    states = randn(batch, TOKENS, CROSS)
    if name == "unet_2d_condition":
        return dict(sample=randn(batch, 4, 8, 8), timestep=timestep, encoder_hidden_states=states,
                    timestep_cond=randn(batch, cfg["time_cond_proj_dim"]),
                    added_cond_kwargs=dict(text_embeds=randn(batch, 8),
                                           time_ids=torch.tensor([[8.0, 8, 0, 0, 8, 8]] * batch)))
    return dict(sample=randn(batch, 4, FRAMES, 8, 8), timestep=timestep, encoder_hidden_states=states)


def make(name: str, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """A tiny model of family ``name`` with perturbed weights, in train mode with dropout off, and its
    inputs."""
    cls, cfg = CONFIGS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initial weights (which perturb_ keeps the scale of) in every process
        model = perturb_(cls(**cfg), seed=seed)
    model.train()
    for module in model.modules():
        # UNet3D's temporal convolutions have a fixed dropout of 0.1 (diffusers'): off, so that two runs agree
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    return model, make_inputs(name)


def target_for(name: str, inputs: dict) -> torch.Tensor:
    """A fixed regression target with the output's shape (the noise of a diffusion loss)."""
    return torch.randn(inputs["sample"].shape, generator=_generator(name, "target"))


def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The diffusion regression loss, computed in float32 whatever the output dtype."""
    return (output.float() - target.float()).square().mean()


def grads(model: torch.nn.Module, inputs: dict, target: torch.Tensor,
          forward: Callable | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(output, {name: gradient})`` of one forward and backward of :func:`loss` (``forward`` defaults
    to ``model``); the sample's gradient is under ``"input.sample"``. Parameter gradients are cleared
    first and left on the model."""
    model.zero_grad(set_to_none=True)
    inputs = dict(inputs, sample=inputs["sample"].detach().clone().requires_grad_(True))
    output = (model if forward is None else forward)(**inputs).sample
    loss(output, target).backward()
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    out["input.sample"] = inputs["sample"].grad.detach().clone()
    return output.detach(), out
