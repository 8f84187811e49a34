"""Full-size copies and allocations of one forward pass of the temporal layers, fastunet against diffusers.

Counted with ``tests/copy_count.py`` on the CPU (torch paths): an op counts when an output has at least
the input's number of elements. Each layer is counted twice: with fastunet's kernels as single calls
(what the layer code itself makes), and descending into their torch implementations (what they make
inside, e.g. the copy ``group_norm_act`` takes of a strided input). Run with ``-s`` to see the tables.
"""

import pytest
import torch
from copy_count import count_forward  # tests/ is on sys.path (rootdir conftest)
from diffusers.models.resnet import TemporalConvLayer as DiffusersTemporalConvLayer
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D as DiffusersAnimateDiff

from fastunet.layers.resnet import TemporalConvLayer
from fastunet.layers.transformer_temporal import AnimateDiffTransformer3D

FRAMES, CHANNELS, GROUPS, HEIGHT, WIDTH = 8, 32, 8, 4, 5
TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=16, in_channels=CHANNELS, norm_num_groups=GROUPS,
                   positional_embeddings="sinusoidal", num_positional_embeddings=16)


def build(layer: str):
    if layer == "transformer":
        ours, theirs = AnimateDiffTransformer3D(**TRANSFORMER), DiffusersAnimateDiff(**TRANSFORMER)
    else:
        ours, theirs = TemporalConvLayer(CHANNELS, norm_num_groups=GROUPS), \
            DiffusersTemporalConvLayer(CHANNELS, norm_num_groups=GROUPS)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def report(layer: str, counters: dict) -> None:
    print(f"\n{layer}: full-size copies / other allocations per forward "
          f"(x: (2*{FRAMES}, {CHANNELS}, {HEIGHT}, {WIDTH}))")
    for name, counter in counters.items():
        print(f"{name:<22} {counter.copies:>2} copies {counter.allocations:>3} allocations")
        print(counter.table())


@pytest.mark.parametrize("layer", ["transformer", "conv"])
def test_fewer_full_size_copies_than_diffusers(layer):
    ours, theirs = build(layer)
    x = torch.randn(2 * FRAMES, CHANNELS, HEIGHT, WIDTH)
    counters = {
        "diffusers": count_forward(theirs, x, num_frames=FRAMES),
        "fastunet": count_forward(ours, x, num_frames=FRAMES),
        "fastunet (descend)": count_forward(ours, x, descend=True, num_frames=FRAMES),
    }
    report(layer, counters)
    theirs_n, ours_n, inside = counters["diffusers"], counters["fastunet"], counters["fastunet (descend)"]
    # q, k and v reach the attention op as strided views of the projections: no copy inside it either
    assert inside.copies_inside("fastunet.attention_fwd") == 0, inside.table()
    if layer == "transformer":
        # diffusers: GroupNorm's contiguous(), the permute to (B*H*W, F, C) tokens and the one back. fastunet:
        # none in the layer once group_norm_act writes out_layout itself (one, norm_act's stand-in, before)
        assert theirs_n.copies == 3
        assert ours_n.copies <= 1, ours_n.table()
        # inside: group_norm_act's torch path copies its strided (B, C, F, H, W) input for aten's GroupNorm
        assert inside.copies <= 2, inside.table()
    else:
        # diffusers: GroupNorm's contiguous() of the strided (B, C, F, H, W) input. fastunet: none in the
        # layer; group_norm_act reads the view (its torch path copies it inside)
        assert theirs_n.copies == 1
        assert ours_n.copies == 0, ours_n.table()
        assert inside.copies <= 1, inside.table()
    assert ours_n.copies < theirs_n.copies
    assert inside.copies + inside.allocations < theirs_n.copies + theirs_n.allocations


def test_outputs_come_back_in_the_input_layout():
    """The residual adds write (B*F, C, H, W) directly: the outputs are contiguous, not permuted views."""
    x = torch.randn(2 * FRAMES, CHANNELS, HEIGHT, WIDTH)
    for layer in ("transformer", "conv"):
        ours, _ = build(layer)
        with torch.no_grad():
            assert ours(x, num_frames=FRAMES).is_contiguous()
