"""fastunet's processors set on genuine diffusers UNets reproduce diffusers' own outputs."""

import pytest
import torch
from attention_helpers import RTOL, backend_for, processor_factories  # tests/ is on sys.path
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models import attention_processor as dap

import fastunet
import fastunet.kernels as K
from fastunet.layers.attention_processor import SlicedAttnProcessor
from fastunet.modeling import AttentionMixin
from fastunet.testing import perturb_, rel_err

PROCESSORS = processor_factories(slice_size=2)


def unet_2d():
    """Perturbed weights (as in the next one), so no projection is near zero and every attention layer matters."""
    return perturb_(UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"),
        attention_head_dim=8, norm_num_groups=8,
    )).eval()


def unet_2d_condition():
    return perturb_(UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )).eval()


@pytest.fixture(scope="module")
def models():
    """Each tiny UNet with its inputs and diffusers' default output (processors are reset per test).

    8x8 samples: 64-token self-attention keeps Triton's CPU interpreter at a fraction of a second per call.
    """
    torch.manual_seed(0)
    uncond = unet_2d()
    cond = unet_2d_condition()
    uncond_args = (torch.randn(2, 3, 8, 8), torch.tensor([10, 500]))
    cond_args = (torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 32))
    with torch.no_grad():
        return {
            "UNet2DModel": (uncond, uncond_args, uncond(*uncond_args).sample),
            "UNet2DConditionModel": (cond, cond_args, cond(*cond_args).sample),
        }


@pytest.fixture(autouse=True)
def _restore_default_processors(request):
    """Put diffusers' default processor back on the shared models after each test, pass or fail."""
    yield
    if "models" in request.fixturenames:
        for model, _, _ in request.getfixturevalue("models").values():
            set_processors(model, dap.AttnProcessor2_0())
        

def set_processors(model, processor):
    """UNet2DModel has no set_attn_processor in diffusers; fastunet's mixin method drives it directly."""
    AttentionMixin.set_attn_processor(model, processor)


def forward(model, args, backend="auto", **kwargs):
    with torch.no_grad(), fastunet.use_backend(backend):
        return model(*args, **kwargs).sample


def attention_launches():
    return sum(n for name, n in K.launch_counts.items()
               if name.startswith("_attention") and name.endswith("fwd_kernel"))


@pytest.mark.parametrize("processor", list(PROCESSORS))
@pytest.mark.parametrize("name", ["UNet2DModel", "UNet2DConditionModel"])
def test_processor_on_diffusers_unet(models, name, processor):
    model, args, expected = models[name]
    set_processors(model, PROCESSORS[processor]())
    assert all(type(p).__module__ == "fastunet.layers.attention_processor"
               for p in AttentionMixin.attn_processors.fget(model).values())
    before = attention_launches()
    actual = forward(model, args, backend=backend_for(processor))
    if processor == "triton":
        layers = len(AttentionMixin.attn_processors.fget(model))
        assert attention_launches() - before >= layers, "the Triton attention kernel did not run in every layer"
    assert rel_err(actual, expected, norm="max") < RTOL


def test_dict_of_processors(models):
    model, (sample, t, context), expected = models["UNet2DConditionModel"]
    keys = list(model.attn_processors)
    kinds = list(PROCESSORS)
    chosen = {key: PROCESSORS[kinds[i % len(kinds)]]() for i, key in enumerate(keys)}
    model.set_attn_processor(dict(chosen))
    assert {k: type(p) for k, p in model.attn_processors.items()} == {k: type(p) for k, p in chosen.items()}
    assert len({type(p) for p in chosen.values()}) == len(PROCESSORS)
    assert rel_err(forward(model, (sample, t, context), backend="triton"), expected, norm="max") < RTOL


@pytest.mark.parametrize("slice_size", ["auto", "max", 2, "per_layer"])
def test_diffusers_slicing_modes_with_our_sliced_processor(models, slice_size):
    """diffusers picks the per-layer slice sizes; our SlicedAttnProcessor computes with them."""
    model, args, expected = models["UNet2DConditionModel"]
    if slice_size == "per_layer":
        slice_size = [1 + i % 4 for i in range(len(model.attn_processors))]
    model.set_attention_slice(slice_size)
    theirs = model.attn_processors
    assert all(isinstance(p, dap.SlicedAttnProcessor) for p in theirs.values())
    model.set_attn_processor({k: SlicedAttnProcessor(p.slice_size) for k, p in theirs.items()})
    assert rel_err(forward(model, args), expected, norm="max") < RTOL


@pytest.mark.parametrize("processor", ["triton", "sliced"])
def test_diffusers_fused_projections_with_our_processor(processor):
    torch.manual_seed(1)
    model = unet_2d_condition()
    args = (torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 32))
    expected = forward(model, args)
    model.fuse_qkv_projections()
    model.set_attn_processor(PROCESSORS[processor]())
    with torch.no_grad():  # our processors must read the fused weights, not the separate ones
        for module in model.modules():
            if isinstance(module, dap.Attention):
                assert module.fused_projections
                for linear in (module.to_k, module.to_v) if module.is_cross_attention else (
                        module.to_q, module.to_k, module.to_v):
                    linear.weight.zero_()
    assert rel_err(forward(model, args, backend=backend_for(processor)), expected, norm="max") < RTOL


def test_encoder_attention_mask(models):
    """UNet2DConditionModel turns encoder_attention_mask into an additive (B, 1, M) bias for attn2."""
    model, (sample, t, context), _ = models["UNet2DConditionModel"]
    keep = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 1, 1, 1]])
    expected = forward(model, (sample, t, context), encoder_attention_mask=keep)
    for name in PROCESSORS:
        set_processors(model, PROCESSORS[name]())
        actual = forward(model, (sample, t, context), backend=backend_for(name), encoder_attention_mask=keep)
        assert rel_err(actual, expected, norm="max") < RTOL, name


def test_added_kv_encoder_attention_mask():
    """SimpleCrossAttn blocks: keys are [encoder tokens, the block's own tokens] and the encoder mask covers
    only the first part; the block's own tokens are kept, as diffusers pads the mask by them."""
    torch.manual_seed(2)
    model = perturb_(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "SimpleCrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
        resnet_time_scale_shift="scale_shift",
    )).eval()
    args = (torch.randn(2, 4, 4, 4), torch.tensor([3, 700]), torch.randn(2, 5, 32))
    keep = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 1, 1, 1]])
    expected = forward(model, args, encoder_attention_mask=keep)
    assert rel_err(expected, forward(model, args), norm="max") > 1e-3  # the mask matters
    for name in PROCESSORS:
        set_processors(model, PROCESSORS[name]())
        actual = forward(model, args, backend=backend_for(name), encoder_attention_mask=keep)
        assert rel_err(actual, expected, norm="max") < RTOL, name
