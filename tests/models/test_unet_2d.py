"""UNet2DModel against diffusers' UNet2DModel: same perturbed weights (strict both ways), outputs and
every parameter gradient; plus the blocks' reuse hooks, pipelines, backends and input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from diffusers import DDPMPipeline, DDPMScheduler
from diffusers import UNet2DModel as DiffusersUNet2DModel

import fastunet
from fastunet.kernels import launch_counts
from fastunet.models.unet_2d import UNet2DModel, UNet2DOutput
from fastunet.models.blocks import Stage, run_transformer
from fastunet.models.unet_2d_blocks import (
    AttnDownBlock2D,
    DownBlock,
    UpBlock,
    UpBlock2D,
    get_down_block,
    get_up_block,
)
from fastunet.testing import gradient_errors, perturb_, perturbed_pair, rel_err

OUT_TOL = 1e-4
GRAD_TOL = 2e-3
# gradients that vanish in exact arithmetic (e.g. attention key biases) are compared against a floor
# relative to the typical gradient size instead of their own (rounding-noise) norm
GRAD_FLOOR = 1e-4

SMALL = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
             attention_head_dim=16, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "UpBlock2D"))

CONFIGS = {
    # google/ddpm-cifar10-32's structure: positional embedding without the sin/cos flip, shift 1,
    # one attention head per layer (attention_head_dim=None), eps 1e-6
    "ddpm_cifar10": dict(sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8,
                         down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
                         flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6),
    # latent-diffusion UNet: 4-channel latents, attention at the lower resolutions with several heads,
    # asymmetric downsampling padding (0), gelu resnets
    "ldm": dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 96),
                layers_per_block=1, norm_num_groups=16, attention_head_dim=16, downsample_padding=0,
                down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), act_fn="gelu"),
    # NCSN++ (score SDE): Gaussian Fourier time embedding, skip blocks with FIR resampling, groups from
    # channels (norm_num_groups=None), centred inputs, sqrt(2) mid scale
    "ncsnpp": dict(sample_size=16, block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=None,
                   time_embedding_type="fourier", center_input_sample=True, attention_head_dim=None,
                   mid_block_scale_factor=math.sqrt(2.0), norm_eps=1e-6,
                   down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D"),
                   up_block_types=("SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D")),
    # class-conditional BigGAN-style resampling, scale/shift time conditioning (mid attention without
    # a group norm), resnet downsample/upsample types in the attention blocks, mish
    "class_scale_shift_resnet": dict(
        sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
        attention_head_dim=8, resnet_time_scale_shift="scale_shift", num_class_embeds=7,
        downsample_type="resnet", upsample_type="resnet", act_fn="mish",
        down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")),
    # learned time embedding, timestep class embedding, explicit attention norm groups and time width
    "learned_timestep_class": dict(
        sample_size=16, block_out_channels=(32, 48), layers_per_block=2, norm_num_groups=16,
        attention_head_dim=16, time_embedding_type="learned", num_train_timesteps=1000,
        class_embed_type="timestep", attn_norm_num_groups=4, time_embedding_dim=72,
        resnet_time_scale_shift="scale_shift",
        down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D")),
    # identity class embedding (labels are embeddings already), mid block without attention
    "identity_class_no_mid_attention": dict(SMALL, class_embed_type="identity", add_attention=False,
                                             time_embedding_dim=64),
    # no mid block at all
    "no_mid_block": dict(SMALL, mid_block_type=None, norm_eps=1e-6),
    # skip blocks in last place resample no skip image, so diffusers takes any in/out channel count there
    "final_skip_blocks_4_channels": dict(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        norm_num_groups=8, attention_head_dim=16, down_block_types=("DownBlock2D", "SkipDownBlock2D"),
        up_block_types=("UpBlock2D", "AttnSkipUpBlock2D")),
}


def build_pair(config: dict, seed: int = 0):
    theirs, ours = perturbed_pair(DiffusersUNet2DModel(**config), UNet2DModel(**config), seed=seed)
    return ours, theirs


def make_inputs(config: dict, batch: int = 2):
    size = config.get("sample_size", 16)
    sample = torch.randn(batch, config.get("in_channels", 3), size, size)
    if config.get("time_embedding_type") == "fourier":
        timestep = torch.rand(batch) * 0.9 + 0.05  # noise levels (log is taken)
    else:
        timestep = torch.randint(0, 1000, (batch,))
    kwargs = {}
    if config.get("num_class_embeds"):
        kwargs["class_labels"] = torch.randint(0, config["num_class_embeds"], (batch,))
    elif config.get("class_embed_type") == "timestep":
        kwargs["class_labels"] = torch.randint(0, 1000, (batch,))
    elif config.get("class_embed_type") == "identity":
        width = config.get("time_embedding_dim") or config["block_out_channels"][0] * 4
        kwargs["class_labels"] = torch.randn(batch, width)
    return sample, timestep, kwargs


def run_fwd_bwd(model: nn.Module, sample, timestep, kwargs, cotangent=None):
    model.zero_grad(set_to_none=True)
    x = sample.clone().requires_grad_(True)
    out = model(x, timestep, **kwargs).sample
    if cotangent is None:
        cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(123))
    (out * cotangent).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    grads["<input>"] = x.grad
    return out.detach(), grads


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers(name):
    config = CONFIGS[name]
    ours, theirs = build_pair(config)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    sample, timestep, kwargs = make_inputs(config)
    out_ours, grads_ours = run_fwd_bwd(ours, sample, timestep, kwargs)
    out_theirs, grads_theirs = run_fwd_bwd(theirs, sample, timestep, kwargs)
    assert out_ours.shape == out_theirs.shape == (2, config.get("out_channels", 3), 16, 16)
    assert rel_err(out_ours, out_theirs) < OUT_TOL
    gradient_errors(grads_ours, grads_theirs, floor=GRAD_FLOOR).check(GRAD_TOL)


def test_config_matches_diffusers_and_round_trips():
    config = CONFIGS["class_scale_shift_resnet"]
    ours, theirs = build_pair(config)
    for key, value in ours.config.items():
        expected = theirs.config[key]
        assert (list(value) if isinstance(value, tuple) else value) == (
            list(expected) if isinstance(expected, tuple) else expected), key
    rebuilt = UNet2DModel.from_config(theirs.config)
    rebuilt.load_state_dict(theirs.state_dict(), strict=True)


def test_dropout_matches_diffusers_in_eval_and_is_active_in_training():
    # (train-mode masks cannot be compared elementwise: torch draws them in memory order, and
    # diffusers' intermediate tensors are not always contiguous)
    config = dict(SMALL, dropout=0.3)
    ours, theirs = build_pair(config)
    ours.eval()
    theirs.eval()
    sample, timestep, kwargs = make_inputs(config)
    out_ours, grads_ours = run_fwd_bwd(ours, sample, timestep, kwargs)
    out_theirs, grads_theirs = run_fwd_bwd(theirs, sample, timestep, kwargs)
    assert rel_err(out_ours, out_theirs) < OUT_TOL
    gradient_errors(grads_ours, grads_theirs, floor=GRAD_FLOOR).check(GRAD_TOL)
    ours.train()
    torch.manual_seed(5)
    first = ours(sample, timestep).sample
    torch.manual_seed(5)
    again = ours(sample, timestep).sample
    torch.testing.assert_close(first, again)
    assert rel_err(first, out_ours) > 1e-2


def test_gradient_checkpointing_gives_the_same_gradients():
    config = dict(CONFIGS["class_scale_shift_resnet"])
    model = UNet2DModel(**config)
    perturb_(model)
    sample, timestep, kwargs = make_inputs(config)
    out_ref, grads_ref = run_fwd_bwd(model, sample, timestep, kwargs)

    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    calls = []
    hook = model.down_blocks[0].resnets[0].register_forward_pre_hook(lambda *_: calls.append(1))
    out_ckpt, grads_ckpt = run_fwd_bwd(model, sample, timestep, kwargs)
    hook.remove()
    assert len(calls) == 2, "the checkpointed resnet should run again during backward"
    torch.testing.assert_close(out_ckpt, out_ref)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-5, atol=1e-6, msg=name)
    model.disable_gradient_checkpointing()
    assert not model.is_gradient_checkpointing


@pytest.mark.parametrize("timestep", [
    7, 12.9, np.int64(21), torch.tensor(33), torch.tensor(41.5), torch.tensor([250]), torch.tensor([3, 999]),
], ids=["int", "float", "numpy_int", "0d_int", "0d_float", "1d_single", "1d_batch"])
def test_timestep_forms_match_diffusers(timestep):
    ours, theirs = build_pair(SMALL)
    sample = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = ours(sample, timestep).sample
        expected = theirs(sample, timestep).sample
    assert rel_err(out, expected) < OUT_TOL


def test_fourier_timestep_forms_match_diffusers():
    ours, theirs = build_pair(CONFIGS["ncsnpp"])
    sample = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for timestep in (torch.tensor(0.25), torch.tensor([0.3, 0.7]), 2):
            assert rel_err(ours(sample, timestep).sample, theirs(sample, timestep).sample) < OUT_TOL


def test_output_forms():
    model = UNet2DModel(**SMALL)
    sample = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = model(sample, 10)
        plain = model(sample, 10, return_dict=False)
    assert isinstance(out, UNet2DOutput) and isinstance(plain, tuple) and len(plain) == 1
    torch.testing.assert_close(out[0], plain[0])
    torch.testing.assert_close(out["sample"], out.sample)
    (unpacked,) = out.to_tuple()
    assert unpacked is out.sample


def test_inputs_are_not_mutated():
    config = CONFIGS["ncsnpp"]
    model = UNet2DModel(**config)
    perturb_(model)
    sample, timestep, kwargs = make_inputs(config)
    before = (sample.clone(), timestep.clone())
    with torch.no_grad():
        model(sample, timestep)
    assert torch.equal(sample, before[0]) and torch.equal(timestep, before[1])


def test_ddpm_pipeline_with_our_unet_gives_the_same_images():
    ours, theirs = build_pair(SMALL, seed=3)
    images = []
    for unet in (ours, theirs):
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100))
        pipe.set_progress_bar_config(disable=True)
        result = pipe(batch_size=2, generator=torch.Generator().manual_seed(11), num_inference_steps=4,
                      output_type="np")
        images.append(torch.from_numpy(result.images))
    assert images[0].shape == (2, 16, 16, 3)
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=1e-4)


def test_triton_backend_matches_torch_backend():
    config = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
                  attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    model = UNet2DModel(**config)
    perturb_(model)
    sample, timestep, kwargs = make_inputs(config)
    with fastunet.use_backend("torch"):
        out_ref, grads_ref = run_fwd_bwd(model, sample, timestep, kwargs)
    launch_counts.clear()
    with fastunet.use_backend("triton"):
        out_tri, grads_tri = run_fwd_bwd(model, sample, timestep, kwargs)
    ran = {name for name, count in launch_counts.items() if count}
    assert any(name.startswith("_group_norm_act") for name in ran), dict(launch_counts)
    assert any(name.startswith("_attention") for name in ran), dict(launch_counts)
    assert rel_err(out_tri, out_ref) < OUT_TOL
    gradient_errors(grads_tri, grads_ref, floor=GRAD_FLOOR).check(GRAD_TOL)


# -- the blocks' reuse hooks -------------------------------------------------------------------------


class _RecordingAttention(nn.Module):
    """A stand-in attention: scales by a parameter and records the kwargs it was called with."""

    def __init__(self, channels: int):
        super().__init__()
        self.gain = nn.Parameter(torch.full((channels,), 1.5))
        self.seen: list[dict] = []

    def forward(self, hidden_states, **kwargs):
        self.seen.append(kwargs)
        return (hidden_states * self.gain[:, None, None],)


def test_blocks_accept_attention_factories_kwargs_residuals_and_freeu():
    made = []

    def factory(index, channels):
        made.append((index, channels))
        return _RecordingAttention(channels)

    down = DownBlock(16, 32, 8, num_layers=2, resnet_groups=4, stages=[Stage("attentions", factory, run_transformer)])
    assert made == [(0, 32), (1, 32)]
    assert {k.split(".")[0] for k in down.state_dict()} == {"attentions", "resnets", "downsamplers"}
    x, temb, extra = torch.randn(2, 16, 8, 8), torch.randn(2, 8), torch.randn(2, 32, 8, 8)
    context = {"encoder_hidden_states": torch.randn(2, 5, 12)}
    h, res = down(x, temb, **context)
    h2, res2 = down(x, temb, **context, additional_residuals=extra)
    assert all(a.seen[-1] is not None and a.seen[-1]["encoder_hidden_states"] is context["encoder_hidden_states"]
               for a in down.attentions)
    torch.testing.assert_close(res2[0], res[0])
    torch.testing.assert_close(res2[1], res[1] + extra)  # after the last resnet/attention, before downsampling
    assert h.shape == (2, 32, 4, 4) and not torch.allclose(h2, h)

    up = UpBlock2D(in_channels=16, prev_output_channel=32, out_channels=32, temb_channels=8, num_layers=2,
                   resnet_groups=4, resolution_idx=0)
    pairs = []

    def freeu(hidden, res_hidden):
        pairs.append((hidden.shape[1], res_hidden.shape[1]))
        return hidden * 1.1, res_hidden * 0.9

    skips = (torch.randn(2, 16, 4, 4), torch.randn(2, 32, 4, 4))
    plain = up(torch.randn(2, 32, 4, 4), skips, temb)
    up.set_freeu(freeu)
    hidden = torch.randn(2, 32, 4, 4)
    with_freeu = up(hidden, skips, temb)
    assert pairs == [(32, 32), (32, 16)] and with_freeu.shape == plain.shape == (2, 32, 8, 8)
    up.set_freeu(None)
    assert up.freeu is None
    with pytest.raises(TypeError):
        up.set_freeu(3)


def test_registry_builds_diffusers_class_names():
    block = get_down_block("AttnDownBlock2D", num_layers=1, in_channels=32, out_channels=32, temb_channels=8,
                           add_downsample=False, resnet_eps=1e-6, resnet_act_fn="silu", resnet_groups=8,
                           attention_head_dim=8, downsample_type="conv")
    assert type(block) is AttnDownBlock2D and block.downsamplers is None
    up = get_up_block("UNetResUpBlock2D", num_layers=1, in_channels=32, out_channels=32, prev_output_channel=32,
                      temb_channels=8, add_upsample=True, resnet_eps=1e-6, resnet_act_fn="silu", resnet_groups=8,
                      resolution_idx=1)
    assert isinstance(up, UpBlock) and up.resolution_idx == 1
    with pytest.raises(ValueError, match="DownBlock2D"):
        get_down_block("NoSuchBlock", 1, 32, 32, 8, True, 1e-6, "silu")


# -- validation --------------------------------------------------------------------------------------


def test_forward_rejects_bad_inputs():
    model = UNet2DModel(**SMALL)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(2, 4, 16, 16\)"):
        model(torch.randn(2, 4, 16, 16), 1)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        model(torch.randn(3, 16, 16), 1)
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.randn(2, 3, 15, 16), 1)
    with pytest.raises(ValueError, match="no class embedding"):
        model(torch.randn(2, 3, 16, 16), 1, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="3 entries"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2, 3]))

    conditional = UNet2DModel(**dict(SMALL, num_class_embeds=4))
    with pytest.raises(ValueError, match="class_labels are required"):
        conditional(torch.randn(2, 3, 16, 16), 1)
    with pytest.raises(ValueError, match="batch 2"):
        conditional(torch.randn(2, 3, 16, 16), 1, class_labels=torch.tensor([0, 1, 2]))

    learned = UNet2DModel(**dict(SMALL, time_embedding_type="learned", num_train_timesteps=10))
    with pytest.raises(TypeError, match="integers"):
        learned(torch.randn(2, 3, 16, 16), torch.tensor([0.5, 1.5]))

    deep = UNet2DModel(**dict(SMALL, block_out_channels=(32, 32, 64),
                              down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3))
    with pytest.raises(ValueError, match="multiples of 4"):
        deep(torch.randn(1, 3, 18, 16), 1)


@pytest.mark.parametrize("overrides,match", [
    (dict(norm_num_groups=12), "groups"),
    (dict(block_out_channels=(32, 64, 64)), "block_out_channels"),
    (dict(up_block_types=("UpBlock2D",)), "same length"),
    (dict(down_block_types=("DownBlock2D", "FancyBlock2D")), "FancyBlock2D"),
    (dict(time_embedding_type="rotary"), "time_embedding_type"),
    (dict(time_embedding_type="learned"), "num_train_timesteps"),
    (dict(class_embed_type="projection"), "class_embed_type"),
    (dict(mid_block_type="UNetMidBlock2DCrossAttn"), "mid_block_type"),
    (dict(resnet_time_scale_shift="spatial"), "resnet_time_scale_shift"),
    (dict(norm_num_groups=None), "norm_num_groups=None"),
    (dict(in_channels=4, down_block_types=("SkipDownBlock2D", "SkipDownBlock2D"),
          up_block_types=("SkipUpBlock2D", "SkipUpBlock2D")), "in_channels must be 3"),
    (dict(out_channels=4, down_block_types=("SkipDownBlock2D", "SkipDownBlock2D"),
          up_block_types=("SkipUpBlock2D", "SkipUpBlock2D")), "out_channels must be 3"),
    # diffusers builds these, then fails in forward: the skip image and the hidden states drift apart
    (dict(block_out_channels=(32, 32, 64), down_block_types=("DownBlock2D", "SkipDownBlock2D", "DownBlock2D"),
          up_block_types=("UpBlock2D",) * 3), "preceded by plain down blocks"),
    (dict(up_block_types=("SkipUpBlock2D", "UpBlock2D")), "every later up block"),
    (dict(attention_head_dim=128), "attention_head_dim"),
    (dict(downsample_type="pool"), "downsample_type"),
    (dict(upsample_type="pixel_shuffle"), "upsample_type"),
])
def test_constructor_rejects_bad_configs(overrides, match):
    with pytest.raises(ValueError, match=match):
        UNet2DModel(**dict(SMALL, **overrides))
