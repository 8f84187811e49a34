"""diffusers-format checkpoints: fastunet.checkpoint's save/load on a tiny test model, every error path,
and round trips against diffusers' own save_pretrained/from_pretrained."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fastunet.checkpoint import (
    DIFFUSERS_FORMAT_VERSION,
    config_to_json_string,
    convert_deprecated_attention_names,
    load_diffusers_state_dict,
    load_weights_file,
)
from fastunet.configuration import register_to_config
from fastunet.modeling import ModelMixin
from fastunet.testing import perturb_


class TinyAttention(nn.Module):
    """Shaped like diffusers' Attention as the old AttentionBlock: to_q/to_k/to_v/to_out.0."""

    def __init__(self, dim: int, flagged: bool):
        super().__init__()
        self.group_norm = nn.GroupNorm(2, dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self._from_deprecated_attn_block = flagged

    def forward(self, x):
        return self.to_out[0](self.to_q(x) + self.to_k(x) * self.to_v(x))


class SelfAttention1dLike(nn.Module):
    """Not flagged, and legitimately named query/key/value/proj_attn (as UNet1D's SelfAttention1d)."""

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj_attn = nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj_attn(self.query(x) * self.key(x) + self.value(x))


class TinyModel(ModelMixin):
    @register_to_config
    def __init__(self, in_channels: int = 3, hidden: int = 8, num_blocks: int = 2,
                 block_types: tuple = ("attn", "attn"), eps: float = 1e-5, act_fn: str | None = "silu"):
        super().__init__()
        self.proj_in = nn.Linear(in_channels, hidden)
        self.blocks = nn.ModuleList([TinyAttention(hidden, flagged=True) for _ in range(num_blocks)])
        self.mid = SelfAttention1dLike(hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.register_buffer("scale", torch.rand(hidden))
        self.register_buffer("steps", torch.arange(4), persistent=True)
        self.register_buffer("cache", torch.zeros(2), persistent=False)

    def forward(self, x):
        h = self.proj_in(x)
        for block in self.blocks:
            h = h + block(h)
        return self.norm(self.mid(h)) * self.scale


class TiedModel(ModelMixin):
    @register_to_config
    def __init__(self, dim: int = 4):
        super().__init__()
        self.embed = nn.Linear(dim, dim, bias=False)
        self.head = nn.Linear(dim, dim, bias=False)
        self.head.weight = self.embed.weight
        self.transposed = nn.Parameter(torch.randn(dim, dim + 1).t())  # non-contiguous


def public(config) -> dict:
    """Config entries without the private ones, lists and tuples alike."""
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))


def assert_state_dicts_bitwise_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.fixture
def saved(tmp_path):
    model = perturb_(TinyModel(hidden=8, block_types=("attn", "plain")))
    model.save_pretrained(tmp_path / "tiny")
    return model, tmp_path / "tiny"


# ------------------------------------------------------------------------------------------ round trips


def test_round_trip_safetensors(saved):
    model, directory = saved
    assert sorted(os.listdir(directory)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = TinyModel.from_pretrained(directory)
    assert public(loaded.config) == public(model.config)
    assert loaded.config["_name_or_path"] == str(directory)
    assert not loaded.training
    assert_state_dicts_bitwise_equal(model.state_dict(), loaded.state_dict())
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    with safe_open(directory / "diffusion_pytorch_model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_config_json_layout_matches_diffusers(saved):
    model, directory = saved
    text = (directory / "config.json").read_text()
    entries = json.loads(text)
    assert entries["_class_name"] == "TinyModel"
    assert entries["_diffusers_version"] == DIFFUSERS_FORMAT_VERSION
    assert entries["block_types"] == ["attn", "plain"] and entries["act_fn"] == "silu"
    assert text == json.dumps(entries, indent=2, sort_keys=True) + "\n"
    assert text == config_to_json_string(model)


def test_round_trip_bin_and_format_preference(tmp_path):
    model = perturb_(TinyModel())
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    assert_state_dicts_bitwise_equal(model.state_dict(), TinyModel.from_pretrained(tmp_path).state_dict())

    other = perturb_(TinyModel(), seed=1)
    save_file(other.state_dict(), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert_state_dicts_bitwise_equal(other.state_dict(), TinyModel.from_pretrained(tmp_path).state_dict())
    from_bin = TinyModel.from_pretrained(tmp_path, use_safetensors=False)
    assert_state_dicts_bitwise_equal(model.state_dict(), from_bin.state_dict())
    with pytest.warns(UserWarning, match="in preference to"):
        model.save_pretrained(tmp_path, safe_serialization=False)


def test_variant(tmp_path):
    model = perturb_(TinyModel()).to(torch.float16)
    model.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors"):
        TinyModel.from_pretrained(tmp_path)
    loaded = TinyModel.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    assert_state_dicts_bitwise_equal(model.state_dict(), loaded.state_dict())
    with pytest.raises(ValueError, match="variant"):
        TinyModel.from_pretrained(tmp_path, variant="../x")


def test_tied_and_non_contiguous_tensors(tmp_path):
    model = perturb_(TiedModel())
    assert not model.transposed.is_contiguous()
    model.save_pretrained(tmp_path)
    on_disk = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert sorted(on_disk) == ["embed.weight", "head.weight", "transposed"]
    loaded = TiedModel.from_pretrained(tmp_path)
    assert_state_dicts_bitwise_equal(model.state_dict(), loaded.state_dict())
    assert loaded.head.weight is loaded.embed.weight

    # A saver that drops duplicate names (safetensors.torch.save_model) writes one of the tied names.
    for kept in ("embed.weight", "head.weight"):
        fresh = TiedModel()
        load_diffusers_state_dict(fresh, {kept: on_disk[kept], "transposed": on_disk["transposed"]})
        assert torch.equal(fresh.head.weight, model.head.weight)


def test_sharded_checkpoint_and_stale_shards(tmp_path):
    model = perturb_(TinyModel())
    state = model.state_dict()
    keys = list(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:5],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[5:]}
    for name, names in shards.items():
        save_file({k: state[k].contiguous() for k in names}, str(tmp_path / name))
    index = {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(config_to_json_string(model))
    assert_state_dicts_bitwise_equal(state, TinyModel.from_pretrained(tmp_path).state_dict())

    other = perturb_(TinyModel(), seed=1)
    other.save_pretrained(tmp_path)  # the stale shards would shadow the new single file
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert_state_dicts_bitwise_equal(other.state_dict(), TinyModel.from_pretrained(tmp_path).state_dict())


def test_subfolder_overrides_and_loading_info(tmp_path):
    model = perturb_(TinyModel(eps=1e-3))
    model.save_pretrained(tmp_path / "unet")
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"pipeline directory: pass subfolder= one of \['unet'\]"):
        TinyModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no subfolder 'vae'"):
        TinyModel.from_pretrained(tmp_path, subfolder="vae")
    loaded, info = TinyModel.from_pretrained(tmp_path, subfolder="unet", eps=1e-2, output_loading_info=True,
                                             low_cpu_mem_usage=False)
    assert loaded.config.eps == 1e-2 and loaded.norm.eps == 1e-2
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['device_mapp'\]"):
        TinyModel.from_pretrained(tmp_path, subfolder="unet", device_mapp="cpu")
    with pytest.warns(UserWarning, match="revision"):
        TinyModel.from_pretrained(tmp_path, subfolder="unet", revision="main")


class LayersOnly(ModelMixin):
    @register_to_config
    def __init__(self, dim: int = 16):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.conv = nn.Conv2d(dim, dim, 3)
        self.embedding = nn.Embedding(4, dim)
        self.norm = nn.GroupNorm(4, dim)
        self.register_buffer("positions", torch.arange(dim) * 0.5, persistent=False)
        nn.init.trunc_normal_(self.embedding.weight, std=0.02)


def test_loading_draws_no_random_numbers(tmp_path):
    model = perturb_(LayersOnly())
    model.save_pretrained(tmp_path)
    state = torch.random.get_rng_state()
    loaded = LayersOnly.from_pretrained(tmp_path)
    assert torch.equal(state, torch.random.get_rng_state())
    assert_state_dicts_bitwise_equal(model.state_dict(), loaded.state_dict())
    assert torch.equal(loaded.positions, torch.arange(16) * 0.5)
    LayersOnly()  # construction outside from_pretrained draws its initial weights as usual
    assert not torch.equal(state, torch.random.get_rng_state())


def test_torch_dtype(saved):
    model, directory = saved
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        loaded = TinyModel.from_pretrained(directory, torch_dtype=dtype)
        for key, tensor in loaded.state_dict().items():
            expected = model.state_dict()[key]
            assert tensor.dtype == (dtype if expected.is_floating_point() else expected.dtype), key
            assert torch.equal(tensor, expected.to(tensor.dtype)), key
        assert loaded.cache.dtype == dtype  # non-persistent buffers too
    with pytest.raises(TypeError, match="torch_dtype"):
        TinyModel.from_pretrained(directory, torch_dtype="float16")
    with pytest.raises(ValueError, match="floating-point"):
        TinyModel.from_pretrained(directory, torch_dtype=torch.int8)


def test_unknown_config_key_warns(saved):
    model, directory = saved
    entries = json.loads((directory / "config.json").read_text())
    entries["upcast_attention_v9"] = True
    (directory / "config.json").write_text(json.dumps(entries))
    with pytest.warns(UserWarning, match="upcast_attention_v9"):
        loaded = TinyModel.from_pretrained(directory)
    assert "upcast_attention_v9" not in loaded.config


# -------------------------------------------------------------------------- deprecated attention names


def old_attention_names(state: dict, prefixes) -> dict:
    renamed = {}
    for key, value in state.items():
        for prefix in prefixes:
            for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
                if key.startswith(f"{prefix}.{new}."):
                    key = f"{prefix}.{old}." + key[len(f"{prefix}.{new}."):]
        renamed[key] = value
    return renamed


def test_deprecated_attention_names_converted_only_under_flagged_modules(tmp_path):
    model = perturb_(TinyModel())
    old = old_attention_names(model.state_dict(), ["blocks.0", "blocks.1"])
    assert "blocks.0.query.weight" in old and "blocks.1.proj_attn.bias" in old
    assert "mid.query.weight" in old  # SelfAttention1d's own names, which must stay as they are
    snapshot = dict(old)
    converted = convert_deprecated_attention_names(model, old)
    assert old == snapshot  # the caller's dict is not modified
    assert sorted(converted) == sorted(model.state_dict())

    save_file({k: v.contiguous() for k, v in old.items()}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(config_to_json_string(model))
    assert_state_dicts_bitwise_equal(model.state_dict(), TinyModel.from_pretrained(tmp_path).state_dict())


def test_deprecated_names_not_converted_for_unflagged_module():
    model = TinyModel()
    for block in model.blocks:
        block._from_deprecated_attn_block = False
    old = old_attention_names(perturb_(TinyModel()).state_dict(), ["blocks.0"])
    with pytest.raises(ValueError, match=r"blocks\.0\.query\.weight"):
        load_diffusers_state_dict(model, old)


def test_old_and_new_name_both_present_is_an_error():
    model = TinyModel()
    state = dict(model.state_dict())
    state["blocks.0.query.weight"] = state["blocks.0.to_q.weight"].clone()
    with pytest.raises(ValueError, match=r"1 unexpected key\(s\): \['blocks\.0\.query\.weight'\]"):
        load_diffusers_state_dict(model, state)


# -------------------------------------------------------------------------------------- load errors


def test_key_errors_are_reported_together_and_nothing_is_loaded():
    model = perturb_(TinyModel())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(perturb_(TinyModel(), seed=1).state_dict())
    del bad["norm.weight"], bad["steps"]
    bad["extra.weight"] = torch.zeros(2)
    bad["proj_in.weight"] = torch.zeros(8, 4)
    bad["scale"] = torch.zeros(9)
    with pytest.raises(ValueError) as info:
        load_diffusers_state_dict(model, bad, source="ckpt.safetensors")
    message = str(info.value)
    assert "from ckpt.safetensors into TinyModel" in message
    assert "2 missing key(s): ['steps', 'norm.weight']" in message  # in the model's order
    assert "1 unexpected key(s): ['extra.weight']" in message
    assert "2 shape mismatch(es):\n  scale: checkpoint [9], model [8]\n  proj_in.weight: checkpoint [8, 4], model [8, 3]" in message
    assert_state_dicts_bitwise_equal(before, model.state_dict())

    bad_value = dict(model.state_dict())
    bad_value["scale"] = [1.0] * 8
    with pytest.raises(ValueError, match=r"not tensors: \['scale'\]"):
        load_diffusers_state_dict(model, bad_value)
    with pytest.raises(TypeError, match="mapping"):
        load_diffusers_state_dict(model, [("scale", torch.zeros(8))])


def test_from_pretrained_missing_unexpected_and_shape_errors(saved):
    model, directory = saved
    weights = directory / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["blocks.1.to_v.bias"]
    state["blocks.2.to_v.bias"] = torch.zeros(8)
    state["norm.bias"] = torch.zeros(7)
    save_file(state, str(weights))
    with pytest.raises(ValueError) as info:
        TinyModel.from_pretrained(directory)
    message = str(info.value)
    assert str(weights) in message
    assert "['blocks.1.to_v.bias']" in message and "['blocks.2.to_v.bias']" in message
    assert "norm.bias: checkpoint [7], model [8]" in message


@pytest.mark.parametrize("damage", ["truncate", "random_bytes", "empty", "lfs_pointer"])
def test_corrupt_safetensors(saved, damage):
    _, directory = saved
    weights = directory / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) - 100])
    elif damage == "random_bytes":
        weights.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    elif damage == "empty":
        weights.write_bytes(b"")
    else:
        weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(OSError, match="cannot read weights file .*diffusion_pytorch_model.safetensors") as info:
        TinyModel.from_pretrained(directory)
    if damage == "lfs_pointer":
        assert "Git LFS pointer" in str(info.value)


def test_corrupt_bin(tmp_path):
    TinyModel().save_pretrained(tmp_path, safe_serialization=False)
    weights = tmp_path / "diffusion_pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(OSError, match="diffusion_pytorch_model.bin"):
        TinyModel.from_pretrained(tmp_path)
    torch.save([torch.zeros(1)], weights)
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        load_weights_file(weights)


def test_bin_is_loaded_with_weights_only(tmp_path):
    weights = tmp_path / "diffusion_pytorch_model.bin"
    torch.save({"w": torch.zeros(1), "obj": _Unpicklable()}, weights)
    with pytest.raises(OSError, match="cannot read weights file"):
        load_weights_file(weights)


class _Unpicklable:
    pass


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", b"\xff\xfe\x00garbage"])
def test_bad_config_json(saved, text):
    _, directory = saved
    config = directory / "config.json"
    if isinstance(text, bytes):
        config.write_bytes(text)
    else:
        config.write_text(text)
    error = ValueError if text == "[1, 2]" else OSError
    with pytest.raises(error, match="config.json"):
        TinyModel.from_pretrained(directory)


def test_missing_paths(tmp_path, saved):
    _, directory = saved
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TinyModel.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(NotADirectoryError, match="is a file"):
        TinyModel.from_pretrained(directory / "config.json")
    (directory / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights file in .*diffusion_pytorch_model\.bin"):
        TinyModel.from_pretrained(directory)
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        TinyModel.from_pretrained(directory)
    with pytest.raises(TypeError, match="local directory path"):
        TinyModel.from_pretrained(None)


def test_missing_shard(tmp_path):
    model = TinyModel()
    model.save_pretrained(tmp_path)
    index = {"weight_map": {k: "diffusion_pytorch_model-00001-of-00002.safetensors" for k in model.state_dict()}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="lists shards that are not in"):
        TinyModel.from_pretrained(tmp_path)


def test_hub_id_is_refused(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="runwayml/stable-diffusion-v1-5.*download it first"):
        TinyModel.from_pretrained("runwayml/stable-diffusion-v1-5", subfolder="unet")


def test_class_name_mismatch(saved):
    _, directory = saved
    entries = json.loads((directory / "config.json").read_text())
    entries["_class_name"] = "UNet2DConditionModel"
    (directory / "config.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="describes a 'UNet2DConditionModel', but TinyModel.from_pretrained"):
        TinyModel.from_pretrained(directory)

    class TinySubclass(TinyModel):
        pass

    entries["_class_name"] = "TinyModel"
    (directory / "config.json").write_text(json.dumps(entries))
    assert isinstance(TinySubclass.from_pretrained(directory), TinySubclass)


def test_save_errors(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        TinyModel().save_pretrained(tmp_path / "file")
    bad = TinyModel(act_fn=torch.float16)
    with pytest.raises(TypeError, match="config entry 'act_fn' holds a torch.dtype"):
        bad.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------- against diffusers' own I/O
#
# Each case names a fastunet model class by module, a small config it shares with diffusers' class of the
# same name, and inputs for both forwards.

DIFFUSERS_CASES = {
    "UNet2DModel": dict(
        module="fastunet.models.unet_2d",
        config=dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                    up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4),
        inputs=lambda: dict(sample=torch.randn(2, 3, 8, 8), timestep=torch.tensor([3, 500])),
    ),
    "UNet2DConditionModel": dict(
        module="fastunet.models.unet_2d_condition",
        config=dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                    cross_attention_dim=8, attention_head_dim=2,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        inputs=lambda: dict(sample=torch.randn(2, 4, 8, 8), timestep=torch.tensor([3, 500]),
                            encoder_hidden_states=torch.randn(2, 5, 8)),
    ),
    # Dance-diffusion layout: SelfAttention1d's own query/key/value/proj_attn must not be renamed.
    "UNet1DModel": dict(
        module="fastunet.models.unet_1d",
        config=dict(sample_size=64, extra_in_channels=64),
        inputs=lambda: dict(sample=torch.randn(2, 2, 64), timestep=torch.tensor([3, 500])),
    ),
}


def model_pair(name: str):
    """(fastunet class, diffusers class, case) for ``name``."""
    import importlib

    import diffusers

    case = DIFFUSERS_CASES[name]
    return getattr(importlib.import_module(case["module"]), name), getattr(diffusers, name), case


class DiffusersLog:
    """Collects what diffusers logs at WARNING and above."""

    def __enter__(self):
        import logging

        self.records = []
        collect = self.records.append
        self.handler = type("Collect", (logging.Handler,), {"emit": lambda self, record: collect(record)})(
            logging.WARNING)
        logging.getLogger("diffusers").addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        import logging

        logging.getLogger("diffusers").removeHandler(self.handler)

    def messages(self) -> list[str]:
        # diffusers warns when accelerate is absent; that says nothing about the checkpoint.
        return [r.getMessage() for r in self.records if "accelerate" not in r.getMessage()]


def outputs(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.sample if hasattr(out, "sample") else out[0]


@pytest.mark.parametrize("name", list(DIFFUSERS_CASES))
@pytest.mark.parametrize("safe_serialization", [True, False])
def test_diffusers_save_fastunet_load(tmp_path, name, safe_serialization):
    ours, theirs, case = model_pair(name)
    reference = perturb_(theirs(**case["config"])).eval()
    reference.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    loaded = ours.from_pretrained(tmp_path)
    assert public(loaded.config) == public(reference.config)
    assert_state_dicts_bitwise_equal(reference.state_dict(), loaded.state_dict())
    inputs = case["inputs"]()
    torch.testing.assert_close(outputs(loaded, inputs), outputs(reference, inputs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(DIFFUSERS_CASES))
def test_fastunet_save_diffusers_load(tmp_path, name):
    ours, theirs, case = model_pair(name)
    model = perturb_(ours(**case["config"])).eval()
    model.save_pretrained(tmp_path)
    theirs(**case["config"]).save_pretrained(tmp_path / "theirs")
    assert (tmp_path / "config.json").read_text() == (tmp_path / "theirs" / "config.json").read_text()
    with DiffusersLog() as log:
        loaded = theirs.from_pretrained(tmp_path)
    assert log.messages() == []  # no unexpected config keys, no missing or unused weights
    assert public(loaded.config) == public(model.config)
    assert_state_dicts_bitwise_equal(model.state_dict(), loaded.state_dict())
    inputs = case["inputs"]()
    torch.testing.assert_close(outputs(loaded, inputs), outputs(model, inputs), rtol=1e-4, atol=1e-4)

    # The log capture does see diffusers' complaint about a config key it does not know.
    entries = json.loads((tmp_path / "config.json").read_text())
    entries["not_a_diffusers_option"] = 1
    (tmp_path / "config.json").write_text(json.dumps(entries))
    with DiffusersLog() as log:
        theirs.from_pretrained(tmp_path)
    assert any("not_a_diffusers_option" in message for message in log.messages())


@pytest.mark.parametrize("name", list(DIFFUSERS_CASES))
def test_diffusers_variant_and_shards(tmp_path, name):
    ours, theirs, case = model_pair(name)
    reference = perturb_(theirs(**case["config"])).to(torch.float16)
    reference.save_pretrained(tmp_path / "fp16", variant="fp16")
    loaded = ours.from_pretrained(tmp_path / "fp16", variant="fp16", torch_dtype=torch.float16)
    assert_state_dicts_bitwise_equal(reference.state_dict(), loaded.state_dict())

    reference = perturb_(theirs(**case["config"]))
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = ours.from_pretrained(tmp_path / "sharded")
    assert_state_dicts_bitwise_equal(reference.state_dict(), loaded.state_dict())


@pytest.mark.parametrize("name", list(DIFFUSERS_CASES))
def test_diffusers_old_attention_names(tmp_path, name):
    ours, theirs, case = model_pair(name)
    reference = perturb_(theirs(**case["config"]))
    flagged = [path for path, module in reference.named_modules()
               if getattr(module, "_from_deprecated_attn_block", False)]
    reference.save_pretrained(tmp_path)
    old = old_attention_names(reference.state_dict(), flagged)
    if flagged:
        assert any(".query.weight" in key for key in old)
    save_file({k: v.contiguous() for k, v in old.items()}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    loaded = ours.from_pretrained(tmp_path)
    assert_state_dicts_bitwise_equal(reference.state_dict(), loaded.state_dict())


def test_models_deepcopy_and_pickle_with_their_config():
    """copy.deepcopy (EMA copies, peft) and pickling rebuild the read-only config instead of refilling it."""
    import copy
    import pickle

    from fastunet import UNet2DModel

    model = UNet2DModel(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin.config == model.config and twin.config is not model.config
        assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), model.state_dict().values()))
        with pytest.raises(TypeError, match="read-only"):
            twin.config["in_channels"] = 1
