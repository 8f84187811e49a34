"""Every diffusers block-type string of each model family builds from that family's registry, has
exactly the parameter names and shapes of diffusers' block, loads diffusers' weights strict, and then
computes what diffusers' block computes.

The registries are built explicitly; importing a module fills none of them (checked last).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from diffusers.models.unets import unet_1d_blocks as d1
from diffusers.models.unets import unet_2d_blocks as d2
from diffusers.models.unets import unet_3d_blocks as d3

from fastunet.models import unet_1d_blocks as f1
from fastunet.models import unet_2d_blocks as f2
from fastunet.models.blocks import BlockContext
from fastunet.models.unet_2d_condition_blocks import UNET_2D_CONDITION_BLOCKS
from fastunet.models.unet_3d_blocks import UNET_3D_BLOCKS
from fastunet.testing import perturbed_state, rel_err

C, TEMB, CROSS, FRAMES = 32, 16, 24, 3

COMMON_2D = dict(num_layers=2, in_channels=C, out_channels=C, temb_channels=TEMB, resnet_eps=1e-6,
                 resnet_act_fn="silu", resnet_groups=8, attention_head_dim=8, cross_attention_dim=CROSS,
                 num_attention_heads=4, transformer_layers_per_block=1)
COMMON_3D = dict(num_layers=2, in_channels=C, out_channels=C, temb_channels=TEMB, resnet_eps=1e-6,
                 resnet_act_fn="silu", resnet_groups=8, cross_attention_dim=CROSS, num_attention_heads=4)


def _load_and_compare(ours: torch.nn.Module, theirs: torch.nn.Module, run) -> None:
    """Same names and shapes; diffusers' (perturbed) weights load strict; same outputs."""
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours_shapes == theirs_shapes
    state = perturbed_state(theirs)
    theirs.load_state_dict(state, strict=True)
    ours.load_state_dict(state, strict=True)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        a, b = run(ours, True), run(theirs, False)
    a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
    assert a.shape == b.shape and rel_err(a, b) < 1e-5, rel_err(a, b)


def _context(ours: bool, frames: int = 1, cross: bool = True) -> dict:
    states = torch.randn(2 * frames, 5, CROSS, generator=torch.Generator().manual_seed(3))
    if ours:
        return {"context": BlockContext(encoder_hidden_states=states, num_frames=frames)}
    return {**({"encoder_hidden_states": states} if cross else {}), **({"num_frames": frames} if frames > 1 else {})}


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, C, 8, 8, generator=g), torch.randn(batch, TEMB, generator=g)


# -- UNet2DModel and UNet2DConditionModel -------------------------------------------------------------------

FAMILY_2D = [("UNet2DModel", f2.UNET_2D_BLOCKS), ("UNet2DConditionModel", UNET_2D_CONDITION_BLOCKS)]
CROSS_TYPES = {"CrossAttnDownBlock2D", "CrossAttnUpBlock2D", "UNetMidBlock2DCrossAttn"}


def _2d_cases(kind: str):
    for family, registry in FAMILY_2D:
        table = {"down": registry.down_blocks, "up": registry.up_blocks, "mid": registry.mid_blocks}[kind]
        for name in sorted(table):
            yield pytest.param(registry, name, id=f"{family}-{name}")


@pytest.mark.parametrize("registry,name", list(_2d_cases("down")))
def test_2d_down_blocks(registry, name):
    kw = dict(COMMON_2D, add_downsample=True, downsample_padding=1)
    ours = f2.get_down_block(name, registry=registry, **kw)
    theirs = d2.get_down_block(name, **kw)
    x, temb = _inputs()
    skip = "Skip" in name

    def run(model, is_ours):
        extra = {}
        if skip:
            extra["skip_sample"] = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
        if name in CROSS_TYPES:
            extra.update(_context(is_ours))
        out = model(x, temb, **extra)
        return out[0]

    _load_and_compare(ours, theirs, run)


@pytest.mark.parametrize("registry,name", list(_2d_cases("up")))
def test_2d_up_blocks(registry, name):
    kw = dict(COMMON_2D, num_layers=3, prev_output_channel=C, add_upsample=True, resolution_idx=1)
    ours = f2.get_up_block(name, registry=registry, **kw)
    theirs = d2.get_up_block(name, **kw)
    x, temb = _inputs()
    g = torch.Generator().manual_seed(4)
    skips = tuple(torch.randn(2, C, 8, 8, generator=g) for _ in range(3))

    def run(model, is_ours):
        extra = _context(is_ours) if name in CROSS_TYPES else {}
        if "Skip" in name:
            # FIR-upsampled to the block's resolution before the block's own skip image is added
            extra["skip_sample"] = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
        if is_ours:
            return model(x, skips, temb, **extra)
        return model(x, skips, temb=temb, **extra)

    _load_and_compare(ours, theirs, run)


@pytest.mark.parametrize("name", sorted(UNET_2D_CONDITION_BLOCKS.mid_blocks))
def test_2d_mid_blocks(name):
    kw = dict(temb_channels=TEMB, in_channels=C, resnet_eps=1e-6, resnet_act_fn="silu", resnet_groups=8,
              cross_attention_dim=CROSS, num_attention_heads=4, transformer_layers_per_block=1)
    ours = UNET_2D_CONDITION_BLOCKS.mid(name, **kw)
    theirs = d2.get_mid_block(name, **kw)
    x, temb = _inputs()
    _load_and_compare(ours, theirs, lambda m, is_ours: m(x, temb, **(_context(is_ours) if name in CROSS_TYPES
                                                                      else {})))


def test_unet_2d_mid_block_with_attention():
    """UNet2DModel's mid block (self-attention, not built through get_mid_block in diffusers either)."""
    ours = f2.UNetMidBlock2D(C, TEMB, resnet_groups=8, attention_head_dim=8)
    theirs = d2.UNetMidBlock2D(C, TEMB, resnet_groups=8, attention_head_dim=8)
    x, temb = _inputs()
    _load_and_compare(ours, theirs, lambda m, is_ours: m(x, temb))


# -- UNet3DConditionModel ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(UNET_3D_BLOCKS.down_blocks))
def test_3d_down_blocks(name):
    kw = dict(COMMON_3D, add_downsample=True, downsample_padding=1)
    ours, theirs = UNET_3D_BLOCKS.down(name, **kw), d3.get_down_block(name, **kw)
    x, temb = _inputs(2 * FRAMES)
    cross = name.startswith("CrossAttn")
    _load_and_compare(ours, theirs, lambda m, is_ours: m(x, temb, **_context(is_ours, FRAMES, cross))[0])


@pytest.mark.parametrize("name", sorted(UNET_3D_BLOCKS.up_blocks))
def test_3d_up_blocks(name):
    kw = dict(COMMON_3D, num_layers=3, prev_output_channel=C, add_upsample=True, resolution_idx=0)
    ours, theirs = UNET_3D_BLOCKS.up(name, **kw), d3.get_up_block(name, **kw)
    x, temb = _inputs(2 * FRAMES)
    g = torch.Generator().manual_seed(4)
    skips = tuple(torch.randn(2 * FRAMES, C, 8, 8, generator=g) for _ in range(3))

    def run(model, is_ours):
        if is_ours:
            return model(x, skips, temb, **_context(True, FRAMES))
        return model(x, res_hidden_states_tuple=skips, temb=temb,
                     **_context(False, FRAMES, name.startswith("CrossAttn")))

    _load_and_compare(ours, theirs, run)


def test_3d_mid_block():
    kw = dict(in_channels=C, temb_channels=TEMB, resnet_groups=8, cross_attention_dim=CROSS, num_attention_heads=4)
    ours = UNET_3D_BLOCKS.mid("UNetMidBlock3DCrossAttn", **kw)
    theirs = d3.UNetMidBlock3DCrossAttn(**kw)
    x, temb = _inputs(2 * FRAMES)
    _load_and_compare(ours, theirs, lambda m, is_ours: m(x, temb, **_context(is_ours, FRAMES)))


# -- UNet1DModel ---------------------------------------------------------------------------------------------


def _temb_1d(name: str, g: torch.Generator) -> torch.Tensor:
    # the planning blocks take a (B, embed) time embedding; the audio blocks take none
    return torch.randn(2, 64, generator=g) if ("Resnet" in name or "Temporal" in name or "Value" in name) else None


@pytest.mark.parametrize("name", sorted(f1.DOWN_BLOCKS))
def test_1d_down_blocks(name):
    kw = dict(num_layers=1, in_channels=64, out_channels=64, temb_channels=64, add_downsample=True)
    ours, theirs = f1.get_down_block(name, **kw), d1.get_down_block(name, **kw)
    g = torch.Generator().manual_seed(1)
    x, temb = torch.randn(2, 64, 32, generator=g), _temb_1d(name, g)
    if name == "DownBlock1DNoSkip":  # concatenates a (B, C_t, L) embedding to its input channels
        x, temb = torch.randn(2, 48, 32, generator=g), torch.randn(2, 16, 32, generator=g)
    _load_and_compare(ours, theirs, lambda m, is_ours: m(x, temb))


@pytest.mark.parametrize("name", sorted(f1.UP_BLOCKS))
def test_1d_up_blocks(name):
    kw = dict(num_layers=1, in_channels=64, out_channels=32, temb_channels=64, add_upsample=True)
    ours, theirs = f1.get_up_block(name, **kw), d1.get_up_block(name, **kw)
    g = torch.Generator().manual_seed(1)
    x, skips, temb = torch.randn(2, 64, 16, generator=g), (torch.randn(2, 64, 16, generator=g),), _temb_1d(name, g)
    _load_and_compare(ours, theirs, lambda m, is_ours: m(x, skips, temb))


@pytest.mark.parametrize("name", sorted(f1.MID_BLOCKS))
def test_1d_mid_blocks(name):
    kw = dict(num_layers=1, in_channels=64, mid_channels=64, out_channels=64, embed_dim=64, add_downsample=False)
    ours, theirs = f1.get_mid_block(name, **kw), d1.get_mid_block(name, **kw)
    g = torch.Generator().manual_seed(1)
    x, temb = torch.randn(2, 64, 8, generator=g), _temb_1d(name, g)
    _load_and_compare(ours, theirs, lambda m, is_ours: m(x, temb))


# -- registries are explicit ---------------------------------------------------------------------------------


def test_importing_a_module_changes_no_registry():
    """In a fresh interpreter: the 2-D registry is the same before and after every other family is imported."""
    code = (
        "from fastunet.models import unet_2d_blocks as f2\n"
        "before = {k: sorted(getattr(f2.UNET_2D_BLOCKS, k)) for k in ('down_blocks', 'up_blocks', 'mid_blocks')}\n"
        "import fastunet, fastunet.models.unet_2d_condition, fastunet.models.unet_3d_condition\n"
        "after = {k: sorted(getattr(f2.UNET_2D_BLOCKS, k)) for k in ('down_blocks', 'up_blocks', 'mid_blocks')}\n"
        "assert before == after, (before, after)\n"
        "assert 'CrossAttnDownBlock2D' not in after['down_blocks']\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_unknown_and_unsupported_types():
    with pytest.raises(ValueError, match=r"unknown down block type 'Nope' for UNet3DConditionModel"):
        UNET_3D_BLOCKS.down("Nope")
    with pytest.raises(NotImplementedError, match="SimpleCrossAttnDownBlock2D"):
        UNET_2D_CONDITION_BLOCKS.down("SimpleCrossAttnDownBlock2D")
    with pytest.raises(TypeError, match="must be a str"):
        UNET_2D_CONDITION_BLOCKS.up(3)
