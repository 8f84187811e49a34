"""UNet1DModel against diffusers' with the same perturbed weights: Dance Diffusion audio, Diffuser planning
and value-function configs; checkpoints both ways; the Triton backend; attention processors; bad inputs."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet1DModel as DiffusersUNet1DModel
from diffusers.models.unets import unet_1d_blocks as d_blocks

import fastunet
from fastunet.layers.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor, TritonAttnProcessor
from fastunet.kernels import launch_counts
from fastunet.models.unet_1d import UNet1DModel, UNet1DOutput
from fastunet.models.unet_1d_blocks import Downsample1d, Upsample1d
from fastunet.testing import GradientErrors, gradient_errors, perturb_, perturbed_pair, rel_err

# (config, sample length) per case: tiny, but every block type, embedding and head of diffusers' 1-D UNet
DANCE = dict(in_channels=2, out_channels=2, extra_in_channels=16, sample_size=2048, sample_rate=16000,
             time_embedding_type="fourier", time_embedding_dim=16, flip_sin_to_cos=True,
             use_timestep_embedding=False, block_out_channels=(16, 32, 64),
             down_block_types=("DownBlock1DNoSkip", "DownBlock1D", "AttnDownBlock1D"),
             up_block_types=("AttnUpBlock1D", "UpBlock1D", "UpBlock1DNoSkip"), mid_block_type="UNetMidBlock1D")
PLANNING = dict(in_channels=6, out_channels=6, sample_size=16, time_embedding_type="positional",
                use_timestep_embedding=True, flip_sin_to_cos=False, freq_shift=1, act_fn="mish",
                down_block_types=("DownResnetBlock1D",) * 3, up_block_types=("UpResnetBlock1D",) * 2,
                mid_block_type="MidResTemporalBlock1D", out_block_type="OutConv1DBlock",
                block_out_channels=(16, 32, 48), norm_num_groups=8, layers_per_block=1)
VALUE = dict(in_channels=6, out_channels=6, sample_size=32, time_embedding_type="positional",
             use_timestep_embedding=True, flip_sin_to_cos=False, freq_shift=1, act_fn="mish",
             down_block_types=("DownResnetBlock1D",) * 3, up_block_types=(), mid_block_type="ValueFunctionMidBlock1D",
             out_block_type="ValueFunction", block_out_channels=(16, 32, 64), norm_num_groups=8,
             layers_per_block=1, downsample_each_block=True)

CASES = {
    "dance": (DANCE, 2048),
    "planning": (PLANNING, 16),
    "planning-swish-2layers": (dict(PLANNING, act_fn="swish", layers_per_block=2), 32),
    "planning-relu": (dict(PLANNING, act_fn="relu"), 16),  # relu: GroupNorm in the kernel, activation after
    "value": (VALUE, 32),
    "value-silu-odd-length": (dict(VALUE, act_fn="silu"), 27),
}
# for the Triton interpreter, whose cost grows with every kernel program: fewer blocks, shorter samples
# (at least two channels per GroupNorm group, or the conv biases before it get no gradient to compare)
TINY = {
    "dance": (DANCE, 32),
    "planning": (dict(PLANNING, down_block_types=("DownResnetBlock1D",) * 2, up_block_types=("UpResnetBlock1D",),
                      block_out_channels=(16, 32), layers_per_block=0), 8),
    "value": (dict(VALUE, down_block_types=("DownResnetBlock1D",) * 2, block_out_channels=(16, 64),
                   layers_per_block=0), 16),
}


def twins(config: dict):
    """A diffusers model and ours with the same perturbed weights, buffers (FIR taps) included, loaded strict."""
    theirs, ours = perturbed_pair(DiffusersUNet1DModel(**config), UNet1DModel(**config))
    return ours, theirs


def inputs(config: dict, length: int, batch: int = 2):
    sample = torch.randn(batch, config["in_channels"], length)
    if config["time_embedding_type"] == "fourier":
        timestep = torch.rand(batch)  # noise levels, as Dance Diffusion feeds them
    else:
        timestep = torch.randint(0, 1000, (batch,))
    return sample, timestep


def run_with_grads(model, sample, timestep, cotangent_seed=2):
    """Output, d(output . random)/d(sample) and /d(every trainable parameter), by name."""
    model.zero_grad(set_to_none=True)
    x = sample.detach().clone().requires_grad_(True)
    out = model(x, timestep).sample
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(cotangent_seed))
    (out * cotangent).sum().backward()
    grads = {"sample": x.grad}
    grads.update({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    return out.detach(), grads


def grad_errors(grads: dict, reference: dict) -> GradientErrors:
    """Max-abs relative errors of every gradient. A key bias's gradient is zero in exact arithmetic (a
    shift of every key changes no softmax row): rounding noise, measured against the scale of the same
    layer's key-weight gradient."""
    floors = {name: reference[name[:-4] + "weight"].abs().max().item()
              for name in reference if name.endswith("key.bias")}
    return gradient_errors(grads, reference, norm="max", floors=floors)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers(case):
    config, length = CASES[case]
    ours, theirs = twins(config)
    sample, timestep = inputs(config, length)
    sample_before, timestep_before = sample.clone(), timestep.clone()

    out, grads = run_with_grads(ours, sample, timestep)
    ref, ref_grads = run_with_grads(theirs, sample, timestep)

    expected_shape = (2, 1) if config.get("out_block_type") == "ValueFunction" else (2, config["out_channels"], length)
    assert out.shape == ref.shape == expected_shape
    assert rel_err(out, ref, norm="max") < 1e-4
    grad_errors(grads, ref_grads).check(2e-3)
    assert torch.equal(sample, sample_before) and torch.equal(timestep, timestep_before)  # inputs untouched


@pytest.mark.parametrize("case", ["dance", "planning"])
@pytest.mark.parametrize("form", ["int", "float", "0-d", "(1,)", "(B,)"])
def test_timestep_forms_match_diffusers(case, form):
    config = CASES[case][0]
    ours, theirs = twins(config)
    sample, timesteps = inputs(config, 64 if case == "dance" else 16, batch=3)
    t = {"int": 7, "float": 3.7, "0-d": timesteps[0], "(1,)": timesteps[:1], "(B,)": timesteps}[form]
    with torch.no_grad():
        assert rel_err(ours(sample, t).sample, theirs(sample, t).sample, norm="max") < 1e-4


def test_value_function_scalar_timestep():
    ours, theirs = twins(VALUE)
    sample, _ = inputs(VALUE, 32, batch=1)
    with torch.no_grad():
        assert rel_err(ours(sample, 10).sample, theirs(sample, 10).sample, norm="max") < 1e-4
        # diffusers cannot broadcast one timestep over a batch here (torch.cat of (B, .) and (1, .)); we do
        batch = sample.expand(3, -1, -1)
        assert torch.allclose(ours(batch, 10).sample, ours(sample, 10).sample.expand(3, 1), rtol=1e-5, atol=1e-6)


def test_output_forms():
    ours = UNet1DModel(**PLANNING)
    sample, timestep = inputs(PLANNING, 16)
    with torch.no_grad():
        out = ours(sample, timestep)
        (tup,) = ours(sample, timestep, return_dict=False)
    assert isinstance(out, UNet1DOutput)
    assert torch.equal(out.sample, tup) and out[0] is out.sample and out["sample"] is out.sample
    assert out.to_tuple() == (out.sample,) and len(out) == 1
    assert list(out) == ["sample"]  # a dict, as diffusers' outputs: iterating gives the keys


@pytest.mark.parametrize("case", ["dance", "value"])
def test_checkpoints_round_trip_with_diffusers(case, tmp_path):
    config, length = CASES[case]
    ours, theirs = twins(config)
    sample, timestep = inputs(config, length)
    with torch.no_grad():
        ref = theirs(sample, timestep).sample

    theirs.save_pretrained(tmp_path / "diffusers")
    loaded = UNet1DModel.from_pretrained(tmp_path / "diffusers")
    def public(config):  # JSON turns tuples into lists
        return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}

    assert public(loaded.config) == public(ours.config) == public(theirs.config)
    loaded.save_pretrained(tmp_path / "fastunet")
    reloaded = DiffusersUNet1DModel.from_pretrained(tmp_path / "fastunet")
    with torch.no_grad():
        assert rel_err(loaded(sample, timestep).sample, ref, norm="max") < 1e-4
        assert torch.equal(reloaded(sample, timestep).sample, ref)
    if case == "dance":  # the fixed FIR taps are persistent buffers, as in diffusers
        assert {"down_blocks.1.down.kernel", "mid_block.down.kernel", "mid_block.up.kernel",
                "up_blocks.0.up.kernel"} <= set(loaded.state_dict())


@pytest.mark.parametrize("case", list(TINY))
def test_triton_backend_matches_torch(case):
    config, length = TINY[case]
    model = UNet1DModel(**config)
    perturb_(model)
    sample, timestep = inputs(config, length, batch=1)
    with fastunet.use_backend("torch"):
        ref, ref_grads = run_with_grads(model, sample, timestep)
    before = dict(launch_counts)
    with fastunet.use_backend("triton"):
        out, grads = run_with_grads(model, sample, timestep)
    ran = {name: n - before.get(name, 0) for name, n in launch_counts.items() if n > before.get(name, 0)}
    assert any(name.startswith("_group_norm_act") for name in ran), ran
    if case == "dance":
        assert any(name.startswith("_attention") for name in ran), ran
    assert rel_err(out, ref, norm="max") < 1e-4
    grad_errors(grads, ref_grads).check(2e-3)


def test_attention_processors():
    config = DANCE
    ours, theirs = twins(config)
    sample, timestep = inputs(config, 64)
    keys = set(ours.state_dict())
    processors = ours.attn_processors
    assert len(processors) == 3 + 6 + 3  # AttnDownBlock1D, UNetMidBlock1D, AttnUpBlock1D
    assert all(isinstance(p, TritonAttnProcessor) for p in processors.values())
    assert "mid_block.attentions.5.processor" in processors
    with torch.no_grad():
        ref = theirs(sample, timestep).sample
        for processor in (AttnProcessor(), AttnProcessor2_0(), SlicedAttnProcessor(1)):
            ours.set_attn_processor(processor)
            assert rel_err(ours(sample, timestep).sample, ref, norm="max") < 1e-4, type(processor).__name__
        ours.set_default_attn_processor()
        ours.fuse_qkv_projections()
        assert rel_err(ours(sample, timestep).sample, ref, norm="max") < 1e-4
        ours.unfuse_qkv_projections()
    assert set(ours.state_dict()) == keys  # processors hold no weights; aliases add no keys


def test_gradient_checkpointing_gives_the_same_gradients():
    model = UNet1DModel(**PLANNING)
    perturb_(model)
    sample, timestep = inputs(PLANNING, 16)
    out, grads = run_with_grads(model, sample, timestep)
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    out_ckpt, grads_ckpt = run_with_grads(model, sample, timestep)
    assert torch.allclose(out, out_ckpt)
    grad_errors(grads_ckpt, grads).check(1e-5)


@pytest.mark.parametrize("kernel", ["linear", "cubic", "lanczos3"])
def test_fixed_resamplers_match_diffusers(kernel):
    x = torch.randn(2, 5, 40, requires_grad=True)
    for ours_cls, theirs_cls in ((Downsample1d, d_blocks.Downsample1d), (Upsample1d, d_blocks.Upsample1d)):
        ours, theirs = ours_cls(kernel), theirs_cls(kernel)
        assert torch.equal(ours.kernel, theirs.kernel) and "kernel" in ours.state_dict()
        outs = []
        for layer in (ours, theirs):
            y = layer(x)
            (g,) = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), x)
            outs.append((y, g))
        assert outs[0][0].shape == outs[1][0].shape
        assert rel_err(outs[0][0], outs[1][0], norm="max") < 1e-5
        assert rel_err(outs[0][1], outs[1][1], norm="max") < 1e-5


# -- bad inputs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, length, factor", [(PLANNING, 18, 4), (DANCE, 100, 8)])
def test_length_not_divisible(config, length, factor):
    model = UNet1DModel(**config)
    with pytest.raises(ValueError, match=rf"sample length {length} is not divisible by {factor}"):
        model(torch.randn(1, config["in_channels"], length), 1)


def test_odd_length_where_the_up_path_lines_up():
    """Two planning down blocks and one up block use only the deeper skip: diffusers runs a length of 7
    (strided convs round up: 7 -> 4, back up to 8), and so must we."""
    config = dict(PLANNING, down_block_types=("DownResnetBlock1D",) * 2, up_block_types=("UpResnetBlock1D",),
                  block_out_channels=(16, 32), layers_per_block=0)
    ours, theirs = twins(config)
    sample, timestep = inputs(config, 7)
    with torch.no_grad():
        out, ref = ours(sample, timestep).sample, theirs(sample, timestep).sample
    assert out.shape == ref.shape == (2, 6, 8)
    assert rel_err(out, ref, norm="max") < 1e-4


def test_up_path_that_never_lines_up():
    # every block downsamples, mid block included, but only two up blocks come back: no length works
    model = UNet1DModel(**dict(PLANNING, downsample_each_block=True))
    with pytest.raises(ValueError, match=r"do not undo the down and mid blocks' resampling at sample length 64 "
                                         r"\(nor at multiples of 16\): up block 0 \(UpResnetBlock1D\) would get length 4 "
                                         r"but its skip connection has length 16"):
        model(torch.randn(1, 6, 64), 1)


@pytest.mark.parametrize("config", [PLANNING, VALUE])
def test_planning_blocks_need_the_timestep_mlp(config):
    config = dict(config, use_timestep_embedding=False)
    sample, timestep = inputs(config, 16)
    with pytest.raises(Exception):  # diffusers fails inside its blocks
        DiffusersUNet1DModel(**config)(sample, timestep)
    with pytest.raises(ValueError, match=r"DownResnetBlock1D.* need use_timestep_embedding=True"):
        UNet1DModel(**config)(sample, timestep)


def test_value_function_length_too_long():
    with pytest.raises(ValueError, match=r"at most 32; got 40"):
        UNet1DModel(**VALUE)(torch.randn(1, 6, 40), 1)


def test_too_short_for_reflect_padding():
    with pytest.raises(ValueError, match=r"Downsample1d pads 3 samples by reflection.*got length 2"):
        UNet1DModel(**DANCE)(torch.randn(1, 2, 8), 1)


@pytest.mark.parametrize("channels", [1, 3, 18])
def test_channel_mismatch_dance(channels):
    # 18 = in_channels + extra_in_channels: the time embedding supplies the 16 extra channels itself
    with pytest.raises(ValueError, match=rf"sample has {channels} channels; expected in_channels = 2$"):
        UNet1DModel(**DANCE)(torch.randn(1, channels, 64), torch.rand(1))


def test_extra_in_channels_not_matching_the_embedding():
    model = UNet1DModel(**dict(DANCE, extra_in_channels=8))
    with pytest.raises(ValueError, match=r"appends the 16-channel time embedding.*extra_in_channels must be 16; got 8"):
        model(torch.randn(1, 2, 64), torch.rand(1))


def test_channel_mismatch_planning():
    with pytest.raises(ValueError, match=r"sample has 5 channels; expected in_channels \+ extra_in_channels = 6 \+ 0"):
        UNet1DModel(**PLANNING)(torch.randn(1, 5, 16), 1)
    model = UNet1DModel(**dict(PLANNING, extra_in_channels=2))  # without DownBlock1DNoSkip, the sample carries them
    with pytest.raises(ValueError, match=r"expected in_channels \+ extra_in_channels = 6 \+ 2 = 8"):
        model(torch.randn(1, 6, 16), 1)
    assert model(torch.randn(1, 8, 16), 1).sample.shape == (1, 6, 16)


@pytest.mark.parametrize("shape", [(6, 16), (1, 6, 16, 1)])
def test_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"sample must be \(batch, channels, length\)"):
        UNet1DModel(**PLANNING)(torch.randn(shape), 1)


def test_bad_timestep_and_sample_types():
    model = UNet1DModel(**PLANNING)
    with pytest.raises(ValueError, match="timestep has 3 entries but the batch has 2"):
        model(torch.randn(2, 6, 16), torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="timestep must be"):
        model(torch.randn(2, 6, 16), "7")
    with pytest.raises(TypeError, match="sample must be a torch.Tensor"):
        model([[0.0] * 16] * 6, 1)


@pytest.mark.parametrize("overrides, message", [
    (dict(down_block_types=("DownBlock1DNoSkip", "Nope", "AttnDownBlock1D")), r"down block type must be one of"),
    (dict(up_block_types=("AttnUpBlock1D", "UpBlock1D", "Nope")), r"up block type must be one of"),
    (dict(mid_block_type="Nope"), r"mid block type must be one of"),
    (dict(out_block_type="Nope"), r"out block type must be one of"),
    (dict(time_embedding_type="learned"), r"time_embedding_type must be 'fourier' or 'positional'; got 'learned'"),
    (dict(time_embedding_dim=15), r"even time_embedding_dim; got 15"),
    (dict(block_out_channels=(16, 32, 16)), r"SelfAttention1d needs n_head >= 1.*got n_head=0"),
    (dict(block_out_channels=(16, 32)), r"down_block_types has 3 entries but block_out_channels only 2"),
])
def test_bad_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        UNet1DModel(**dict(DANCE, **overrides))


def test_dance_diffusion_config_without_time_embedding_dim(tmp_path):
    """README, known differences: harmonai's Dance Diffusion configs lack time_embedding_dim; diffusers
    0.42 cannot load such a directory, fastunet refuses it with an error naming the mismatched weight and
    both shapes, and loads it with ``time_embedding_dim=16``."""
    import json

    ours, theirs = twins(DANCE)
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["time_embedding_dim"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception):
        DiffusersUNet1DModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"time_proj.weight: checkpoint \[8\], model \[16\]"):
        UNet1DModel.from_pretrained(tmp_path)
    loaded = UNet1DModel.from_pretrained(tmp_path, time_embedding_dim=16)
    x, t = torch.randn(2, 2, 32), torch.tensor([3, 500])
    with torch.no_grad():
        assert rel_err(loaded(x, t).sample, theirs(x, t).sample) < 1e-5
