"""UNet3DConditionModel against diffusers (the oracle), fp32.

Two configs -- a tiny one and one with ModelScope's structure (three levels, two layers per block, heads
from ``attention_head_dim``) -- at 1, 3 and 8 frames. Each pair of models gets the same perturbed weights
(every parameter, the zero-initialised temporal convolutions included) loaded strict; outputs are
compared at 1e-4 relative L2 and every gradient (parameters and the input) at 2e-3, then the outputs
again with FreeU, attention slicing, forward chunking, ControlNet residuals, ``attention_mask``,
``timestep_cond``, ``return_dict=False`` and gradient checkpointing.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, TextToVideoSDPipeline
from diffusers import UNet3DConditionModel as DiffusersUNet3D
from diffusers.models.attention_processor import AttnProcessor2_0 as DiffusersAttnProcessor2_0
from pipeline_parts import tiny_text_encoder, tiny_tokenizer, tiny_vae  # tests/ is on sys.path

import fastunet
from fastunet import UNet3DConditionModel, UNet3DConditionOutput
from fastunet.kernels import launch_counts
from fastunet.layers.attention_processor import SlicedAttnProcessor, TritonAttnProcessor
from fastunet.testing import gradient_errors, perturbed_pair, rel_err

OUT_TOL, GRAD_TOL, GRAD_FLOOR = 1e-4, 2e-3, 1e-4
BATCH, TOKENS, COND = 2, 7, 8

CONFIGS = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
                 attention_head_dim=4, time_cond_proj_dim=COND,
                 down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                 up_block_types=("UpBlock3D", "CrossAttnUpBlock3D")),
    # ModelScope's layout (CrossAttn, CrossAttn, ..., DownBlock3D; mirrored up), scaled down
    "modelscope": dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8,
                       cross_attention_dim=24, attention_head_dim=8, time_cond_proj_dim=COND,
                       down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
                       up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D")),
}
CASES = [("tiny", 3), ("modelscope", 1), ("modelscope", 3), ("modelscope", 8)]
# the options are checked on each config (at 3 frames); outputs and gradients at every frame count
OPTION_CASES = [("tiny", 3), ("modelscope", 3)]
SIZE = (8, 8)


def skip_shapes(cfg: dict, frames: int, height: int, width: int) -> tuple[list, tuple]:
    """Shapes of the down path's skip connections and of the mid output, frames as batch."""
    channels, layers = cfg["block_out_channels"], cfg["layers_per_block"]
    shapes = [(BATCH * frames, channels[0], height, width)]
    for i, c in enumerate(channels):
        shapes += [(BATCH * frames, c, height, width)] * layers
        if i < len(channels) - 1:
            height, width = (height + 1) // 2, (width + 1) // 2
            shapes.append((BATCH * frames, c, height, width))
    return shapes, (BATCH * frames, channels[-1], height, width)


class Pair:
    def __init__(self, name: str, frames: int):
        self.name, self.frames, self.cfg = name, frames, CONFIGS[name]
        self.theirs, self.ours = perturbed_pair(DiffusersUNet3D(**self.cfg), UNet3DConditionModel(**self.cfg))
        # eval: the temporal convolutions have dropout 0.1
        self.theirs.eval()
        self.ours.eval()
        self.inputs = dict(sample=torch.randn(BATCH, 4, frames, *SIZE), timestep=torch.tensor([5, 700]),
                           encoder_hidden_states=torch.randn(BATCH, TOKENS, self.cfg["cross_attention_dim"]))
        with torch.no_grad():
            self.base = self.theirs(**self.inputs).sample

    def compare(self, tol: float = OUT_TOL, **extra) -> torch.Tensor:
        kwargs = {**self.inputs, **extra}
        with torch.no_grad():
            a = self.ours(**kwargs).sample
            b = self.theirs(**kwargs).sample
        assert a.shape == b.shape == (BATCH, 4, self.frames, *SIZE)
        assert rel_err(a, b) < tol, rel_err(a, b)
        return a


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{f}f" for n, f in CASES])
def frames_pair(request) -> Pair:
    torch.manual_seed(4321 + CASES.index(request.param))
    return Pair(*request.param)


@pytest.fixture(scope="module", params=OPTION_CASES, ids=[f"{n}-{f}f" for n, f in OPTION_CASES])
def pair(request) -> Pair:
    torch.manual_seed(1234 + OPTION_CASES.index(request.param))
    return Pair(*request.param)


def _grads(model, inputs: dict, weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    sample = inputs["sample"].clone().requires_grad_(True)
    out = model(**{**inputs, "sample": sample}).sample
    (out * weight).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    grads["<input sample>"] = sample.grad
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def test_outputs_and_gradients(frames_pair: Pair):
    pair = frames_pair
    # with timestep_cond, every parameter (time_embedding.cond_proj too) gets a gradient
    inputs = {**pair.inputs, "timestep_cond": torch.randn(BATCH, COND)}
    weight = torch.randn_like(pair.base)
    ours_out, ours = _grads(pair.ours, inputs, weight)
    theirs_out, theirs = _grads(pair.theirs, inputs, weight)
    assert rel_err(ours_out, theirs_out) < OUT_TOL
    gradient_errors(ours, theirs, floor=GRAD_FLOOR).check(GRAD_TOL)
    assert ours_out.std() > 1e-2  # a real output, not a constant


def test_return_dict_false_and_output_type(pair: Pair):
    with torch.no_grad():
        as_tuple = pair.ours(**pair.inputs, return_dict=False)
        as_output = pair.ours(**pair.inputs)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and rel_err(as_tuple[0], pair.base) < OUT_TOL
    assert isinstance(as_output, UNet3DConditionOutput) and torch.equal(as_output.sample, as_tuple[0])


def test_timestep_cond_and_attention_mask(pair: Pair):
    cond = torch.randn(BATCH, COND)
    out = pair.compare(timestep_cond=cond)
    assert rel_err(out, pair.base) > 1e-3  # the condition changed something
    keep = torch.ones(BATCH, TOKENS)
    keep[0, 4:] = 0
    # diffusers turns the mask into a bias and hands it to blocks that do not use it: same output
    masked = pair.compare(attention_mask=keep)
    assert rel_err(masked, pair.base) < OUT_TOL


def test_controlnet_residuals(pair: Pair):
    down_shapes, mid_shape = skip_shapes(pair.cfg, pair.frames, *SIZE)
    down = [torch.randn(s) for s in down_shapes]
    mid = torch.randn(mid_shape)
    copies = [d.clone() for d in down]
    out = pair.compare(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    assert rel_err(out, pair.base) > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(down, copies))  # the caller's tensors are untouched


@pytest.mark.parametrize("slice_size", ["auto", "max", 1])
def test_attention_slice(pair: Pair, slice_size):
    assert list(pair.ours.attn_processors) == list(pair.theirs.attn_processors)
    try:
        pair.ours.set_attention_slice(slice_size)
        pair.theirs.set_attention_slice(slice_size)
        assert all(isinstance(p, SlicedAttnProcessor) for p in pair.ours.attn_processors.values())
        pair.compare()
    finally:
        pair.ours.set_default_attn_processor()
        pair.theirs.set_attn_processor(DiffusersAttnProcessor2_0())
    assert all(isinstance(p, TritonAttnProcessor) for p in pair.ours.attn_processors.values())


@pytest.mark.parametrize("chunk_size,dim", [(None, 0), (2, 1)])
def test_forward_chunking(pair: Pair, chunk_size, dim):
    try:
        pair.ours.enable_forward_chunking(chunk_size, dim)
        pair.theirs.enable_forward_chunking(chunk_size, dim)
        if dim == 1 and pair.frames % 2:
            # the temporal transformers' token axis is the frames: 1 or 3 are not multiples of 2
            with pytest.raises(ValueError, match="multiple of chunk_size"):
                pair.ours(**pair.inputs)
        else:
            pair.compare()
    finally:
        pair.ours.disable_forward_chunking()
        pair.theirs.disable_forward_chunking()


def test_freeu_on_then_off(pair: Pair):
    try:
        pair.ours.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
        pair.theirs.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
        on = pair.compare()
        assert rel_err(on, pair.base) > 1e-3
    finally:
        pair.ours.disable_freeu()
        pair.theirs.disable_freeu()
    assert rel_err(pair.compare(), pair.base) < OUT_TOL


def test_gradient_checkpointing(pair: Pair):
    weight = torch.randn_like(pair.base)
    inputs = {**pair.inputs, "timestep_cond": torch.randn(BATCH, COND)}
    plain_out, plain = _grads(pair.ours, inputs, weight)
    pair.ours.train()
    pair.ours.enable_gradient_checkpointing()
    try:
        # dropout off: train mode only to make checkpointing recompute
        for module in pair.ours.modules():
            if isinstance(module, torch.nn.Dropout):
                module.eval()
        assert pair.ours.is_gradient_checkpointing
        ckpt_out, ckpt = _grads(pair.ours, inputs, weight)
    finally:
        pair.ours.disable_gradient_checkpointing()
        pair.ours.eval()
    assert rel_err(ckpt_out, plain_out) < 1e-6
    gradient_errors(ckpt, plain, floor=GRAD_FLOOR).check(1e-5)


# -- single-config checks ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> Pair:
    torch.manual_seed(99)
    return Pair("tiny", 2)


def test_fuse_qkv_projections(tiny: Pair):
    try:
        tiny.ours.fuse_qkv_projections()
        tiny.compare()
    finally:
        tiny.ours.unfuse_qkv_projections()
    tiny.compare()


def test_save_and_load_both_ways(tiny: Pair, tmp_path):
    tiny.ours.save_pretrained(tmp_path / "ours")
    theirs = DiffusersUNet3D.from_pretrained(tmp_path / "ours").eval()
    tiny.theirs.save_pretrained(tmp_path / "theirs")
    ours = UNet3DConditionModel.from_pretrained(tmp_path / "theirs").eval()
    with torch.no_grad():
        assert rel_err(theirs(**tiny.inputs).sample, tiny.base) < OUT_TOL
        assert rel_err(ours(**tiny.inputs).sample, tiny.base) < OUT_TOL
    assert json.loads((tmp_path / "ours" / "config.json").read_text()) == \
        {**json.loads((tmp_path / "theirs" / "config.json").read_text())}


def test_encoder_states_per_frame(tiny: Pair):
    """(B*F, M, D) encoder states are used as they are, frame by frame."""
    states = tiny.inputs["encoder_hidden_states"].repeat_interleave(tiny.frames, dim=0)
    with torch.no_grad():
        out = tiny.ours(**{**tiny.inputs, "encoder_hidden_states": states}).sample
    assert rel_err(out, tiny.base) < OUT_TOL


def test_no_unload_lora_like_diffusers():
    """diffusers' UNet3DConditionModel has no LoRA loader methods; neither has fastunet's."""
    assert hasattr(UNet3DConditionModel, "unload_lora") == hasattr(DiffusersUNet3D, "unload_lora")


def test_triton_backend_matches_torch_backend(tiny: Pair):
    """The whole model, forward and every gradient, on the Triton kernels (interpreter) vs the torch path,
    with ``timestep_cond``. One sample of 2 frames at 4x4: the temporal layers launch a program per pixel
    and head and the interpreter runs each for about 10 ms (the full 2 x 3 x 8x8 input took 9 min)."""
    inputs = dict(sample=tiny.inputs["sample"][:1, :, :2, :4, :4].contiguous(), timestep=tiny.inputs["timestep"][1:],
                  encoder_hidden_states=tiny.inputs["encoder_hidden_states"][:1], timestep_cond=torch.randn(1, COND))
    weight = torch.randn(1, 4, 2, 4, 4)
    torch_out, torch_grads = _grads(tiny.ours, inputs, weight)
    launch_counts.clear()
    with fastunet.use_backend("triton"):
        triton_out, triton_grads = _grads(tiny.ours, inputs, weight)
    launched = {name for name, count in launch_counts.items() if count}
    assert any("attention" in name for name in launched) and any("group_norm" in name for name in launched), launched
    assert rel_err(triton_out, torch_out) < 1e-5
    gradient_errors(triton_grads, torch_grads, floor=GRAD_FLOOR).check(1e-3)


# -- diffusers' text-to-video pipeline -----------------------------------------------------------------



def test_text_to_video_pipeline_same_frames(tmp_path):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(tmp_path)
    text_encoder = tiny_text_encoder(tokenizer, 16)
    vae = tiny_vae()
    cfg = {**CONFIGS["tiny"], "time_cond_proj_dim": None, "sample_size": 8}
    theirs, ours = perturbed_pair(DiffusersUNet3D(**cfg), UNet3DConditionModel(**cfg))
    videos = []
    for unet in (theirs, ours):
        scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        pipe = TextToVideoSDPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(),
                                     scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a cat", negative_prompt="blurry", num_inference_steps=3, num_frames=3, guidance_scale=6.0,
                   height=16, width=16, output_type="pt", generator=torch.Generator().manual_seed(7))
        videos.append(torch.as_tensor(out.frames))
    reference, candidate = videos
    assert reference.shape[:2] == (1, 3) and reference.std() > 1e-3
    assert torch.allclose(candidate, reference, atol=1e-4, rtol=0), (candidate - reference).abs().max()


# -- real size: names and shapes on the meta device ------------------------------------------------------


def test_modelscope_real_size_names_and_shapes():
    cfg = dict(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=64, cross_attention_dim=1024,
               layers_per_block=2, norm_num_groups=32)
    with torch.device("meta"):
        ours, theirs = UNet3DConditionModel(**cfg), DiffusersUNet3D(**cfg)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours_shapes == theirs_shapes
    assert list(ours.attn_processors) == list(theirs.attn_processors)
    assert sum(v.numel() for v in ours.parameters()) == sum(v.numel() for v in theirs.parameters())


# -- bad inputs ----------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(tiny: Pair):
    model, inputs = tiny.ours, tiny.inputs
    with pytest.raises(ValueError, match=r"\(B, 4, F, H, W\).*\(2, 4, 8, 8\)"):
        model(torch.randn(2, 4, 8, 8), inputs["timestep"], inputs["encoder_hidden_states"])
    with pytest.raises(ValueError, match=r"\(B, 4, F, H, W\).*\(2, 3, 2, 8, 8\)"):
        model(torch.randn(2, 3, 2, 8, 8), inputs["timestep"], inputs["encoder_hidden_states"])
    with pytest.raises(ValueError, match=r"\(2, M, 16\).*\(4, M, 16\).*\(3, 7, 16\)"):
        model(inputs["sample"], inputs["timestep"], torch.randn(3, TOKENS, 16))
    with pytest.raises(ValueError, match=r"\(2, M, 16\).*\(2, 7, 12\)"):
        model(inputs["sample"], inputs["timestep"], torch.randn(2, TOKENS, 12))
    down_shapes, mid_shape = skip_shapes(tiny.cfg, tiny.frames, *SIZE)
    wrong_frames = [torch.randn(BATCH * 3, *s[1:]) for s in down_shapes]
    with pytest.raises(ValueError, match=r"down_block_additional_residuals\[0\].*\(4, 32, 8, 8\).*\(6, 32, 8, 8\)"):
        model(**inputs, down_block_additional_residuals=wrong_frames, mid_block_additional_residual=torch.randn(mid_shape))
    with pytest.raises(ValueError, match="one tensor per skip connection"):
        model(**inputs, down_block_additional_residuals=[torch.randn(s) for s in down_shapes[:-1]],
              mid_block_additional_residual=torch.randn(mid_shape))
    with pytest.raises(ValueError, match=r"mid_block_additional_residual.*\(4, 64, 4, 4\).*\(4, 64, 8, 8\)"):
        model(**inputs, down_block_additional_residuals=[torch.randn(s) for s in down_shapes],
              mid_block_additional_residual=torch.randn(4, 64, 8, 8))
    with pytest.raises(NotImplementedError, match="num_attention_heads"):
        UNet3DConditionModel(**{**tiny.cfg, "num_attention_heads": 4})
    with pytest.raises(ValueError, match="norm_num_groups"):
        UNet3DConditionModel(**{**tiny.cfg, "norm_num_groups": None})
