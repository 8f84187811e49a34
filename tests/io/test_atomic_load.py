"""All-or-nothing loads into an existing model: ``ModelMixin.load_state_dict`` (every fastunet model),
``UNetMotionModel.load_motion_modules`` through :func:`fastunet.checkpoint.load_state_dict_under`, and the
adapter loaders. A load that fails names every offending entry and leaves each tensor of the model
bit-identical; one that succeeds keeps torch's semantics (``strict=False``, ``assign=True``, the
``_IncompatibleKeys`` result)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fastunet
from fastunet.checkpoint import check_state_dict, load_state_dict_under
from fastunet.testing import perturb_
from test_checkpoint import TinyModel  # tests/io is on sys.path
from test_drop_in import FAMILIES, UNETS

UNET2D = FAMILIES["UNet2DModel"][2]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    changed = [k for k in before if after[k].dtype != before[k].dtype or not torch.equal(after[k], before[k])]
    assert not changed, f"a failed load changed {changed}"


def tiny_unet(seed: int = 0, **overrides) -> fastunet.UNet2DModel:
    torch.manual_seed(seed)
    return perturb_(fastunet.UNet2DModel(**{**UNET2D, **overrides}), seed=seed)


# ------------------------------------------------------------------------------ the bug this fixes


def test_torch_load_state_dict_alone_leaves_a_partly_overwritten_model():
    """What ModelMixin.load_state_dict guards against: torch copies every entry it can before raising."""
    model, other = tiny_unet(0), tiny_unet(1, block_out_channels=(8, 24))
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="size mismatch"):
        nn.Module.load_state_dict(model, other.state_dict())
    changed = [k for k in before if not torch.equal(model.state_dict()[k], before[k])]
    assert changed, "torch's own load no longer copies before raising; the reproduction needs another case"


def test_different_block_out_channels_leave_the_model_unchanged():
    model, other = tiny_unet(0), tiny_unet(1, block_out_channels=(8, 24))
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="Error\\(s\\) in loading state_dict for UNet2DModel") as info:
        model.load_state_dict(other.state_dict())
    assert_unchanged(model, before)
    message = str(info.value)
    ours, theirs = model.state_dict(), other.state_dict()
    for key in ours:
        if key in theirs and ours[key].shape != theirs[key].shape:
            assert (f"size mismatch for {key}: copying a param with shape {list(theirs[key].shape)} from "
                    f"checkpoint, the shape in current model is {list(ours[key].shape)}") in message
    assert "nothing was loaded" in message


@pytest.mark.parametrize("name", UNETS)
def test_every_unet_is_all_or_nothing(name):
    cls, _, config = FAMILIES[name]
    model = perturb_(cls(**config))
    before = snapshot(model)
    bad = {k: v + 1 if v.is_floating_point() else v for k, v in before.items()}
    keys = list(bad)
    first, last = keys[0], keys[-1]
    bad[last] = torch.zeros(*bad[last].shape, 2)  # the very last entry is misshapen: all others come first
    del bad[keys[len(keys) // 2]]
    bad["not_a_module.weight"] = torch.zeros(1)
    for strict in (True, False):
        with pytest.raises(RuntimeError) as info:
            model.load_state_dict(bad, strict=strict)
        assert_unchanged(model, before)
        message = str(info.value)
        assert f"size mismatch for {last}" in message
        assert ("Missing key(s)" in message) == strict and ("Unexpected key(s)" in message) == strict
    assert first not in message


def test_strict_missing_and_unexpected_keys_are_named_and_nothing_is_copied():
    model, other = tiny_unet(0), tiny_unet(1)
    before = snapshot(model)
    state = dict(other.state_dict())
    removed = [k for k in state if k.endswith(".bias")][:3]
    for key in removed:
        del state[key]
    state["extra.weight"] = torch.zeros(3)
    state["down_blocks.7.weight"] = torch.zeros(3)
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict(state)  # strict by default, as torch
    assert_unchanged(model, before)
    message = str(info.value)
    assert "Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in removed) + "." in message
    assert 'Unexpected key(s) in state_dict: "extra.weight", "down_blocks.7.weight".' in message


def test_integer_values_into_weights_are_refused():
    model, other = tiny_unet(0), tiny_unet(1)
    before = snapshot(model)
    state = dict(other.state_dict())
    state["conv_in.weight"] = state["conv_in.weight"].to(torch.int32)
    state["conv_out.bias"] = state["conv_out.bias"] > 0
    for strict in (True, False):
        with pytest.raises(RuntimeError) as info:
            model.load_state_dict(state, strict=strict)
        assert_unchanged(model, before)
    message = str(info.value)
    assert "dtype mismatch for conv_in.weight: the state dict holds integer torch.int32" in message
    assert "dtype mismatch for conv_out.bias: the state dict holds boolean torch.bool" in message


def test_floats_into_an_integer_buffer_are_refused():
    model = perturb_(TinyModel())
    before = snapshot(model)
    state = dict(model.state_dict())
    state["steps"] = state["steps"].float() + 0.5
    with pytest.raises(RuntimeError, match="dtype mismatch for steps: the state dict holds floating-point"):
        model.load_state_dict(state)
    assert_unchanged(model, before)


def test_non_tensor_values_and_non_mappings_are_refused():
    model = tiny_unet(0)
    before = snapshot(model)
    state = dict(tiny_unet(1).state_dict())
    state["conv_in.bias"] = [0.0] * 8
    with pytest.raises(RuntimeError, match="conv_in.bias: expected a tensor, the state dict holds a list"):
        model.load_state_dict(state)
    assert_unchanged(model, before)
    with pytest.raises(TypeError, match="dict-like"):
        model.load_state_dict([("conv_in.bias", torch.zeros(8))])


def test_meta_values_are_refused_unless_assigned():
    model = tiny_unet(0)
    before = snapshot(model)
    state = {k: v.to("meta") for k, v in tiny_unet(1).state_dict().items()}
    with pytest.raises(RuntimeError, match="on the meta device"):
        model.load_state_dict(state)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------- successful loads unchanged


def test_successful_loads_keep_torchs_semantics():
    model, other = tiny_unet(0), tiny_unet(1)
    result = model.load_state_dict(other.state_dict())
    assert isinstance(result, torch.nn.modules.module._IncompatibleKeys)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))

    # strict=False: the missing entries keep their values, the unexpected ones are reported
    fresh = tiny_unet(2)
    before = snapshot(fresh)
    partial = {k: v for k, v in other.state_dict().items() if not k.startswith("conv_out.")}
    partial["extra.weight"] = torch.zeros(1)
    result = fresh.load_state_dict(partial, strict=False)
    assert result.missing_keys == ["conv_out.weight", "conv_out.bias"]
    assert result.unexpected_keys == ["extra.weight"]
    assert torch.equal(fresh.conv_out.weight, before["conv_out.weight"])
    assert torch.equal(fresh.conv_in.weight, other.conv_in.weight)

    # floating-point values are cast to the model's dtype, as torch's copy_ casts
    half = {k: v.half() for k, v in other.state_dict().items()}
    model.load_state_dict(half)
    assert model.conv_in.weight.dtype == torch.float32
    assert torch.equal(model.conv_in.weight, other.conv_in.weight.half().float())

    # a one-element 1-D tensor fills a 0-D entry, as in torch
    scalar = TinyScalar()
    scalar.load_state_dict({"gain": torch.tensor([3.0])})
    assert scalar.gain.item() == 3.0


class TinyScalar(fastunet.ModelMixin):
    @fastunet.configuration.register_to_config
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(1.0))


def test_assign_keeps_working_and_checks_first():
    other = tiny_unet(1)
    with torch.device("meta"):
        model = fastunet.UNet2DModel(**UNET2D)
    result = model.load_state_dict(other.state_dict(), assign=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert model.conv_in.weight.device.type == "cpu" and isinstance(model.conv_in.weight, nn.Parameter)
    assert model.conv_in.weight.requires_grad
    assert torch.equal(model.conv_in.weight, other.conv_in.weight)

    target = tiny_unet(0)
    before = snapshot(target)
    identities = {k: id(v) for k, v in target.state_dict(keep_vars=True).items()}
    state = dict(other.state_dict())
    state["conv_in.weight"] = state["conv_in.weight"].long()  # torch would fail while assigning it
    state["time_embedding.linear_1.bias"] = torch.zeros(3)
    with pytest.raises(RuntimeError, match="dtype mismatch for conv_in.weight") as info:
        target.load_state_dict(state, assign=True)
    assert "size mismatch for time_embedding.linear_1.bias" in str(info.value)
    assert_unchanged(target, before)
    assert identities == {k: id(v) for k, v in target.state_dict(keep_vars=True).items()}


def test_check_state_dict_reports_like_torch():
    model, other = tiny_unet(0), tiny_unet(1)
    state = dict(other.state_dict())
    del state["conv_in.bias"]
    state["extra"] = torch.zeros(1)
    assert check_state_dict(model, state, strict=False) == (["conv_in.bias"], ["extra"])
    result = model.load_state_dict(state, strict=False)
    assert (result.missing_keys, result.unexpected_keys) == (["conv_in.bias"], ["extra"])


# ---------------------------------------------------------------------- sub-module loads (motion)


MOTION_UNET = FAMILIES["UNetMotionModel"][2]
MOTION_ADAPTER = FAMILIES["MotionAdapter"][2]


def motion_prefixes(unet: nn.Module) -> list[str]:
    return [name for name, _ in unet.named_modules() if name.endswith("motion_modules")]


def test_load_state_dict_under_loads_the_motion_modules_only():
    unet = perturb_(fastunet.UNetMotionModel(**MOTION_UNET))
    adapter = perturb_(fastunet.MotionAdapter(**MOTION_ADAPTER), seed=1)
    before = snapshot(unet)
    load_state_dict_under(unet, adapter.state_dict(), motion_prefixes(unet))
    theirs = adapter.state_dict()
    for key, value in unet.state_dict().items():
        if ".motion_modules." in key:
            assert torch.equal(value, theirs[key]), key
        else:
            assert torch.equal(value, before[key]), key


def test_load_state_dict_under_is_all_or_nothing():
    unet = perturb_(fastunet.UNetMotionModel(**MOTION_UNET))
    before = snapshot(unet)
    # an adapter without the mid block the UNet has: the down blocks must not be loaded either
    adapter = perturb_(fastunet.MotionAdapter(**{**MOTION_ADAPTER, "use_motion_mid_block": False}), seed=1)
    with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "mid_block.motion_modules.0') as info:
        load_state_dict_under(unet, adapter.state_dict(), motion_prefixes(unet))
    assert_unchanged(unet, before)
    assert "down_blocks" not in str(info.value)

    state = dict(perturb_(fastunet.MotionAdapter(**MOTION_ADAPTER), seed=2).state_dict())
    last = [k for k in state if k.startswith("up_blocks.")][-1]
    state[last] = torch.zeros(3)
    state["up_blocks.1.motion_modules.9.weight"] = torch.zeros(3)
    state["conv_in.weight"] = torch.zeros(1)  # outside the prefixes: ignored
    with pytest.raises(RuntimeError) as info:
        load_state_dict_under(unet, state, motion_prefixes(unet))
    assert_unchanged(unet, before)
    message = str(info.value)
    assert f"size mismatch for {last}" in message
    assert '"up_blocks.1.motion_modules.9.weight"' in message and "conv_in" not in message
    with pytest.raises(AttributeError):
        load_state_dict_under(unet, state, ["down_blocks.5.motion_modules"])
    assert_unchanged(unet, before)


def test_save_motion_modules_round_trip_through_the_atomic_load(tmp_path):
    unet = perturb_(fastunet.UNetMotionModel(**MOTION_UNET))
    unet.save_motion_modules(tmp_path)
    adapter = fastunet.MotionAdapter.from_pretrained(tmp_path)
    theirs = adapter.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in unet.state_dict().items() if ".motion_modules." in k)


def test_load_motion_modules_is_all_or_nothing():
    """UNetMotionModel.load_motion_modules goes through the atomic sub-module load: an adapter with one
    misshapen tensor in its last up block leaves every motion module (the down blocks' too) as it was."""
    unet = perturb_(fastunet.UNetMotionModel(**MOTION_UNET))
    before = snapshot(unet)
    adapter = perturb_(fastunet.MotionAdapter(**MOTION_ADAPTER), seed=3)
    name, param = [(n, p) for n, p in adapter.named_parameters() if n.startswith("up_blocks.")][-1]
    module = adapter.get_submodule(name.rsplit(".", 1)[0])
    setattr(module, name.rsplit(".", 1)[1], nn.Parameter(torch.zeros(param.shape[0] + 1, *param.shape[1:])))
    with pytest.raises(RuntimeError, match=f"size mismatch for {name}"):
        unet.load_motion_modules(adapter)
    assert_unchanged(unet, before)
    unet.load_motion_modules(perturb_(fastunet.MotionAdapter(**MOTION_ADAPTER), seed=4))
    assert any(not torch.equal(v, before[k]) for k, v in unet.state_dict().items() if ".motion_modules." in k)
