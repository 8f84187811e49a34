"""diffusers' own StableDiffusionPipeline, built from tiny random components (CLIP text encoder with a
hand-made BPE vocabulary, AutoencoderKL, DDIM), gives the same images with fastunet's
UNet2DConditionModel in place of diffusers' UNet."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers import UNet2DConditionModel as DiffusersUNet
from pipeline_parts import tiny_text_encoder, tiny_tokenizer, tiny_vae  # tests/ is on sys.path

from fastunet import UNet2DConditionModel
from fastunet.testing import perturbed_pair

UNET_CONFIG = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                   norm_num_groups=8, attention_head_dim=4,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))



def test_stable_diffusion_pipeline_same_images(tmp_path):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(tmp_path)
    text_encoder = tiny_text_encoder(tokenizer, 32)
    vae = tiny_vae()
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
