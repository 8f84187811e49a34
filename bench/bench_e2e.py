"""End-to-end UNet benchmarks: forward (inference) and forward+backward (a training step's gradients).

Providers:
  fastunet          fastunet's model, backend "auto" (Triton kernels on CUDA, torch reference on CPU)
  fastunet-torch    fastunet's model, backend "torch" (shows what the kernels buy on a GPU)
  diffusers         diffusers' own model with its default attention processor
  torch.compile     torch.compile of fastunet's model (backend "auto"; the custom ops stay whole)
  diffusers+compile torch.compile of diffusers' model
All providers run the same weights. Besides time, each run records the bytes autograd saves for
backward (``saved_mib``, measured with saved-tensor hooks, device independent) and on CUDA the peak
allocated memory (``peak_mib``).

On a CPU the shapes are small so the whole file finishes in a few minutes; on a GPU they are
SD-1.5-sized (64x64 latents, fp16), except at the small (smoke-test) sizes, which are the CPU's
everywhere.
"""

from __future__ import annotations

import pytest
import torch
from harness import CUDA, available, cuda_peak_bytes, saved_bytes, small, time_rounds, warm_up

import fastunet

try:
    import diffusers
except ImportError:  # the diffusers providers need it; fastunet's run on randomly initialised weights
    diffusers = None

DTYPE = torch.float16 if CUDA else torch.float32

if CUDA and not small():
    CONFIGS = {
        "UNet2DModel-ddpm256": dict(
            cls="UNet2DModel", batch=8, size=64,
            config=dict(sample_size=64, block_out_channels=(128, 128, 256, 256, 512, 512),
                        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4)),
        "UNet2DConditionModel-sd15": dict(
            cls="UNet2DConditionModel", batch=2, size=64, tokens=77,
            config=dict(sample_size=64, cross_attention_dim=768)),
    }
else:
    CONFIGS = {
        "UNet2DModel-ddpm-tiny": dict(
            cls="UNet2DModel", batch=2, size=32,
            config=dict(sample_size=32, block_out_channels=(32, 64, 64), norm_num_groups=8,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))),
        "UNet2DConditionModel-sd-tiny": dict(
            cls="UNet2DConditionModel", batch=2, size=16, tokens=77,
            config=dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
                        norm_num_groups=8, attention_head_dim=8,
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))),
    }

if small():  # smoke-test sizes: the CPU models on one sample at half the resolution
    for _spec in CONFIGS.values():
        _spec.update(batch=1, size=_spec["size"] // 2)
        _spec["config"]["sample_size"] = _spec["size"]

PROVIDERS = ["fastunet", "fastunet-torch", "diffusers", "torch.compile", "diffusers+compile"]


def _inputs(spec: dict, device) -> dict:
    cfg = spec["config"]
    channels = cfg.get("in_channels", 3 if spec["cls"] == "UNet2DModel" else 4)
    inputs = dict(sample=torch.randn(spec["batch"], channels, spec["size"], spec["size"], device=device, dtype=DTYPE),
                  timestep=torch.randint(0, 1000, (spec["batch"],), device=device))
    if spec["cls"] == "UNet2DConditionModel":
        inputs["encoder_hidden_states"] = torch.randn(spec["batch"], spec["tokens"], cfg["cross_attention_dim"],
                                                      device=device, dtype=DTYPE)
    return inputs


_MODELS: dict = {}


def _model(kind: str, name: str, device) -> torch.nn.Module:
    """The ``kind`` ("diffusers" or "fastunet") model of config ``name`` on ``device`` in ``DTYPE``, built
    once per (config, device, dtype) and shared by the providers and modes (a real-size init takes
    seconds). Both hold the same random weights; without diffusers fastunet's own initialisation."""
    key = (name, str(device), DTYPE)
    if key not in _MODELS:
        spec = CONFIGS[name]
        reference = getattr(diffusers, spec["cls"])(**spec["config"]) if diffusers is not None else None
        model = getattr(fastunet, spec["cls"])(**spec["config"])
        if reference is not None:
            model.load_state_dict(reference.state_dict(), strict=True)
        _MODELS.clear()  # one config's pair at a time
        _MODELS[key] = {"fastunet": model.to(device=device, dtype=DTYPE),
                        "diffusers": None if reference is None else reference.to(device=device, dtype=DTYPE)}
    return _MODELS[key][kind]


def setup(provider: str, name: str, mode: str, device):
    """A zero-argument callable running one forward ("fwd"), forward+backward ("fwd_bwd") or training
    step ("train": forward, backward and an AdamW step)."""
    if mode not in ("fwd", "fwd_bwd", "train"):
        raise ValueError(f"mode must be 'fwd', 'fwd_bwd' or 'train'; got {mode!r}")
    spec = CONFIGS[name]
    if diffusers is None and provider.startswith("diffusers"):
        raise ImportError(f"provider {provider!r} needs diffusers, which is not installed")
    model = _model("diffusers" if provider.startswith("diffusers") else "fastunet", name, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6) if mode == "train" else None
    if provider.endswith("compile"):
        model = torch.compile(model)
    backend = "torch" if provider == "fastunet-torch" else "auto"
    inputs = _inputs(spec, device)

    def step():
        with fastunet.use_backend(backend):
            if mode == "fwd":
                with torch.no_grad():
                    return model(**inputs).sample
            model.zero_grad(set_to_none=True)
            out = model(**inputs).sample
            out.float().square().mean().backward()
            if optimizer is not None:
                optimizer.step()
            return out

    return step


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("provider", available(PROVIDERS))
def test_unet(benchmark, provider, name, mode, device):
    torch.manual_seed(0)
    step = setup(provider, name, mode, device)
    if benchmark.enabled:  # disabled (a smoke run): time_rounds runs it once, nothing is measured
        warm_up(step)
        if mode == "fwd_bwd":
            benchmark.extra_info["saved_mib"] = saved_bytes(step) / 2**20
        if CUDA:
            benchmark.extra_info["peak_mib"] = cuda_peak_bytes(step, beyond_allocated=False) / 2**20
    benchmark.group = f"{name} {mode}"
    time_rounds(benchmark, step, rounds=5 if not CUDA else 20, warmup_rounds=1)
