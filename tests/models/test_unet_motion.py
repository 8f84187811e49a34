"""UNetMotionModel and MotionAdapter (AnimateDiff) against diffusers (the oracle), fp32.

Three kinds of model, each as a fastunet / diffusers pair with the same perturbed weights (every
parameter, the zero-initialised motion-module output projections included) loaded strict:

* ``tiny`` -- built from a config;
* ``from_unet2d-fastunet`` / ``from_unet2d-diffusers`` -- ``from_unet2d`` of a perturbed
  ``UNet2DConditionModel`` (fastunet's, or diffusers' own) and a perturbed ``MotionAdapter``, against
  diffusers' ``UNetMotionModel.from_unet2d`` of the same weights;
* ``sdxl`` -- SDXL's structure (``text_time`` added embeddings, deeper transformers, no motion mid block).

Outputs are compared at 1e-4 relative L2 and every gradient (parameters and the input) at 2e-3, then
the outputs again with FreeU, forward chunking, ControlNet residuals, ``return_dict=False`` and gradient
checkpointing.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AnimateDiffPipeline, DDIMScheduler
from diffusers import MotionAdapter as DiffusersMotionAdapter
from diffusers import UNet2DConditionModel as DiffusersUNet2D
from diffusers import UNetMotionModel as DiffusersUNetMotion
from pipeline_parts import tiny_text_encoder, tiny_tokenizer, tiny_vae  # tests/ is on sys.path

import fastunet
from fastunet import MotionAdapter, UNet2DConditionModel, UNet3DConditionOutput, UNetMotionModel
from fastunet.kernels import launch_counts
from fastunet.testing import gradient_errors, perturb_, perturbed_pair, rel_err

OUT_TOL, GRAD_TOL, GRAD_FLOOR = 1e-4, 2e-3, 1e-4
BATCH, TOKENS, FRAMES, SIZE, CROSS = 2, 7, 3, (8, 8), 16

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=CROSS,
            num_attention_heads=2, motion_num_attention_heads=2, motion_max_seq_length=8,
            down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
            up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"))
# SDXL's layout scaled down: plain first block, per-block heads and transformer depths, text_time
TEXT_EMBEDS, TIME_DIM = 16, 8
SDXL = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=CROSS,
            num_attention_heads=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
            motion_num_attention_heads=(2, 4), motion_max_seq_length=8, use_motion_mid_block=False,
            down_block_types=("DownBlockMotion", "CrossAttnDownBlockMotion"),
            up_block_types=("CrossAttnUpBlockMotion", "UpBlockMotion"), addition_embed_type="text_time",
            addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=TEXT_EMBEDS + 6 * TIME_DIM)
UNET_2D = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=CROSS,
               attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
ADAPTER = dict(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
               motion_norm_num_groups=8, motion_max_seq_length=8)
CASES = ["tiny", "from_unet2d-fastunet", "from_unet2d-diffusers", "sdxl"]


def _from_unet2d(source: str):
    """(diffusers' model, fastunet's model) by from_unet2d of the same perturbed 2-D UNet and adapter."""
    theirs_2d, ours_2d = perturbed_pair(DiffusersUNet2D(**UNET_2D), UNet2DConditionModel(**UNET_2D), seed=1)
    theirs_adapter, ours_adapter = perturbed_pair(DiffusersMotionAdapter(**ADAPTER), MotionAdapter(**ADAPTER), seed=2)
    theirs = DiffusersUNetMotion.from_unet2d(theirs_2d, theirs_adapter)
    if source == "fastunet":
        ours = UNetMotionModel.from_unet2d(ours_2d, ours_adapter)
    else:
        ours = UNetMotionModel.from_unet2d(theirs_2d, theirs_adapter)
    # both ways strict: the same names, shapes and values
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return theirs, ours


class Pair:
    def __init__(self, name: str):
        self.name = name
        if name.startswith("from_unet2d"):
            self.theirs, self.ours = _from_unet2d(name.split("-")[1])
        else:
            cfg = TINY if name == "tiny" else SDXL
            self.theirs, self.ours = perturbed_pair(DiffusersUNetMotion(**cfg), UNetMotionModel(**cfg))
        self.theirs.eval()
        self.ours.eval()
        self.cfg = dict(self.ours.config)
        self.inputs = dict(sample=torch.randn(BATCH, 4, FRAMES, *SIZE), timestep=torch.tensor([5, 700]),
                           encoder_hidden_states=torch.randn(BATCH * FRAMES, TOKENS, CROSS))
        if self.cfg["addition_embed_type"] == "text_time":
            self.inputs["added_cond_kwargs"] = dict(text_embeds=torch.randn(BATCH, TEXT_EMBEDS),
                                                    time_ids=torch.randn(BATCH, 6) * 100)
        with torch.no_grad():
            self.base = self.theirs(**self.inputs).sample

    def compare(self, tol: float = OUT_TOL, **extra) -> torch.Tensor:
        kwargs = {**self.inputs, **extra}
        with torch.no_grad():
            a = self.ours(**kwargs).sample
            b = self.theirs(**kwargs).sample
        assert a.shape == b.shape == (BATCH, 4, FRAMES, *SIZE)
        assert rel_err(a, b) < tol, rel_err(a, b)
        return a


@pytest.fixture(scope="module", params=CASES)
def pair(request) -> Pair:
    torch.manual_seed(1234 + CASES.index(request.param))
    return Pair(request.param)


def skip_shapes(cfg: dict) -> tuple[list, tuple]:
    """Shapes of the skip connections and of the mid output, frames as batch."""
    channels, layers = cfg["block_out_channels"], cfg["layers_per_block"]
    n, (h, w) = BATCH * FRAMES, SIZE
    shapes = [(n, channels[0], h, w)]
    for i, c in enumerate(channels):
        shapes += [(n, c, h, w)] * layers
        if i < len(channels) - 1:
            h, w = h // 2, w // 2
            shapes.append((n, c, h, w))
    return shapes, (n, channels[-1], h, w)


def _grads(model, inputs: dict, weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    sample = inputs["sample"].clone().requires_grad_(True)
    out = model(**{**inputs, "sample": sample}).sample
    (out * weight).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    grads["<input sample>"] = sample.grad
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def test_names_and_processor_order(pair: Pair):
    assert list(pair.ours.state_dict()) == list(pair.theirs.state_dict())
    assert list(pair.ours.attn_processors) == list(pair.theirs.attn_processors)


def test_outputs_and_gradients(pair: Pair):
    weight = torch.randn_like(pair.base)
    ours_out, ours = _grads(pair.ours, pair.inputs, weight)
    theirs_out, theirs = _grads(pair.theirs, pair.inputs, weight)
    err = rel_err(ours_out, theirs_out)
    assert err < OUT_TOL, err
    table = gradient_errors(ours, theirs, floor=GRAD_FLOOR).check(GRAD_TOL)
    print(f"{pair.name}: output {err:.2e}, worst gradient {table.max:.2e} ({table.worst})")
    assert ours_out.std() > 1e-2


def test_return_dict_false_and_output_type(pair: Pair):
    with torch.no_grad():
        as_tuple = pair.ours(**pair.inputs, return_dict=False)
        as_output = pair.ours(**pair.inputs)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and rel_err(as_tuple[0], pair.base) < OUT_TOL
    assert isinstance(as_output, UNet3DConditionOutput) and torch.equal(as_output.sample, as_tuple[0])


def test_controlnet_residuals(pair: Pair):
    down_shapes, mid_shape = skip_shapes(pair.cfg)
    down = [torch.randn(s) for s in down_shapes]
    mid = torch.randn(mid_shape)
    copies = [d.clone() for d in down]
    out = pair.compare(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    assert rel_err(out, pair.base) > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(down, copies))


def test_forward_chunking(pair: Pair):
    try:
        pair.ours.enable_forward_chunking(None, 0)
        pair.theirs.enable_forward_chunking(None, 0)
        pair.compare()
    finally:
        pair.ours.disable_forward_chunking()
        pair.theirs.disable_forward_chunking()


def test_freeu_on_then_off(pair: Pair):
    try:
        pair.ours.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
        pair.theirs.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
        assert rel_err(pair.compare(), pair.base) > 1e-3
    finally:
        pair.ours.disable_freeu()
        pair.theirs.disable_freeu()
    assert rel_err(pair.compare(), pair.base) < OUT_TOL


def test_gradient_checkpointing(pair: Pair):
    weight = torch.randn_like(pair.base)
    plain_out, plain = _grads(pair.ours, pair.inputs, weight)
    pair.ours.enable_gradient_checkpointing()
    try:
        assert pair.ours.is_gradient_checkpointing
        ckpt_out, ckpt = _grads(pair.ours, pair.inputs, weight)
    finally:
        pair.ours.disable_gradient_checkpointing()
    assert rel_err(ckpt_out, plain_out) < 1e-6
    gradient_errors(ckpt, plain, floor=GRAD_FLOOR).check(1e-5)


# -- single-model checks ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> Pair:
    torch.manual_seed(99)
    return Pair("tiny")


def test_freeze_unet2d_params_like_diffusers(tiny: Pair):
    try:
        tiny.ours.freeze_unet2d_params()
        tiny.theirs.freeze_unet2d_params()
        trainable = {n for n, p in tiny.ours.named_parameters() if p.requires_grad}
        assert trainable == {n for n, p in tiny.theirs.named_parameters() if p.requires_grad}
        assert trainable and all("motion_modules" in n for n in trainable)
    finally:
        tiny.ours.requires_grad_(True)
        tiny.theirs.requires_grad_(True)


def test_motion_adapter_round_trip_both_ways(tmp_path):
    theirs, ours = perturbed_pair(DiffusersMotionAdapter(**ADAPTER), MotionAdapter(**ADAPTER), seed=5)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    from_ours = DiffusersMotionAdapter.from_pretrained(tmp_path / "ours")
    from_theirs = MotionAdapter.from_pretrained(tmp_path / "theirs")
    for model in (from_ours, from_theirs):
        state = model.state_dict()
        assert list(state) == list(theirs.state_dict())
        assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in state.items())
    public = lambda config: {k: v for k, v in json.loads(json.dumps(dict(config))).items() if not k.startswith("_")}
    assert public(from_theirs.config) == public(ours.config) == public(theirs.config)


def test_save_and_load_motion_modules_both_ways(tiny: Pair, tmp_path):
    tiny.ours.save_motion_modules(tmp_path / "ours")
    tiny.theirs.save_motion_modules(tmp_path / "theirs")
    fresh_theirs = DiffusersUNetMotion(**TINY)
    fresh_theirs.load_motion_modules(DiffusersMotionAdapter.from_pretrained(tmp_path / "ours"))
    fresh_ours = UNetMotionModel(**TINY)
    fresh_ours.load_motion_modules(MotionAdapter.from_pretrained(tmp_path / "theirs"))
    reference = tiny.theirs.state_dict()
    for model in (fresh_theirs, fresh_ours):
        motion = {k: v for k, v in model.state_dict().items() if "motion_modules" in k}
        assert motion and all(torch.equal(v, reference[k]) for k, v in motion.items())


def test_save_and_from_pretrained_both_ways(tiny: Pair, tmp_path):
    tiny.ours.save_pretrained(tmp_path / "ours")
    tiny.theirs.save_pretrained(tmp_path / "theirs")
    theirs = DiffusersUNetMotion.from_pretrained(tmp_path / "ours").eval()
    ours = UNetMotionModel.from_pretrained(tmp_path / "theirs").eval()
    with torch.no_grad():
        assert rel_err(theirs(**tiny.inputs).sample, tiny.base) < OUT_TOL
        assert rel_err(ours(**tiny.inputs).sample, tiny.base) < OUT_TOL


def test_fuse_qkv_and_slicing(tiny: Pair):
    try:
        tiny.ours.fuse_qkv_projections()
        tiny.compare()
    finally:
        tiny.ours.unfuse_qkv_projections()
    try:
        tiny.ours.set_attention_slice(1)
        tiny.compare()
    finally:
        tiny.ours.set_default_attn_processor()


def test_encoder_states_per_video(tiny: Pair):
    """(B, M, D) encoder states are repeated per frame: the same as passing them per frame."""
    per_video = torch.randn(BATCH, TOKENS, CROSS)
    with torch.no_grad():
        a = tiny.ours(**{**tiny.inputs, "encoder_hidden_states": per_video}).sample
        b = tiny.ours(**{**tiny.inputs, "encoder_hidden_states": per_video.repeat_interleave(FRAMES, 0)}).sample
    assert torch.equal(a, b)


def test_triton_backend_matches_torch_backend(tiny: Pair):
    """The whole model, forward and every gradient, on the Triton kernels (interpreter) vs the torch path.
    One sample of 2 frames at 4x4 (its 2 frames' text states): the motion modules launch a program per
    pixel and head, run one after another by the interpreter."""
    inputs = dict(sample=tiny.inputs["sample"][:1, :, :2, :4, :4].contiguous(), timestep=tiny.inputs["timestep"][1:],
                  encoder_hidden_states=tiny.inputs["encoder_hidden_states"][:2])
    weight = torch.randn(1, 4, 2, 4, 4)
    torch_out, torch_grads = _grads(tiny.ours, inputs, weight)
    launch_counts.clear()
    with fastunet.use_backend("triton"):
        triton_out, triton_grads = _grads(tiny.ours, inputs, weight)
    launched = {name for name, count in launch_counts.items() if count}
    assert any("attention" in name for name in launched) and any("group_norm" in name for name in launched), launched
    assert rel_err(triton_out, torch_out) < 1e-5
    gradient_errors(triton_grads, torch_grads, floor=GRAD_FLOOR).check(1e-3)


# -- diffusers' AnimateDiff pipeline ------------------------------------------------------------------------



def test_animatediff_pipeline_same_frames(tmp_path):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(tmp_path)
    text_encoder = tiny_text_encoder(tokenizer, CROSS)
    vae = tiny_vae()
    adapter = perturb_(DiffusersMotionAdapter(**ADAPTER), seed=3)
    cfg = {**TINY, "sample_size": 8}
    theirs, ours = perturbed_pair(DiffusersUNetMotion(**cfg), UNetMotionModel(**cfg))
    videos = []
    for unet in (theirs, ours):
        scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                  steps_offset=1)
        pipe = AnimateDiffPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(),
                                   motion_adapter=adapter, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a cat", negative_prompt="blurry", num_inference_steps=2, num_frames=FRAMES, guidance_scale=6.0,
                   height=16, width=16, output_type="pt", generator=torch.Generator().manual_seed(7))
        videos.append(torch.as_tensor(out.frames))
    reference, candidate = videos
    assert reference.shape[:2] == (1, FRAMES) and reference.std() > 1e-3
    assert torch.allclose(candidate, reference, atol=1e-4, rtol=0), (candidate - reference).abs().max()


# -- real AnimateDiff configs: names and shapes on the meta device -------------------------------------------

SD15 = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8)
SDXL_2D = dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
               transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
               addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
REAL = {
    "v1-4": (SD15, dict(motion_max_seq_length=24, use_motion_mid_block=False)),
    "v1-5-2": (SD15, dict(motion_max_seq_length=32, use_motion_mid_block=True)),
    "v1-5-3": (SD15, dict(motion_max_seq_length=32, use_motion_mid_block=False)),
    "sdxl-beta": (SDXL_2D, dict(block_out_channels=(320, 640, 1280), motion_max_seq_length=32,
                                use_motion_mid_block=False)),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_configs_names_and_shapes(name):
    unet_cfg, adapter_cfg = REAL[name]
    with torch.device("meta"):
        unet_2d = DiffusersUNet2D(**unet_cfg)
        adapter = DiffusersMotionAdapter(**adapter_cfg)
        theirs = DiffusersUNetMotion.from_unet2d(unet_2d, adapter, load_weights=False)
        ours = UNetMotionModel.from_config(theirs.config)
        ours_from_2d = UNetMotionModel.from_unet2d(unet_2d, adapter, load_weights=False)
    theirs_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    for model in (ours, ours_from_2d):
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == theirs_shapes
        assert list(model.attn_processors) == list(theirs.attn_processors)
    assert ours.config.motion_max_seq_length == adapter_cfg["motion_max_seq_length"]
    assert hasattr(ours.mid_block, "motion_modules") == adapter_cfg["use_motion_mid_block"]


# -- bad inputs -------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(tiny: Pair):
    model, inputs = tiny.ours, tiny.inputs
    with pytest.raises(ValueError, match=r"\(B, 4, F, H, W\).*\(2, 4, 8, 8\)"):
        model(torch.randn(2, 4, 8, 8), inputs["timestep"], inputs["encoder_hidden_states"])
    with pytest.raises(ValueError, match=r"9 frames.*motion_max_seq_length=8"):
        model(torch.randn(1, 4, 9, 8, 8), inputs["timestep"][:1], torch.randn(9, TOKENS, CROSS))
    with pytest.raises(ValueError, match=r"\(6, M, 16\).*\(2, M, 16\).*\(5, 7, 16\)"):
        model(inputs["sample"], inputs["timestep"], torch.randn(5, TOKENS, CROSS))
    with pytest.raises(ValueError, match=r"block_out_channels \[32, 32\].*\[32, 64\]"):
        model.load_motion_modules(MotionAdapter(**{**ADAPTER, "block_out_channels": (32, 32)}))
    with pytest.raises(ValueError, match=r"motion_layers_per_block \[2, 2\].*layers_per_block \[1, 1\]"):
        model.load_motion_modules(MotionAdapter(**{**ADAPTER, "motion_layers_per_block": 2}))
    unet_2d = UNet2DConditionModel(**UNET_2D)
    with pytest.raises(ValueError, match=r"block_out_channels \[32, 64, 64\].*\[32, 64\]"):
        UNetMotionModel.from_unet2d(unet_2d, MotionAdapter(**{**ADAPTER, "block_out_channels": (32, 64, 64)}))
    with pytest.raises(ValueError, match="addition_time_embed_dim"):
        UNetMotionModel(**{**TINY, "addition_embed_type": "text_time"})
    with pytest.raises(ValueError, match="text_embeds"):
        UNetMotionModel(**SDXL)(**{k: v for k, v in inputs.items() if k != "added_cond_kwargs"})
