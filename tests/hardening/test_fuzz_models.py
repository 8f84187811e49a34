"""Fuzzing the forward inputs of the five UNets (and their feature switches) with hypothesis.

Each test starts from inputs a tiny model accepts, corrupts one of them in a way hypothesis draws (the
rank, the channels, the dtype, the device, the batch of a conditioning tensor, the frame count, the
ControlNet / T2I-Adapter residuals, the timestep...), and checks that ``forward`` refuses it with a
``ValueError`` or ``TypeError`` whose message names both the value expected and the value given -- never
an opaque error from inside a convolution or a matmul. ``meta`` tensors stand in for "another device"
(the only other device a CPU-only machine has), both as inputs to a CPU model and as the model itself.
Valid variations (timestep forms, broadcast conditioning, per-frame states) are drawn too and must run.

The models are built once per session (``functools.lru_cache``); the hypothesis profile is the
``fastunet-fuzz`` alias of ``conftest.py`` (``ci`` by default, ``long`` with ``FASTUNET_FUZZ_PROFILE=long``).
"""

from __future__ import annotations

import copy
import functools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastunet import UNet2DConditionModel, UNetMotionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from training_parts import CONFIGS as TRAINING_CONFIGS  # noqa: E402

FUZZ = settings.get_profile("fastunet-fuzz")
B, F, S, CROSS, TOKENS, TEXT, TIME_DIM, COND = 2, 3, 4, 16, 5, 8, 4, 8  # S: the side of the images
PROJECTION = TEXT + 6 * TIME_DIM  # SDXL: pooled text embeddings + six time ids of TIME_DIM features each
MAX_FRAMES = 8

CONFIGS: dict[str, tuple[type, dict]] = {
    # the training tests' tiny 1-D and 2-D models as they are
    "unet_1d": TRAINING_CONFIGS["unet_1d"],
    "unet_2d": TRAINING_CONFIGS["unet_2d"],
    # the training tests' SDXL-style model (added embeddings, LCM's timestep_cond) with a projection class
    # embedding too
    "unet_2d_condition": (UNet2DConditionModel, dict(TRAINING_CONFIGS["unet_2d_condition"][1],
                                                     class_embed_type="projection")),
    "unet_3d_condition": TRAINING_CONFIGS["unet_3d_condition"],
    # the training tests' motion model with SDXL's added embeddings
    "unet_motion": (UNetMotionModel, dict(TRAINING_CONFIGS["unet_motion"][1], motion_max_seq_length=MAX_FRAMES,
                                          addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
                                          projection_class_embeddings_input_dim=PROJECTION)),
}
NAMES = list(CONFIGS)
VIDEO = ("unet_3d_condition", "unet_motion")
CONDITIONED = ("unet_2d_condition", *VIDEO)

# the ControlNet residual shapes: one per skip connection (conv_in, each resnet, each downsampler), and
# the mid block's output; the video models take them frames-as-batch
SKIPS = {
    "unet_2d_condition": [(B, 16, S, S), (B, 16, S, S), (B, 16, S // 2, S // 2), (B, 32, S // 2, S // 2)],
    "unet_3d_condition": [(B * F, 16, S, S)] * 2,
    "unet_motion": [(B * F, 16, S, S)] * 2,
}
MID = {"unet_2d_condition": (B, 32, S // 2, S // 2), "unet_3d_condition": (B * F, 16, S, S),
       "unet_motion": (B * F, 16, S, S)}
# T2I-Adapter: DownBlock2D takes its feature after downsampling, CrossAttnDownBlock2D after its last layer
ADAPTER = [(B, 16, S // 2, S // 2), (B, 32, S // 2, S // 2)]


@functools.lru_cache(maxsize=None)
def model(name: str) -> torch.nn.Module:
    cls, cfg = CONFIGS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls(**cfg).eval()


@functools.lru_cache(maxsize=None)
def meta_model(name: str) -> torch.nn.Module:
    """The model with its weights on the meta device."""
    return copy.deepcopy(model(name)).to("meta")


def sample_shape(name: str) -> tuple[int, ...]:
    return {"unet_1d": (B, 6, 8), "unet_2d": (B, 3, S, S), "unet_2d_condition": (B, 4, S, S)}.get(name, (B, 4, F, S, S))


def valid_inputs(name: str) -> dict[str, Any]:
    """Keyword inputs the model accepts (fresh tensors each call)."""
    g = torch.Generator().manual_seed(NAMES.index(name))
    inputs: dict[str, Any] = dict(sample=torch.randn(sample_shape(name), generator=g), timestep=torch.tensor([3, 501]))
    if name == "unet_2d":
        inputs["class_labels"] = torch.tensor([0, 3])
    if name in CONDITIONED:
        inputs["encoder_hidden_states"] = torch.randn(B, TOKENS, CROSS, generator=g)
    if name in ("unet_2d_condition", "unet_motion"):
        inputs["added_cond_kwargs"] = dict(text_embeds=torch.randn(B, TEXT, generator=g),
                                           time_ids=torch.tensor([[8.0, 8, 0, 0, 8, 8]] * B))
    if name == "unet_2d_condition":
        inputs["timestep_cond"] = torch.randn(B, COND, generator=g)
        inputs["class_labels"] = torch.randn(B, PROJECTION, generator=g)
    return inputs


@dataclass
class Case:
    """A corrupted input: ``overrides`` on the valid inputs (or a call of its own), and the strings the
    error message must contain (the value expected and the value given)."""
    what: str
    overrides: dict[str, Any] = field(default_factory=dict)
    needles: tuple[str, ...] = ()
    call: Callable[[torch.nn.Module], Any] | None = None
    on_meta_model: bool = False


def run_case(name: str, case: Case, counts) -> None:
    net = meta_model(name) if case.on_meta_model else model(name)
    counts[f"{name}: errors"] += 1
    counts[f"{name}: errors / {case.what}"] += 1

    def call():
        if case.call is not None:
            return case.call(net)
        with torch.no_grad():
            return net(**{**valid_inputs(name), **case.overrides})

    with pytest.raises((ValueError, TypeError)) as info:
        call()
    message = str(info.value)
    missing = [needle for needle in case.needles if needle not in message]
    assert not missing, f"{case.what}: {missing} not in the message {message!r}"


def shape_str(shape) -> str:
    return str(tuple(shape))


# -- strategies --------------------------------------------------------------------------------------------

BAD_DTYPES = st.sampled_from([torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
                              torch.bool])
FLOAT_DTYPES = st.sampled_from([torch.float64, torch.float16, torch.bfloat16])
NON_TENSORS = st.sampled_from([1.5, "x", [[0.0, 1.0]], (1, 2), np.zeros((2, 2), np.float32)])
SIDE = st.integers(1, 4)


def other_than(values, lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.integers(lo, hi).filter(lambda v: v not in values)


def shape_of_rank(rank: int) -> st.SearchStrategy[tuple[int, ...]]:
    return st.lists(SIDE, min_size=rank, max_size=rank).map(tuple)


def other_rank_shape(draw, rank: int) -> tuple[int, ...]:
    return draw(shape_of_rank(draw(other_than({rank}, 1, 6))))


def tensor_kinds(draw, name: str, key: str, shape, *, floating: bool = True, path=None) -> Case:
    """dtype / device / type corruptions of input ``key`` (in ``added_cond_kwargs`` when ``path`` is set)."""
    kind = draw(st.sampled_from(["dtype", "device", "type"] if floating else ["device", "type"]))

    def put(value):
        if path is None:
            return {key: value}
        inner = dict(valid_inputs(name)[path])
        inner[key] = value
        return {path: inner}

    label = key if path is None else f"{path}['{key}']"
    if kind == "dtype":
        dtype = draw(BAD_DTYPES if key == "sample" else FLOAT_DTYPES)
        value = torch.zeros(shape).to(dtype)
        return Case(f"{label} dtype", put(value), (str(dtype), "torch.float32"))
    if kind == "device":
        return Case(f"{label} device", put(torch.zeros(shape, device="meta")), ("meta", "cpu"))
    value = draw(NON_TENSORS)
    return Case(f"{label} type", put(value), (type(value).__name__, "Tensor"))


@st.composite
def bad_sample(draw, name: str) -> Case:
    shape = sample_shape(name)
    channels = shape[1]
    kind = draw(st.sampled_from(["rank", "channels", "empty", "tensor", "model on meta"]))
    expected = "(batch, channels, length)" if name == "unet_1d" else f"(B, {channels},"
    if kind == "rank":
        bad = other_rank_shape(draw, len(shape))
        return Case("sample rank", {"sample": torch.zeros(bad)}, (expected, shape_str(bad)))
    if kind == "channels":
        c = draw(other_than({channels}, 1, 9))
        bad = (shape[0], c, *shape[2:])
        if name == "unet_1d":
            return Case("sample channels", {"sample": torch.zeros(bad)}, (f"{c} channels", f"= {channels}"))
        return Case("sample channels", {"sample": torch.zeros(bad)}, (expected, shape_str(bad)))
    if kind == "empty":
        dim = draw(st.integers(2, len(shape) - 1))
        bad = tuple(0 if i == dim else s for i, s in enumerate(shape))
        return Case("sample empty dim", {"sample": torch.zeros(bad)}, ("at least 1", shape_str(bad)))
    if kind == "model on meta":
        return Case("model on meta", {}, ("meta", "cpu"), on_meta_model=True)
    return tensor_kinds(draw, name, "sample", shape)


@st.composite
def bad_timestep(draw, name: str) -> Case:
    kind = draw(st.sampled_from(["rank", "batch", "type", "device", "complex"]))
    if kind == "rank":
        bad = draw(st.lists(SIDE, min_size=2, max_size=3).map(tuple))
        return Case("timestep rank", {"timestep": torch.ones(bad)}, ("1-d", shape_str(bad)))
    if kind == "batch":
        n = draw(other_than({1, B}, 0, 6))
        return Case("timestep batch", {"timestep": torch.arange(n)}, (f"{n} entries", f"{B} samples"))
    if kind == "type":
        value = draw(st.sampled_from(["7", [1, 2], None, {"t": 1}, True]))
        return Case("timestep type", {"timestep": value}, (type(value).__name__, "an int, a float or a tensor"))
    if kind == "device":
        return Case("timestep device", {"timestep": torch.ones(B, device="meta")}, ("meta", "cpu"))
    return Case("timestep complex", {"timestep": torch.ones(B, dtype=torch.complex64)}, ("complex64", "real"))


@st.composite
def bad_encoder_states(draw, name: str) -> Case:
    video = name in VIDEO
    batches = {B, B * F} if video else {B}
    kind = draw(st.sampled_from(["batch", "width", "rank", "tensor"]))
    if kind == "batch":
        bad = (draw(other_than(batches, 1, 9)), TOKENS, CROSS)
    elif kind == "width":
        bad = (B, TOKENS, draw(other_than({CROSS}, 1, 24)))
    elif kind == "rank":
        bad = other_rank_shape(draw, 3)
    else:
        return tensor_kinds(draw, name, "encoder_hidden_states", (B, TOKENS, CROSS))
    needles = [f"({B}, M, {CROSS})", shape_str(bad)]
    if video:
        needles.append(f"({B * F}, M, {CROSS})")
    return Case(f"encoder_hidden_states {kind}", {"encoder_hidden_states": torch.zeros(bad)}, tuple(needles))


@st.composite
def bad_added_cond(draw, name: str) -> Case:
    valid = valid_inputs(name)["added_cond_kwargs"]
    kind = draw(st.sampled_from(["type", "missing", "text batch", "text rank", "text width", "ids rows",
                                 "ids count", "tensor"]))
    if kind == "type":
        value = draw(st.sampled_from([[1, 2], "text_embeds", (valid["text_embeds"],)]))
        return Case("added_cond_kwargs type", {"added_cond_kwargs": value}, (type(value).__name__, "dict"))
    if kind == "missing":
        key = draw(st.sampled_from(["text_embeds", "time_ids"]))
        return Case("added_cond_kwargs missing", {"added_cond_kwargs": {k: v for k, v in valid.items() if k != key}},
                    (key, "'text_embeds' and 'time_ids'"))
    text, ids = valid["text_embeds"], valid["time_ids"]
    if kind == "text batch":
        text = torch.zeros(draw(other_than({1, B}, 0, 6)), TEXT)
        needles = (shape_str(text.shape), f"{B} (or 1, broadcast)")
    elif kind == "text rank":
        text = torch.zeros(other_rank_shape(draw, 2))
        needles = (shape_str(text.shape), "E)")
    elif kind == "text width":
        width = draw(other_than({TEXT}, 1, 16))
        text = torch.zeros(B, width)
        needles = (f"{width} text_embeds features", f"= {width + 6 * TIME_DIM}", str(PROJECTION))
    elif kind == "ids rows":
        ids = torch.zeros(draw(other_than({B}, 1, 6)), 6)
        needles = (shape_str(ids.shape), f"({B}, K)")
    elif kind == "ids count":
        count = draw(other_than({6}, 1, 9))
        ids = torch.zeros(B, count)
        needles = (f"{count} time_ids", f"= {TEXT + count * TIME_DIM}", str(PROJECTION))
    else:
        key = draw(st.sampled_from(["text_embeds", "time_ids"]))
        return tensor_kinds(draw, name, key, valid[key].shape, floating=False, path="added_cond_kwargs")
    return Case(f"added_cond_kwargs {kind}", {"added_cond_kwargs": dict(text_embeds=text, time_ids=ids)}, needles)


@st.composite
def bad_timestep_cond(draw, name: str) -> Case:
    kind = draw(st.sampled_from(["batch", "width", "rank", "tensor"]))
    if kind == "batch":
        bad = (draw(other_than({1, B}, 0, 6)), COND)
    elif kind == "width":
        bad = (B, draw(other_than({COND}, 1, 16)))
    elif kind == "rank":
        bad = other_rank_shape(draw, 2)
    else:
        return tensor_kinds(draw, name, "timestep_cond", (B, COND))
    return Case(f"timestep_cond {kind}", {"timestep_cond": torch.zeros(bad)},
                (f"({B} (or 1, broadcast), {COND})", shape_str(bad)))


@st.composite
def bad_class_labels(draw, name: str) -> Case:
    if name == "unet_2d":  # ids into a table of num_class_embeds=4, one per sample
        kind = draw(st.sampled_from(["missing", "batch", "rank", "float", "range", "tensor"]))
        if kind == "missing":
            return Case("class_labels missing", {"class_labels": None}, ("required", "num_class_embeds=4"))
        if kind == "batch":
            n = draw(other_than({B}, 1, 6))
            return Case("class_labels batch", {"class_labels": torch.zeros(n, dtype=torch.long)},
                        (f"({B},)", f"({n},)"))
        if kind == "rank":
            bad = draw(st.sampled_from([(), (B, 1), (B, 3), (1, B, 1)]))
            return Case("class_labels rank", {"class_labels": torch.zeros(bad, dtype=torch.long)},
                        (f"batch {B}", shape_str(bad)))
        if kind == "float":
            dtype = draw(FLOAT_DTYPES)
            return Case("class_labels dtype", {"class_labels": torch.zeros(B, dtype=dtype)}, ("integer", str(dtype)))
        if kind == "range":
            bad = draw(st.lists(st.integers(-5, 12), min_size=B, max_size=B).filter(
                lambda v: min(v) < 0 or max(v) >= 4))
            return Case("class_labels range", {"class_labels": torch.tensor(bad)},
                        ("[0, 4)", f"from {min(bad)} to {max(bad)}"))
        kind = draw(st.sampled_from(["device", "type"]))
        if kind == "device":
            return Case("class_labels device", {"class_labels": torch.zeros(B, dtype=torch.long, device="meta")},
                        ("meta", "cpu"))
        value = draw(NON_TENSORS)
        return Case("class_labels type", {"class_labels": value}, (type(value).__name__, "Tensor"))
    # a projection of (B, PROJECTION) features; one row broadcasts over the batch
    kind = draw(st.sampled_from(["missing", "batch", "width", "rank", "tensor"]))
    if kind == "missing":
        return Case("class_labels missing", {"class_labels": None}, ("required", "'projection'"))
    if kind == "batch":
        bad = (draw(other_than({1, B}, 1, 6)), PROJECTION)
    elif kind == "width":
        bad = (B, draw(other_than({PROJECTION}, 1, 40)))
    elif kind == "rank":
        bad = draw(st.sampled_from([(B,), (B, 1, PROJECTION), (1, B, 1, PROJECTION)]))
    else:
        return tensor_kinds(draw, name, "class_labels", (B, PROJECTION))
    return Case(f"class_labels {kind}", {"class_labels": torch.zeros(bad)},
                (f"({B} (or 1, broadcast), {PROJECTION})", shape_str(bad)))


@st.composite
def bad_masks(draw, name: str) -> Case:
    key = draw(st.sampled_from(["attention_mask", "encoder_attention_mask"]))
    kind = draw(st.sampled_from(["batch", "rank", "tokens", "device", "type"]))
    if kind == "tokens" and key == "encoder_attention_mask":
        tokens = draw(other_than({TOKENS}, 1, 9))
        return Case("encoder_attention_mask tokens", {key: torch.ones(B, tokens)}, (f"keys={TOKENS}", f", {tokens})"))
    if kind in ("batch", "tokens"):
        bad = (draw(other_than({B}, 1, 6)), TOKENS)
    elif kind == "rank":
        bad = draw(st.sampled_from([(B,), (B, 1, TOKENS), (B, 1, 1, TOKENS)]))
    elif kind == "device":
        return Case(f"{key} device", {key: torch.ones(B, TOKENS, device="meta")}, ("meta", "cpu"))
    else:
        value = draw(NON_TENSORS)
        return Case(f"{key} type", {key: value}, (type(value).__name__, "Tensor"))
    return Case(f"{key} {kind}", {key: torch.ones(bad)}, (f"({B}, tokens)", shape_str(bad)))


@st.composite
def bad_controlnet(draw, name: str) -> Case:
    skips, mid = SKIPS[name], MID[name]
    down = [torch.zeros(s) for s in skips]
    kind = draw(st.sampled_from(["count", "shape", "entry type", "entry device", "container", "mid shape",
                                 "mid device"]))
    overrides: dict[str, Any] = dict(down_block_additional_residuals=down,
                                     mid_block_additional_residual=torch.zeros(mid))
    if kind == "count":
        n = draw(other_than({len(skips)}, 0, len(skips) + 3))
        overrides["down_block_additional_residuals"] = [torch.zeros(skips[i % len(skips)]) for i in range(n)]
        return Case("controlnet count", overrides, (f"({len(skips)})", f"got {n}"))
    if kind == "mid shape":
        bad = draw(shape_of_rank(4).filter(lambda s: s != mid))
        overrides["mid_block_additional_residual"] = torch.zeros(bad)
        return Case("controlnet mid shape", overrides, (shape_str(mid), shape_str(bad)))
    if kind == "mid device":
        overrides["mid_block_additional_residual"] = torch.zeros(mid, device="meta")
        return Case("controlnet mid device", overrides, ("meta", "cpu"))
    if kind == "container":
        overrides["down_block_additional_residuals"] = draw(st.sampled_from([torch.stack(down[:2]), "residuals", 3]))
        value = overrides["down_block_additional_residuals"]
        return Case("controlnet container", overrides, (type(value).__name__, "list or tuple"))
    i = draw(st.integers(0, len(skips) - 1))
    if kind == "shape":
        bad = draw(shape_of_rank(draw(st.integers(3, 5))).filter(lambda s: s != skips[i]))
        down[i] = torch.zeros(bad)
        return Case("controlnet shape", overrides, (f"[{i}]", shape_str(skips[i]), shape_str(bad)))
    if kind == "entry type":
        down[i] = draw(st.sampled_from([None, 0.0, "residual"]))
        return Case("controlnet entry type", overrides, (f"[{i}]", type(down[i]).__name__, "Tensor"))
    down[i] = torch.zeros(skips[i], device="meta")
    return Case("controlnet entry device", overrides, (f"[{i}]", "meta", "cpu"))


@st.composite
def bad_adapter(draw, name: str) -> Case:
    residuals = [torch.zeros(s) for s in ADAPTER]
    kind = draw(st.sampled_from(["count", "shape", "entry type", "entry device", "container"]))
    key = "down_intrablock_additional_residuals"
    if kind == "count":
        n = draw(st.integers(4, 6))
        return Case("t2i count", {key: [torch.zeros(MID[name])] * n}, ("3", f"got {n}"))
    if kind == "container":
        value = draw(st.sampled_from([torch.zeros(ADAPTER[0]), "features"]))
        return Case("t2i container", {key: value}, (type(value).__name__, "list or tuple"))
    i = draw(st.integers(0, len(ADAPTER) - 1))
    if kind == "shape":
        bad = draw(shape_of_rank(4).filter(lambda s: s != ADAPTER[i]))
        residuals[i] = torch.zeros(bad)
        return Case("t2i shape", {key: residuals}, (f"[{i}]", shape_str(ADAPTER[i]), shape_str(bad)))
    if kind == "entry type":
        residuals[i] = draw(st.sampled_from([None, 1.0]))
        return Case("t2i entry type", {key: residuals}, (f"[{i}]", type(residuals[i]).__name__))
    residuals[i] = torch.zeros(ADAPTER[i], device="meta")
    return Case("t2i entry device", {key: residuals}, (f"[{i}]", "meta", "cpu"))


@st.composite
def bad_frames(draw, name: str) -> Case:
    frames = draw(st.integers(MAX_FRAMES + 1, MAX_FRAMES + 4))
    return Case("frames over motion_max_seq_length", dict(
        sample=torch.zeros(1, 4, frames, S, S), timestep=1, encoder_hidden_states=torch.zeros(1, TOKENS, CROSS),
        added_cond_kwargs=dict(text_embeds=torch.zeros(1, TEXT), time_ids=torch.zeros(1, 6))),
        (f"{frames} frames", f"motion_max_seq_length={MAX_FRAMES}"))


@st.composite
def bad_kwargs_dict(draw, name: str) -> Case:
    # UNet2DConditionModel's LoRA-scale decorator (loaders.py) reads the value before forward does, and
    # checks it the same way (test_lora_scale_decorator_reads_a_non_dict keeps the two that once failed there)
    value = draw(st.sampled_from(["attention", [("scale", 1.0)], "scale=1", 0.5]))
    return Case("cross_attention_kwargs type", {"cross_attention_kwargs": value}, (type(value).__name__, "dict"))


@st.composite
def bad_switch(draw, name: str) -> Case:
    kind = draw(st.sampled_from(["chunk_size", "dim", "freeu type", "freeu value"]))
    if kind == "chunk_size":
        value = draw(st.sampled_from([-1, -7, 1.5, "2", True, [1]]))
        return Case("enable_forward_chunking chunk_size", call=lambda m: m.enable_forward_chunking(value),
                    needles=("chunk_size", "positive int or None", repr(value)))
    if kind == "dim":
        value = draw(st.sampled_from([2, -1, "0", 1.0, True]))
        return Case("enable_forward_chunking dim", call=lambda m: m.enable_forward_chunking(1, dim=value),
                    needles=("0 (batch) or 1 (tokens)", repr(value)))
    position = draw(st.integers(0, 3))
    value = draw(st.sampled_from(["0.9", None, [1.0], True]) if kind == "freeu type" else
                 st.sampled_from([math.nan, math.inf, -math.inf]))
    args = [0.9, 0.2, 1.2, 1.4]
    args[position] = value
    needles = (("s1", "s2", "b1", "b2")[position],
               type(value).__name__ if kind == "freeu type" else str(value))
    return Case(kind, call=lambda m: m.enable_freeu(*args), needles=needles)


GROUPS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "sample": (bad_sample, tuple(NAMES)),
    "timestep": (bad_timestep, tuple(NAMES)),
    "encoder_hidden_states": (bad_encoder_states, CONDITIONED),
    "added_cond_kwargs": (bad_added_cond, ("unet_2d_condition", "unet_motion")),
    "timestep_cond": (bad_timestep_cond, ("unet_2d_condition",)),
    "class_labels": (bad_class_labels, ("unet_2d", "unet_2d_condition")),
    "masks": (bad_masks, ("unet_2d_condition",)),
    "controlnet": (bad_controlnet, CONDITIONED),
    "t2i_adapter": (bad_adapter, ("unet_2d_condition",)),
    "frames": (bad_frames, ("unet_motion",)),
    "cross_attention_kwargs": (bad_kwargs_dict, CONDITIONED),
    "switches": (bad_switch, ("unet_2d", *CONDITIONED)),
}
PAIRS = [(name, group) for group, (_, names) in GROUPS.items() for name in names]


@pytest.mark.parametrize("name,group", PAIRS, ids=[f"{n}-{g}" for n, g in PAIRS])
@settings(FUZZ)
@given(data=st.data())
def test_bad_input_is_refused_by_name(name, group, data, fuzz_counts):
    net = model(name)
    freeu = getattr(net, "freeu", None)
    case = data.draw(GROUPS[group][0](name), label="case")
    try:
        run_case(name, case, fuzz_counts)
        assert getattr(net, "freeu", None) == freeu, "a refused enable_freeu must leave the model as it was"
    finally:
        if group == "switches":  # the model is shared: whatever happened, leave it plain for the next example
            net.disable_freeu()
            net.disable_forward_chunking()


# -- valid variations keep working ---------------------------------------------------------------------------


@st.composite
def valid_variation(draw, name: str) -> dict[str, Any]:
    inputs = valid_inputs(name)
    timestep = draw(st.sampled_from(["int", "float", "0-d", "(1,)", "(B,) float", "numpy"]))
    inputs["timestep"] = {"int": 7, "float": 7.5, "0-d": torch.tensor(7), "(1,)": torch.tensor([7]),
                          "(B,) float": torch.tensor([3.0, 900.0]), "numpy": np.int64(7)}[timestep]
    if name in VIDEO and draw(st.booleans()):
        inputs["encoder_hidden_states"] = torch.randn(B * F, TOKENS, CROSS)  # one per frame
    if name == "unet_2d_condition":
        if draw(st.booleans()):  # one row broadcast over the batch, as diffusers adds it
            inputs["class_labels"] = inputs["class_labels"][:1]
        if draw(st.booleans()):
            inputs["timestep_cond"] = inputs["timestep_cond"][:1]
        if draw(st.booleans()):
            inputs["encoder_attention_mask"] = torch.ones(B, TOKENS)
        if draw(st.booleans()):
            inputs["down_intrablock_additional_residuals"] = [torch.zeros(s) for s in ADAPTER]
    if name in ("unet_2d_condition", "unet_motion") and draw(st.booleans()):
        inputs["added_cond_kwargs"] = {k: v[:1] for k, v in inputs["added_cond_kwargs"].items()}
    if name in CONDITIONED and draw(st.booleans()):
        inputs["down_block_additional_residuals"] = [torch.zeros(s) for s in SKIPS[name]]
        inputs["mid_block_additional_residual"] = torch.zeros(MID[name])
    if draw(st.booleans()):
        inputs["sample"] = inputs["sample"].transpose(-1, -2).contiguous().transpose(-1, -2)  # non-contiguous
    return inputs


@pytest.mark.parametrize("name", NAMES)
@settings(FUZZ, max_examples=max(4, FUZZ.max_examples // 6))
@given(data=st.data())
def test_valid_variations_still_run(name, data, fuzz_counts):
    inputs = data.draw(valid_variation(name), label="inputs")
    fuzz_counts[f"{name}: valid"] += 1
    with torch.no_grad():
        out = model(name)(**inputs).sample
    assert out.shape == inputs["sample"].shape
    assert torch.isfinite(out).all()


def test_autocast_accepts_half_precision_conditioning():
    """Under torch.autocast a bf16 input meets fp32 weights: not a dtype error."""
    inputs = valid_inputs("unet_2d_condition")
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"].bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model("unet_2d_condition")(**inputs).sample
    assert out.shape == inputs["sample"].shape


# -- regressions: the concrete inputs that failed opaquely before the models checked them ----------------------

META = "meta"  # the device of the inputs that hold no values
REGRESSIONS = [
    # (model, what, overrides, exception, needles); the opaque error each one gave is in the comment
    ("unet_1d", "float64 sample", {"sample": torch.zeros(B, 6, 8, dtype=torch.float64)}, TypeError,
     ("torch.float64", "torch.float32")),  # RuntimeError: mat1 and mat2 must have the same dtype
    ("unet_2d", "int64 sample", {"sample": torch.zeros(B, 3, S, S, dtype=torch.long)}, TypeError,
     ("torch.int64", "torch.float32")),  # RuntimeError: Input type (long int) and bias type (float)
    ("unet_2d_condition", "sample on meta", {"sample": torch.zeros(B, 4, S, S, device=META)}, ValueError,
     ("meta", "cpu")),  # RuntimeError: Tensor on device cpu is not on the expected device meta!
    ("unet_motion", "float64 sample", {"sample": torch.zeros(B, 4, F, S, S, dtype=torch.float64)}, TypeError,
     ("torch.float64", "torch.float32")),  # RuntimeError: Input type (double) and bias type (float)
    ("unet_3d_condition", "timestep on meta", {"timestep": torch.ones(B, device=META)}, ValueError,
     ("meta", "cpu")),  # NotImplementedError: Cannot copy out of meta tensor; no data!
    ("unet_1d", "complex timestep", {"timestep": torch.ones(B, dtype=torch.complex64)}, TypeError,
     ("complex64", "real")),  # ran, dropping the imaginary part with a warning
    ("unet_1d", "empty length", {"sample": torch.zeros(B, 6, 0)}, ValueError,
     ("at least 1", "(2, 6, 0)")),  # RuntimeError: Kernel size can't be greater than actual input size
    ("unet_2d", "empty height", {"sample": torch.zeros(B, 3, 0, S)}, ValueError,
     ("at least 1", "(2, 3, 0, 4)")),  # RuntimeError: Kernel size can't be greater than actual input size
    ("unet_motion", "zero frames", {"sample": torch.zeros(B, 4, 0, S, S)}, ValueError,
     ("at least 1", "(2, 4, 0, 4, 4)")),  # RuntimeError: cannot reshape tensor of 0 elements
    ("unet_2d", "float class ids", {"class_labels": torch.zeros(B)}, TypeError,
     ("integer", "torch.float32")),  # RuntimeError: Expected tensor for argument #1 'indices' to have ... Long
    ("unet_2d", "class id out of range", {"class_labels": torch.tensor([0, 9])}, ValueError,
     ("[0, 4)", "from 0 to 9")),  # IndexError: index out of range in self
    ("unet_2d", "2-d class ids", {"class_labels": torch.zeros(B, 3, dtype=torch.long)}, ValueError,
     ("(2,)", "(2, 3)")),  # RuntimeError: The size of tensor a (2) must match the size of tensor b (3)
    ("unet_2d", "class ids on meta", {"class_labels": torch.zeros(B, dtype=torch.long, device=META)}, ValueError,
     ("meta", "cpu")),  # ran
    ("unet_2d_condition", "projection class labels too wide", {"class_labels": torch.zeros(B, PROJECTION + 1)},
     ValueError, (f"(2 (or 1, broadcast), {PROJECTION})", f"(2, {PROJECTION + 1})")),  # RuntimeError in a matmul
    ("unet_2d_condition", "float16 encoder_hidden_states", {"encoder_hidden_states": torch.zeros(B, TOKENS, CROSS,
     dtype=torch.float16)}, TypeError, ("torch.float16", "torch.float32")),  # RuntimeError: expected m1 and m2 ...
    ("unet_3d_condition", "float64 encoder_hidden_states", {"encoder_hidden_states": torch.zeros(B, TOKENS, CROSS,
     dtype=torch.float64)}, TypeError, ("torch.float64", "torch.float32")),  # RuntimeError in a matmul
    ("unet_2d_condition", "encoder_hidden_states as a list", {"encoder_hidden_states": [torch.zeros(B, TOKENS, CROSS)]},
     TypeError, ("list", "Tensor")),  # AttributeError: 'list' object has no attribute 'dim'
    ("unet_2d_condition", "text_embeds batch 3", {"added_cond_kwargs": dict(text_embeds=torch.zeros(3, TEXT),
     time_ids=torch.zeros(B, 6))}, ValueError, ("(3, 8)", "2 (or 1, broadcast)")),  # RuntimeError: mat1 and mat2
    ("unet_motion", "time_ids of 5", {"added_cond_kwargs": dict(text_embeds=torch.zeros(B, TEXT),
     time_ids=torch.zeros(B, 5))}, ValueError, ("5 time_ids", f"= {TEXT + 5 * TIME_DIM}", str(PROJECTION))),
    ("unet_2d_condition", "1-d text_embeds", {"added_cond_kwargs": dict(text_embeds=torch.zeros(TEXT),
     time_ids=torch.zeros(B, 6))}, ValueError, ("(8,)", "E)")),  # RuntimeError: Tensors must have same dims
    ("unet_2d_condition", "timestep_cond batch 3", {"timestep_cond": torch.zeros(3, COND)}, ValueError,
     ("(2 (or 1, broadcast), 8)", "(3, 8)")),  # RuntimeError: The size of tensor a (2) must match ... b (3)
    ("unet_2d_condition", "float64 timestep_cond", {"timestep_cond": torch.zeros(B, COND, dtype=torch.float64)},
     TypeError, ("torch.float64", "torch.float32")),  # RuntimeError: expected m1 and m2 to have the same dtype
    ("unet_2d_condition", "timestep_cond on meta", {"timestep_cond": torch.zeros(B, COND, device=META)}, ValueError,
     ("meta", "cpu")),  # RuntimeError: Tensor on device meta is not on the expected device cpu!
    ("unet_2d_condition", "a None ControlNet residual", dict(
        down_block_additional_residuals=[torch.zeros(s) for s in SKIPS["unet_2d_condition"][:-1]] + [None],
        mid_block_additional_residual=torch.zeros(MID["unet_2d_condition"])), TypeError,
     ("[3]", "NoneType")),  # AttributeError: 'NoneType' object has no attribute 'shape'
    ("unet_3d_condition", "a ControlNet residual on meta", dict(
        down_block_additional_residuals=[torch.zeros(SKIPS["unet_3d_condition"][0], device=META),
                                         torch.zeros(SKIPS["unet_3d_condition"][1])],
        mid_block_additional_residual=torch.zeros(MID["unet_3d_condition"])), ValueError,
     ("[0]", "meta", "cpu")),  # RuntimeError: Tensor on device meta is not on the expected device cpu!
    ("unet_motion", "the ControlNet mid residual on meta", dict(
        down_block_additional_residuals=[torch.zeros(s) for s in SKIPS["unet_motion"]],
        mid_block_additional_residual=torch.zeros(MID["unet_motion"], device=META)), ValueError,
     ("meta", "cpu")),  # RuntimeError: Tensor on device meta is not on the expected device cpu!
    ("unet_2d_condition", "ControlNet residuals stacked in one tensor", dict(
        down_block_additional_residuals=torch.zeros(4, *SKIPS["unet_2d_condition"][0]),
        mid_block_additional_residual=torch.zeros(MID["unet_2d_condition"])), TypeError,
     ("Tensor", "list or tuple")),  # a shape error about residual [2], which does not exist
    ("unet_2d_condition", "T2I-Adapter feature at the wrong resolution", {"down_intrablock_additional_residuals": [
        torch.zeros(B, 16, S, S), torch.zeros(ADAPTER[1])]}, ValueError,
     ("[0]", shape_str(ADAPTER[0]), f"(2, 16, {S}, {S})")),  # RuntimeError: The size of tensor a ... must match
    ("unet_2d_condition", "T2I-Adapter feature with the wrong channels", {"down_intrablock_additional_residuals": [
        torch.zeros(ADAPTER[0]), torch.zeros(ADAPTER[0])]}, ValueError,
     ("[1]", shape_str(ADAPTER[1]), shape_str(ADAPTER[0]))),  # RuntimeError inside CrossAttnDownBlock2D
    ("unet_2d_condition", "four T2I-Adapter features for two blocks", {"down_intrablock_additional_residuals": [
        torch.zeros(ADAPTER[0]), torch.zeros(ADAPTER[1])] + [torch.zeros(MID["unet_2d_condition"])] * 2}, ValueError,
     ("3", "got 4")),  # ran, silently dropping the last one
    ("unet_2d_condition", "cross_attention_kwargs a string", {"cross_attention_kwargs": "attention"}, TypeError,
     ("str", "dict")),  # ValueError: dictionary update sequence element #0 has length 1; 2 is required
    ("unet_2d_condition", "encoder_attention_mask a list", {"encoder_attention_mask": [[1] * TOKENS] * B}, TypeError,
     ("list", "Tensor")),  # AttributeError: 'list' object has no attribute 'dim'
]


@pytest.mark.parametrize("name,what,overrides,error,needles", REGRESSIONS, ids=[r[1] for r in REGRESSIONS])
def test_regression_input_is_refused_by_name(name, what, overrides, error, needles):
    with pytest.raises(error) as info, torch.no_grad():
        model(name)(**{**valid_inputs(name), **overrides})
    missing = [needle for needle in needles if needle not in str(info.value)]
    assert not missing, f"{missing} not in {str(info.value)!r}"


def test_regression_model_on_meta_refuses_cpu_inputs():
    with pytest.raises(ValueError, match="model's device meta; got a tensor on cpu"):
        meta_model("unet_1d")(**valid_inputs("unet_1d"))


@pytest.mark.parametrize("name", ["unet_2d", "unet_2d_condition"])
def test_regression_forward_chunking_arguments(name):
    net = model(name)
    try:
        # UNet2DModel has no feed-forward to chunk, so nothing used to look at chunk_size
        with pytest.raises(ValueError, match=r"chunk_size must be a positive int or None; got -1"):
            net.enable_forward_chunking(-1)
        # 1.0 passed `dim in (0, 1)` and broke the next forward (tuple indices must be integers)
        with pytest.raises(ValueError, match=r"dim must be 0 \(batch\) or 1 \(tokens\); got 1\.0"):
            net.enable_forward_chunking(1, dim=1.0)
        net.enable_forward_chunking(0)  # 0 means 1, as in diffusers
    finally:
        net.disable_forward_chunking()


@pytest.mark.parametrize("value", ["scale=1", 0.5])
def test_lora_scale_decorator_reads_a_non_dict(value):
    with pytest.raises(TypeError, match=f"cross_attention_kwargs must be a dict or None; got {type(value).__name__}"):
        model("unet_2d_condition")(**valid_inputs("unet_2d_condition"), cross_attention_kwargs=value)
