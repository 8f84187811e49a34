"""Checkpoint fault injection: damaged weights files, bad config.json, wrong tensors, malicious pickles,
missing shards, and saves interrupted at every step. Each fault must give a clear error naming the file
and the problem, and, where the API loads into an existing model, leave that model bit-identical.

What is and is not detected, as documented in :mod:`fastunet.checkpoint`:

* safetensors files carry no checksum. A flipped bit in the JSON header is caught (it breaks the JSON, or
  changes a name, dtype, shape or offset, which the checks against the file size and the model catch);
  a flipped bit in the tensor data loads, as a different value. Only the metadata entry
  (``{"format": "pt"}``) is not checked.
* a directory holding both ``.safetensors`` and ``.bin`` weights is read from the ``.safetensors``, as
  diffusers reads it (``use_safetensors=False`` picks the ``.bin``).
* a ``config.json`` without ``_class_name`` loads into the class it is loaded with, as in diffusers.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
import torch.nn as nn

import fastunet
from fastunet import checkpoint
from fastunet.configuration import config_problems
from fastunet.testing import perturb_
from test_atomic_load import assert_unchanged, snapshot, tiny_unet  # tests/io is on sys.path
from test_checkpoint import TinyModel, assert_state_dicts_bitwise_equal, public
from test_drop_in import FAMILIES

WEIGHTS = "diffusion_pytorch_model.safetensors"
LOAD_ERRORS = (OSError, ValueError, RuntimeError)


@pytest.fixture
def saved_unet(tmp_path):
    model = tiny_unet(0)
    model.save_pretrained(tmp_path / "unet")
    return model, tmp_path / "unet"


def header_span(path) -> tuple[int, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return 8 + length, data


# ------------------------------------------------------------------------------------- weights files


def test_truncated_safetensors_names_the_file(saved_unet):
    _, directory = saved_unet
    weights = directory / WEIGHTS
    end, data = header_span(weights)
    for cut in (4, end - 10, end + 10, len(data) - 1):
        weights.write_bytes(data[:cut])
        with pytest.raises(OSError, match=f"cannot read weights file .*{WEIGHTS}: it is truncated"):
            fastunet.UNet2DModel.from_pretrained(directory)


def test_every_bit_flip_in_the_tensor_entries_of_the_header_is_caught(tmp_path):
    model = perturb_(TinyModel())
    model.save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS
    end, data = header_span(weights)
    header = data[8:end]
    metadata = header.index(b'"__metadata__"')
    metadata_end = header.index(b"}", metadata) + 1
    positions = [p for p in range(len(header.rstrip(b" "))) if not metadata <= p < metadata_end]
    assert len(positions) > 500
    uncaught = []
    for position in positions:
        damaged = bytearray(data)
        damaged[8 + position] ^= 0x01
        weights.write_bytes(bytes(damaged))
        target = TinyModel()
        try:
            checkpoint.load_diffusers_state_dict(target, checkpoint.load_weights_file(weights))
        except LOAD_ERRORS:
            continue
        uncaught.append((position, header[max(position - 10, 0):position + 10]))
    assert not uncaught


def test_a_bit_flip_in_the_data_loads_a_different_value(saved_unet):
    """Documented, not detected: safetensors has no checksum, so the flipped value is what loads."""
    model, directory = saved_unet
    weights = directory / WEIGHTS
    end, data = header_span(weights)
    damaged = bytearray(data)
    damaged[end + 2] ^= 0x40  # a high bit of the first float32 of the data region
    weights.write_bytes(bytes(damaged))
    loaded = fastunet.UNet2DModel.from_pretrained(directory)
    different = [k for k, v in loaded.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert len(different) == 1
    key = different[0]
    assert (loaded.state_dict()[key] != model.state_dict()[key]).sum() == 1


def test_wrong_shape_and_integer_weights_in_the_file(saved_unet):
    model, directory = saved_unet
    weights = directory / WEIGHTS
    state = checkpoint.load_weights_file(weights)
    state["conv_in.weight"] = state["conv_in.weight"].to(torch.int64)
    state["conv_out.bias"] = torch.zeros(5)
    checkpoint.save_file(state, str(weights))
    with pytest.raises(ValueError) as info:
        fastunet.UNet2DModel.from_pretrained(directory)
    message = str(info.value)
    assert str(weights) in message and "nothing was loaded" in message
    assert "conv_out.bias: checkpoint [5], model [3]" in message
    assert "conv_in.weight: checkpoint torch.int64, model torch.float32" in message
    # the same tensors into an existing model: refused whole, the model unchanged
    target = tiny_unet(1)
    before = snapshot(target)
    with pytest.raises(RuntimeError, match="dtype mismatch for conv_in.weight"):
        target.load_state_dict(state)
    assert_unchanged(target, before)


def test_safetensors_is_preferred_over_bin(tmp_path):
    bin_model, safe_model = perturb_(TinyModel(), seed=1), perturb_(TinyModel(), seed=2)
    bin_model.save_pretrained(tmp_path, safe_serialization=False)
    checkpoint.save_file(safe_model.state_dict(), str(tmp_path / WEIGHTS))
    assert_state_dicts_bitwise_equal(safe_model.state_dict(), TinyModel.from_pretrained(tmp_path).state_dict())
    assert_state_dicts_bitwise_equal(bin_model.state_dict(),
                                     TinyModel.from_pretrained(tmp_path, use_safetensors=False).state_dict())


class Payload:
    """Unpickling this runs ``open(marker, "w")``: the file appears if the pickle's code is executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_malicious_bin_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker"
    directory = tmp_path / "ckpt"
    TinyModel().save_pretrained(directory, safe_serialization=False)
    state = dict(TinyModel().state_dict())
    state["norm.weight"] = Payload(marker)
    torch.save(state, directory / "diffusion_pytorch_model.bin")
    with pytest.raises(OSError, match="cannot read weights file .*diffusion_pytorch_model.bin.*Unpickl") as info:
        TinyModel.from_pretrained(directory)
    assert "weights_only" in str(info.value.__cause__) or "Weights only load failed" in str(info.value)
    assert not marker.exists()
    torch.save({"norm.weight": Payload(marker)}, tmp_path / "pytorch_lora_weights.bin")
    peft = pytest.importorskip("peft")  # noqa: F841
    unet = fastunet.UNet2DConditionModel(**COND_UNET)
    with pytest.raises(OSError, match="cannot read weights file .*pytorch_lora_weights.bin"):
        unet.load_lora_adapter(tmp_path / "pytorch_lora_weights.bin", prefix=None)
    assert not marker.exists()


def test_sharded_index_naming_a_missing_shard(tmp_path):
    model = tiny_unet(0)
    model.save_pretrained(tmp_path, max_shard_size=4000)
    shards = sorted(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=f"lists shards that are not in .*\\['{shards[1].name}'\\]"):
        fastunet.UNet2DModel.from_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text("{\"weight_map\": ")
    with pytest.raises(OSError, match="index.json is not valid JSON"):
        fastunet.UNet2DModel.from_pretrained(tmp_path)


# -------------------------------------------------------------------------------------- config.json


@pytest.mark.parametrize("key, value, expected", [
    ("block_out_channels", "abc", "block_out_channels='abc' (a JSON str): expected tuple[int, ...]"),
    ("layers_per_block", -1, "layers_per_block=-1: a count or size cannot be negative"),
    ("layers_per_block", "2", "layers_per_block='2' (a JSON str): expected int"),
    ("layers_per_block", True, "layers_per_block=True (a JSON bool): expected int"),
    ("norm_eps", "x", "norm_eps='x' (a JSON str): expected float"),
    ("block_out_channels", [8, -16], "block_out_channels=[8, -16]: a count or size cannot be negative"),
    ("down_block_types", "DownBlock2D", "down_block_types='DownBlock2D' (a JSON str): expected tuple[str, ...]"),
    ("in_channels", 3.5, "in_channels=3.5 (a JSON float): expected int"),
])
def test_config_entries_of_the_wrong_type(saved_unet, key, value, expected):
    _, directory = saved_unet
    config = json.loads((directory / "config.json").read_text())
    config[key] = value
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        fastunet.UNet2DModel.from_pretrained(directory)
    message = str(info.value)
    assert f"{directory / 'config.json'} has entries of the wrong type for UNet2DModel" in message
    assert expected in message


def test_values_the_constructor_refuses_name_the_config_file(saved_unet):
    _, directory = saved_unet
    config = json.loads((directory / "config.json").read_text())
    config["layers_per_block"] = 0
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="layers_per_block must be a positive int") as info:
        fastunet.UNet2DModel.from_pretrained(directory)
    assert any(str(directory / "config.json") in note for note in info.value.__notes__)


def test_config_without_class_name_loads_and_invalid_json_fails(saved_unet):
    model, directory = saved_unet
    config = json.loads((directory / "config.json").read_text())
    del config["_class_name"]
    (directory / "config.json").write_text(json.dumps(config))
    assert_state_dicts_bitwise_equal(model.state_dict(), fastunet.UNet2DModel.from_pretrained(directory).state_dict())
    (directory / "config.json").write_text(json.dumps(config)[:-5])
    with pytest.raises(OSError, match="config.json is not valid JSON"):
        fastunet.UNet2DModel.from_pretrained(directory)


def test_real_configs_pass_the_type_check():
    """diffusers' defaults for each class (the real-size SD and AnimateDiff layouts) and SDXL's config."""
    import inspect

    import diffusers

    for name in ("UNet1DModel", "UNet2DModel", "UNet2DConditionModel", "UNet3DConditionModel", "UNetMotionModel",
                 "MotionAdapter"):
        theirs = getattr(diffusers, name)
        defaults = {k: p.default for k, p in inspect.signature(theirs.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        entries = getattr(fastunet, name).extract_init_kwargs(json.loads(json.dumps(defaults)), warn=False)
        assert config_problems(getattr(fastunet, name), entries) == [], name
    sdxl = {"addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
            "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 2,
            "mid_block_scale_factor": 1, "norm_eps": 1e-05, "num_attention_heads": None, "sample_size": 128,
            "projection_class_embeddings_input_dim": 2816, "transformer_layers_per_block": [1, 2, 10],
            "upcast_attention": None, "use_linear_projection": True, "class_embed_type": None, "freq_shift": 0}
    assert config_problems(fastunet.UNet2DConditionModel, sdxl) == []


# ----------------------------------------------------------------------------- interrupted saves


def half_writer(real):
    """A ``save_file`` that writes half the file and then fails, as a killed or out-of-space save would."""

    def write(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    return write


def test_interrupted_save_into_a_fresh_directory_leaves_nothing_loadable(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "save_file", half_writer(checkpoint.save_file))
    with pytest.raises(OSError, match="No space left"):
        tiny_unet(0).save_pretrained(tmp_path / "new")
    assert os.listdir(tmp_path / "new") == []
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        fastunet.UNet2DModel.from_pretrained(tmp_path / "new")


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("new_config", [dict(norm_eps=1e-3), dict(block_out_channels=(8, 24))])
def test_interrupted_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch, sharded, new_config):
    """``norm_eps`` changes the config and not one shape: a new config over the old weights would load."""
    old = tiny_unet(0)
    shard_size = 4000 if sharded else "10GB"
    old.save_pretrained(tmp_path, max_shard_size=shard_size)
    listing = sorted(os.listdir(tmp_path))
    calls = []
    real = checkpoint.save_file

    def second_call_fails(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == (2 if sharded else 1):
            return half_writer(real)(tensors, path, metadata)
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", second_call_fails)
    with pytest.raises(OSError, match="No space left"):
        tiny_unet(1, **new_config).save_pretrained(tmp_path, max_shard_size=shard_size)
    assert sorted(os.listdir(tmp_path)) == listing  # no temporary file left behind either
    loaded = fastunet.UNet2DModel.from_pretrained(tmp_path)
    assert public(loaded.config) == public(old.config)
    assert_state_dicts_bitwise_equal(old.state_dict(), loaded.state_dict())


def commit_steps(monkeypatch, fail_at: int, counter: list) -> None:
    """Make the ``fail_at``-th rename or removal of the commit raise, as if the process died there."""
    for name in ("replace", "remove"):
        real = getattr(os, name)

        def step(*args, real=real, **kwargs):
            counter.append(args[0])
            if len(counter) == fail_at:
                raise KeyboardInterrupt("killed during the commit")
            return real(*args, **kwargs)

        monkeypatch.setattr(os, name, step)


@pytest.mark.parametrize("old_sharded, new_sharded", [(False, False), (True, False), (False, True), (True, True)])
def test_a_save_killed_at_any_step_loads_old_or_new_or_fails(tmp_path, monkeypatch, old_sharded, new_sharded):
    old, new = tiny_unet(0), tiny_unet(1, norm_eps=1e-3)
    step = 0
    outcomes = set()
    while True:
        step += 1
        directory = tmp_path / f"step{step}"
        old.save_pretrained(directory, max_shard_size=4000 if old_sharded else "10GB")
        counter: list = []
        with monkeypatch.context() as patch:
            commit_steps(patch, step, counter)
            try:
                new.save_pretrained(directory, max_shard_size=4000 if new_sharded else "10GB")
                finished = True
            except KeyboardInterrupt:
                finished = False
        try:
            loaded = fastunet.UNet2DModel.from_pretrained(directory)
        except FileNotFoundError as error:
            assert "no config.json in" in str(error)
            outcomes.add("fails")
        else:
            for name, model in (("old", old), ("new", new)):
                if loaded.config.norm_eps == model.config.norm_eps:
                    assert_state_dicts_bitwise_equal(model.state_dict(), loaded.state_dict())
                    outcomes.add(name)
        if finished:
            break
    assert "new" in outcomes and "fails" in outcomes and step > 3


# ------------------------------------------------------------------- loads into an existing model

COND_UNET = dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                 cross_attention_dim=8, attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def lora_state(seed: int = 0) -> dict[str, torch.Tensor]:
    from peft import LoraConfig, get_peft_model_state_dict

    source = fastunet.UNet2DConditionModel(**COND_UNET)
    torch.manual_seed(seed)
    source.add_adapter(LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(source).items()}


@pytest.mark.parametrize("fault", ["shape", "integer"])
@pytest.mark.parametrize("with_adapter", [False, True])
def test_failed_lora_load_leaves_the_model_as_it_was(fault, with_adapter):
    pytest.importorskip("peft")
    unet = perturb_(fastunet.UNet2DConditionModel(**COND_UNET))
    if with_adapter:
        unet.load_lora_adapter(lora_state(1), prefix=None, adapter_name="first")
    before, modules = snapshot(unet), [type(m) for m in unet.modules()]
    bad = lora_state(2)
    key = list(bad)[-1]
    bad[key] = torch.zeros(bad[key].shape[0] + 1, bad[key].shape[1]) if fault == "shape" else bad[key].long()
    with pytest.raises(RuntimeError, match="nothing was loaded") as info:
        unet.load_lora_adapter(bad, prefix=None, adapter_name="bad")
    assert key.replace(".weight", ".bad.weight") in str(info.value)
    assert any("while loading LoRA adapter 'bad'" in note for note in info.value.__notes__)
    assert_unchanged(unet, before)
    assert [type(m) for m in unet.modules()] == modules
    assert list(getattr(unet, "peft_config", {})) == (["first"] if with_adapter else [])
    assert unet._hf_peft_config_loaded == with_adapter


def test_truncated_lora_file_names_it(tmp_path):
    pytest.importorskip("peft")
    path = tmp_path / "pytorch_lora_weights.safetensors"
    checkpoint.save_file(lora_state(), str(path))
    path.write_bytes(path.read_bytes()[:-50])
    unet = perturb_(fastunet.UNet2DConditionModel(**COND_UNET))
    before = snapshot(unet)
    with pytest.raises(OSError, match="cannot read weights file .*pytorch_lora_weights.safetensors"):
        unet.load_lora_adapter(tmp_path, prefix=None)
    assert_unchanged(unet, before)


def test_custom_diffusion_weights_for_another_width_are_refused():
    unet = perturb_(fastunet.UNet2DConditionModel(**COND_UNET))
    processors = unet.attn_processors
    mid = next(name for name in processors if name.startswith("mid_block") and name.endswith("attn2.processor"))
    down = next(name for name in processors if name.startswith("down_blocks.0") and name.endswith("attn2.processor"))
    weights = {f"{mid}.to_k_custom_diffusion.weight": torch.randn(16, 8),
               f"{mid}.to_v_custom_diffusion.weight": torch.randn(16, 8),
               f"{down}.to_k_custom_diffusion.weight": torch.randn(16, 8),  # down_blocks.0 is 8 wide
               f"{down}.to_v_custom_diffusion.weight": torch.randn(16, 8)}
    with pytest.raises(ValueError, match="nothing was loaded") as info:
        unet.load_attn_procs(weights)
    assert f"{down}.to_k_custom_diffusion.weight: shape [16, 8], the layer's to_k is [8, 8]" in str(info.value)
    assert mid not in str(info.value)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == {k: type(v) for k, v in processors.items()}
