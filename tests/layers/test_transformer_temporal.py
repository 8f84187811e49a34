"""TransformerTemporalModel / AnimateDiffTransformer3D / TemporalConvLayer against diffusers (the
oracle), fp32, and the Triton kernels (under the interpreter) against the torch backend.

Both sides get the same perturbed state (every parameter and buffer, the zero-initialised last conv
and the sinusoidal table included), loaded strict; outputs must agree to 1e-5 relative L2, the input
gradient and every parameter gradient to 2e-3.
"""

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock as DiffusersBlock
from diffusers.models.resnet import TemporalConvLayer as DiffusersTemporalConvLayer
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel as DiffusersTemporal
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D as DiffusersAnimateDiff

import fastunet
from fastunet.kernels import launch_counts
from fastunet.layers.attention import BasicTransformerBlock
from fastunet.layers.embeddings import SinusoidalPositionalEmbedding
from fastunet.layers.normalization import norm_act
from fastunet.layers.resnet import TemporalConvLayer
from fastunet.layers.transformer_temporal import (
    AnimateDiffTransformer3D,
    TransformerTemporalModel,
    TransformerTemporalModelOutput,
)
from fastunet.testing import gradient_errors, perturbed_pair, rel_err

OUT_TOL, GRAD_TOL = 1e-5, 2e-3

PAIRS = {
    "temporal": (TransformerTemporalModel, DiffusersTemporal),
    "animatediff": (AnimateDiffTransformer3D, DiffusersAnimateDiff),
}


def forward_backward(model, x, weight, **kwargs):
    """Output, input gradient and parameter gradients of ``sum(model(x) * weight)``."""
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x, **kwargs)
    out = out if torch.is_tensor(out) else out[0]
    (out * weight).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def parity(ours, theirs, x, **kwargs) -> dict:
    """Compare outputs and gradients; return the measured errors."""
    weight = torch.randn_like(x)
    out_a, dx_a, grads_a = forward_backward(ours, x, weight, **kwargs)
    out_b, dx_b, grads_b = forward_backward(theirs, x, weight, **kwargs)
    assert out_a.shape == out_b.shape == x.shape
    # gradients that vanish in exact arithmetic (a key bias shifts every score of a row alike) are rounding
    # noise on both sides: each error is relative to at least 1e-4 of the largest gradient
    grads = gradient_errors(grads_a, grads_b, floor=1e-4)
    errors = dict(out=rel_err(out_a, out_b), dx=rel_err(dx_a, dx_b), grad=grads.max, worst=grads.worst)
    assert errors["out"] < OUT_TOL, errors
    assert errors["dx"] < GRAD_TOL, errors
    assert errors["grad"] < GRAD_TOL, errors
    return errors


# name: (pair, constructor overrides, frames, channels, groups, height, width)
TRANSFORMER_CASES = {
    "temporal_default_f8": ("temporal", dict(), 8, 32, 8, 4, 5),
    "temporal_one_frame": ("temporal", dict(double_self_attention=False), 1, 32, 16, 3, 4),
    "temporal_cross_two_layers_f3": ("temporal", dict(double_self_attention=False, cross_attention_dim=24,
                                                      num_layers=2, attention_bias=True), 3, 64, 16, 3, 3),
    "temporal_sinusoidal_narrow_inner_f16": ("temporal", dict(positional_embeddings="sinusoidal",
                                                              num_positional_embeddings=16, heads=2, head_dim=8),
                                             16, 32, 8, 2, 3),
    "animatediff_odd_shape_two_layers_f16": ("animatediff", dict(positional_embeddings="sinusoidal",
                                                                 num_positional_embeddings=24, num_layers=2,
                                                                 heads=4, head_dim=24), 16, 96, 32, 7, 9),
    "animatediff_cross_f8": ("animatediff", dict(positional_embeddings="sinusoidal", num_positional_embeddings=32,
                                                 double_self_attention=False, cross_attention_dim=16), 8, 32, 32, 3, 4),
    "animatediff_gelu_f3": ("animatediff", dict(positional_embeddings="sinusoidal", num_positional_embeddings=8,
                                                activation_fn="gelu", norm_elementwise_affine=False), 3, 64, 32, 2, 2),
    "animatediff_one_frame": ("animatediff", dict(positional_embeddings="sinusoidal", num_positional_embeddings=8),
                              1, 32, 8, 4, 4),
}


def build_transformers(pair: str, channels: int, groups: int, overrides: dict):
    cfg = dict(overrides)
    heads, head_dim = cfg.pop("heads", 2), cfg.pop("head_dim", channels // 2)
    cfg.update(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=channels, norm_num_groups=groups)
    ours_cls, theirs_cls = PAIRS[pair]
    ours, theirs = ours_cls(**cfg), theirs_cls(**cfg)
    perturbed_pair(ours, theirs)
    return ours, theirs


@pytest.mark.parametrize("name", list(TRANSFORMER_CASES))
def test_temporal_transformer_matches_diffusers(name):
    pair, overrides, frames, channels, groups, height, width = TRANSFORMER_CASES[name]
    ours, theirs = build_transformers(pair, channels, groups, overrides)
    batch = 2
    x = torch.randn(batch * frames, channels, height, width)
    kwargs = dict(num_frames=frames)
    if overrides.get("cross_attention_dim"):
        kwargs["encoder_hidden_states"] = torch.randn(batch * height * width, 5, overrides["cross_attention_dim"])
    errors = parity(ours, theirs, x, **kwargs)
    print(f"{name}: out {errors['out']:.2e}  dx {errors['dx']:.2e}  worst grad {errors['grad']:.2e} "
          f"({errors['worst']})")


# name: (frames, channels, groups, height, width)
CONV_CASES = {
    "f1": (1, 32, 8, 4, 4),
    "f3": (3, 64, 16, 5, 3),
    "f8": (8, 32, 32, 4, 5),
    "f16_odd": (16, 96, 32, 7, 9),
}


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_temporal_conv_layer_matches_diffusers(name):
    frames, channels, groups, height, width = CONV_CASES[name]
    ours = TemporalConvLayer(channels, norm_num_groups=groups)
    theirs = DiffusersTemporalConvLayer(channels, norm_num_groups=groups)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours.conv4[3].weight.abs().max() == 0 and ours.conv4[3].bias.abs().max() == 0
    perturbed_pair(ours, theirs)
    errors = parity(ours, theirs, torch.randn(2 * frames, channels, height, width), num_frames=frames)
    print(f"conv {name}: out {errors['out']:.2e}  dx {errors['dx']:.2e}  worst grad {errors['grad']:.2e} "
          f"({errors['worst']})")


def test_temporal_conv_layer_dropout_indices_and_eval():
    """Dropout sits at index 2 of conv2..conv4 as in diffusers; in eval mode it is the identity."""
    ours = TemporalConvLayer(16, dropout=0.3, norm_num_groups=4).eval()
    theirs = DiffusersTemporalConvLayer(16, dropout=0.3, norm_num_groups=4).eval()
    perturbed_pair(ours, theirs)
    assert all(isinstance(getattr(ours, f"conv{i}")[2], torch.nn.Dropout) for i in (2, 3, 4))
    x = torch.randn(6, 16, 3, 2)
    with torch.no_grad():
        assert rel_err(ours(x, num_frames=3), theirs(x, num_frames=3)) < OUT_TOL


def test_state_dict_names_and_sinusoidal_table():
    """Same keys and shapes as diffusers (the table ``pos_embed.pe`` is a persistent buffer there too), and
    the same table values before any loading."""
    cfg = dict(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4, num_layers=2,
               positional_embeddings="sinusoidal", num_positional_embeddings=24)
    for ours_cls, theirs_cls in PAIRS.values():
        ours, theirs = ours_cls(**cfg), theirs_cls(**cfg)
        assert {k: v.shape for k, v in ours.state_dict().items()} == \
            {k: v.shape for k, v in theirs.state_dict().items()}
        assert "transformer_blocks.1.pos_embed.pe" in ours.state_dict()
        torch.testing.assert_close(ours.transformer_blocks[0].pos_embed.pe, theirs.transformer_blocks[0].pos_embed.pe,
                                   rtol=0, atol=1e-6)


def test_outputs_layout_and_config():
    cfg = dict(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4)
    model = TransformerTemporalModel(**cfg)
    perturbed_pair(model, DiffusersTemporal(**cfg))
    x = torch.randn(6, 16, 3, 2)
    before = x.clone()
    with torch.no_grad():
        out = model(x, num_frames=3)
        as_tuple = model(x, num_frames=3, return_dict=False)
        animatediff = AnimateDiffTransformer3D(**cfg)
        animatediff.load_state_dict(model.state_dict())
        plain = animatediff(x, num_frames=3)
    assert isinstance(out, TransformerTemporalModelOutput) and isinstance(as_tuple, tuple)
    assert torch.equal(out.sample, as_tuple[0]) and torch.equal(out.sample, plain)
    assert out.sample.is_contiguous() and torch.equal(x, before)
    assert model.config.double_self_attention is True and animatediff.config.double_self_attention is True
    rebuilt = TransformerTemporalModel.from_config(model.config)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


def test_channels_last_input_keeps_its_layout():
    cfg = dict(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4)
    ours, theirs = TransformerTemporalModel(**cfg), DiffusersTemporal(**cfg)
    perturbed_pair(ours, theirs)
    conv_ours, conv_theirs = TemporalConvLayer(16, norm_num_groups=4), DiffusersTemporalConvLayer(16, norm_num_groups=4)
    perturbed_pair(conv_ours, conv_theirs)
    x = torch.randn(6, 16, 3, 5).to(memory_format=torch.channels_last)
    with torch.no_grad():
        for a, b in ((ours(x, num_frames=2).sample, theirs(x, num_frames=2).sample),
                     (conv_ours(x, num_frames=2), conv_theirs(x, num_frames=2))):
            assert a.is_contiguous(memory_format=torch.channels_last)
            assert rel_err(a, b) < OUT_TOL


def test_gradient_checkpointing_same_gradients():
    cfg = dict(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4, num_layers=2,
               positional_embeddings="sinusoidal", num_positional_embeddings=4)
    model = AnimateDiffTransformer3D(**cfg)
    perturbed_pair(model, AnimateDiffTransformer3D(**cfg))
    x, weight = torch.randn(8, 16, 2, 3), torch.randn(8, 16, 2, 3)
    out_a, dx_a, grads_a = forward_backward(model, x, weight, num_frames=4)
    model.enable_gradient_checkpointing()
    out_b, dx_b, grads_b = forward_backward(model, x, weight, num_frames=4)
    assert rel_err(out_b, out_a) < 1e-6 and rel_err(dx_b, dx_a) < 1e-6
    gradient_errors(grads_b, grads_a).check(1e-5)


def test_block_positional_embedding_matches_diffusers():
    """The block alone (positions added before both attentions, in place on the LayerNorm outputs)."""
    ours = BasicTransformerBlock(32, 2, 16, double_self_attention=True, positional_embeddings="sinusoidal",
                                 num_positional_embeddings=10)
    theirs = DiffusersBlock(32, 2, 16, double_self_attention=True, positional_embeddings="sinusoidal",
                            num_positional_embeddings=10)
    perturbed_pair(ours, theirs)
    parity(ours, theirs, torch.randn(6, 7, 32))


def test_norm_act_out_layout():
    """norm_act writes the requested memory order (the kernel's out_layout, or norm_act's stand-in for it)."""
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    frames = torch.randn(2, 3, 8, 4, 5)  # (B, F, C, H, W)
    x = frames.transpose(1, 2)           # (B, C, F, H, W), strided
    y = norm_act(norm, x, "silu", out_layout=(0, 3, 4, 2, 1))
    assert y.shape == x.shape and y.permute(0, 3, 4, 2, 1).is_contiguous()
    expected = torch.nn.functional.silu(torch.nn.functional.group_norm(x.double(), 4, norm.weight.double(),
                                                                       norm.bias.double(), 1e-6))
    assert rel_err(y, expected) < 1e-6
    with pytest.raises(ValueError, match="out_layout"):
        norm_act(norm, x, out_layout=(0, 1, 2, 3))


@pytest.mark.parametrize("layer", ["animatediff", "conv"])
def test_triton_backend_matches_torch_backend(layer):
    """The same layer on the Triton kernels (interpreter) and on the torch paths, forward and backward."""
    if layer == "conv":
        model = TemporalConvLayer(16, norm_num_groups=4)
        perturbed_pair(model, TemporalConvLayer(16, norm_num_groups=4))
        expected_kernels = [("group_norm_act", "fwd"), ("group_norm_act", "bwd")]
    else:
        cfg = dict(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4,
                   positional_embeddings="sinusoidal", num_positional_embeddings=4)
        model = AnimateDiffTransformer3D(**cfg)
        perturbed_pair(model, AnimateDiffTransformer3D(**cfg))
        expected_kernels = [("group_norm_act", "fwd"), ("group_norm_act", "bwd"), ("attention_short", "fwd"),
                            ("attention_short", "bwd")]
    x = torch.randn(2 * 3, 16, 2, 2)
    weight = torch.randn_like(x)
    with fastunet.use_backend("torch"):
        reference = forward_backward(model, x, weight, num_frames=3)
    launch_counts.clear()
    with fastunet.use_backend("triton"):
        result = forward_backward(model, x, weight, num_frames=3)
    launched = {name for name, n in launch_counts.items() if n > 0}
    for parts in expected_kernels:  # launch names are the kernels' names: match on their words
        assert any(all(p in name for p in parts) for name in launched), (parts, launched)
    assert rel_err(result[0], reference[0]) < 1e-5
    assert rel_err(result[1], reference[1]) < GRAD_TOL
    gradient_errors(result[2], reference[2]).check(GRAD_TOL)


def test_bad_inputs_raise_value_errors():
    cfg = dict(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4,
               positional_embeddings="sinusoidal", num_positional_embeddings=4)
    model = AnimateDiffTransformer3D(**cfg)
    conv = TemporalConvLayer(16, norm_num_groups=4)
    for layer in (model, conv):
        with pytest.raises(ValueError, match=r"\(B\*num_frames, 16, H, W\); got shape \(2, 16, 3, 3, 3\)"):
            layer(torch.randn(2, 16, 3, 3, 3), num_frames=1)
        with pytest.raises(ValueError, match=r"\(B\*num_frames, 16, H, W\); got shape \(6, 8, 2, 2\)"):
            layer(torch.randn(6, 8, 2, 2), num_frames=3)
        with pytest.raises(ValueError, match="7 frames of the batch are not a multiple of num_frames=3"):
            layer(torch.randn(7, 16, 2, 2), num_frames=3)
        with pytest.raises(ValueError, match="num_frames must be at least 1; got 0"):
            layer(torch.randn(6, 16, 2, 2), num_frames=0)
        with pytest.raises(TypeError, match="num_frames must be an int; got float"):
            layer(torch.randn(6, 16, 2, 2), num_frames=3.0)
    with pytest.raises(ValueError, match="num_frames=5 is more than the num_positional_embeddings=4"):
        model(torch.randn(10, 16, 2, 2), num_frames=5)
    with pytest.raises(ValueError, match=r"B\*H\*W = 2\*2\*2 = 8.*got shape \(4, 3, 16\)"):
        model(torch.randn(6, 16, 2, 2), encoder_hidden_states=torch.randn(4, 3, 16), num_frames=3)
    block = BasicTransformerBlock(16, 2, 8, positional_embeddings="sinusoidal", num_positional_embeddings=4)
    with pytest.raises(ValueError, match="sequence of 5 positions is longer than the sinusoidal table's 4"):
        block(torch.randn(2, 5, 16))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_positional_embeddings"):
        BasicTransformerBlock(16, 2, 8, positional_embeddings="sinusoidal")
    with pytest.raises(NotImplementedError, match="positional_embeddings='learned'"):
        TransformerTemporalModel(in_channels=16, norm_num_groups=4, positional_embeddings="learned",
                                 num_positional_embeddings=4)
    with pytest.raises(ValueError, match="embed_dim must be even; got 15"):
        SinusoidalPositionalEmbedding(15, 8)
    with pytest.raises(ValueError, match="in_channels must be a positive int; got None"):
        TransformerTemporalModel()
    with pytest.raises(ValueError, match=r"out_channels must be None or in_channels \(16\).*got 32"):
        TransformerTemporalModel(in_channels=16, out_channels=32, norm_num_groups=4)
    with pytest.raises(ValueError, match="18 channels cannot be split into 4"):
        AnimateDiffTransformer3D(in_channels=18, norm_num_groups=4)
    with pytest.raises(ValueError, match="out_dim must equal in_dim=16; got 32"):
        TemporalConvLayer(16, 32, norm_num_groups=4)
    with pytest.raises(ValueError, match="16 channels cannot be split into 6"):
        TemporalConvLayer(16, norm_num_groups=6)
