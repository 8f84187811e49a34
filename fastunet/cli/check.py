"""Check a diffusers-format checkpoint directory: does it load into fastunet, and match diffusers?

Reads DIR/config.json, picks the fastunet class named by its "_class_name" (UNet1DModel, UNet2DModel,
UNet2DConditionModel, UNet3DConditionModel, UNetMotionModel, MotionAdapter) and loads the weights strictly.
Missing, unexpected or wrongly shaped weights are listed and the exit status is 1. When diffusers is
installed, the same directory is loaded into diffusers' class and both models run on one random input;
the relative L2 error of fastunet's output against diffusers' (fastunet.testing.rel_err) is printed on a
PASS line (exit 0) when it is at most --tolerance, else on a FAIL line (exit 1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .. import models
from ..testing import rel_err

CLASSES = ("UNet1DModel", "UNet2DModel", "UNet2DConditionModel", "UNet3DConditionModel", "UNetMotionModel",
           "MotionAdapter")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path, metavar="DIR",
                   help="checkpoint directory holding config.json and diffusion_pytorch_model.safetensors (or .bin, "
                        "or shards)")
    p.add_argument("--subfolder", default=None, help="a subfolder of DIR that holds the model, e.g. unet")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest relative L2 error of the output against diffusers that passes (default: 1e-4)")
    p.add_argument("--size", type=int, default=32,
                   help="largest spatial size (or length, for 1-D models) of the random test input; the config's "
                        "sample_size is used when smaller (default: 32)")
    p.add_argument("--no-parity", action="store_true", help="only check that the weights load; skip diffusers")
    p.add_argument("--seed", type=int, default=0, help="seed of the random test input (default: 0)")


def _fail(message: str) -> int:
    print(f"FAIL {message}")
    return 1


def _inputs(name: str, model, size: int, seed: int) -> dict | None:
    """A random forward input for ``model`` (batch 1), or None where this command has no recipe."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    def spatial():
        s = cfg.get("sample_size") or size
        s = s[0] if isinstance(s, (list, tuple)) else s
        return max(8, min(int(s), size))

    t = torch.tensor([torch.randint(1, 1000, (1,), generator=g).item()])
    if name == "UNet1DModel":
        return dict(sample=randn(1, cfg["in_channels"], max(16, min(int(cfg.get("sample_size") or size), 4 * size))),
                    timestep=t)
    if name == "UNet2DModel":
        inputs = dict(sample=randn(1, cfg["in_channels"], spatial(), spatial()), timestep=t)
        if cfg.get("num_class_embeds"):
            inputs["class_labels"] = torch.randint(0, cfg["num_class_embeds"], (1,), generator=g)
        return inputs
    if name in ("UNet2DConditionModel", "UNet3DConditionModel", "UNetMotionModel"):
        if cfg.get("addition_embed_type") not in (None, "text_time") or cfg.get("class_embed_type"):
            return None
        cross = cfg["cross_attention_dim"]
        cross = cross[0] if isinstance(cross, (list, tuple)) else cross
        s = spatial()
        sample = randn(1, cfg["in_channels"], s, s) if name == "UNet2DConditionModel" else \
            randn(1, cfg["in_channels"], 2, s, s)
        inputs = dict(sample=sample, timestep=t, encoder_hidden_states=randn(1, 8, cross))
        if cfg.get("num_class_embeds"):
            inputs["class_labels"] = torch.randint(0, cfg["num_class_embeds"], (1,), generator=g)
        if cfg.get("addition_embed_type") == "text_time":
            n_time = 6 * cfg["addition_time_embed_dim"]
            inputs["added_cond_kwargs"] = dict(text_embeds=randn(1, cfg["projection_class_embeddings_input_dim"] - n_time),
                                               time_ids=randn(1, 6))
        return inputs
    return None


def run(args) -> int:
    directory: Path = args.directory if args.subfolder is None else args.directory / args.subfolder
    config_file = directory / "config.json"
    if not config_file.is_file():
        return _fail(f"{directory}: no config.json (is this a diffusers-format model directory?)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return _fail(f"{config_file}: not readable JSON: {e}")
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name not in CLASSES:
        return _fail(f"{config_file}: _class_name is {name!r}; fastunet implements {', '.join(CLASSES)}")
    cls = getattr(models, name)
    try:
        model = cls.from_pretrained(directory).eval()
    except (ValueError, OSError, TypeError, RuntimeError) as e:
        return _fail(f"{name} from {directory} does not load into fastunet:\n{e}")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"OK   {name} from {directory}: every weight present and of the right shape ({n_params:,} parameters)")
    if args.no_parity:
        return 0
    try:
        import diffusers
    except ImportError:
        print("diffusers is not installed: output parity not checked")
        return 0
    inputs = _inputs(name, model, args.size, args.seed)
    if inputs is None:
        print(f"no test input recipe for this {name} config: output parity not checked")
        return 0
    try:
        reference = getattr(diffusers, name).from_pretrained(directory).eval()
    except Exception as e:  # diffusers' own loader raises many kinds; any of them means it cannot be the oracle
        return _fail(f"diffusers' {name} cannot load {directory} ({type(e).__name__}: {e})")
    with torch.no_grad():
        expected = reference(**inputs).sample
        actual = model(**inputs).sample
    error = rel_err(actual, expected)
    shape = "x".join(map(str, inputs["sample"].shape))
    line = f"{name} output vs diffusers {diffusers.__version__} on a random {shape} input: rel_err {error:.3g} " \
           f"(tolerance {args.tolerance:g})"
    if not error <= args.tolerance:
        return _fail(line)
    print(f"PASS {line}")
    return 0
