"""fastunet.testing, the comparison toolkit the other tests stand on: each check must be able to fail."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from fastunet.testing import (
    ComparisonError,
    check_against_oracle,
    gradient_errors,
    perturb_,
    perturbed_pair,
    perturbed_state,
    rel_err,
)


class Tiny(nn.Module):
    """A linear layer, a zero-initialised projection, a norm (scale one, bias zero) and two buffers."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.proj = nn.Linear(4, width)
        self.out = nn.Linear(width, 3)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.norm = nn.LayerNorm(3)
        self.register_buffer("taps", torch.tensor([0.25, 0.5, 0.25]))
        self.register_buffer("steps", torch.tensor(7))

    def forward(self, x):
        return self.norm(self.out(torch.tanh(self.proj(x)))) * self.taps


def test_module_imports_without_diffusers():
    code = ("import sys; sys.modules['diffusers'] = None; import fastunet.testing; "
            "assert 'diffusers' not in {m.split('.')[0] for m in sys.modules if sys.modules[m] is not None}")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rel_err_l2_and_max_with_floor():
    expected = torch.tensor([3.0, -4.0])
    actual = expected + torch.tensor([0.3, 0.0])
    assert rel_err(actual, expected) == pytest.approx(0.3 / 5.0)
    assert rel_err(actual, expected, norm="max") == pytest.approx(0.3 / 4.0)
    assert rel_err(actual, expected, floor=30.0) == pytest.approx(0.3 / 30.0)  # the floor only raises the scale
    assert rel_err(actual, expected, floor=1.0) == rel_err(actual, expected)
    tiny = torch.tensor([1e-9, -1e-9])
    assert rel_err(tiny * 2, tiny) == pytest.approx(1.0)
    assert rel_err(tiny * 2, tiny, floor=1e-3) < 1e-5
    assert rel_err(torch.zeros(3), torch.zeros(3)) == 0.0
    assert rel_err(torch.ones(3), torch.zeros(3)) == math.inf
    assert math.isnan(rel_err(torch.tensor([float("nan"), 1.0]), expected))
    assert rel_err(actual.half(), expected.double()) == pytest.approx(0.3 / 5.0, rel=1e-2)  # 3.3 in fp16
    with pytest.raises(ComparisonError, match="shapes differ"):
        rel_err(torch.ones(2, 1), torch.ones(2))  # would broadcast to (2, 2)
    with pytest.raises(ValueError, match="norm"):
        rel_err(actual, expected, norm="l1")


def test_oracle_rule_accepts_2x_and_rejects_3x_torch_error():
    oracle = torch.randn(64, dtype=torch.float64)
    direction = torch.sign(torch.randn(64, dtype=torch.float64))
    torch_result = oracle + 1e-3 * direction
    assert check_against_oracle(oracle + 1.9e-3 * direction, oracle, torch_result, floor=0.0) == pytest.approx(1.9e-3)
    with pytest.raises(ComparisonError, match=r"error 0.003 > bound 0.002 = 2 x the yardstick's own error 0.001"):
        check_against_oracle(oracle + 3e-3 * direction, oracle, torch_result, floor=0.0, name="dq")
    # the floor widens the bound; a yardstick that is exact leaves only the floor
    check_against_oracle(oracle + 3e-3 * direction, oracle, torch_result, floor=1.5e-3)
    with pytest.raises(ComparisonError, match="bound 1e-06"):
        check_against_oracle(oracle + 1e-5, oracle, oracle.clone(), floor=1e-6)
    with pytest.raises(ComparisonError, match="non-finite"):
        check_against_oracle(torch.full_like(oracle, float("nan")), oracle, torch_result, floor=1.0)
    with pytest.raises(ComparisonError, match="shape"):
        check_against_oracle(oracle[:10], oracle, torch_result, floor=1.0)


def _backward(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()


def test_perturbation_changes_every_float_entry_and_is_deterministic():
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = perturbed_state(model, seed=3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "perturbed_state is not in place"
    for name, value in state.items():
        if value.is_floating_point():
            assert (value != before[name]).all(), name  # every element, the zero-initialised ones included
        else:
            assert torch.equal(value, before[name]), name
    assert all(torch.equal(v, perturbed_state(model, seed=3)[k]) for k, v in state.items())
    assert not torch.equal(perturbed_state(model, seed=4)["proj.weight"], state["proj.weight"])
    # the noise depends on the seed and the name only (a second model with other initial values gets the
    # same draw, scaled by its own spread), and a constant tensor gets noise of size ``floor``
    other = Tiny()
    noise = state["proj.weight"] - before["proj.weight"]
    other_noise = perturbed_state(other, seed=3)["proj.weight"] - other.proj.weight
    torch.testing.assert_close(other_noise / other.proj.weight.std(), noise / before["proj.weight"].std())
    assert 0.05 < (state["out.weight"] - before["out.weight"]).std() < 0.2
    assert perturb_(model, seed=3) is model
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_tied_weights_stay_tied():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    perturb_(model)
    assert model[1].weight is model[0].weight
    state = perturbed_state(model)
    assert torch.equal(state["0.weight"], state["1.weight"])


def test_pair_loads_the_same_state_and_rejects_a_mismatched_pair():
    a, b = perturbed_pair(Tiny(), Tiny(), seed=1)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    x = torch.randn(5, 4)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="size mismatch"):
        perturbed_pair(Tiny(width=6), Tiny(width=7))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        perturbed_pair(Tiny(), nn.Sequential())


def test_pair_rejects_a_model_that_reads_back_other_values():
    class Rounding(Tiny):
        """Stores its projection weight in half precision: a loaded checkpoint would not round-trip."""

        def load_state_dict(self, state_dict, strict=True):
            result = super().load_state_dict(state_dict, strict=strict)
            with torch.no_grad():
                self.proj.weight.copy_(self.proj.weight.half().float())
            return result

    with pytest.raises(ComparisonError, match=r"Rounding reads back other values than it loaded: \['proj.weight'\]"):
        perturbed_pair(Tiny(), Rounding())


def test_gradient_table_finds_a_wrong_gradient():
    a, b = perturbed_pair(Tiny(), Tiny())
    x = torch.randn(5, 4)
    _backward(a, x)
    _backward(b, x)
    same = gradient_errors(a, b)
    assert set(same.errors) == {"proj.weight", "proj.bias", "out.weight", "out.bias", "norm.weight", "norm.bias"}
    assert same.max == 0.0
    same.check(1e-6)

    wrong = {n: p.grad.clone() for n, p in a.named_parameters()}
    wrong["out.bias"][1] += 0.1 * wrong["out.bias"].norm()
    table = gradient_errors(wrong, b)
    assert table.worst == "out.bias" and table.max == pytest.approx(0.1, rel=1e-6)
    assert all(e == 0.0 for n, e in table.errors.items() if n != "out.bias")
    with pytest.raises(ComparisonError) as failure:
        table.check(1e-3)
    message = str(failure.value)
    assert "1 not below the tolerance 0.001" in message and "1.00e-01  out.bias" in message
    assert message.splitlines()[1].split() == ["1.00e-01", "out.bias"]  # worst first
    wrong["proj.weight"][0, 0] = float("nan")
    nan_table = gradient_errors(wrong, b)
    assert nan_table.worst == "proj.weight" and math.isnan(nan_table.max)
    with pytest.raises(ComparisonError):
        nan_table.check(1.0)


def test_gradient_floor_measures_vanishing_gradients_against_the_largest():
    expected = {"big": torch.tensor([10.0, 0.0]), "noise": torch.tensor([1e-7, -1e-7])}
    actual = {"big": torch.tensor([10.0, 0.0]), "noise": torch.tensor([3e-7, 1e-7])}
    assert gradient_errors(actual, expected).errors["noise"] == pytest.approx(math.sqrt(8) / math.sqrt(2))
    floored = gradient_errors(actual, expected, floor=1e-4)
    assert floored.errors["noise"] == pytest.approx(math.sqrt(8) * 1e-7 / 1e-3)
    assert "each scale at least 0.0001 x the largest gradient's" in floored.table()
    per_name = gradient_errors(actual, expected, norm="max", floors={"noise": 10.0})
    assert per_name.errors["noise"] == pytest.approx(2e-7 / 10.0)


def test_gradient_names_and_missing_gradients_are_errors():
    model = Tiny()
    _backward(model, torch.randn(2, 4))
    grads = {n: p.grad for n, p in model.named_parameters()}
    with pytest.raises(ComparisonError, match=r"missing \['norm.bias'\], unexpected \['<input>'\]"):
        gradient_errors({**{k: v for k, v in grads.items() if k != "norm.bias"}, "<input>": grads["norm.weight"]},
                        grads)
    model.norm.bias.grad = None
    with pytest.raises(ComparisonError, match=r"no gradient for \['norm.bias'\]"):
        gradient_errors(model, grads)
