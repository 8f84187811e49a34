"""The temporal path launches past CUDA's 65,535 grid limit: a whole AnimateDiff motion module (and a
ModelScope temporal transformer) with 65,536 and 1,000,000 (pixel, head) sequences of 16 frames, on
the Triton backend with every Triton kernel stubbed (the interpreter would take hours at this size; the
numbers are checked at normal sizes in test_transformer_temporal.py). Each recorded launch must fit
CUDA's grid limits (x < 2**31, y and z <= 65,535) and the attention launches must be handed every
sequence. xformers' and SDPA's memory-efficient kernels fail here (xformers issue 845, PyTorch issue
142228)."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import fastunet
from fastunet.layers.transformer_temporal import AnimateDiffTransformer3D, TransformerTemporalModel

# the modules, not the functions fastunet.kernels exports under the same names
attention_module = importlib.import_module("fastunet.kernels.attention")
group_norm_module = importlib.import_module("fastunet.kernels.group_norm_act")

FRAMES, HEADS = 16, 8
GRID_X_MAX, GRID_YZ_MAX = 2**31 - 1, 65535


def _kernels(module) -> list[str]:
    """Names of the Triton kernels defined in ``module`` (jit or interpreted functions)."""
    return [name for name, obj in vars(module).items()
            if type(obj).__name__ in ("JITFunction", "InterpretedFunction") and name.endswith("kernel")]


@pytest.fixture
def launches(monkeypatch):
    recorded: list[tuple[str, tuple, tuple]] = []

    class Stub:
        def __init__(self, name: str):
            self.name = name

        def __getitem__(self, grid):
            grid = tuple(grid)

            def launch(*args, **kwargs):
                recorded.append((self.name, grid, args))

            return launch

    names = []
    for module in (attention_module, group_norm_module):
        for name in _kernels(module):
            monkeypatch.setattr(module, name, Stub(name))
            names.append(name)
    assert any("attention" in n for n in names) and any("group_norm" in n for n in names), names
    return recorded


@pytest.mark.parametrize("pairs", [65_536, 1_000_000])
@pytest.mark.parametrize("layer", ["motion_module", "temporal_transformer"])
def test_temporal_layer_launches_within_cuda_grid_limits(launches, layer, pairs):
    channels = HEADS  # one feature per head keeps a million sequences small in memory
    if layer == "motion_module":
        module = AnimateDiffTransformer3D(num_attention_heads=HEADS, attention_head_dim=1, in_channels=channels,
                                          norm_num_groups=8, positional_embeddings="sinusoidal",
                                          num_positional_embeddings=32)
    else:
        module = TransformerTemporalModel(num_attention_heads=HEADS, attention_head_dim=1, in_channels=channels,
                                          norm_num_groups=8)
    pixels = math.ceil(pairs / HEADS)
    height = math.ceil(math.sqrt(pixels))
    width = math.ceil(pixels / height)
    x = torch.randn(FRAMES, channels, height, width)  # one video of FRAMES frames
    sequences = height * width * HEADS
    assert sequences >= pairs
    with fastunet.use_backend("triton"), torch.no_grad():
        out = module(x, num_frames=FRAMES) if layer == "motion_module" else \
            module(x, num_frames=FRAMES, return_dict=False)[0]
    assert out.shape == x.shape
    attention_launches = [(n, g, a) for n, g, a in launches if "attention" in n]
    assert attention_launches, launches
    for name, grid, _ in launches:
        assert grid[0] <= GRID_X_MAX and all(d <= GRID_YZ_MAX for d in grid[1:]), (name, grid)
    # attention over the frames is handed every (pixel, head) sequence
    for name, grid, args in attention_launches:
        assert any(isinstance(a, int) and a == sequences for a in args), (name, grid)
    assert any(isinstance(a, int) and a == FRAMES for _, _, args in attention_launches for a in args)
