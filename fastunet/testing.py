"""The comparison toolkit: how fastunet is checked against an oracle.

Used by the test suite, by ``python -m fastunet.demo`` and by anything else that has to say whether two
computations agree (a loaded checkpoint against diffusers, one backend against another):

* :func:`rel_err` -- the error of a tensor relative to its reference's scale (L2 or max-abs), with an
  absolute floor for the scale so that near-zero references do not blow the ratio up;
* :func:`check_against_oracle` -- the "at most twice PyTorch's own error, plus a floor" rule: our result
  and a same-dtype yardstick (torch's own result) are both measured against an exact (float64) oracle;
* :func:`gradient_errors` -- every gradient of two models, matched by name, as a
  :class:`GradientErrors` table (per-tensor errors, the worst one, a short printable table);
* :func:`perturbed_state`, :func:`perturb_` and :func:`perturbed_pair` -- seeded random weights for
  every floating-point entry of a state dict (zero-initialised layers included, so they really act),
  loaded strict into two models.

A failed comparison raises :class:`ComparisonError`, an ``AssertionError``, so pytest reports it as a
failed assertion with the message given here. Only torch is needed: diffusers, the usual oracle, is a
test dependency and is not imported by this module.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar, Union

import torch
import torch.nn as nn

__all__ = [
    "ComparisonError",
    "GradientErrors",
    "check_against_oracle",
    "gradient_errors",
    "named_gradients",
    "perturb_",
    "perturbed_pair",
    "perturbed_state",
    "rel_err",
    "saved_activation_bytes",
]

Norm = Literal["l2", "max"]
ModuleT = TypeVar("ModuleT", bound=nn.Module)
ModuleU = TypeVar("ModuleU", bound=nn.Module)
Gradients = Union[nn.Module, Mapping[str, torch.Tensor]]


class ComparisonError(AssertionError):
    """Two computations that should agree do not (or cannot be compared: names or shapes differ)."""


def _scale(t: torch.Tensor, norm: Norm) -> float:
    """The size of ``t`` in float64: its L2 norm, or its largest absolute value."""
    t = t.detach().double()
    if t.numel() == 0:
        return 0.0
    if norm == "l2":
        return t.norm().item()
    if norm == "max":
        return t.abs().max().item()
    raise ValueError(f"norm must be 'l2' or 'max', got {norm!r}")


def _ratio(error: float, scale: float) -> float:
    """``error / scale``, where 0 / 0 is 0 (two empty or all-zero tensors agree) and x / 0 is inf."""
    if scale > 0 or math.isnan(scale):
        return error / scale
    return 0.0 if error == 0 else math.inf


def rel_err(actual: torch.Tensor, expected: torch.Tensor, *, norm: Norm = "l2", floor: float = 0.0) -> float:
    """The error of ``actual`` relative to the scale of ``expected``, computed in float64.

    ``norm="l2"``: ``||actual - expected||_2 / max(||expected||_2, floor)``;
    ``norm="max"``: ``max|actual - expected| / max(max|expected|, floor)``.

    ``actual`` and ``expected`` must have the same shape (any shape, any floating dtypes: each is cast to
    float64); nothing is broadcast. ``floor`` is an absolute lower bound on the denominator, in the units
    of ``expected``: it keeps a reference that is zero in exact arithmetic (rounding noise on both sides)
    from turning a tiny difference into a huge ratio. A NaN anywhere gives NaN, which fails every
    ``rel_err(...) < tol`` check.
    """
    if actual.shape != expected.shape:
        raise ComparisonError(f"shapes differ: actual {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    error = _scale(actual.detach().double() - expected.detach().double(), norm)
    return _ratio(error, max(_scale(expected, norm), floor))


def check_against_oracle(actual: torch.Tensor, oracle: torch.Tensor, yardstick: torch.Tensor, *, floor: float,
                         factor: float = 2.0, name: str = "output") -> float:
    """The rule for kernels: our error against an exact oracle is at most ``factor`` times the error of a
    trusted implementation in the same dtype (the yardstick), plus ``floor``.

    ``actual``: our result (any shape, any dtype); ``oracle``: the same computation in float64 (same
    shape); ``yardstick``: the trusted implementation (PyTorch's own op, or diffusers') run in ``actual``'s
    dtype on the same inputs (same shape). Errors are max-abs differences from ``oracle``, in float64::

        max|actual - oracle|  <=  factor * max|yardstick - oracle|  +  floor

    ``floor`` is absolute (callers usually pass a few units in the last place at the oracle's largest
    magnitude): it covers the roundings a kernel may do differently from the yardstick, and a yardstick
    that happens to be exact. Returns our error; raises :class:`ComparisonError` with both errors and the
    bound when the rule is broken or ``actual`` is not finite.
    """
    for label, t in (("actual", actual), ("yardstick", yardstick)):
        if t.shape != oracle.shape:
            raise ComparisonError(f"{name}: {label} shape {tuple(t.shape)} differs from the oracle's "
                                  f"{tuple(oracle.shape)}")
    if not torch.isfinite(actual).all():
        raise ComparisonError(f"{name}: non-finite values in the result")
    error = _scale(actual.double() - oracle.double(), "max")
    baseline = _scale(yardstick.double() - oracle.double(), "max")
    bound = factor * baseline + floor
    if not error <= bound:
        raise ComparisonError(f"{name}: error {error:.3g} > bound {bound:.3g} = {factor:g} x the yardstick's own "
                              f"error {baseline:.3g} + floor {floor:.3g}")
    return error


# -- gradient tables -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GradientErrors:
    """Relative errors of matching gradients (see :func:`gradient_errors`), by tensor name."""

    errors: dict[str, float]
    norm: Norm = "l2"
    floor: float = 0.0

    @property
    def worst(self) -> str:
        """The name with the largest error (NaN counts as the largest)."""
        if not self.errors:
            raise ValueError("no gradients were compared")
        return max(self.errors, key=lambda n: math.inf if math.isnan(self.errors[n]) else self.errors[n])

    @property
    def max(self) -> float:
        """The largest error (NaN if any error is NaN); 0.0 for an empty table."""
        return self.errors[self.worst] if self.errors else 0.0

    def table(self, limit: int = 5, tolerance: float | None = None) -> str:
        """A short text table: what was measured, then the ``limit`` worst tensors, worst first."""
        measure = "relative L2" if self.norm == "l2" else "relative max-abs"
        if self.floor:
            measure += f"; each scale at least {self.floor:g} x the largest gradient's"
        header = f"gradient errors ({measure}): worst {min(limit, len(self.errors))} of {len(self.errors)}"
        if tolerance is not None:
            failing = sum(not error < tolerance for error in self.errors.values())
            header += f"; {failing} not below the tolerance {tolerance:g}"
        ranked = sorted(self.errors, key=lambda n: -math.inf if math.isnan(self.errors[n]) else -self.errors[n])
        return "\n".join([header] + [f"  {self.errors[n]:9.2e}  {n}" for n in ranked[:limit]])

    def check(self, tolerance: float, limit: int = 5) -> GradientErrors:
        """Raise :class:`ComparisonError` with the table unless every error is below ``tolerance``."""
        if not self.max < tolerance:
            raise ComparisonError(self.table(limit, tolerance))
        return self

    def __str__(self) -> str:
        return self.table()


def named_gradients(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """``{name: parameter.grad}`` for every parameter of ``model`` that requires a gradient."""
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def gradient_errors(actual: Gradients, expected: Gradients, *, norm: Norm = "l2", floor: float = 0.0,
                    floors: Mapping[str, float] | None = None) -> GradientErrors:
    """Compare every gradient of two models, matched by name.

    ``actual``, ``expected``: each a model (its parameters' ``.grad``, after a backward) or a mapping
    ``{name: gradient}`` (which may hold input gradients too, under names of the caller's choosing).
    Both must have the same names and a gradient (same shape) for each; otherwise
    :class:`ComparisonError` lists the differences.

    Each error is :func:`rel_err` with the given ``norm``, its scale floored at ``floor`` times the
    largest reference gradient's scale: gradients that vanish in exact arithmetic (an attention key
    bias shifts every score of a row equally) are rounding noise on both sides and are measured against
    the typical gradient size instead. ``floors`` gives absolute floors for single names (the larger
    floor applies).
    """
    actual = named_gradients(actual) if isinstance(actual, nn.Module) else dict(actual)
    expected = named_gradients(expected) if isinstance(expected, nn.Module) else dict(expected)
    missing, unexpected = sorted(expected.keys() - actual.keys()), sorted(actual.keys() - expected.keys())
    if missing or unexpected:
        raise ComparisonError(f"gradient names differ: missing {missing}, unexpected {unexpected}")
    absent = [n for n in expected if actual[n] is None or expected[n] is None]
    if absent:
        raise ComparisonError(f"no gradient for {absent}")
    largest = max((_scale(g, norm) for g in expected.values()), default=0.0)
    floors = floors or {}
    errors = {n: rel_err(actual[n], g, norm=norm, floor=max(floor * largest, floors.get(n, 0.0)))
              for n, g in expected.items()}
    return GradientErrors(errors, norm, floor)


# -- perturbed weights, loaded strict ---------------------------------------------------------------------


def _entry_seed(seed: int, name: str) -> int:
    """A generator seed for one state-dict entry: depends only on ``seed`` and the entry's name."""
    return zlib.crc32(f"{seed}/{name}".encode())


def perturbed_state(module: nn.Module, *, seed: int = 0, floor: float = 0.1) -> dict[str, torch.Tensor]:
    """``module``'s state dict with seeded noise on every floating-point entry (new tensors; ``module``
    is left as it is).

    Each entry ``t`` becomes ``t + n * max(std(t), floor)`` with ``n`` standard normal: a tensor keeps
    its own scale (embeddings, Fourier features, FIR taps), and a constant one (zero-initialised output
    projections, norm scales of one, zero biases) gets noise of size ``floor``, so no layer stays inert.
    The noise of an entry depends only on ``seed`` and its name (drawn on the CPU in float32, then cast
    to the entry's dtype and device), so two models with the same keys get the same noise whatever their
    module order. Integer buffers are kept; tied tensors stay tied (one draw, under the first name).
    """
    state = module.state_dict()
    drawn: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, t in state.items():
        if not t.is_floating_point():
            out[name] = t.clone()
            continue
        alias = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if alias not in drawn:
            generator = torch.Generator().manual_seed(_entry_seed(seed, name))
            noise = torch.randn(t.shape, generator=generator, dtype=torch.float32)
            spread = t.detach().float().std().item() if t.numel() > 1 else 0.0
            spread = max(spread, floor) if math.isfinite(spread) else floor
            drawn[alias] = t.detach() + (noise * spread).to(t.device, t.dtype)
        out[name] = drawn[alias]
    return out


def perturb_(module: ModuleT, *, seed: int = 0, floor: float = 0.1) -> ModuleT:
    """Overwrite ``module``'s parameters and persistent buffers in place with :func:`perturbed_state`
    (same seed, same values); returns ``module``."""
    new = perturbed_state(module, seed=seed, floor=floor)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            t.copy_(new[name])
    return module


def perturbed_pair(source: ModuleT, other: ModuleU, *, seed: int = 0, floor: float = 0.1) -> tuple[ModuleT, ModuleU]:
    """Load one perturbed state strict into two models with the same state-dict keys and shapes.

    The state is :func:`perturbed_state` of ``source`` (its own values plus seeded noise). It is loaded
    with ``load_state_dict(strict=True)`` into ``source`` and then ``other`` (a fastunet model and its
    diffusers twin, or two fastunet models), so a missing, unexpected or misshapen key raises torch's
    ``RuntimeError``; then both models' state dicts must read back exactly the loaded values
    (:class:`ComparisonError` otherwise). Returns ``(source, other)``.
    """
    state = perturbed_state(source, seed=seed, floor=floor)
    for model in (source, other):
        model.load_state_dict(state, strict=True)
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
        if changed:
            raise ComparisonError(f"{type(model).__name__} reads back other values than it loaded: {changed}")
    return source, other


# -- activation memory --------------------------------------------------------------------------------------


def saved_activation_bytes(fn, model: nn.Module, *, details: list | None = None, label=None) -> int:
    """Bytes of the tensors autograd keeps for the backward of ``fn()``, parameters excluded.

    ``fn`` runs a forward (``lambda: model(x, t)``); every tensor that an autograd node saves while it runs
    is seen through ``torch.autograd.graph.saved_tensors_hooks``. Tensors are counted by storage: a storage
    saved many times, or through several views (a transpose, a chunk), counts once, with its whole
    ``nbytes``. Storages of ``model``'s parameters and buffers (and of their views, such as a Linear's
    transposed weight) are not activations and are left out. The forward's result is held until the count
    is done, so that no saved storage is freed and its address reused by another.

    ``details``, if given, receives one dict per counted storage (``nbytes``, ``shape``, ``dtype`` of the
    first tensor saved from it, and ``label``: ``label()`` called when that tensor was saved, or None),
    for a breakdown by layer or op.
    """
    excluded = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, tuple[torch.Tensor, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in excluded and ptr not in seen:
            seen[ptr] = (t, storage.nbytes())
            if details is not None:
                details.append({"nbytes": storage.nbytes(), "shape": tuple(t.shape), "dtype": t.dtype,
                                "label": label() if label is not None else None})
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    total = sum(nbytes for _, nbytes in seen.values())
    del result
    return total
