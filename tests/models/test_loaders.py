"""Adapters on fastunet's UNet2DConditionModel against diffusers' own, in diffusers' StableDiffusionPipeline:
LoRA files written by ``StableDiffusionPipeline.save_lora_weights`` and loaded with ``pipe.load_lora_weights``
(plain, scaled, fused, two adapters with weights, unloaded), IP-Adapter weights through ``pipe.load_ip_adapter``
with ``ip_adapter_image_embeds``, Custom Diffusion ``load_attn_procs`` / ``save_attn_procs``; and the
attention kernel still running with adapters in place."""

from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers import UNet2DConditionModel as DiffusersUNet
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

import fastunet
from fastunet import UNet2DConditionModel
from fastunet.kernels import launch_counts
from fastunet.layers.attention_processor import TritonCustomDiffusionAttnProcessor, TritonIPAdapterAttnProcessor
from fastunet.testing import perturbed_pair, rel_err

from pipeline_parts import tiny_text_encoder, tiny_tokenizer, tiny_vae  # tests/ is on sys.path

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402

UNET_CONFIG = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                   norm_num_groups=8, attention_head_dim=4,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TOL = 1e-4  # images in [0, 1]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer = tiny_tokenizer(directory)
    return dict(tokenizer=tokenizer, text_encoder=tiny_text_encoder(tokenizer, 32), vae=tiny_vae())


def pipelines(parts):
    theirs, ours = perturbed_pair(DiffusersUNet(**UNET_CONFIG), UNet2DConditionModel(**UNET_CONFIG))
    out = []
    for unet in (theirs, ours):
        scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        pipe = StableDiffusionPipeline(unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False, **parts)
        pipe.set_progress_bar_config(disable=True)
        out.append(pipe)
    return out


def images(pipe, **kwargs):
    with torch.no_grad():
        return pipe(["a cat", "a red fox"], negative_prompt=["blurry", "dark"], num_inference_steps=2,
                    guidance_scale=6.0, height=16, width=16, output_type="pt",
                    generator=torch.Generator().manual_seed(7), **kwargs).images


def assert_same(theirs, ours, label):
    error = (ours - theirs).abs().max().item()
    print(f"{label}: max |diff| = {error:.2e}")
    assert error < TOL, f"{label}: max |diff| {error:.3e}"


def write_lora(unet, directory, seed, rank=4, alpha=8):
    """A trained-looking LoRA (random A and B) on a copy of diffusers' ``unet``, saved as a pipeline file."""
    model = copy.deepcopy(unet)
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.3)
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=get_peft_model_state_dict(model))
    return directory


def test_lora_pipeline_same_images(parts, tmp_path):
    theirs, ours = pipelines(parts)
    base = images(theirs)
    assert_same(base, images(ours), "base")
    first = write_lora(theirs.unet, tmp_path / "a", seed=1)
    second = write_lora(theirs.unet, tmp_path / "b", seed=2, rank=2, alpha=2)

    for pipe in (theirs, ours):
        pipe.load_lora_weights(first, adapter_name="a")
    assert ours.unet._hf_peft_config_loaded and list(ours.unet.peft_config) == ["a"]
    assert ours.unet.active_adapters() == ["a"]
    with_lora = images(theirs)
    assert (with_lora - base).abs().max() > 1e-2  # the LoRA acts
    assert_same(with_lora, images(ours), "lora")
    assert_same(images(theirs, cross_attention_kwargs={"scale": 0.5}),
                images(ours, cross_attention_kwargs={"scale": 0.5}), "lora scale 0.5")
    assert_same(with_lora, images(ours), "lora after a scaled call")

    for pipe in (theirs, ours):
        pipe.unet.fuse_lora(lora_scale=0.7, safe_fusing=True)
    assert_same(images(theirs), images(ours), "fused 0.7")
    for pipe in (theirs, ours):
        pipe.unet.unfuse_lora()
    assert_same(with_lora, images(ours), "unfused")

    for pipe in (theirs, ours):
        pipe.load_lora_weights(second, adapter_name="b")
        pipe.unet.set_adapters(["a", "b"], [0.6, 1.5])
    assert ours.unet.active_adapters() == ["a", "b"]
    assert_same(images(theirs), images(ours), "two adapters")

    for pipe in (theirs, ours):
        pipe.unet.disable_lora()
    assert_same(base, images(ours), "disabled")
    for pipe in (theirs, ours):
        pipe.unet.enable_lora()
        pipe.unet.delete_adapters("b")
    assert list(ours.unet.peft_config) == ["a"]

    ours.unet.unload_lora()
    assert not any("lora" in k for k in ours.unet.state_dict())
    assert_same(base, images(ours), "unloaded")


def test_lora_save_round_trip_and_training_adapter(tmp_path):
    _, ours = perturbed_pair(DiffusersUNet(**UNET_CONFIG), UNet2DConditionModel(**UNET_CONFIG))
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.add_adapter(LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad and "lora" in n]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ours.save_lora_adapter(tmp_path, adapter_name="default")
    saved = safetensors.torch.load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert all(".lora_A." in k or ".lora_B." in k for k in saved)

    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 5, 32, generator=generator)
    with torch.no_grad():
        expected = ours(sample, 10, context).sample
    clean = UNet2DConditionModel(**UNET_CONFIG)
    clean.load_state_dict(base)
    clean.load_lora_adapter(tmp_path, prefix=None, adapter_name="again")
    with torch.no_grad():
        assert rel_err(clean(sample, 10, context).sample, expected, norm="max") < 1e-5


def test_lora_keeps_attention_on_triton_and_refuses_fused_qkv(tmp_path):
    theirs, ours = perturbed_pair(DiffusersUNet(**UNET_CONFIG), UNet2DConditionModel(**UNET_CONFIG))
    ours.load_lora_adapter(write_lora(theirs, tmp_path, seed=4), prefix="unet", adapter_name="a")
    theirs.load_lora_adapter(tmp_path, prefix="unet", adapter_name="a", weight_name="pytorch_lora_weights.safetensors")
    generator = torch.Generator().manual_seed(5)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 5, 32, generator=generator)
    before = dict(launch_counts)
    with torch.no_grad(), fastunet.use_backend("triton"):
        actual = ours(sample, 10, context).sample
    ran = {n: c - before.get(n, 0) for n, c in launch_counts.items() if c > before.get(n, 0)}
    assert any(n.startswith("_attention") for n in ran), ran
    with torch.no_grad():
        expected = theirs(sample, 10, context).sample
    assert rel_err(actual, expected, norm="max") < 1e-4

    with pytest.raises(ValueError, match="LoRA adapter is loaded"):
        ours.fuse_qkv_projections()
    ours.unload_lora()
    ours.fuse_qkv_projections()
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        ours.load_lora_adapter(tmp_path, prefix="unet", adapter_name="b")


def test_lora_bad_inputs(tmp_path):
    unet = UNet2DConditionModel(**UNET_CONFIG)
    with pytest.raises(ValueError, match="no LoRA adapter is loaded"):
        unet.set_adapters("x")
    with pytest.raises(TypeError, match="unexpected keyword"):
        unet.load_lora_adapter({}, nonsense=1)
    with pytest.raises(TypeError, match="peft config"):
        unet.add_adapter({"r": 4})
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="a")
    with pytest.raises(ValueError, match="not loaded"):
        unet.set_adapters(["a", "missing"])
    with pytest.raises(ValueError, match="one weight per adapter"):
        unet.set_adapters(["a"], [1.0, 2.0])
    with pytest.raises(ValueError, match="already in use"):
        unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="a")
    with pytest.raises(ValueError, match="no weights file"):
        unet.load_lora_adapter(tmp_path)


def ip_adapter_file(directory, unet, image_embed_dim=24, seed=0):
    """Random IP-Adapter weights in the original (diffusers-readable) layout, one file."""
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    tensors = {"image_proj.proj.weight": torch.randn(4 * cross, image_embed_dim, generator=generator) * 0.2,
               "image_proj.proj.bias": torch.randn(4 * cross, generator=generator) * 0.1,
               "image_proj.norm.weight": 1 + 0.1 * torch.randn(cross, generator=generator),
               "image_proj.norm.bias": 0.1 * torch.randn(cross, generator=generator)}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            width = unet.config.block_out_channels[0 if name.startswith(("down_blocks.0", "up_blocks.1")) else -1]
            for kind in ("to_k_ip", "to_v_ip"):
                tensors[f"ip_adapter.{key_id}.{kind}.weight"] = torch.randn(width, cross, generator=generator) * 0.3
            key_id += 2
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, directory / "ip.safetensors")
    return directory


def test_ip_adapter_pipeline_same_images(parts, tmp_path):
    theirs, ours = pipelines(parts)
    base = images(theirs)
    folder = ip_adapter_file(tmp_path / "ip", theirs.unet)
    for pipe in (theirs, ours):
        pipe.load_ip_adapter(str(folder), subfolder="", weight_name="ip.safetensors", image_encoder_folder=None)
    assert all(isinstance(p, TritonIPAdapterAttnProcessor)
               for n, p in ours.unet.attn_processors.items() if n.endswith("attn2.processor"))
    generator = torch.Generator().manual_seed(11)
    # (negative, positive) image embeddings for classifier-free guidance: (2 * batch, images, dim)
    embeds = [torch.randn(4, 1, 24, generator=generator)]
    with_ip = images(theirs, ip_adapter_image_embeds=embeds)
    assert (with_ip - base).abs().max() > 1e-2
    assert_same(with_ip, images(ours, ip_adapter_image_embeds=embeds), "ip-adapter")

    theirs.set_ip_adapter_scale(0.4)
    ours.unet.set_ip_adapter_scale(0.4)
    assert_same(images(theirs, ip_adapter_image_embeds=embeds), images(ours, ip_adapter_image_embeds=embeds),
                "ip-adapter scale 0.4")
    # diffusers' own pipeline method reaches fastunet's processors too
    for pipe in (theirs, ours):
        pipe.set_ip_adapter_scale(0.7)
    assert all(p.scale == [0.7] for n, p in ours.unet.attn_processors.items() if n.endswith("attn2.processor"))
    assert_same(images(theirs, ip_adapter_image_embeds=embeds), images(ours, ip_adapter_image_embeds=embeds),
                "ip-adapter scale 0.7 through pipe.set_ip_adapter_scale")

    before = dict(launch_counts)
    with fastunet.use_backend("triton"):
        images(ours, ip_adapter_image_embeds=embeds)
    ran = {n: c - before.get(n, 0) for n, c in launch_counts.items() if c > before.get(n, 0)}
    # text and image attention of every attn2, attn1, at 2 steps: more launches than attention layers
    assert sum(c for n, c in ran.items() if n.startswith("_attention")) > 0, ran


def test_ip_adapter_masks_match_diffusers(tmp_path):
    theirs, ours = perturbed_pair(DiffusersUNet(**UNET_CONFIG), UNet2DConditionModel(**UNET_CONFIG))
    folder = ip_adapter_file(tmp_path, theirs, seed=3)
    state = safetensors.torch.load_file(folder / "ip.safetensors")
    split = {"image_proj": {k[11:]: v for k, v in state.items() if k.startswith("image_proj.")},
             "ip_adapter": {k[11:]: v for k, v in state.items() if k.startswith("ip_adapter.")}}
    for unet in (theirs, ours):
        unet._load_ip_adapter_weights([split, copy.deepcopy(split)])
    generator = torch.Generator().manual_seed(2)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 5, 32, generator=generator)
    embeds = [torch.randn(2, 2, 24, generator=generator), torch.randn(2, 2, 24, generator=generator)]
    masks = [torch.rand(1, 2, 12, 16, generator=generator), None]
    for unet in (theirs, ours):
        for p in unet.attn_processors.values():
            if hasattr(p, "to_k_ip"):
                p.scale = [[0.7, 1.2], 0.5]
    outs = []
    for unet in (theirs, ours):
        with torch.no_grad():
            outs.append(unet(sample, 10, context, added_cond_kwargs={"image_embeds": embeds},
                             cross_attention_kwargs={"ip_adapter_masks": masks}).sample)
    assert rel_err(outs[1], outs[0], norm="max") < 1e-4

    with pytest.raises(ValueError, match="image_embeds"):
        ours(sample, 10, context)


def test_custom_diffusion_round_trip(tmp_path):
    theirs, ours = perturbed_pair(DiffusersUNet(**UNET_CONFIG), UNet2DConditionModel(**UNET_CONFIG))
    torch.manual_seed(6)
    processors = {}
    for name in theirs.attn_processors:
        if name.endswith("attn2.processor"):
            width = 32 if name.startswith(("down_blocks.0", "up_blocks.1")) else 64
            processors[name] = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=name.startswith("down"),
                                                               hidden_size=width, cross_attention_dim=32)
            for p in processors[name].parameters():
                torch.nn.init.normal_(p, std=0.2)
        else:
            processors[name] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False)
    theirs.set_attn_processor(processors)
    theirs.save_attn_procs(tmp_path / "theirs")

    base = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.load_attn_procs(tmp_path / "theirs")
    assert sum(isinstance(p, TritonCustomDiffusionAttnProcessor) for p in ours.attn_processors.values()) == 4
    generator = torch.Generator().manual_seed(8)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 5, 32, generator=generator)
    with torch.no_grad():
        expected = theirs(sample, 10, context).sample
        actual = ours(sample, 10, context).sample
    assert rel_err(actual, expected, norm="max") < 1e-4

    ours.save_attn_procs(tmp_path / "ours")
    again = UNet2DConditionModel(**UNET_CONFIG)
    again.load_state_dict(base)
    again.load_attn_procs(tmp_path / "ours")
    with torch.no_grad():
        assert rel_err(again(sample, 10, context).sample, actual, norm="max") < 1e-6
    with pytest.raises(ValueError, match="custom_diffusion"):
        ours.load_attn_procs({"down_blocks.0.x.weight": torch.zeros(1)})


def test_pipeline_level_lora_switches_skip_fastunets_unet(parts, tmp_path):
    """README, known differences: ``pipe.fuse_lora()`` (and the other pipeline-level switches) only reach
    diffusers' own model classes, so on fastunet's UNet it changes nothing; ``pipe.unet.fuse_lora()`` does."""
    theirs, ours = pipelines(parts)
    write_lora(theirs.unet, tmp_path, seed=3)
    for pipe in (theirs, ours):
        pipe.load_lora_weights(tmp_path, adapter_name="a")
    before = {n: p.detach().clone() for n, p in ours.unet.named_parameters() if "base_layer" in n}
    theirs_before = {n: p.detach().clone() for n, p in theirs.unet.named_parameters() if "base_layer" in n}
    for pipe in (theirs, ours):
        pipe.fuse_lora(components=["unet"], lora_scale=1.0)
    changed = [n for n, p in theirs.unet.named_parameters() if n in theirs_before and not torch.equal(p, theirs_before[n])]
    assert changed, "diffusers' pipe.fuse_lora fuses into diffusers' UNet"
    assert all(torch.equal(p, before[n]) for n, p in ours.unet.named_parameters() if n in before)
    ours.unet.fuse_lora(lora_scale=1.0)
    assert any(not torch.equal(p, before[n]) for n, p in ours.unet.named_parameters() if n in before)
    assert_same(images(theirs), images(ours), "fused through pipe.fuse_lora / pipe.unet.fuse_lora")


@pytest.mark.parametrize("fault", ["to_k_ip shape", "image_proj shape", "missing to_v_ip"])
def test_a_faulty_ip_adapter_is_refused_and_leaves_the_unet_as_it_was(tmp_path, fault):
    """A wrongly shaped or missing IP-Adapter weight: one error naming the entry (with both shapes where
    it has them), and the UNet keeps its processors, projections and weights."""
    unet = UNet2DConditionModel(**UNET_CONFIG)
    folder = ip_adapter_file(tmp_path, unet, seed=5)
    state = safetensors.torch.load_file(folder / "ip.safetensors")
    split = {"image_proj": {k[11:]: v for k, v in state.items() if k.startswith("image_proj.")},
             "ip_adapter": {k[11:]: v for k, v in state.items() if k.startswith("ip_adapter.")}}
    if fault == "to_k_ip shape":
        good = split["ip_adapter"]["3.to_k_ip.weight"]
        split["ip_adapter"]["3.to_k_ip.weight"] = torch.randn(good.shape[0] + 1, good.shape[1])
        error, words = RuntimeError, ["3.to_k_ip", "to_k_ip.0.weight", str(tuple(good.shape)),
                                      str((good.shape[0] + 1, good.shape[1]))]
    elif fault == "image_proj shape":
        good = split["image_proj"]["norm.weight"]
        split["image_proj"]["norm.weight"] = torch.randn(good.shape[0] + 3)
        error, words = RuntimeError, ["norm.weight", str(good.shape[0]), str(good.shape[0] + 3)]
    else:
        del split["ip_adapter"]["5.to_v_ip.weight"]
        error, words = ValueError, ["'5.to_v_ip.weight'"]
    processors = unet.attn_processors
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    projection = unet.encoder_hid_proj
    with pytest.raises(error) as raised:
        unet._load_ip_adapter_weights([split])
    message = str(raised.value).replace("torch.Size([", "(").replace("])", ")").replace("[", "(").replace("]", ")")
    for word in words:
        assert word in message, (word, str(raised.value))
    assert unet.attn_processors == processors
    assert unet.encoder_hid_proj is projection
    after = unet.state_dict()
    assert after.keys() == weights.keys()
    assert all(torch.equal(after[k], v) for k, v in weights.items())
