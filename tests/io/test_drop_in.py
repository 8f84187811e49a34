"""fastunet as a drop-in for diffusers beyond forward(): output objects, the ConfigMixin/ModelMixin surface
(register_to_config, config attributes, save/load_config, from_config, sharded save_pretrained,
parameter counts, class attributes) side by side with diffusers 0.42.1, and the memory of a load
(models built on meta, the checkpoint's tensors assigned), measured on a real-size SD1.5 UNet."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass

import diffusers
import pytest
import torch
import torch.nn as nn
from diffusers.models.transformers.transformer_temporal import (
    TransformerTemporalModel as DTransformerTemporalModel,
    TransformerTemporalModelOutput as DTransformerTemporalModelOutput,
)
from diffusers.models.modeling_outputs import Transformer2DModelOutput as DTransformer2DModelOutput
from diffusers.models.transformers.transformer_2d import Transformer2DModel as DTransformer2DModel
from diffusers.models.unets.unet_1d import UNet1DOutput as DUNet1DOutput
from diffusers.models.unets.unet_2d import UNet2DOutput as DUNet2DOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput as DUNet2DConditionOutput
from diffusers.models.unets.unet_3d_condition import UNet3DConditionOutput as DUNet3DConditionOutput
from diffusers.models.unets.unet_motion_model import UNetMotionOutput as DUNetMotionOutput
from diffusers.utils import BaseOutput

import fastunet
from fastunet.checkpoint import parse_shard_size
from fastunet.layers.transformer_2d import Transformer2DModel, Transformer2DModelOutput
from fastunet.layers.transformer_temporal import TransformerTemporalModel, TransformerTemporalModelOutput
from fastunet.outputs import ModelOutput
from fastunet.testing import perturb_

# --------------------------------------------------------------------------------------------- outputs

OUTPUT_PAIRS = {
    "UNet1DOutput": (fastunet.UNet1DOutput, DUNet1DOutput),
    "UNet2DOutput": (fastunet.UNet2DOutput, DUNet2DOutput),
    "UNet2DConditionOutput": (fastunet.UNet2DConditionOutput, DUNet2DConditionOutput),
    "UNet3DConditionOutput": (fastunet.UNet3DConditionOutput, DUNet3DConditionOutput),
    "UNetMotionOutput": (fastunet.UNetMotionOutput, DUNetMotionOutput),
    "Transformer2DModelOutput": (Transformer2DModelOutput, DTransformer2DModelOutput),
    "TransformerTemporalModelOutput": (TransformerTemporalModelOutput, DTransformerTemporalModelOutput),
}


@dataclass
class ThreeFields(ModelOutput):
    """A multi-field output, to see ``None`` entries left out in the middle and at the end."""

    sample: torch.Tensor | None = None
    extra: object = None
    last: object = None


@dataclass
class DThreeFields(BaseOutput):
    sample: torch.Tensor | None = None
    extra: object = None
    last: object = None


def dict_view(out) -> dict:
    """What a caller sees of an output through the dict and tuple interfaces."""
    return {"isinstance_dict": isinstance(out, dict), "keys": list(out.keys()), "len": len(out),
            "iter": list(out), "values": [id(v) for v in out.values()],
            "items": [(k, id(v)) for k, v in out.items()], "tuple": [id(v) for v in out.to_tuple()]}


@pytest.mark.parametrize("name", list(OUTPUT_PAIRS))
def test_output_reads_like_diffusers(name):
    ours_cls, theirs_cls = OUTPUT_PAIRS[name]
    sample = torch.randn(2, 3, 4)
    ours, theirs = ours_cls(sample=sample), theirs_cls(sample=sample)
    assert dict_view(ours) == dict_view(theirs)
    assert dict(ours) == {"sample": sample} and isinstance(ours, dict)
    for out in (ours, theirs):
        assert out[0] is out["sample"] is out.sample is sample
        assert out.to_tuple() == (sample,) and out[:1] == (sample,)
    with pytest.raises(KeyError):
        ours["nope"]
    with pytest.raises(IndexError):
        ours[1]

    # None fields are left out, as diffusers does
    empty_ours, empty_theirs = ours_cls(sample=None), theirs_cls(sample=None)
    assert dict_view(empty_ours) == dict_view(empty_theirs)
    assert list(empty_ours.keys()) == [] and empty_ours.to_tuple() == ()

    # attribute and entry stay in step, whichever is set
    for out in (ours, theirs):
        other = torch.randn(1)
        out.sample = other
        assert out["sample"] is other and out[0] is other
        third = torch.randn(1)
        out["sample"] = third
        assert out.sample is third and out.to_tuple() == (third,)

    # removal and bulk updates are refused (diffusers raises Exception; ours a TypeError, a subclass)
    for action in (lambda o: o.pop("sample"), lambda o: o.update(sample=1), lambda o: o.__delitem__("sample"),
                   lambda o: o.setdefault("x", 1)):
        with pytest.raises(Exception):
            action(theirs)
        with pytest.raises(TypeError):
            action(ours)


@pytest.mark.parametrize("name", list(OUTPUT_PAIRS))
def test_output_pickles_and_copies(name):
    ours_cls, _ = OUTPUT_PAIRS[name]
    out = ours_cls(sample=torch.randn(2, 5))
    for clone in (pickle.loads(pickle.dumps(out)), copy.deepcopy(out), copy.copy(out)):
        assert type(clone) is ours_cls and list(clone.keys()) == ["sample"]
        assert torch.equal(clone.sample, out.sample) and clone[0] is clone.sample
    # with values that compare as booleans, the unpickled object equals the original
    plain = ours_cls(sample=3)
    assert pickle.loads(pickle.dumps(plain)) == plain


def test_multi_field_output_like_diffusers():
    x, y = torch.randn(2), torch.randn(3)
    cases = [dict(sample=x), dict(sample=x, last=y), dict(extra=y), dict(sample=x, extra=5, last=y), {}]
    for kwargs in cases:
        if not kwargs:
            continue
        ours, theirs = ThreeFields(**kwargs), DThreeFields(**kwargs)
        assert dict_view(ours) == dict_view(theirs), kwargs
        assert all(a is b for a, b in zip(ours.to_tuple(), theirs.to_tuple()))
    ours, theirs = ThreeFields(sample=x, last=y), DThreeFields(sample=x, last=y)
    assert ours[1] is theirs[1] is y  # integer positions count only the entries present
    # a dict as the only field: its items are the entries (diffusers' construction rule)
    ours, theirs = ThreeFields(sample={"a": x, "b": y}), DThreeFields(sample={"a": x, "b": y})
    assert dict_view(ours) == dict_view(theirs)

    # fastunet keeps fields in step both ways, also for a field first given as None
    out = ThreeFields(sample=x)
    out.last = y
    assert list(out.keys()) == ["sample", "last"] and out["last"] is y
    out.extra = 7
    assert list(out.keys()) == ["sample", "extra", "last"] and out.to_tuple() == (x, 7, y)
    out["extra"] = None
    assert list(out.keys()) == ["sample", "last"] and out.extra is None
    out = pickle.loads(pickle.dumps(ThreeFields(sample=1, last="z")))
    assert out == ThreeFields(sample=1, last="z") and list(out.items()) == [("sample", 1), ("last", "z")]


def test_output_is_a_pytree_node():
    out = ThreeFields(sample=torch.ones(2), last=torch.zeros(1))
    leaves, spec = torch.utils._pytree.tree_flatten(out)
    assert len(leaves) == 2
    rebuilt = torch.utils._pytree.tree_unflatten([leaf + 1 for leaf in leaves], spec)
    assert type(rebuilt) is ThreeFields and list(rebuilt.keys()) == ["sample", "last"]
    assert torch.equal(rebuilt.sample, torch.full((2,), 2.0))


def test_model_forward_returns_the_dict_output():
    cfg = dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
               down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    ours, theirs = fastunet.UNet2DModel(**cfg).eval(), diffusers.UNet2DModel(**cfg).eval()
    ours.load_state_dict(theirs.state_dict())
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    with torch.no_grad():
        a, b = ours(x, t), theirs(x, t)
    assert isinstance(a, fastunet.UNet2DOutput) and isinstance(a, dict)
    assert list(a.keys()) == list(b.keys()) == ["sample"]
    torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a["sample"], b["sample"], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------- model families

COND = 8
FAMILIES = {
    "UNet1DModel": (fastunet.UNet1DModel, diffusers.UNet1DModel, dict(sample_size=64, extra_in_channels=64)),
    "UNet2DModel": (fastunet.UNet2DModel, diffusers.UNet2DModel, dict(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
        num_class_embeds=10, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"))),
    "UNet2DModel-fourier": (fastunet.UNet2DModel, diffusers.UNet2DModel, dict(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        time_embedding_type="fourier", down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"))),
    "UNet2DConditionModel": (fastunet.UNet2DConditionModel, diffusers.UNet2DConditionModel, dict(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
        attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))),
    "UNet3DConditionModel": (fastunet.UNet3DConditionModel, diffusers.UNet3DConditionModel, dict(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
        attention_head_dim=4, time_cond_proj_dim=COND, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))),
    "UNetMotionModel": (fastunet.UNetMotionModel, diffusers.UNetMotionModel, dict(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
        num_attention_heads=2, motion_num_attention_heads=2, motion_max_seq_length=8,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"))),
    "MotionAdapter": (fastunet.MotionAdapter, diffusers.MotionAdapter, dict(
        block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
        motion_norm_num_groups=8, motion_max_seq_length=8)),
    "Transformer2DModel": (Transformer2DModel, DTransformer2DModel, dict(
        num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=4, cross_attention_dim=8)),
    "TransformerTemporalModel": (TransformerTemporalModel, DTransformerTemporalModel, dict(
        num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=4)),
}
UNETS = [name for name in FAMILIES if name.startswith("UNet") or name == "MotionAdapter"]


def pair(name: str):
    """(fastunet model, diffusers model) of family ``name``, holding the same perturbed weights."""
    ours_cls, theirs_cls, cfg = FAMILIES[name]
    theirs = perturb_(theirs_cls(**cfg))
    ours = ours_cls(**cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def public(config) -> dict:
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


# the classes where fastunet implements gradient checkpointing and diffusers does not
CHECKPOINTING_EXTENSIONS = {"UNet1DModel", "UNet3DConditionModel", "TransformerTemporalModel"}


@pytest.mark.parametrize("name", [n for n in FAMILIES if "-" not in n])
def test_class_attributes_match_diffusers(name):
    ours, theirs, _ = FAMILIES[name]
    for attribute in ("_keep_in_fp32_modules", "_no_split_modules", "_skip_layerwise_casting_patterns",
                      "config_name"):
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute
    if name in CHECKPOINTING_EXTENSIONS:
        assert ours._supports_gradient_checkpointing and not theirs._supports_gradient_checkpointing
    else:
        assert ours._supports_gradient_checkpointing == theirs._supports_gradient_checkpointing
    if not ours._supports_gradient_checkpointing:
        with pytest.raises(ValueError, match="does not support gradient checkpointing"):
            ours(**FAMILIES[name][2]).enable_gradient_checkpointing()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_parameter_counts_and_footprint_match_diffusers(name):
    ours, theirs = pair(name)
    for only_trainable in (False, True):
        for exclude_embeddings in (False, True):
            kwargs = dict(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
            assert ours.num_parameters(**kwargs) == theirs.num_parameters(**kwargs), kwargs
    for module in (ours, theirs):  # the same parameters frozen in both (by name: the orders may differ)
        params = dict(module.named_parameters())
        for key in sorted(params)[::3]:
            params[key].requires_grad_(False)
    assert ours.num_parameters(only_trainable=True) == theirs.num_parameters(only_trainable=True)
    for return_buffers in (True, False):
        assert (ours.get_memory_footprint(return_buffers=return_buffers)
                == theirs.get_memory_footprint(return_buffers=return_buffers))
    assert ours.dtype == theirs.dtype == torch.float32 and ours.device == theirs.device
    ours.to(torch.float16), theirs.to(torch.float16)
    assert ours.dtype == theirs.dtype == torch.float16
    assert ours.get_memory_footprint() == theirs.get_memory_footprint()


def test_exclude_embeddings_counts_something():
    ours, _ = pair("UNet2DModel")  # num_class_embeds: an nn.Embedding
    embedding = ours.class_embedding.weight.numel()
    assert embedding and ours.num_parameters(exclude_embeddings=True) == ours.num_parameters() - embedding


# ---------------------------------------------------------------------------------------- config


def test_register_to_config_updates_config_like_diffusers(tmp_path):
    ours, theirs = pair("UNet2DModel")
    for model in (ours, theirs):
        model.register_to_config(sample_size=96, new_entry=[1, 2])
        assert model.config.sample_size == 96 and model.config["new_entry"] == [1, 2]
        assert model.config.in_channels == 3  # the other entries stay
    assert public(ours.config) == public(theirs.config)
    ours.save_config(tmp_path / "ours")
    theirs.save_config(tmp_path / "theirs")
    assert (tmp_path / "ours" / "config.json").read_text() == (tmp_path / "theirs" / "config.json").read_text()
    with pytest.raises(TypeError, match="read-only"):
        ours.config["sample_size"] = 3
    # the decorator sets a fresh config for each new model; the method changed only this one
    assert fastunet.UNet2DModel(**FAMILIES["UNet2DModel"][2]).config.sample_size == 8


@pytest.mark.parametrize("name", ["UNet2DModel", "UNet2DConditionModel", "UNetMotionModel"])
def test_config_attribute_access_warns_like_diffusers(name):
    ours, theirs = pair(name)
    for key in ("in_channels", "block_out_channels", "layers_per_block"):
        with pytest.warns(FutureWarning, match=key):
            ours_value = getattr(ours, key)
        with pytest.warns(FutureWarning):
            theirs_value = getattr(theirs, key)
        assert json.dumps(ours_value) == json.dumps(theirs_value)
    # real attributes (both set sample_size in __init__), sub-modules and parameters do not warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ours.sample_size == theirs.sample_size
        assert ours.conv_in is ours._modules["conv_in"]
        assert ours.conv_in.weight is not None and ours.dtype == torch.float32
    messages = []
    for model in (ours, theirs):
        with pytest.raises(AttributeError) as info:
            model.not_an_attribute_or_entry
        messages.append(str(info.value))
    assert messages[0] == messages[1] == f"'{type(ours).__name__}' object has no attribute 'not_an_attribute_or_entry'"
    assert getattr(ours, "not_an_attribute_or_entry", "fallback") == "fallback"


@pytest.mark.parametrize("name", UNETS)
def test_save_load_from_config_match_diffusers(tmp_path, name):
    ours, theirs = pair(name)
    ours.save_config(tmp_path / "ours")
    theirs.save_config(tmp_path / "theirs")
    assert os.listdir(tmp_path / "ours") == ["config.json"]
    assert (tmp_path / "ours" / "config.json").read_text() == (tmp_path / "theirs" / "config.json").read_text()
    loaded = type(ours).load_config(tmp_path / "ours")
    assert isinstance(loaded, dict) and loaded == type(theirs).load_config(tmp_path / "theirs")
    assert type(ours).load_config(tmp_path / "ours" / "config.json") == loaded
    assert type(ours).load_config(tmp_path, subfolder="ours") == loaded
    built = type(ours).from_config(loaded)
    assert public(built.config) == public(ours.config) and built.config["_class_name"] == type(ours).__name__
    assert public(type(ours).from_config(theirs.config).config) == public(theirs.config)

    config, unused = type(ours).load_config(tmp_path / "ours", return_unused_kwargs=True, cache_dir="x", foo=1)
    assert config == loaded and unused == {"foo": 1}
    with pytest.warns(UserWarning, match="not_an_option"):
        model, unused = type(ours).from_config({**loaded, "not_an_option": 1}, return_unused_kwargs=True, bar=2)
    _, theirs_unused = type(theirs).from_config({**loaded, "not_an_option": 1}, return_unused_kwargs=True, bar=2)
    assert unused == theirs_unused
    with pytest.raises(FileNotFoundError, match="no config.json"):
        type(ours).load_config(tmp_path)
    with pytest.raises(NotADirectoryError):
        ours.save_config(tmp_path / "ours" / "config.json")


# ----------------------------------------------------------------------------------------- shards


def listing(directory) -> list[str]:
    return sorted(os.listdir(directory))


# Families whose state dict lists the weights in diffusers' order: their shards hold the same weights
# as diffusers' and the index is the same text. (UNet1DModel and UNet2DModel register their mid block
# before the up blocks, diffusers after, so their shard boundaries fall elsewhere; the plan is still
# diffusers' plan of that order, see test_shard_plan_is_huggingface_hubs.)
SAME_ORDER = ["UNet2DConditionModel", "UNet3DConditionModel", "UNetMotionModel", "MotionAdapter"]


def test_state_dict_orders():
    for name in FAMILIES:
        ours, theirs = pair(name)
        same = list(ours.state_dict()) == list(theirs.state_dict())
        assert same == (name in SAME_ORDER or name.startswith("Transformer")), name


@pytest.mark.parametrize("name", ["UNet2DConditionModel", "UNet1DModel", "MotionAdapter"])
@pytest.mark.parametrize("safe_serialization", [True, False])
@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sharded_save_matches_diffusers_both_ways(tmp_path, name, safe_serialization, variant):
    ours, theirs = pair(name)
    options = dict(safe_serialization=safe_serialization, variant=variant, max_shard_size="60KB")
    ours.save_pretrained(tmp_path / "ours", **options)
    theirs.save_pretrained(tmp_path / "theirs", **options)
    assert listing(tmp_path / "ours") == listing(tmp_path / "theirs")
    index = [n for n in listing(tmp_path / "ours") if "index" in n]
    assert len(index) == 1 and len(listing(tmp_path / "ours")) > 3
    ours_index, theirs_index = (json.loads((tmp_path / d / index[0]).read_text()) for d in ("ours", "theirs"))
    assert ours_index["metadata"] == theirs_index["metadata"]
    assert sorted(ours_index["weight_map"]) == sorted(theirs_index["weight_map"])
    if name in SAME_ORDER:  # byte for byte: which shard holds each weight
        assert (tmp_path / "ours" / index[0]).read_text() == (tmp_path / "theirs" / index[0]).read_text()

    reference = theirs.state_dict()
    # diffusers finds sharded .bin weights only when told not to look for safetensors
    by_diffusers = type(theirs).from_pretrained(tmp_path / "ours", variant=variant,
                                                use_safetensors=None if safe_serialization else False)
    by_fastunet = type(ours).from_pretrained(tmp_path / "theirs", variant=variant)
    for loaded in (by_diffusers, by_fastunet):
        state = loaded.state_dict()
        assert sorted(state) == sorted(reference)
        assert all(torch.equal(state[k], reference[k]) for k in reference)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_shard_plan_is_huggingface_hubs(name):
    from huggingface_hub import split_torch_state_dict_into_shards

    from fastunet.checkpoint import _plan_shards

    ours, _ = pair(name)
    state = ours.state_dict()
    sizes = sorted(t.nbytes for t in state.values())
    for limit in (sizes[len(sizes) // 2], sizes[-1] - 1, 3 * sizes[-1], 10**10):
        split = split_torch_state_dict_into_shards(state, max_shard_size=limit, filename_pattern="w{suffix}")
        shards, total = _plan_shards(state, limit)
        assert shards == list(split.filename_to_tensors.values()) and total == split.metadata["total_size"]


def test_shard_size_forms_and_stale_files(tmp_path):
    ours, theirs = pair("UNet2DConditionModel")
    ours.save_pretrained(tmp_path / "a", max_shard_size=60_000)
    theirs.save_pretrained(tmp_path / "b", max_shard_size=60_000)
    assert listing(tmp_path / "a") == listing(tmp_path / "b")
    assert parse_shard_size("200MB") == 200 * 10**6 and parse_shard_size("10GB") == 10**10
    assert parse_shard_size(" 1.5kb ") == 1500 and parse_shard_size(123) == 123
    for bad, error in (("200", ValueError), ("12XB", ValueError), ("abcMB", ValueError), (0, ValueError),
                       (-5, ValueError), (1.5, TypeError), (True, TypeError), ("-1GB", ValueError)):
        with pytest.raises(error, match="max_shard_size"):
            parse_shard_size(bad)
    with pytest.raises(ValueError, match=r"'200'"):
        ours.save_pretrained(tmp_path / "c", max_shard_size="200")

    # the default (10GB) writes one file; it replaces the shards and their index, and the reverse
    ours.save_pretrained(tmp_path / "a")
    assert listing(tmp_path / "a") == ["config.json", "diffusion_pytorch_model.safetensors"]
    ours.save_pretrained(tmp_path / "a", max_shard_size="60KB")
    assert "diffusion_pytorch_model.safetensors" not in listing(tmp_path / "a")
    assert "diffusion_pytorch_model.safetensors.index.json" in listing(tmp_path / "a")
    fewer = listing(tmp_path / "a")
    ours.save_pretrained(tmp_path / "a", max_shard_size="200KB")  # fewer shards: the extra ones go
    assert len(listing(tmp_path / "a")) < len(fewer)
    index = json.loads((tmp_path / "a" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = [n for n in listing(tmp_path / "a") if n.startswith("diffusion_pytorch_model-")]
    assert sorted(set(index["weight_map"].values())) == shards
    loaded = type(ours).from_pretrained(tmp_path / "a")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_one_tensor_larger_than_the_limit_gets_its_own_shard(tmp_path):
    ours, theirs = pair("UNet2DConditionModel")
    ours.save_pretrained(tmp_path / "ours", max_shard_size="5KB")
    theirs.save_pretrained(tmp_path / "theirs", max_shard_size="5KB")
    name = "diffusion_pytorch_model.safetensors.index.json"
    assert (tmp_path / "ours" / name).read_text() == (tmp_path / "theirs" / name).read_text()


# ---------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", list(FAMILIES))
def test_load_builds_on_meta_and_fills_every_tensor(tmp_path, name):
    ours, theirs = pair(name)
    theirs.save_pretrained(tmp_path)
    loaded = type(ours).from_pretrained(tmp_path)
    tensors = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    assert not [n for n, t in tensors.items() if t.device.type != "cpu"]
    # buffers (computed ones included) equal those of a model built as usual; parameters the checkpoint's
    assert {n: b for n, b in loaded.named_buffers()}.keys() == {n: b for n, b in ours.named_buffers()}.keys()
    for key, buffer in ours.named_buffers():
        assert torch.equal(dict(loaded.named_buffers())[key], buffer), key
    reference = theirs.state_dict()
    assert all(torch.equal(loaded.state_dict()[k], reference[k]) for k in reference)
    assert {n: p.requires_grad for n, p in loaded.named_parameters()} == \
        {n: p.requires_grad for n, p in ours.named_parameters()}
    assert all(type(p) is nn.Parameter for p in loaded.parameters())
    half = type(ours).from_pretrained(tmp_path, torch_dtype=torch.float16)
    assert {t.dtype for t in half.state_dict().values() if t.is_floating_point()} == {torch.float16}


def test_fourier_projection_stays_frozen(tmp_path):
    ours, theirs = pair("UNet2DModel-fourier")
    frozen = [n for n, p in theirs.named_parameters() if not p.requires_grad]
    assert frozen  # GaussianFourierProjection's W
    theirs.save_pretrained(tmp_path)
    loaded = fastunet.UNet2DModel.from_pretrained(tmp_path)
    assert [n for n, p in loaded.named_parameters() if not p.requires_grad] == frozen
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([0.5])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t).sample, theirs(x, t).sample, rtol=1e-4, atol=1e-4)


# A real-size (SD1.5) UNet2DConditionModel checkpoint with random fp16 weights, written tensor by tensor in
# its own process (so that neither the writer's nor pytest's memory counts), then loaded in a fresh one.
WRITE_SD15 = textwrap.dedent("""
    import json, struct, sys, torch
    from fastunet import UNet2DConditionModel
    from fastunet.checkpoint import config_to_json_string
    directory = sys.argv[1]
    with torch.device("meta"):
        model = UNet2DConditionModel(cross_attention_dim=768)  # diffusers' defaults with SD1.5's text width
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in shapes.items():
        size = 2 * torch.Size(shape).numel()
        header[key] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    generator = torch.Generator().manual_seed(0)
    sums = {}
    with open(f"{directory}/diffusion_pytorch_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for i, (key, shape) in enumerate(shapes.items()):
            tensor = (torch.randn(shape, generator=generator) * 0.02).half()
            if i % 97 == 0:
                sums[key] = tensor.double().sum().item()
            f.write(tensor.numpy().tobytes())
    with open(f"{directory}/config.json", "w") as f:
        f.write(config_to_json_string(model))
    json.dump({"bytes": offset, "sums": sums}, open(f"{directory}/expected.json", "w"))
""")

LOAD_AND_MEASURE = textwrap.dedent("""
    import json, sys, torch
    from fastunet import UNet2DConditionModel

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    directory = sys.argv[1]
    expected = json.load(open(f"{directory}/expected.json"))
    try:  # reset the high-water mark, so that imports do not count
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pass
    baseline = status("VmRSS")
    model = UNet2DConditionModel.from_pretrained(directory, torch_dtype=torch.float16)
    peak = status("VmHWM")
    state = model.state_dict()
    sums_ok = all(abs(state[k].double().sum().item() - v) <= 1e-6 * max(1.0, abs(v))
                  for k, v in expected["sums"].items())
    print(json.dumps({"baseline": baseline, "peak": peak, "bytes": expected["bytes"], "sums_ok": sums_ok,
                      "params": model.num_parameters(), "dtype": str(model.dtype),
                      "meta": sum(t.is_meta for t in state.values())}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_real_size_load_holds_one_copy_of_the_weights(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", WRITE_SD15, str(tmp_path)], check=True, timeout=120, env=env)
    result = subprocess.run([sys.executable, "-c", LOAD_AND_MEASURE, str(tmp_path)], check=True, timeout=120,
                            env=env, capture_output=True, text=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(report)
    assert report["sums_ok"] and report["meta"] == 0 and report["dtype"] == "torch.float16"
    assert report["params"] == 859_520_964  # SD1.5's UNet
    size = report["bytes"]
    growth = report["peak"] - report["baseline"]
    print(f"checkpoint {size / 1e9:.3f} GB, load peak growth {growth / 1e9:.3f} GB, ratio {growth / size:.3f}")
    assert growth <= 1.3 * size, (growth, size)
