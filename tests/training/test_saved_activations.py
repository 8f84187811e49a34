"""Activation memory of training (issue 12): the bytes autograd saves for backward, fastunet against
diffusers on the same weights and inputs, counted by :func:`fastunet.testing.saved_activation_bytes`
(unique storages, parameters left out).

Asserted: at most ``RATIO_LIMIT`` of diffusers' on a DDPM-CIFAR-structured UNet2DModel (batch 8, 32x32,
channels scaled down from (128, 256, 256, 256) to (32, 64, 64, 64)) and on an SD-1.5-structured tiny
UNet2DConditionModel (batch 4, 32x32 latents, 77 tokens, channels (32, 64, 64, 64)). Recorded: the ratio
of each of the five UNet families at the training tests' tiny sizes (printed with ``-s``, and kept in
the test's ``record_property``). ``scripts/saved_activations.py`` measures the same and the real-size
SD 1.5 UNet, with a per-layer breakdown.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from training_parts import CONFIGS as TINY_CONFIGS  # tests/training is on sys.path
from training_parts import NAMES, make

import fastunet
from fastunet.testing import perturbed_pair, saved_activation_bytes

RATIO_LIMIT = 0.6

# google/ddpm-cifar10-32's structure (attention at 16x16, two resnets per level, one head per layer),
# at a quarter of its channels
DDPM_CIFAR = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64, 64),
                  layers_per_block=2, norm_num_groups=32, attention_head_dim=None, flip_sin_to_cos=False,
                  freq_shift=1, norm_eps=1e-6,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
# SD 1.5's block types, heads and cross attention at 32-64 channels
SD_TINY = dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64, 64),
               layers_per_block=2, norm_num_groups=32, cross_attention_dim=64, attention_head_dim=8,
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def ddpm_cifar_pair(batch: int = 8, **overrides):
    """fastunet and diffusers UNet2DModel with the same perturbed weights, and their inputs."""
    cfg = dict(DDPM_CIFAR, **overrides)
    ours, theirs = perturbed_pair(fastunet.UNet2DModel(**cfg), diffusers.UNet2DModel(**cfg))
    g = torch.Generator().manual_seed(12)
    size = cfg["sample_size"]
    inputs = dict(sample=torch.randn(batch, cfg["in_channels"], size, size, generator=g),
                  timestep=torch.randint(1, 1000, (batch,), generator=g))
    return ours, theirs, inputs


def sd_pair(batch: int = 4, latent: int = 32, tokens: int = 77, **overrides):
    """fastunet and diffusers UNet2DConditionModel with the same perturbed weights, and their inputs."""
    cfg = dict(SD_TINY, **overrides)
    ours, theirs = perturbed_pair(fastunet.UNet2DConditionModel(**cfg), diffusers.UNet2DConditionModel(**cfg))
    g = torch.Generator().manual_seed(12)
    inputs = dict(sample=torch.randn(batch, cfg["in_channels"], latent, latent, generator=g),
                  timestep=torch.randint(1, 1000, (batch,), generator=g),
                  encoder_hidden_states=torch.randn(batch, tokens, cfg["cross_attention_dim"], generator=g))
    return ours, theirs, inputs


def family_pair(name: str):
    """A tiny model of one of the five families (the training tests' configs) and its diffusers twin."""
    ours, inputs = make(name)
    theirs = getattr(diffusers, type(ours).__name__)(**TINY_CONFIGS[name][1])
    theirs.load_state_dict(ours.state_dict(), strict=True)
    if name == "unet_motion":  # diffusers' motion UNet takes the text states per frame, (B*F, tokens, dim)
        frames = inputs["sample"].shape[2]
        inputs = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].repeat_interleave(frames, 0))
    theirs.train()
    for module in theirs.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    return ours, theirs, inputs


def saved_bytes(model, inputs) -> int:
    """Bytes saved for backward by one training forward (parameters require grad, the inputs do not)."""
    return saved_activation_bytes(lambda: model(**inputs).sample, model)


def ratio(pair) -> tuple[float, int, int]:
    ours, theirs, inputs = pair
    mine, reference = saved_bytes(ours, inputs), saved_bytes(theirs, inputs)
    return mine / reference, mine, reference


@pytest.mark.parametrize("make_pair", [ddpm_cifar_pair, sd_pair], ids=["ddpm_cifar", "sd_tiny"])
def test_saved_activations_at_most_limit_of_diffusers(make_pair, record_property):
    value, mine, reference = ratio(make_pair())
    record_property("ratio", round(value, 4))
    print(f"\n{make_pair.__name__}: fastunet {mine / 2**20:.2f} MiB, diffusers {reference / 2**20:.2f} MiB, "
          f"ratio {value:.3f}")
    assert value <= RATIO_LIMIT, f"saved activations {value:.3f}x diffusers' (limit {RATIO_LIMIT})"


def test_saved_activations_of_the_five_families(record_property):
    """Recorded, not asserted against a limit: the tiny configs are dominated by small tensors, where
    the layers run aten's plain ops (``normalization.PLAIN_BELOW_ELEMENTS``) and save what diffusers saves."""
    for name in NAMES:
        value, mine, reference = ratio(family_pair(name))
        record_property(name, round(value, 4))
        print(f"\n{name}: fastunet {mine / 2**10:.1f} KiB, diffusers {reference / 2**10:.1f} KiB, ratio {value:.3f}")
        assert value <= 1.0, f"{name} saves more than diffusers ({value:.3f}x)"


def test_counts_unique_storages_without_parameters():
    """A tensor saved twice and through a view counts once; a Linear's weight not at all."""
    layer = torch.nn.Linear(8, 8, bias=False)
    x = torch.randn(4, 8, requires_grad=True)

    def forward():
        h = layer(x)          # saves x (and the weight, excluded)
        return h * h.t().t()  # saves h and a view of h: one storage

    assert saved_activation_bytes(forward, layer) == 2 * 4 * 8 * 4
