"""Property-based checks (hypothesis) of the ops on arbitrary shapes, against their oracles.

Random plane sizes, thresholds, group layouts and activations, drawn by hypothesis, on both the Triton
kernels (CPU interpreter) and the torch path. Few examples each: the fixed-shape tests in the other
files carry the bulk; these look for the shape nobody thought of.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import fourier_filter as diffusers_fourier_filter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastunet.kernels import attention, fourier_filter, group_norm_act, use_backend

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
backends = st.sampled_from(["triton", "torch"])


@SETTINGS
@given(h=st.integers(1, 40), w=st.integers(1, 40), threshold=st.integers(0, 5),
       scale=st.floats(-2, 2, allow_nan=False), backend=backends, seed=st.integers(0, 2**16))
def test_fourier_filter_equals_diffusers_at_any_size(h, w, threshold, scale, backend, seed):
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))
    with use_backend(backend):
        ours = fourier_filter(x, threshold, scale)
    expected = diffusers_fourier_filter(x.clone(), threshold, scale)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


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
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, add, scale, shift)]
    with use_backend(backend):
        y = group_norm_act(leaves[0], groups, *leaves[1:3], 1e-5, activation, *leaves[3:])
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)

    ref_leaves = [t.double().requires_grad_() for t in (x, weight, bias, add, scale, shift)]
    extra = (1,) * len(spatial)
    h = ref_leaves[0] + ref_leaves[3].view(batch, channels, *extra)
    grouped = h.reshape(batch, groups, -1)  # by hand: F.group_norm refuses one-element groups
    mean = grouped.mean(-1, keepdim=True)
    var = grouped.var(-1, unbiased=False, keepdim=True)
    h = ((grouped - mean) / torch.sqrt(var + 1e-5)).reshape(h.shape)
    h = h * ref_leaves[1].view(channels, *extra) + ref_leaves[2].view(channels, *extra)
    h = h * (1 + ref_leaves[4].view(batch, channels, *extra)) + ref_leaves[5].view(batch, channels, *extra)
    ref = {None: lambda t: t, "silu": F.silu, "gelu": F.gelu, "mish": F.mish}[activation](h)
    ref.backward(dy.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(leaves, ref_leaves):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-4)


@SETTINGS
@given(n=st.integers(1, 70), m=st.integers(1, 70), d=st.integers(1, 72), heads=st.integers(1, 3),
       masked=st.booleans(), backend=backends, seed=st.integers(0, 2**16))
def test_attention_matches_float64_at_any_shape(n, m, d, heads, masked, backend, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, heads, length, d, generator=g) for length in (n, m, m))
    mask = torch.randn(2, 1, 1, m, generator=g) if masked else None  # additive bias over keys
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with use_backend(backend):
        out = attention(*leaves, attn_mask=mask)
    dout = torch.randn(out.shape, generator=g)
    out.backward(dout)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_leaves, attn_mask=None if mask is None else mask.double())
    ref.backward(dout.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(leaves, ref_leaves):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-4)
