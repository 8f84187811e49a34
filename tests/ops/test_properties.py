"""Property-based checks (hypothesis) of the ops on arbitrary shapes, against their oracles.

Random plane sizes, thresholds, group layouts and activations, drawn by hypothesis, on both the Triton
kernels (CPU interpreter) and the torch path. Few examples each: the fixed-shape tests in the other
files carry the bulk; these look for the shape nobody thought of.

Every example follows the kernels' float64 rule (``fastunet.testing.check_against_oracle``): our fp32
error against the float64 oracle is at most twice the error of PyTorch's (or diffusers') own fp32
computation, plus a floor of a few fp32 units in the last place at the oracle's magnitude. An example
drawn on the ``triton`` backend must also have launched its Triton kernels (``launch_counts``).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import fourier_filter as diffusers_fourier_filter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastunet.kernels import attention, fourier_filter, group_norm_act, launch_counts, use_backend
from fastunet.testing import check_against_oracle

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
backends = st.sampled_from(["triton", "torch"])


FP32_ULP = 2.0**-23
FLOOR_ULPS = 8


def floor_for(oracle: torch.Tensor, condition: float = 1.0) -> float:
    """A few fp32 units in the last place at the oracle's largest magnitude (at least at 1), times the
    op's condition number where the caller knows it."""
    return FLOOR_ULPS * FP32_ULP * condition * max(oracle.abs().max().item() if oracle.numel() else 0.0, 1.0)


def check_rule(ours, oracles, yardsticks, names, condition: float = 1.0):
    for name, a, exact, theirs in zip(names, ours, oracles, yardsticks):
        check_against_oracle(a, exact, theirs, floor=floor_for(exact, condition), name=name)


class Launches:
    """The Triton kernels (by name prefix) launched inside the ``with`` block."""

    def __enter__(self):
        self.before = Counter(launch_counts)
        return self

    def __exit__(self, *exc):
        self.names = {name for name, count in (launch_counts - self.before).items() if count > 0}

    def check(self, backend: str, *prefixes: str) -> None:
        if backend == "torch":
            assert not self.names, f"the torch backend launched {sorted(self.names)}"
            return
        missing = [p for p in prefixes if not any(name.startswith(p) for name in self.names)]
        assert not missing, f"no {missing} kernel launched on the triton backend; launched {sorted(self.names)}"


@SETTINGS
@given(h=st.integers(1, 40), w=st.integers(1, 40), threshold=st.integers(0, 4),
       scale=st.floats(-2, 2, allow_nan=False), backend=backends, seed=st.integers(0, 2**16))
def test_fourier_filter_equals_diffusers_at_any_size(h, w, threshold, scale, backend, seed):
    """Thresholds up to 4, the kernel's range (beyond it the triton backend warns and runs the reference,
    tests/ops/test_fourier_filter.py); threshold 0 scales no frequency and is a copy, with no launch."""
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))
    with use_backend(backend), Launches() as launched:
        ours = fourier_filter(x, threshold, scale)
    launched.check(backend, *(["_fourier_filter"] if threshold > 0 else []))
    exact = diffusers_fourier_filter(x.double(), threshold, scale)
    check_rule([ours], [exact], [diffusers_fourier_filter(x.clone(), threshold, scale)], ["out"])


def _group_norm_by_hand(leaves, groups, activation, spatial):
    """GroupNorm + add/scale/shift + activation from its definition (F.group_norm refuses one-element
    groups), in the leaves' dtype."""
    x, weight, bias, add, scale, shift = leaves
    batch, channels = x.shape[:2]
    extra = (1,) * len(spatial)
    h = x + add.view(batch, channels, *extra)
    grouped = h.reshape(batch, groups, -1)
    mean = grouped.mean(-1, keepdim=True)
    var = grouped.var(-1, unbiased=False, keepdim=True)
    h = ((grouped - mean) / torch.sqrt(var + 1e-5)).reshape(h.shape)
    h = h * weight.view(channels, *extra) + bias.view(channels, *extra)
    h = h * (1 + scale.view(batch, channels, *extra)) + shift.view(batch, channels, *extra)
    return {None: lambda t: t, "silu": F.silu, "gelu": F.gelu, "mish": F.mish}[activation](h)


def _forward_backward(fn, tensors, dtype, grad):
    """``fn`` on copies of ``tensors`` in ``dtype`` with gradients: ``[output, *gradients]``."""
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in tensors]
    out = fn(leaves)
    out.backward(grad.to(dtype))
    return [out.detach(), *(t.grad for t in leaves)]


@SETTINGS
@given(batch=st.integers(1, 3), groups=st.sampled_from([1, 2, 4, 8]), per_group=st.integers(1, 6),
       spatial=st.lists(st.integers(1, 9), min_size=1, max_size=3),
       activation=st.sampled_from([None, "silu", "gelu", "mish"]), backend=backends, seed=st.integers(0, 2**16))
def test_group_norm_act_matches_float64_at_any_shape(batch, groups, per_group, spatial, activation, backend, seed):
    g = torch.Generator().manual_seed(seed)
    channels = groups * per_group
    x = torch.randn(batch, channels, *spatial, generator=g) * 2 + 0.5
    weight, bias = torch.randn(channels, generator=g), torch.randn(channels, generator=g)
    add, scale, shift = (torch.randn(batch, channels, generator=g) * 0.5 for _ in range(3))
    tensors = (x, weight, bias, add, scale, shift)
    dy = torch.randn(x.shape, generator=g)

    def ours_fn(leaves):
        return group_norm_act(leaves[0], groups, *leaves[1:3], 1e-5, activation, *leaves[3:])

    with use_backend(backend), Launches() as launched:
        ours = _forward_backward(ours_fn, tensors, torch.float32, dy)
    launched.check(backend, "_group_norm_act_fwd", "_group_norm_act_bwd")

    def by_hand(leaves):
        return _group_norm_by_hand(leaves, groups, activation, spatial)

    exact = _forward_backward(by_hand, tensors, torch.float64, dy)
    theirs = _forward_backward(by_hand, tensors, torch.float32, dy)
    # GroupNorm's condition number: an input rounding of one ulp of |x + add| moves the normalised value by
    # that ulp times rstd. It is large only for (near-)constant groups, e.g. one-element groups (rstd =
    # eps**-0.5 = 316), where the kernel's (x - (mean - add)) differs from the exact 0 by ~ulp * rstd
    h = (x + add.view(batch, channels, *(1,) * len(spatial))).double().reshape(batch, groups, -1)
    rstd = (h.var(-1, unbiased=False) + 1e-5).rsqrt()
    condition = max(1.0, h.abs().max().item() * rstd.max().item())
    check_rule(ours, exact, theirs, ["out", "dx", "dweight", "dbias", "dadd", "dscale", "dshift"], condition)


@SETTINGS
@given(n=st.integers(1, 70), m=st.integers(1, 70), d=st.integers(1, 72), heads=st.integers(1, 3),
       masked=st.booleans(), backend=backends, seed=st.integers(0, 2**16))
def test_attention_matches_float64_at_any_shape(n, m, d, heads, masked, backend, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, heads, length, d, generator=g) for length in (n, m, m))
    mask = torch.randn(2, 1, 1, m, generator=g) if masked else None  # additive bias over keys
    dout = torch.randn(2, heads, n, d, generator=g)

    def sdpa(leaves):
        bias = None if mask is None else mask.to(leaves[0].dtype)
        return F.scaled_dot_product_attention(*leaves, attn_mask=bias)

    with use_backend(backend), Launches() as launched:
        ours = _forward_backward(lambda leaves: attention(*leaves, attn_mask=mask), (q, k, v), torch.float32, dout)
    launched.check(backend, "_attention")
    exact = _forward_backward(sdpa, (q, k, v), torch.float64, dout)
    theirs = _forward_backward(sdpa, (q, k, v), torch.float32, dout)
    check_rule(ours, exact, theirs, ["out", "dq", "dk", "dv"])
