"""UNet2DConditionModel against diffusers (the oracle), fp32, on tiny configs with the structure of
SD 1.5, SD 2.1, SDXL, LCM and class-conditional UNets.

Each config's model pair is built once (module-scoped fixture) with the same perturbed weights (every
parameter, including zero- and one-initialised ones) loaded strict into both; then outputs (1e-4
relative L2) and, on the base comparison, every parameter gradient (2e-3 relative) are compared, and
the outputs again with: encoder attention masks, ControlNet residuals, T2I-Adapter residuals, sliced
attention, feed-forward chunking, FreeU on and FreeU back off.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers import UNet2DConditionModel as DiffusersUNet
from diffusers.models.attention_processor import AttnProcessor2_0 as DiffusersAttnProcessor2_0

from fastunet.layers.attention_processor import AttnProcessor, SlicedAttnProcessor, TritonAttnProcessor
from fastunet.models.unet_2d_condition import UNet2DConditionModel, UNet2DConditionOutput
from fastunet.testing import gradient_errors, perturb_, perturbed_pair, rel_err

OUT_TOL, GRAD_TOL = 1e-4, 2e-3
GRAD_FLOOR = 1e-4  # each gradient's scale is at least 1e-4 of the largest gradient norm
BATCH, TOKENS = 2, 9

_TINY = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8)

CONFIGS = {
    # SD 1.5: conv projections, attention_head_dim 8 (= 8 heads), CrossAttn down then DownBlock2D
    "sd15": dict(_TINY, layers_per_block=2, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # SD 2.1: linear projections, per-block heads, upcast attention (+ scale_shift resnets, cos/sin order)
    "sd21": dict(_TINY, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 resnet_time_scale_shift="scale_shift", flip_sin_to_cos=False, freq_shift=1),
    # SDXL: DownBlock2D first, transformer depth [1, 2], text_time added embedding
    "sdxl": dict(_TINY, layers_per_block=2, attention_head_dim=(2, 4), use_linear_projection=True,
                 transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
    # LCM: time_cond_proj_dim / timestep_cond (+ encoder_hid_proj, 1x1 conv_in/out, centred input, activations)
    "lcm": dict(_TINY, attention_head_dim=4, time_cond_proj_dim=16, encoder_hid_dim=24,
                conv_in_kernel=1, conv_out_kernel=1, center_input_sample=True, timestep_post_act="silu",
                time_embedding_act_fn="silu",
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # class-conditional "projection" (+ concatenated class embeddings, only_cross_attention, no mid block)
    "class_projection": dict(_TINY, attention_head_dim=2, class_embed_type="projection",
                             projection_class_embeddings_input_dim=12, class_embeddings_concat=True,
                             only_cross_attention=True, mid_block_type=None,
                             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # class_embed_type "timestep" with Fourier time features, mish, odd sample size (forward_upsample_size)
    "class_timestep": dict(_TINY, attention_head_dim=4, class_embed_type="timestep", time_embedding_type="fourier",
                           act_fn="mish", mid_block_scale_factor=1.5,
                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
}
SAMPLE_HW = {"class_timestep": (15, 13)}


def skip_shapes(cfg: dict, height: int, width: int) -> tuple[list, tuple]:
    """Shapes (without batch) of the down path's skip connections and of the mid block's output."""
    channels = cfg["block_out_channels"]
    layers = cfg["layers_per_block"]
    shapes = [(channels[0], height, width)]
    for i, c in enumerate(channels):
        shapes += [(c, height, width)] * layers
        if i < len(channels) - 1:
            height, width = (height + 1) // 2, (width + 1) // 2
            shapes.append((c, height, width))
    return shapes, (channels[-1], height, width)


def make_inputs(name: str, cfg: dict) -> dict:
    height, width = SAMPLE_HW.get(name, (16, 16))
    context_dim = cfg.get("encoder_hid_dim") or cfg["cross_attention_dim"]
    inputs = dict(sample=torch.randn(BATCH, 4, height, width), timestep=torch.tensor([3, 601]),
                  encoder_hidden_states=torch.randn(BATCH, TOKENS, context_dim))
    if cfg.get("addition_embed_type") == "text_time":
        inputs["added_cond_kwargs"] = dict(text_embeds=torch.randn(BATCH, 16),
                                           time_ids=torch.tensor([[64.0, 48, 0, 8, 64, 48], [32, 32, 4, 0, 32, 32]]))
    if cfg.get("time_cond_proj_dim"):
        inputs["timestep_cond"] = torch.randn(BATCH, cfg["time_cond_proj_dim"])
    if cfg.get("class_embed_type") == "projection":
        inputs["class_labels"] = torch.randn(BATCH, cfg["projection_class_embeddings_input_dim"])
    if cfg.get("class_embed_type") == "timestep":
        inputs["class_labels"] = torch.tensor([5, 900])
        inputs["timestep"] = torch.tensor([0.25, 1.5])  # Fourier features of noise levels
    return inputs


class Pair:
    def __init__(self, name: str):
        self.name, self.cfg = name, CONFIGS[name]
        self.ours, self.theirs = UNet2DConditionModel(**self.cfg), DiffusersUNet(**self.cfg)
        perturbed_pair(self.theirs, self.ours)
        self.inputs = make_inputs(name, self.cfg)
        with torch.no_grad():
            self.base = self.theirs(**self.inputs).sample

    def compare(self, tol: float = OUT_TOL, **extra) -> torch.Tensor:
        kwargs = {**self.inputs, **extra}
        with torch.no_grad():
            a = self.ours(**kwargs).sample
            # diffusers pops residuals off the lists it is given: hand it copies
            b = self.theirs(**{k: list(v) if isinstance(v, list) else v for k, v in kwargs.items()}).sample
        assert a.shape == b.shape == self.inputs["sample"].shape[:1] + (4,) + self.inputs["sample"].shape[2:]
        assert rel_err(a, b) < tol, rel_err(a, b)
        return a


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request) -> Pair:
    torch.manual_seed(1234 + list(CONFIGS).index(request.param))
    return Pair(request.param)


def test_outputs_and_gradients(pair: Pair):
    inputs = pair.inputs
    weight = torch.randn_like(pair.base)
    grads = []
    for model in (pair.ours, pair.theirs):
        model.zero_grad(set_to_none=True)
        out = model(**inputs).sample
        (out * weight).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        if model is pair.ours:
            ours_out = out.detach()
    assert rel_err(ours_out, pair.base) < OUT_TOL, rel_err(ours_out, pair.base)
    assert grads[0].keys() == grads[1].keys()
    assert all(g is not None for g in grads[0].values())
    gradient_errors(*grads, floor=GRAD_FLOOR).check(GRAD_TOL)
    for model in (pair.ours, pair.theirs):
        model.zero_grad(set_to_none=True)
    with torch.no_grad():
        as_tuple = pair.ours(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and rel_err(as_tuple[0], pair.base) < OUT_TOL


def test_encoder_attention_mask(pair: Pair):
    keep = torch.ones(BATCH, TOKENS)
    keep[0, 5:] = 0
    keep[1, :3] = 0
    masked = pair.compare(encoder_attention_mask=keep)
    assert rel_err(masked, pair.base) > 1e-3  # the mask changed something
    if pair.cfg.get("only_cross_attention"):
        # attn1 attends to the text too, so attention_mask (its keep-mask) has text-token length
        pair.compare(attention_mask=keep, encoder_attention_mask=torch.flip(keep, [1]))


def test_controlnet_residuals(pair: Pair):
    height, width = pair.inputs["sample"].shape[2:]
    down_shapes, mid_shape = skip_shapes(pair.cfg, height, width)
    down = [torch.randn(BATCH, *s) for s in down_shapes]
    mid = torch.randn(BATCH, *mid_shape)
    copies = [d.clone() for d in down]
    out = pair.compare(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    assert rel_err(out, pair.base) > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(down, copies))  # the caller's tensors are untouched


def test_t2i_adapter(pair: Pair):
    """One residual per down block (inside cross-attention blocks, after plain ones, where diffusers'
    in-place add also reaches the block's last skip), plus one for the mid block (T2I-Adapter-XL)."""
    cfg = pair.cfg
    height, width = pair.inputs["sample"].shape[2:]
    adapters = []
    for i, (kind, c) in enumerate(zip(cfg["down_block_types"], cfg["block_out_channels"])):
        last = i == len(cfg["block_out_channels"]) - 1
        down_height, down_width = (height, width) if last else ((height + 1) // 2, (width + 1) // 2)
        at_output = kind == "DownBlock2D"
        adapters.append(torch.randn(BATCH, c, *((down_height, down_width) if at_output else (height, width))))
        height, width = down_height, down_width
    adapters.append(torch.randn(BATCH, cfg["block_out_channels"][-1], height, width))
    given = list(adapters)
    out = pair.compare(down_intrablock_additional_residuals=given)
    assert rel_err(out, pair.base) > 1e-3
    assert len(given) == len(adapters)  # the caller's list is not consumed
    # the deprecated form: adapter residuals in down_block_additional_residuals without a mid residual
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pair.compare(down_block_additional_residuals=list(adapters))


@pytest.mark.parametrize("slice_size", ["auto", 1, "list"])
def test_attention_slice(pair: Pair, slice_size):
    count = len(pair.ours.attn_processors)
    assert list(pair.ours.attn_processors) == list(pair.theirs.attn_processors)
    size = [1 + (i % 2) for i in range(count)] if slice_size == "list" else slice_size
    try:
        pair.ours.set_attention_slice(size)
        pair.theirs.set_attention_slice(list(size) if isinstance(size, list) else size)
        assert all(isinstance(p, SlicedAttnProcessor) for p in pair.ours.attn_processors.values())
        pair.compare()
    finally:
        pair.ours.set_default_attn_processor()
        pair.theirs.set_attn_processor(DiffusersAttnProcessor2_0())
    assert all(isinstance(p, TritonAttnProcessor) for p in pair.ours.attn_processors.values())


def _diffusers_chunking(model, chunk_size, dim):
    for module in model.modules():
        if hasattr(module, "set_chunk_feed_forward"):
            module.set_chunk_feed_forward(chunk_size=chunk_size, dim=dim)


@pytest.mark.parametrize("chunk_size,dim", [(None, 0), (2, 1)])
def test_forward_chunking(pair: Pair, chunk_size, dim):
    try:
        pair.ours.enable_forward_chunking(chunk_size, dim)
        _diffusers_chunking(pair.theirs, chunk_size or 1, dim)
        if pair.name == "class_timestep" and dim == 1:
            with pytest.raises(ValueError, match="multiple of chunk_size"):  # 15x13 tokens
                pair.ours(**pair.inputs)
        else:
            out = pair.compare()
            assert rel_err(out, pair.base) < OUT_TOL
    finally:
        pair.ours.disable_forward_chunking()
        _diffusers_chunking(pair.theirs, None, 0)


def test_freeu_on_then_off(pair: Pair):
    try:
        pair.ours.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
        pair.theirs.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
        assert pair.ours.freeu is not None
        on = pair.compare()
        assert rel_err(on, pair.base) > 1e-3
    finally:
        pair.ours.disable_freeu()
        pair.theirs.disable_freeu()
    assert pair.ours.freeu is None
    off = pair.compare()
    assert rel_err(off, pair.base) < OUT_TOL


def test_freeu_needs_all_four_factors(sdxl: Pair):
    """As in diffusers, FreeU does nothing unless s1, s2, b1 and b2 are all non-zero."""
    try:
        sdxl.ours.enable_freeu(s1=0.0, s2=0.2, b1=1.2, b2=1.4)
        sdxl.theirs.enable_freeu(s1=0.0, s2=0.2, b1=1.2, b2=1.4)
        assert rel_err(sdxl.compare(), sdxl.base) < OUT_TOL
        with pytest.raises(TypeError, match="b2"):
            sdxl.ours.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2="1.4")
    finally:
        sdxl.ours.disable_freeu()
        sdxl.theirs.disable_freeu()


# -- single-config checks ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl() -> Pair:
    torch.manual_seed(99)
    return Pair("sdxl")


@pytest.mark.parametrize("timestep", [7, 7.0, "0d", "batch", "one"])
def test_timestep_forms(sdxl: Pair, timestep):
    forms = {"0d": torch.tensor(250), "batch": torch.tensor([10, 990]), "one": torch.tensor([421.5])}
    sdxl.compare(timestep=forms.get(timestep, timestep))


def test_gradient_checkpointing_same_gradients(sdxl: Pair):
    model = sdxl.ours
    weight = torch.randn_like(sdxl.base)

    def grads():
        model.zero_grad(set_to_none=True)
        (model(**sdxl.inputs).sample * weight).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.enable_gradient_checkpointing()
    try:
        assert model.is_gradient_checkpointing
        checkpointed = grads()
    finally:
        model.disable_gradient_checkpointing()
        model.zero_grad(set_to_none=True)
    gradient_errors(checkpointed, plain, floor=GRAD_FLOOR).check(1e-5)


def test_attention_processor_api(sdxl: Pair):
    ours, theirs = sdxl.ours, sdxl.theirs
    assert list(ours.attn_processors) == list(theirs.attn_processors)
    try:
        processors = {k: AttnProcessor() for k in ours.attn_processors}
        ours.set_attn_processor(processors)
        assert all(isinstance(p, AttnProcessor) for p in ours.attn_processors.values())
        sdxl.compare()
        # fastunet's processors run on diffusers' Attention too
        theirs.set_attn_processor(TritonAttnProcessor())
        sdxl.compare()
        ours.fuse_qkv_projections()
        sdxl.compare()
        ours.unfuse_qkv_projections()
    finally:
        ours.set_default_attn_processor()
        theirs.set_attn_processor(DiffusersAttnProcessor2_0())
    sdxl.compare()


class RecordingProcessor(TritonAttnProcessor):
    """The default processor, recording the extra keyword it is given."""

    def __init__(self):
        self.seen = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 tag=None):
        self.seen.append(tag)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_cross_attention_kwargs_reach_processors(sdxl: Pair):
    recorder = RecordingProcessor()
    try:
        sdxl.ours.set_attn_processor(recorder)
        with torch.no_grad():
            out = sdxl.ours(**sdxl.inputs, cross_attention_kwargs={"tag": "x", "scale": 1.0}).sample
    finally:
        sdxl.ours.set_default_attn_processor()
    assert recorder.seen == ["x"] * len(sdxl.ours.attn_processors)
    assert rel_err(out, sdxl.base) < OUT_TOL


def test_fused_kernels_run_under_triton_backend():
    """With the Triton backend (the interpreter on CPU), every GroupNorm (+activation) of the UNet is one
    group_norm_act launch and every attention one attention launch, and the output still matches."""
    import fastunet
    from fastunet.layers.attention_processor import Attention
    from fastunet.kernels import launch_counts

    torch.manual_seed(21)
    cfg = dict(CONFIGS["sd15"], layers_per_block=1, attention_head_dim=2)
    ours, theirs = UNet2DConditionModel(**cfg), DiffusersUNet(**cfg)
    perturbed_pair(theirs, ours)
    inputs = dict(sample=torch.randn(BATCH, 4, 8, 8), timestep=torch.tensor([1, 500]),
                  encoder_hidden_states=torch.randn(BATCH, 5, 32))
    launch_counts.clear()
    with torch.no_grad(), fastunet.use_backend("triton"):
        out = ours(**inputs).sample
    with torch.no_grad():
        reference = theirs(**inputs).sample
    group_norms = sum(isinstance(m, torch.nn.GroupNorm) for m in ours.modules())
    attentions = sum(isinstance(m, Attention) for m in ours.modules())
    assert launch_counts["_group_norm_act_fwd_kernel"] == group_norms
    fwd_launches = (n for k, n in launch_counts.items() if k.startswith("_attention") and k.endswith("fwd_kernel"))
    assert sum(fwd_launches) == attentions
    assert rel_err(out, reference) < OUT_TOL


def test_num_attention_heads_overrides_attention_head_dim():
    """diffusers refuses num_attention_heads; fastunet takes it as the head count per block."""
    cfg = dict(CONFIGS["sd21"])
    theirs = DiffusersUNet(**cfg)
    ours = UNet2DConditionModel(**{**cfg, "attention_head_dim": 16, "num_attention_heads": (2, 4)})
    perturbed_pair(theirs, ours)
    assert ours.down_blocks[1].attentions[0].transformer_blocks[0].attn1.heads == 4
    inputs = make_inputs("sd21", cfg)
    with torch.no_grad():
        assert rel_err(ours(**inputs).sample, theirs(**inputs).sample) < OUT_TOL


@pytest.mark.parametrize("class_embed_type", ["simple_projection", "identity", "num_class_embeds"])
def test_other_class_embeddings(class_embed_type):
    torch.manual_seed(3)
    cfg = dict(_TINY, attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    time_embed_dim = 4 * cfg["block_out_channels"][0]
    if class_embed_type == "simple_projection":
        cfg.update(class_embed_type="simple_projection", projection_class_embeddings_input_dim=10)
        labels = torch.randn(BATCH, 10)
    elif class_embed_type == "identity":
        cfg.update(class_embed_type="identity")
        labels = torch.randn(BATCH, time_embed_dim)
    else:
        cfg.update(num_class_embeds=5)
        labels = torch.tensor([4, 1])
    ours, theirs = UNet2DConditionModel(**cfg), DiffusersUNet(**cfg)
    perturbed_pair(theirs, ours)
    inputs = make_inputs("sd15", cfg)
    with torch.no_grad():
        a = ours(**inputs, class_labels=labels).sample
        b = theirs(**inputs, class_labels=labels).sample
    assert rel_err(a, b) < OUT_TOL
    with pytest.raises(ValueError, match="class_labels are required"):
        ours(**inputs)


def test_ddim_classifier_free_guidance_loop():
    """A 3-step DDIM sampling loop with classifier-free guidance (random text embeddings) through both
    UNets gives the same latents (the full StableDiffusionPipeline is in test_sd_pipeline.py)."""
    torch.manual_seed(11)
    cfg = CONFIGS["sd15"]
    ours, theirs = UNet2DConditionModel(**cfg), DiffusersUNet(**cfg)
    perturbed_pair(theirs, ours)
    text, uncond = torch.randn(1, TOKENS, 32), torch.randn(1, TOKENS, 32)
    context = torch.cat([uncond, text])
    start = torch.randn(1, 4, 16, 16)

    def sample(unet):
        scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  clip_sample=False, set_alpha_to_one=False)
        scheduler.set_timesteps(3)
        latents = start * scheduler.init_noise_sigma
        with torch.no_grad():
            for t in scheduler.timesteps:
                model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                noise_uncond, noise_text = unet(model_in, t, encoder_hidden_states=context).sample.chunk(2)
                noise = noise_uncond + 7.5 * (noise_text - noise_uncond)
                latents = scheduler.step(noise, t, latents).prev_sample
        return latents

    a, b = sample(ours), sample(theirs)
    assert rel_err(a, b) < OUT_TOL, rel_err(a, b)
    assert rel_err(a, start) > 1e-2


def test_load_diffusers_checkpoint(tmp_path):
    torch.manual_seed(5)
    cfg = CONFIGS["sd21"]
    theirs = DiffusersUNet(**cfg)
    perturb_(theirs)
    theirs.save_pretrained(tmp_path / "unet")
    ours = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    inputs = make_inputs("sd21", cfg)
    with torch.no_grad():
        assert rel_err(ours(**inputs).sample, theirs(**inputs).sample) < OUT_TOL


# -- real-size configs: same parameter names and shapes, built on the meta device --------------------

SD15_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD21_CONFIG = dict(SD15_CONFIG, sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                   use_linear_projection=True, upcast_attention=True, dual_cross_attention=False)
SDXL_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280], layers_per_block=2, transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, mid_block_scale_factor=1, downsample_padding=1,
)


@pytest.mark.parametrize("cfg", [SD15_CONFIG, SD21_CONFIG, SDXL_CONFIG], ids=["sd15", "sd21", "sdxl"])
def test_real_size_configs_same_parameters(cfg):
    with torch.device("meta"):
        ours, theirs = UNet2DConditionModel(**cfg), DiffusersUNet(**cfg)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(theirs)
    assert list(ours.attn_processors) == list(theirs.attn_processors)


# -- validation ----------------------------------------------------------------------------------------


def test_forward_validation(sdxl: Pair):
    model, inputs = sdxl.ours, sdxl.inputs
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        model(**{**inputs, "sample": torch.randn(BATCH, 3, 16, 16)})
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        model(**{**inputs, "sample": torch.randn(4, 16, 16)})
    with pytest.raises(ValueError, match="encoder_hidden_states .* is required"):
        model(**{**inputs, "encoder_hidden_states": None})
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \(2, M, 32\)"):
        model(**{**inputs, "encoder_hidden_states": torch.randn(BATCH, TOKENS, 31)})
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        model(**{**inputs, "added_cond_kwargs": None})
    with pytest.raises(ValueError, match="time_ids"):
        model(**{**inputs, "added_cond_kwargs": {"text_embeds": torch.randn(BATCH, 16)}})
    with pytest.raises(ValueError, match="keep-mask"):
        model(**inputs, encoder_attention_mask=torch.ones(BATCH, 1, TOKENS))
    with pytest.raises(ValueError, match="timestep_cond"):
        model(**inputs, timestep_cond=torch.randn(BATCH, 4))
    with pytest.raises(ValueError, match="one tensor per skip"):
        model(**inputs, down_block_additional_residuals=[torch.zeros(1)], mid_block_additional_residual=torch.zeros(1))
    with pytest.raises(NotImplementedError, match="GLIGEN"):
        model(**inputs, cross_attention_kwargs={"gligen": {"boxes": None}})


@pytest.mark.parametrize("overrides,error,match", [
    (dict(dual_cross_attention=True), NotImplementedError, "dual_cross_attention"),
    (dict(attention_type="gated"), NotImplementedError, "attention_type"),
    (dict(addition_embed_type="image"), NotImplementedError, "addition_embed_type"),
    (dict(encoder_hid_dim=8, encoder_hid_dim_type="image_proj"), NotImplementedError, "encoder_hid_dim_type"),
    (dict(down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D")), NotImplementedError, "SimpleCrossAttn"),
    (dict(down_block_types=("CrossAttnDownBlock3D", "DownBlock2D")), ValueError, "unknown down block"),
    (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), NotImplementedError, "UNetMidBlock2DSimpleCrossAttn"),
    (dict(norm_num_groups=None), ValueError, "norm_num_groups"),
    (dict(block_out_channels=(32, 64, 64)), ValueError, "block_out_channels"),
    (dict(attention_head_dim=(2, 4, 8)), ValueError, "attention_head_dim"),
    (dict(transformer_layers_per_block=[[1], [1]]), ValueError, "reverse_transformer_layers_per_block"),
    (dict(class_embed_type="projection"), ValueError, "projection_class_embeddings_input_dim"),
    (dict(class_embed_type="bogus"), ValueError, "class_embed_type"),
    (dict(time_embedding_type="learned"), ValueError, "time_embedding_type"),
    (dict(addition_embed_type="text_time"), ValueError, "addition_time_embed_dim"),
])
def test_constructor_validation(overrides, error, match):
    cfg = {**CONFIGS["sd15"], **overrides}
    with pytest.raises(error, match=match):
        UNet2DConditionModel(**cfg)


def test_nested_transformer_layers_with_reverse():
    """Per-layer transformer depths for down blocks, with reverse_transformer_layers_per_block for up blocks."""
    torch.manual_seed(8)
    cfg = dict(CONFIGS["sd21"], layers_per_block=2, transformer_layers_per_block=[[1, 2], [2, 1]],
               reverse_transformer_layers_per_block=[[1, 1, 2], [2, 1, 1]])
    ours, theirs = UNet2DConditionModel(**cfg), DiffusersUNet(**cfg)
    perturbed_pair(theirs, ours)
    assert len(ours.up_blocks[0].attentions[2].transformer_blocks) == 2
    inputs = make_inputs("sd21", cfg)
    with torch.no_grad():
        assert rel_err(ours(**inputs).sample, theirs(**inputs).sample) < OUT_TOL
    with torch.no_grad():
        out = ours(**inputs)
    assert isinstance(out, UNet2DConditionOutput) and out["sample"] is out[0] is out.sample
    (sample,) = out.to_tuple()
    assert sample is out.sample and len(out) == 1 and list(out) == ["sample"]
