"""diffusers' own StableDiffusionPipeline, built from tiny random components (CLIP text encoder with a
hand-made BPE vocabulary, AutoencoderKL, DDIM), gives the same images with fastunet's
UNet2DConditionModel in place of diffusers' UNet."""

from __future__ import annotations

import json

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from diffusers import UNet2DConditionModel as DiffusersUNet
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from fastunet import UNet2DConditionModel
from fastunet.testing import perturbed_pair

UNET_CONFIG = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                   norm_num_groups=8, attention_head_dim=4,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def tiny_tokenizer(directory) -> CLIPTokenizer:
    """A character-level CLIP tokenizer: one token per letter (and per word-final letter), no merges."""
    vocab = {}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=16)


def test_stable_diffusion_pipeline_same_images(tmp_path):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(tmp_path)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id))
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    theirs, ours = perturbed_pair(DiffusersUNet(**UNET_CONFIG), UNet2DConditionModel(**UNET_CONFIG))

    images = []
    for unet in (theirs, ours):
        scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(["a cat", "a red fox"], negative_prompt=["blurry", "dark"], num_inference_steps=3,
                   guidance_scale=6.0, height=16, width=16, output_type="pt",
                   generator=torch.Generator().manual_seed(7))
        images.append(out.images)
    reference, candidate = images
    assert reference.shape == (2, 3, 16, 16)
    assert reference.std() > 1e-3  # a real image, not a constant
    assert torch.allclose(candidate, reference, atol=1e-4, rtol=0), (candidate - reference).abs().max()
