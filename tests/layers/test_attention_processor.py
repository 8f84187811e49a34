"""fastunet's ``Attention`` and processors against diffusers' ``Attention`` with the same weights."""

import logging

import pytest
import torch
import torch.nn as nn
from attention_helpers import RTOL, backend_for, processor_factories  # tests/ is on sys.path
from diffusers.models import attention_processor as dap
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel as DiffusersUNet2DCondition

import fastunet
import fastunet.kernels as K
from fastunet.layers.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    SlicedAttnProcessor,
    TritonAttnProcessor,
    TritonSlicedAttnProcessor,
    _row_slices,
)
from fastunet.configuration import register_to_config
from fastunet.modeling import AttentionMixin, ModelMixin
from fastunet.testing import perturbed_pair, rel_err

PROCESSORS = processor_factories(slice_size=3)


def make_pair(query_dim, **kwargs):
    """A diffusers Attention with perturbed weights and a fastunet twin, loaded strict."""
    ref, ours = perturbed_pair(dap.Attention(query_dim, **kwargs), Attention(query_dim, **kwargs))
    return ref.eval(), ours.eval()


def run(attn, processor_name, *args, **kwargs):
    """Forward with the named processor; the Triton one under the 'triton' backend (the interpreter on CPU)."""
    attn.set_processor(PROCESSORS[processor_name]())
    with torch.no_grad(), fastunet.use_backend(backend_for(processor_name)):
        return attn(*args, **kwargs)


def assert_matches(ref, ours, processor_name, *args, **kwargs):
    """``ours`` with the named processor gives ``ref``'s own (no-grad) output on the same inputs."""
    with torch.no_grad():
        expected = ref(*args, **kwargs)
    actual = run(ours, processor_name, *args, **kwargs)
    assert rel_err(actual, expected, norm="max") < RTOL


def launches(op):
    return sum(n for name, n in K.launch_counts.items() if op in name)


def block_kwargs(channels, head_dim):
    """The attention of UNet2DModel's Attn*Block2D / UNetMidBlock2D."""
    return dict(heads=channels // head_dim, dim_head=head_dim, rescale_output_factor=1.7, eps=1e-6,
                norm_num_groups=32, spatial_norm_dim=None, residual_connection=True, bias=True,
                upcast_softmax=True, _from_deprecated_attn_block=True)


# -- structure -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    block_kwargs(64, 8),
    dict(cross_attention_dim=24, heads=2, dim_head=16, cross_attention_norm="layer_norm"),
    dict(cross_attention_dim=32, heads=2, dim_head=16, cross_attention_norm="group_norm",
         cross_attention_norm_num_groups=8),
    dict(heads=2, dim_head=32, spatial_norm_dim=16, norm_num_groups=32, residual_connection=True),
    dict(cross_attention_dim=64, heads=4, dim_head=16, added_kv_proj_dim=24, norm_num_groups=8, bias=True,
         upcast_softmax=True, only_cross_attention=True, cross_attention_norm="group_norm",
         cross_attention_norm_num_groups=8),
    dict(heads=3, dim_head=16, out_dim=64, out_bias=False),
])
def test_parameter_names_and_attributes_match_diffusers(kwargs):
    ref, ours = make_pair(64, **kwargs)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for name in ("heads", "scale", "rescale_output_factor", "residual_connection", "upcast_attention",
                 "upcast_softmax", "only_cross_attention", "is_cross_attention", "_from_deprecated_attn_block",
                 "sliceable_head_dim", "inner_dim", "out_dim", "cross_attention_dim", "added_kv_proj_dim"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert isinstance(ours.processor, TritonAttnProcessor)
    assert isinstance(ours.to_out, nn.ModuleList) and isinstance(ours.to_out[1], nn.Dropout)


# -- outputs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("processor", list(PROCESSORS))
@pytest.mark.parametrize("head_dim", [8, 40, 64])
def test_self_attention_block_4d(processor, head_dim):
    channels = {8: 64, 40: 160, 64: 128}[head_dim]
    ref, ours = make_pair(channels, **block_kwargs(channels, head_dim))
    x = torch.randn(2, channels, 5, 7)
    x_before = x.clone()
    expected = ref(x)
    attention_launches, norm_launches = launches("attention"), launches("group_norm")
    actual = run(ours, processor, x)
    assert torch.equal(x, x_before)
    assert actual.shape == expected.shape
    assert rel_err(actual, expected, norm="max") < RTOL
    if processor == "triton":
        assert launches("attention") > attention_launches, "the Triton attention kernel did not run"
        assert launches("group_norm") > norm_launches, "the Triton group-norm kernel did not run"


@pytest.mark.parametrize("processor", list(PROCESSORS))
@pytest.mark.parametrize("added_kv", [False, True])
def test_image_output_is_contiguous(processor, added_kv):
    """An image-shaped attention output comes out NCHW-contiguous, equal to diffusers' (which is a
    channels-last tensor), so the next GroupNorm or convolution reads it without a layout copy."""
    if added_kv:
        kwargs = dict(cross_attention_dim=64, heads=4, dim_head=16, added_kv_proj_dim=24, norm_num_groups=8)
        ref, ours = make_pair(64, processor=dap.AttnAddedKVProcessor2_0(), **kwargs)
        args = (torch.randn(2, 64, 4, 5), torch.randn(2, 6, 24))
    else:
        ref, ours = make_pair(64, **block_kwargs(64, 8))
        args = (torch.randn(2, 64, 4, 5),)
    with torch.no_grad():
        expected = ref(*args)
    actual = run(ours, processor, *args)
    assert not expected.is_contiguous()  # what diffusers' layout would cost the next layer
    assert actual.is_contiguous(), actual.stride()
    assert rel_err(actual, expected, norm="max") < RTOL


@pytest.mark.parametrize("processor", list(PROCESSORS))
def test_same_processor_object_runs_on_diffusers_attention(processor):
    ref, _ = make_pair(64, **block_kwargs(64, 8))
    x = torch.randn(2, 64, 4, 6)
    assert_matches(ref, ref, processor, x)


def _masks(batch, heads, queries, keys):
    keep = torch.rand(batch, 1, keys) > 0.4
    keep[..., 0] = True  # no fully masked row
    per_query = torch.rand(batch, queries, keys) > 0.3
    per_query[..., 0] = True
    return {
        "bool": keep,
        "additive": (1 - keep.float()) * -10000.0,  # UNet2DConditionModel's encoder_attention_mask bias
        "per_query": per_query,
        "per_head": torch.randn(batch * heads, queries, keys),
        "batch_keys": torch.randn(batch, keys),
    }


@pytest.mark.parametrize("processor", list(PROCESSORS))
@pytest.mark.parametrize("mask_kind", ["bool", "additive", "per_query", "per_head", "batch_keys"])
def test_cross_attention_with_mask(processor, mask_kind):
    ref, ours = make_pair(80, cross_attention_dim=32, heads=2, dim_head=40, cross_attention_norm="layer_norm",
                          upcast_attention=True)
    x, context = torch.randn(2, 11, 80), torch.randn(2, 7, 32)
    mask = _masks(2, 2, 11, 7)[mask_kind]
    assert_matches(ref, ours, processor, x, context, attention_mask=mask)  # ref: diffusers' default AttnProcessor2_0


@pytest.mark.parametrize("processor", list(PROCESSORS))
def test_spatial_norm_with_temb(processor):
    ref, ours = make_pair(64, heads=2, dim_head=32, spatial_norm_dim=16, norm_num_groups=32,
                          residual_connection=True, rescale_output_factor=0.9, bias=True)
    x, temb = torch.randn(2, 64, 6, 6), torch.randn(2, 16, 3, 3)
    assert_matches(ref, ours, processor, x, temb=temb)


@pytest.mark.parametrize("processor", list(PROCESSORS))
def test_cross_attention_group_norm_3d_tokens(processor):
    ref, ours = make_pair(64, cross_attention_dim=32, heads=4, dim_head=16, norm_num_groups=8,
                          cross_attention_norm="group_norm", cross_attention_norm_num_groups=8, out_dim=64)
    x, context = torch.randn(3, 9, 64), torch.randn(3, 5, 32)
    assert_matches(ref, ours, processor, x, context)


@pytest.mark.parametrize("processor", list(PROCESSORS))
@pytest.mark.parametrize("only_cross", [False, True])
def test_added_kv_projections(processor, only_cross):
    """UNet2DConditionModel's SimpleCrossAttn blocks; diffusers' oracle is AttnAddedKVProcessor2_0."""
    kwargs = dict(cross_attention_dim=64, heads=4, dim_head=16, added_kv_proj_dim=24, norm_num_groups=8,
                  bias=True, upcast_softmax=True, only_cross_attention=only_cross,
                  cross_attention_norm="group_norm", cross_attention_norm_num_groups=8)
    ref, ours = make_pair(64, processor=dap.AttnAddedKVProcessor2_0(), **kwargs)
    x, context = torch.randn(2, 64, 4, 5), torch.randn(2, 6, 24)
    assert_matches(ref, ours, processor, x, context)


@pytest.mark.parametrize("processor", list(PROCESSORS))
@pytest.mark.parametrize("cross", [False, True])
def test_fused_projections(processor, cross):
    kwargs = dict(heads=2, dim_head=40, bias=True)
    if cross:
        kwargs["cross_attention_dim"] = 24
    ref, ours = make_pair(80, **kwargs)
    x = torch.randn(2, 10, 80)
    context = torch.randn(2, 6, 24) if cross else None
    with torch.no_grad():
        expected = ref(x, context)
    ref.fuse_projections()
    ours.fuse_projections()
    assert ours.fused_projections and list(ours.state_dict()) == list(ref.state_dict())
    assert rel_err(ours.state_dict()["to_kv.weight" if cross else "to_qkv.weight"],
                   ref.state_dict()["to_kv.weight" if cross else "to_qkv.weight"], norm="max") == 0
    with torch.no_grad():  # the separate projections must no longer matter
        for linear in (ours.to_k, ours.to_v) if cross else (ours.to_q, ours.to_k, ours.to_v):
            linear.weight.zero_()
    assert rel_err(run(ours, processor, x, context), expected, norm="max") < RTOL
    ours.unfuse_projections()
    assert not ours.fused_projections and "to_qkv" not in dict(ours.named_children())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_match_diffusers(backend):
    ref, ours = make_pair(64, **block_kwargs(64, 16))
    x = torch.randn(2, 64, 4, 4)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(x_ref).square().sum().backward()
    with fastunet.use_backend(backend):
        ours(x_ours).square().sum().backward()
    assert rel_err(x_ours.grad, x_ref.grad, norm="max") < RTOL
    expected = dict(ref.named_parameters())
    largest = max(p.grad.abs().max() for p in expected.values())
    for name, p in ours.named_parameters():
        if name == "to_k.bias":  # zero in exact arithmetic (softmax ignores a shift of all scores): rounding noise
            assert p.grad.abs().max() <= 1e-6 * largest
        else:
            assert rel_err(p.grad, expected[name].grad, norm="max") < RTOL, name


def test_set_attention_slice_on_the_layer():
    ref, ours = make_pair(64, **block_kwargs(64, 8))  # 8 heads
    x = torch.randn(2, 64, 3, 5)
    with torch.no_grad():
        expected = ref(x)
    ours.set_attention_slice(3)
    assert isinstance(ours.processor, SlicedAttnProcessor) and ours.processor.slice_size == 3
    with torch.no_grad():
        assert rel_err(ours(x), expected, norm="max") < RTOL
    ours.set_attention_slice(None)
    assert isinstance(ours.processor, TritonAttnProcessor)
    with pytest.raises(ValueError, match="slice_size 9 has to be smaller or equal to 8"):
        ours.set_attention_slice(9)


def test_set_attention_slice_keeps_the_triton_kernel(monkeypatch):
    """Slicing installs the Triton processor that bounds the batch*heads rows per launch: one launch per
    piece, pieces split at sample boundaries, and the result (and gradients) equal the unsliced kernel's."""
    import fastunet.layers.attention_processor as ap

    ref, ours = make_pair(64, cross_attention_dim=32, heads=4, dim_head=16)
    x, context = torch.randn(3, 10, 64, requires_grad=True), torch.randn(3, 7, 32)
    mask = torch.rand(3, 7) > 0.3
    mask[:, 0] = True
    with fastunet.use_backend("triton"):
        expected = ours(x, context, attention_mask=mask)
        expected_grads = torch.autograd.grad(expected.square().sum(), [x, *ours.parameters()])
        ours.set_attention_slice(3)
        assert type(ours.processor) is TritonSlicedAttnProcessor and ours.processor.slice_size == 3
        calls = []
        kernel = ap.attention_kernel
        monkeypatch.setattr(ap, "attention_kernel", lambda q, *a, **k: calls.append(q.shape[:2]) or kernel(q, *a, **k))
        out = ours(x, context, attention_mask=mask)
        grads = torch.autograd.grad(out.square().sum(), [x, *ours.parameters()])
    # 12 rows, 3 at a time; slices [3:6] and [6:9] cross the sample boundaries at 4 and 8
    assert calls == [(1, 3), (1, 1), (1, 2), (1, 2), (1, 1), (1, 3)]
    assert rel_err(out, expected, norm="max") < 1e-6
    for actual, wanted in zip(grads, expected_grads):
        assert rel_err(actual, wanted, norm="max") < 1e-6
    with torch.no_grad():
        assert rel_err(out, ref(x, context, attention_mask=mask), norm="max") < RTOL


def test_row_slices_cover_every_row_once():
    for batch, heads, size in [(1, 1, 1), (2, 8, 3), (3, 5, 5), (4, 2, 1), (2, 3, 2)]:
        rows = [b * heads + h for b, h0, h1 in _row_slices(batch, heads, size) for h in range(h0, h1)]
        assert rows == list(range(batch * heads))
        assert all(h1 - h0 <= size for _, h0, h1 in _row_slices(batch, heads, size))


def test_auto_slicing_a_one_head_layer_slices_one_head():
    """README, known differences: diffusers' "auto" gives a one-head layer slice size 0 (its forward then
    fails with ZeroDivisionError); fastunet gives it 1, and the model computes as unsliced."""
    kwargs = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=1, norm_num_groups=8)
    theirs, ours = perturbed_pair(DiffusersUNet2DCondition(**kwargs), fastunet.UNet2DConditionModel(**kwargs))
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = ours(x, 3, context).sample
        theirs.set_attention_slice("auto")
        ours.set_attention_slice("auto")
        assert {p.slice_size for p in theirs.attn_processors.values()} == {0}
        assert {p.slice_size for p in ours.attn_processors.values()} == {1}
        assert all(type(p) is TritonSlicedAttnProcessor for p in ours.attn_processors.values())
        with pytest.raises(ZeroDivisionError):  # diffusers' sliced processor divides the rows by the slice size
            theirs(x, 3, context)
        assert rel_err(ours(x, 3, context).sample, expected, norm="max") < 1e-6


def test_helpers_match_diffusers():
    ref, ours = make_pair(48, heads=3, dim_head=16)
    t = torch.randn(2, 5, 48)
    for out_dim in (3, 4):
        assert torch.equal(ours.head_to_batch_dim(t, out_dim), ref.head_to_batch_dim(t, out_dim))
    t4 = torch.randn(2, 2, 5, 48)
    assert torch.equal(ours.head_to_batch_dim(t4), ref.head_to_batch_dim(t4))
    b = torch.randn(6, 5, 16)
    assert torch.equal(ours.batch_to_head_dim(b), ref.batch_to_head_dim(b))
    q, k, m = torch.randn(6, 5, 16), torch.randn(6, 4, 16), torch.randn(6, 5, 4)
    assert rel_err(ours.get_attention_scores(q, k, m), ref.get_attention_scores(q, k, m), norm="max") < 1e-6
    assert rel_err(ours.get_attention_scores(q, k), ref.get_attention_scores(q, k), norm="max") < 1e-6
    mask = torch.randn(2, 1, 4)
    for out_dim in (3, 4):
        assert torch.equal(ours.prepare_attention_mask(mask, 4, 2, out_dim),
                           ref.prepare_attention_mask(mask, 4, 2, out_dim))


def test_unexpected_kwargs_are_dropped_with_a_warning(caplog):
    _, ours = make_pair(32, heads=2, dim_head=16)
    x = torch.randn(1, 4, 32)
    with caplog.at_level(logging.WARNING, logger="fastunet.layers.attention_processor"):
        out = ours(x, bogus=1.0, ip_adapter_masks=None)
    assert "['bogus'] are not expected by TritonAttnProcessor" in caplog.text
    assert "ip_adapter_masks" not in caplog.text
    assert torch.equal(out, ours(x))


def test_module_processor_is_unregistered_when_replaced():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.tensor(2.0))

        def __call__(self, attn, hidden_states, **kwargs):
            return AttnProcessor2_0()(attn, hidden_states, **kwargs) * self.gain

    _, ours = make_pair(32, heads=2, dim_head=16)
    ours.set_processor(Scaled())
    assert "processor.gain" in ours.state_dict()
    ours.set_processor(AttnProcessor())
    assert "processor.gain" not in ours.state_dict() and isinstance(ours.get_processor(), AttnProcessor)


# -- errors --------------------------------------------------------------------------------------------

def test_constructor_errors():
    with pytest.raises(ValueError, match="out_dim must be a multiple of dim_head=16; got out_dim=40"):
        Attention(32, dim_head=16, out_dim=40)
    with pytest.raises(ValueError, match="only_cross_attention=True needs added_kv_proj_dim"):
        Attention(32, only_cross_attention=True)
    with pytest.raises(ValueError, match="cross_attention_norm must be None, 'layer_norm' or 'group_norm'"):
        Attention(32, cross_attention_norm="rms_norm")
    with pytest.raises(ValueError, match="heads must be a positive int; got 0"):
        Attention(32, heads=0)
    for kwargs in (dict(qk_norm="layer_norm"), dict(kv_heads=2, heads=4), dict(is_causal=True),
                   dict(context_pre_only=True), dict(pre_only=True)):
        with pytest.raises(NotImplementedError, match="is not supported by fastunet"):
            Attention(32, **kwargs)
    with pytest.raises(ValueError, match="slice_size must be at least 1; got 0"):
        SlicedAttnProcessor(0)
    with pytest.raises(TypeError, match="slice_size must be an int; got float"):
        SlicedAttnProcessor(1.5)


def test_mismatched_dims_raise():
    _, ours = make_pair(64, cross_attention_dim=32, heads=2, dim_head=32)
    with pytest.raises(ValueError, match="hidden_states must have query_dim=64 channels; got shape \\(2, 5, 48\\)"):
        ours(torch.randn(2, 5, 48))
    with pytest.raises(ValueError, match="must have 32 features in its last dimension; got shape \\(2, 3, 40\\)"):
        ours(torch.randn(2, 5, 64), torch.randn(2, 3, 40))


@pytest.mark.parametrize("processor", list(PROCESSORS))
@pytest.mark.parametrize("shape", [(2, 1, 6), (3, 1, 7), (2, 4, 7), (2, 7), (2, 1, 1, 7)])
def test_bad_mask_shape_raises(processor, shape):
    _, ours = make_pair(64, cross_attention_dim=32, heads=2, dim_head=32)
    x, context = torch.randn(2, 5, 64), torch.randn(2, 7, 32)
    if shape == (2, 7):
        shape = (3, 7)
    with pytest.raises(ValueError, match="attention_mask must"):
        run(ours, processor, x, context, attention_mask=torch.zeros(shape))


# -- model-level API (AttentionMixin), on a small model and on diffusers' UNet ---------------------------

class TwoLayerModel(ModelMixin, AttentionMixin):
    @register_to_config
    def __init__(self, channels: int = 32):
        super().__init__()
        self.attn = Attention(channels, heads=4, dim_head=channels // 4)
        self.blocks = nn.ModuleList([
            nn.ModuleDict({"cross": Attention(channels, cross_attention_dim=16, heads=2, dim_head=channels // 2)}),
        ])

    def forward(self, x, context):
        return self.blocks[0]["cross"](self.attn(x), context)


def test_mixin_processor_api():
    model = TwoLayerModel()
    assert list(model.attn_processors) == ["attn.processor", "blocks.0.cross.processor"]
    assert all(isinstance(p, TritonAttnProcessor) for p in model.attn_processors.values())
    x, context = torch.randn(2, 6, 32), torch.randn(2, 3, 16)
    with torch.no_grad():
        expected = model(x, context)

    chosen = {"attn.processor": AttnProcessor(), "blocks.0.cross.processor": SlicedAttnProcessor(1)}
    given = dict(chosen)
    model.set_attn_processor(given)
    assert given == chosen, "set_attn_processor must not consume the caller's dict"
    assert model.attn_processors == chosen
    with torch.no_grad():
        assert rel_err(model(x, context), expected, norm="max") < RTOL

    with pytest.raises(ValueError, match="the number of processors 1 does not match the number of attention "
                                         "layers: 2. Please make sure to pass 2 processor classes."):
        model.set_attn_processor({"attn.processor": AttnProcessor()})
    with pytest.raises(ValueError, match="missing \\['attn.processor'\\], unknown \\['x.processor'\\]"):
        model.set_attn_processor({"x.processor": AttnProcessor(), "blocks.0.cross.processor": AttnProcessor()})

    model.set_default_attn_processor()
    assert all(type(p) is TritonAttnProcessor for p in model.attn_processors.values())

    model.set_attn_processor(dap.AttnProcessor2_0())  # diffusers' own: knows nothing of fastunet's fusion
    model.fuse_qkv_projections()
    assert model.attn.fused_projections and model.blocks[0]["cross"].fused_projections
    assert "attn.to_qkv.weight" in model.state_dict() and "blocks.0.cross.to_kv.weight" in model.state_dict()
    assert all(isinstance(p, TritonAttnProcessor) for p in model.attn_processors.values())
    with torch.no_grad():
        assert rel_err(model(x, context), expected, norm="max") < RTOL
    model.unfuse_qkv_projections()
    assert not model.attn.fused_projections and "attn.to_qkv.weight" not in model.state_dict()
    assert all(type(p) is dap.AttnProcessor2_0 for p in model.attn_processors.values())
    model.set_attn_processor(SlicedAttnProcessor(1))  # fastunet's processors stay, on the fused weights
    model.fuse_qkv_projections()
    assert all(type(p) is SlicedAttnProcessor for p in model.attn_processors.values())
    with torch.no_grad():
        assert rel_err(model(x, context), expected, norm="max") < RTOL


def test_mixin_set_attention_slice_errors():
    model = TwoLayerModel()  # sliceable head counts [4, 2]
    with pytest.raises(ValueError, match="You have provided 3, but .* has 2 different attention layers. Make sure "
                                         "to match `len\\(slice_size\\)` to be 2."):
        model.set_attention_slice([1, 1, 1])
    with pytest.raises(ValueError, match="size 3 has to be smaller or equal to 2."):
        model.set_attention_slice(3)
    with pytest.raises(ValueError, match="slice_size must be 'auto', 'max', an int or a list; got 'half'"):
        model.set_attention_slice("half")
    model.set_attention_slice([None, 2])
    assert isinstance(model.attn.processor, TritonAttnProcessor)
    assert model.blocks[0]["cross"].processor.slice_size == 2


def _tiny_diffusers_unet():
    return DiffusersUNet2DCondition(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=8,
    )


@pytest.mark.parametrize("slice_size", ["auto", "max", 1, "list"])
def test_mixin_slicing_follows_diffusers_order(slice_size):
    """Our AttentionMixin driving a genuine diffusers UNet slices each layer as diffusers itself does."""
    theirs, ours = _tiny_diffusers_unet(), _tiny_diffusers_unet()
    assert list(AttentionMixin.attn_processors.fget(ours)) == list(theirs.attn_processors)
    if slice_size == "list":  # a different size per layer, in diffusers' layer order
        heads = [m.heads for m in theirs.modules() if isinstance(m, dap.Attention)]
        slice_size = [max(1, h - i % 3) for i, h in enumerate(heads)]
    theirs.set_attention_slice(slice_size)
    AttentionMixin.set_attention_slice(ours, slice_size)
    sizes = [p.slice_size for p in theirs.attn_processors.values()]
    assert [p.slice_size for p in ours.attn_processors.values()] == sizes
    assert len(set(sizes)) > 1 or slice_size in ("max", 1)
