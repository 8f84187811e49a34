"""The roofline model (fastunet/roofline.py): README's block is what the script makes of the real model
structures, and a few of its counts agree with counts made here by hand from the configurations."""

from __future__ import annotations

import pytest

from fastunet import roofline

F16 = 2  # bytes per float16 element
F32 = 4


@pytest.fixture(scope="module")
def calls() -> dict[str, list[roofline.OpCall]]:
    return {name: roofline.record(name) for name in roofline.MODELS}


def test_readme_block_is_current(calls):
    text = roofline.README.read_text()
    assert roofline.replace_block(text, roofline.block(calls)) == text, (
        "README.md's roofline block is stale: run .venv/bin/python -m fastunet.roofline --write")


def test_block_says_the_fractions_are_a_model(calls):
    new = roofline.block(calls)
    assert "model, not a measurement" in new and new.startswith(roofline.BEGIN) and new.endswith(roofline.END)
    for title, *_ in roofline.MODELS.values():
        assert title in new


def test_first_group_norm_bytes_by_hand(calls):
    """down_blocks.0.resnets.0.norm1 of SD 1.5: x (2, 320, 64, 64) fp16 read, y written, weight and bias
    (320,) read, mean and rstd (2, 32) fp32 written; 8 FLOPs per element."""
    first = next(c for c in calls["sd15"] if c.category == "GroupNorm+act")
    assert first.module.startswith("down_blocks.0.resnets.0")
    x = 2 * 320 * 64 * 64
    assert first.bytes == 2 * x * F16 + 2 * 320 * F16 + 2 * (2 * 32) * F32
    assert first.flops == 8 * x


def test_attention_flops_by_hand(calls):
    """4 B H N M D: SD 1.5's first self-attention (8 heads of 40 over 64x64 tokens), its first
    cross-attention (77 text tokens), AnimateDiff's first temporal attention (2*64*64 pixel sequences of
    16 frames, 8 heads of 40)."""
    sd = calls["sd15"]
    self_attn = next(c for c in sd if c.category == "self-attention")
    cross = next(c for c in sd if c.category == "cross-attention")
    assert self_attn.flops == 4 * 2 * 8 * 4096 * 4096 * 40
    assert cross.flops == 4 * 2 * 8 * 4096 * 77 * 40
    # q, k, v (B, H, N, D) fp16 read; out written; the log-sum-exp (B, H, N) fp32 written
    assert cross.bytes == (2 * 2 * 8 * 4096 * 40 + 2 * 2 * 8 * 77 * 40) * F16 + 2 * 8 * 4096 * F32
    temporal = next(c for c in calls["animatediff"] if c.category == "temporal attention")
    assert temporal.meta["bhnmd"] == (2 * 64 * 64, 8, 16, 16, 40)
    assert temporal.flops == 4 * (2 * 64 * 64) * 8 * 16 * 16 * 40


def test_conv_in_flops_and_lower_bound_by_hand(calls):
    conv_in = next(c for c in calls["sd15"] if c.category == "conv")
    assert conv_in.module == "conv_in"
    out = 2 * 320 * 64 * 64
    assert conv_in.flops == 2 * out * 4 * 3 * 3
    assert conv_in.bytes == (2 * 4 * 64 * 64 + 320 * 4 * 9 + 320 + out) * F16
    bandwidth, peak = roofline.DEVICES["H100"]
    assert roofline.lower_bound_s(conv_in, "H100") == max(conv_in.bytes / bandwidth, conv_in.flops / peak)


def test_call_counts_follow_the_configs(calls):
    """SD 1.5: 16 transformer blocks (6 down, 1 mid, 9 up), one self- and one cross-attention each;
    SDXL: (0 + 2*2 + 2*10) down + 10 mid + (3*10 + 3*2) up = 70 blocks; AnimateDiff: 21 motion modules
    (8 down, 12 up, 1 mid) of two temporal attentions; FreeU filters the skips of up stages 0 and 1
    (3 each)."""
    def count(name, category):
        return sum(c.category == category for c in calls[name])

    assert count("sd15", "self-attention") == count("sd15", "cross-attention") == 16
    assert count("sdxl", "self-attention") == count("sdxl", "cross-attention") == 70
    assert count("animatediff", "temporal attention") == 42
    assert count("sd15", "temporal attention") == 0
    assert count("sd15", "FreeU filter") == count("sdxl", "FreeU filter") == 6
    heads = {c.meta["bhnmd"][4] for name in calls for c in calls[name] if c.category == "self-attention"}
    assert heads == {40, 64, 80, 160}


def test_fractions_are_between_zero_and_one(calls):
    for name in calls:
        for c in calls[name]:
            for device in roofline.DEVICES:
                assert 0 < roofline.call_fraction(c, device) <= 1, (name, c)


def test_replace_block_needs_exactly_one_block():
    new = f"{roofline.BEGIN}\nnew\n{roofline.END}"
    assert roofline.replace_block(f"a\n{roofline.BEGIN}\nold\n{roofline.END}\nb", new) == f"a\n{new}\nb"
    for text in ("no markers", f"{roofline.END} {roofline.BEGIN}", f"{new}\n{new}"):
        with pytest.raises(ValueError, match="exactly one"):
            roofline.replace_block(text, new)


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="one of .*'sd15'.*got 'sd3'"):
        roofline.build("sd3")


def test_group_norm_fraction_follows_the_one_pass_rule(calls):
    """A (C/G, spatial) group of at most 8192 padded lanes is one pass (2x traffic, the minimum), larger
    ones three passes' worth (3x): SD 1.5's first norm (10 x 4096) against a mid-block one (40 x 64)."""
    norms = [c for c in calls["sd15"] if c.category == "GroupNorm+act"]
    stream = roofline.EFFICIENCY["H100"]["stream"]
    assert roofline.call_fraction(norms[0], "H100") == pytest.approx(stream * 2 / 3)
    mid = next(c for c in norms if c.module.startswith("mid_block") and c.shapes[0] == (2, 1280, 8, 8))
    assert roofline.call_fraction(mid, "H100") == pytest.approx(stream)


def test_attention_fraction_follows_the_kernels_head_dim_tile(calls):
    """Compute-bound self-attention is modelled at ``mma x D / D_tile``, D_tile being what the fp16
    forward computes: SD 1.5's 40 pads to 64 on both archs; 80 and 160 split on sm_90 (64+16, 128+32:
    no waste); on sm_80 80 splits and 160 pads to 256."""
    assert {d: roofline.head_dim_tile(d, "H100") for d in (40, 64, 80, 160)} == {40: 64, 64: 64, 80: 80, 160: 160}
    assert {d: roofline.head_dim_tile(d, "A100") for d in (40, 64, 80, 160)} == {40: 64, 64: 64, 80: 80, 160: 256}
    for device, (bandwidth, peak) in roofline.DEVICES.items():
        mma = roofline.EFFICIENCY[device]["mma"]
        bound = [c for c in calls["sd15"] if c.category == "self-attention" and c.flops / peak > c.bytes / bandwidth]
        assert {c.meta["bhnmd"][4] for c in bound} >= {40, 80}, device
        for call in bound:
            d = call.meta["bhnmd"][4]
            assert roofline.call_fraction(call, device) == pytest.approx(mma * d / roofline.head_dim_tile(d, device))
