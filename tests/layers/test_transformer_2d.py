"""Transformer2DModel / BasicTransformerBlock / FeedForward against diffusers (the oracle), fp32.

Both models get the same perturbed weights (every parameter, including zero- and one-initialised
ones), loaded strict; outputs must agree to 1e-4 relative L2 and every gradient to 2e-3.
"""

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock as DiffusersBlock
from diffusers.models.attention import FeedForward as DiffusersFeedForward
from diffusers.models.transformers.transformer_2d import Transformer2DModel as DiffusersTransformer2DModel

from fastunet.layers.attention import BasicTransformerBlock, FeedForward
from fastunet.layers.transformer_2d import Transformer2DModel
from fastunet.testing import gradient_errors, perturbed_pair, rel_err

OUT_TOL, GRAD_TOL = 1e-4, 2e-3

# diffusers' own Transformer2DModel builds its deprecated output class on every call
pytestmark = pytest.mark.filterwarnings("ignore:.*Transformer2DModelOutput.*:FutureWarning")


def run_and_backward(model, x, weight, **kwargs):
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x, **kwargs)
    out = out[0] if isinstance(out, (tuple, list)) or hasattr(out, "sample") else out
    (out * weight).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), x.grad, grads


def assert_parity(ours, theirs, x, **kwargs):
    weight = None
    with torch.no_grad():
        probe = theirs(x, **kwargs)
        probe = probe[0] if not torch.is_tensor(probe) else probe
        weight = torch.randn_like(probe)
    out_a, dx_a, grads_a = run_and_backward(ours, x, weight, **kwargs)
    out_b, dx_b, grads_b = run_and_backward(theirs, x, weight, **kwargs)
    assert out_a.shape == out_b.shape
    assert rel_err(out_a, out_b) < OUT_TOL, rel_err(out_a, out_b)
    assert rel_err(dx_a, dx_b) < GRAD_TOL
    # gradients that vanish in exact arithmetic (an attention key bias shifts every score of a row
    # equally) are rounding noise on both sides: each is measured against 1e-4 of the largest gradient
    gradient_errors(grads_a, grads_b, floor=1e-4).check(GRAD_TOL)
    return out_a


CONFIGS = {
    "sd15_conv": dict(),
    "sd21_linear_upcast": dict(use_linear_projection=True, upcast_attention=True),
    "only_cross": dict(only_cross_attention=True),
    "double_self": dict(double_self_attention=True, cross_attention_dim=None),
    "gelu_two_layers_bias": dict(activation_fn="gelu", num_layers=2, attention_bias=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformer_2d_matches_diffusers(name):
    cfg = dict(num_attention_heads=2, attention_head_dim=16, in_channels=32, norm_num_groups=8, cross_attention_dim=24)
    cfg.update(CONFIGS[name])
    ours, theirs = Transformer2DModel(**cfg), DiffusersTransformer2DModel(**cfg)
    perturbed_pair(ours, theirs)
    batch, height, width, tokens = 2, 6, 5, 7
    x = torch.randn(batch, 32, height, width)
    kwargs = {}
    if cfg["cross_attention_dim"] is not None:
        kwargs["encoder_hidden_states"] = torch.randn(batch, tokens, 24)
        keep = torch.ones(batch, tokens)
        keep[0, 4:] = 0
        keep[1, :2] = 0
        kwargs["encoder_attention_mask"] = keep
    # attn1's keep-mask, as (B, keys): its keys are the H*W tokens, or the context with only_cross_attention
    keys = tokens if cfg.get("only_cross_attention") else height * width
    self_keep = (torch.rand(batch, keys) > 0.3).float()
    self_keep[:, 0] = 1
    kwargs["attention_mask"] = self_keep
    assert_parity(ours, theirs, x, **kwargs)


def test_transformer_2d_bias_masks_pass_through():
    """Already-converted (B, 1, M) additive biases are used as they are (the UNet converts once)."""
    cfg = dict(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4, cross_attention_dim=8)
    ours, theirs = Transformer2DModel(**cfg), DiffusersTransformer2DModel(**cfg)
    perturbed_pair(ours, theirs)
    x, context = torch.randn(2, 16, 4, 4), torch.randn(2, 5, 8)
    bias = torch.zeros(2, 1, 5)
    bias[0, 0, 3:] = -10000.0
    with torch.no_grad():
        a = ours(x, context, encoder_attention_mask=bias, return_dict=False)[0]
        b = theirs(x, context, encoder_attention_mask=bias, return_dict=False)[0]
        unmasked = ours(x, context).sample
    assert rel_err(a, b) < OUT_TOL
    assert rel_err(a, unmasked) > 1e-3  # the mask did something


@pytest.mark.parametrize("dim,chunk", [(0, 1), (1, 5)])
def test_chunked_feed_forward_same_result(dim, chunk):
    ours = BasicTransformerBlock(32, 2, 16, cross_attention_dim=12)
    theirs = DiffusersBlock(32, 2, 16, cross_attention_dim=12)
    perturbed_pair(ours, theirs)
    x, context = torch.randn(2, 20, 32), torch.randn(2, 3, 12)
    with torch.no_grad():
        plain = ours(x, encoder_hidden_states=context)
        ours.set_chunk_feed_forward(chunk, dim)
        theirs.set_chunk_feed_forward(chunk, dim)
        chunked = ours(x, encoder_hidden_states=context)
        reference = theirs(x, encoder_hidden_states=context)
    assert rel_err(chunked, plain) < 1e-6
    assert rel_err(chunked, reference) < OUT_TOL
    ours.set_chunk_feed_forward(3, 1)
    with pytest.raises(ValueError, match="multiple of chunk_size 3"):
        ours(x, encoder_hidden_states=context)
    ours.set_chunk_feed_forward(None)
    with torch.no_grad():
        assert rel_err(ours(x, encoder_hidden_states=context), plain) < 1e-7


def test_chunk_feed_forward_validation():
    block = BasicTransformerBlock(16, 2, 8)
    with pytest.raises(ValueError, match="dim must be 0"):
        block.set_chunk_feed_forward(2, dim=2)
    with pytest.raises(ValueError, match="positive int"):
        block.set_chunk_feed_forward(0)


@pytest.mark.parametrize("activation_fn", ["geglu", "gelu", "gelu-approximate", "geglu-approximate"])
def test_feed_forward_variants(activation_fn):
    ours = FeedForward(16, dim_out=12, mult=2, activation_fn=activation_fn)
    theirs = DiffusersFeedForward(16, dim_out=12, mult=2, activation_fn=activation_fn)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert "net.0.proj.weight" in ours.state_dict() and "net.2.weight" in ours.state_dict()
    perturbed_pair(ours, theirs)
    assert_parity(ours, theirs, torch.randn(3, 7, 16))


def test_gradient_checkpointing_same_gradients():
    cfg = dict(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4,
               cross_attention_dim=8, num_layers=2)
    model = Transformer2DModel(**cfg)
    perturbed_pair(model, Transformer2DModel(**cfg))
    x, context = torch.randn(2, 16, 4, 4), torch.randn(2, 5, 8)
    weight = torch.randn(2, 16, 4, 4)
    out_a, dx_a, grads_a = run_and_backward(model, x, weight, encoder_hidden_states=context)
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    out_b, dx_b, grads_b = run_and_backward(model, x, weight, encoder_hidden_states=context)
    assert rel_err(out_b, out_a) < 1e-6 and rel_err(dx_b, dx_a) < 1e-6
    gradient_errors(grads_b, grads_a).check(1e-5)


def test_config_and_state_dict_names():
    cfg = dict(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4, cross_attention_dim=8)
    ours, theirs = Transformer2DModel(**cfg), DiffusersTransformer2DModel(**cfg)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours.config.attention_head_dim == 8 and ours.config.cross_attention_dim == 8
    rebuilt = Transformer2DModel.from_config(ours.config)
    assert rebuilt.state_dict().keys() == ours.state_dict().keys()


def test_unsupported_options_and_bad_inputs():
    with pytest.raises(NotImplementedError, match="in_channels"):
        Transformer2DModel(num_vector_embeds=10, sample_size=4)
    with pytest.raises(NotImplementedError, match="patch_size"):
        Transformer2DModel(in_channels=16, norm_num_groups=4, patch_size=2, sample_size=8)
    with pytest.raises(NotImplementedError, match="norm_type"):
        Transformer2DModel(in_channels=16, norm_num_groups=4, norm_type="ada_norm_zero", num_embeds_ada_norm=10)
    with pytest.raises(NotImplementedError, match="attention_type"):
        Transformer2DModel(in_channels=16, norm_num_groups=4, cross_attention_dim=8, attention_type="gated")
    with pytest.raises(NotImplementedError, match="activation_fn"):
        FeedForward(8, activation_fn="swiglu")
    with pytest.raises(ValueError, match="out_channels"):
        Transformer2DModel(in_channels=16, out_channels=8, norm_num_groups=4)
    with pytest.raises(ValueError, match="norm_num_groups"):
        Transformer2DModel(in_channels=18, norm_num_groups=4)
    model = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4)
    with pytest.raises(ValueError, match=r"\(B, 16, H, W\)"):
        model(torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 16, H, W\)"):
        model(torch.randn(2, 16, 16))
    block = BasicTransformerBlock(16, 2, 8, cross_attention_dim=8)
    with pytest.raises(NotImplementedError, match="GLIGEN"):
        block(torch.randn(1, 4, 16), encoder_hidden_states=torch.randn(1, 3, 8),
              cross_attention_kwargs={"gligen": {"objs": torch.zeros(1)}})
