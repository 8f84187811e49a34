"""``UNet2DConditionModel``: the text-conditioned UNet of Stable Diffusion 1.x / 2.x / XL, LCM and
their fine-tunes, with diffusers' constructor arguments, forward signature, outputs and state-dict
names, on fastunet's fused kernels.

Data flow of ``forward(sample (B, in_channels, H, W), timestep, encoder_hidden_states (B, M, D))``::

    emb = time_embedding(time_proj(t), timestep_cond) [+ class_embedding(class_labels)]
          [+ add_embedding(text_embeds ++ add_time_proj(time_ids))] [-> time_embed_act]
    h = conv_in(sample)                                  skips = [h]
    for block in down_blocks:  h, s = block(h, emb, context)   skips += s   (+ T2I-Adapter residuals)
    skips += ControlNet down residuals;  h = mid_block(h, emb, context) (+ ControlNet mid residual)
    for block in up_blocks:    h = block(h, pop(skips), emb, context)       (FreeU on stages 0, 1)
    out = conv_out(act(GroupNorm(h)))                    # one group_norm_act call

The blocks come from the registry in :mod:`fastunet.models.unet_2d_condition_blocks`; every
GroupNorm+activation runs as one ``group_norm_act`` call and attention through the default
``TritonAttnProcessor``. Options diffusers has but no SD-family UNet uses (``dual_cross_attention``,
GLIGEN ``attention_type``, Kandinsky's image embeddings, ``addition_embed_type="text"``) raise
``NotImplementedError``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..configuration import register_to_config, reject_unsupported
from ..layers.activations import get_activation
from ..layers.attention import mask_to_bias
from ..layers.embeddings import (GaussianFourierProjection, ImageProjection, MultiIPAdapterImageProjection,
                                 TimestepEmbedding, Timesteps)
from ..loaders import PeftAdapterMixin, UNet2DConditionLoadersMixin, scales_lora
from ..outputs import ModelOutput
from ._unet import UNetSkeleton, check_mapping, check_tensor, class_embedding
from .blocks import BlockContext
from .unet_2d_condition_blocks import UNET_2D_CONDITION_BLOCKS


@dataclass
class UNet2DConditionOutput(ModelOutput):
    """``sample``: ``(B, out_channels, H, W)``. Like diffusers' outputs it also reads as ``out[0]``,
    ``out["sample"]`` and ``out.to_tuple()``."""

    sample: torch.Tensor


def _per_block(value, count: int, name: str, scalar_types=(int,)) -> list:
    """A scalar repeated ``count`` times, or a sequence of exactly ``count`` entries, as a list."""
    if value is None or isinstance(value, scalar_types):
        return [value] * count
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(f"{name} must be a single value or a sequence of {count} (one per block); got {value!r}")
    if len(value) != count:
        raise ValueError(f"{name} must have one entry per down block ({count}); got {len(value)}: {list(value)}")
    return list(value)


class UNet2DConditionModel(UNetSkeleton, UNet2DConditionLoadersMixin, PeftAdapterMixin):
    """Conditional 2-D UNet ``(B, in_channels, H, W) -> (B, out_channels, H, W)`` (see the module
    docstring). Constructor arguments are diffusers'; as in diffusers, ``attention_head_dim`` is the
    number of heads of the cross-attention blocks (each head has ``channels // heads`` features);
    ``num_attention_heads``, which diffusers refuses, overrides it here when given.

    Feature switches are methods: ``enable_freeu``/``disable_freeu``, ``enable_forward_chunking``/
    ``disable_forward_chunking``, ``set_attention_slice``, ``set_attn_processor``,
    ``fuse_qkv_projections``, ``enable_gradient_checkpointing``.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["BasicTransformerBlock", "ResnetBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    _skip_layerwise_casting_patterns = ["norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: Sequence[str] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                           "DownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        up_block_types: Sequence[str] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                         "CrossAttnUpBlock2D"),
        only_cross_attention: bool | Sequence[bool] = False,
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        layers_per_block: int | Sequence[int] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        dropout: float = 0.0,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int | Sequence[int] = 1280,
        transformer_layers_per_block: int | Sequence[int] | Sequence[Sequence[int]] = 1,
        reverse_transformer_layers_per_block: Sequence[Sequence[int]] | None = None,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | Sequence[int] = 8,
        num_attention_heads: int | Sequence[int] | None = None,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        resnet_skip_time_act: bool = False,
        resnet_out_scale_factor: float = 1.0,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        time_embedding_act_fn: str | None = None,
        timestep_post_act: str | None = None,
        time_cond_proj_dim: int | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        projection_class_embeddings_input_dim: int | None = None,
        attention_type: str = "default",
        class_embeddings_concat: bool = False,
        mid_block_only_cross_attention: bool | None = None,
        cross_attention_norm: str | None = None,
        addition_embed_type_num_heads: int = 64,
    ):
        super().__init__()
        self.sample_size = sample_size
        num_blocks = self._check_block_plan(down_block_types, up_block_types, block_out_channels)
        if dual_cross_attention:
            raise NotImplementedError("UNet2DConditionModel: dual_cross_attention=True (DualTransformer2DModel, "
                                      "Versatile Diffusion) is not supported by fastunet")
        reject_unsupported("UNet2DConditionModel", "attention_type", attention_type, ("default",))
        reject_unsupported("UNet2DConditionModel", "addition_embed_type", addition_embed_type, (None, "text_time"))
        if norm_num_groups is None:
            raise ValueError("norm_num_groups=None is not supported: the UNet's ResnetBlock2D, Transformer2DModel "
                             "and conv_norm_out need GroupNorm groups (diffusers fails on it too); got None")

        # diffusers' naming quirk: attention_head_dim holds the number of heads unless num_attention_heads is set
        heads = _per_block(num_attention_heads if num_attention_heads is not None else attention_head_dim,
                           num_blocks, "num_attention_heads" if num_attention_heads is not None
                           else "attention_head_dim")
        head_dims = _per_block(attention_head_dim, num_blocks, "attention_head_dim")
        cross_dims = _per_block(cross_attention_dim, num_blocks, "cross_attention_dim")
        only_cross = _per_block(only_cross_attention, num_blocks, "only_cross_attention", (bool,))
        layers = _per_block(layers_per_block, num_blocks, "layers_per_block")
        transformer_layers = _per_block(transformer_layers_per_block, num_blocks, "transformer_layers_per_block")
        if reverse_transformer_layers_per_block is None:
            if any(not isinstance(n, int) for n in transformer_layers):
                raise ValueError("transformer_layers_per_block with per-layer lists needs "
                                 "reverse_transformer_layers_per_block for the up blocks; got None")
            reverse_transformer_layers = list(reversed(transformer_layers))
        else:
            reverse_transformer_layers = _per_block(reverse_transformer_layers_per_block, num_blocks,
                                                    "reverse_transformer_layers_per_block")
        if isinstance(only_cross_attention, bool) and mid_block_only_cross_attention is None:
            mid_block_only_cross_attention = only_cross_attention
        mid_block_only_cross_attention = bool(mid_block_only_cross_attention)

        # input
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], conv_in_kernel,
                                 padding=(conv_in_kernel - 1) // 2)

        # time, class and added embeddings
        if time_embedding_type == "fourier":
            time_embed_dim = time_embedding_dim or block_out_channels[0] * 2
            if time_embed_dim % 2 != 0:
                raise ValueError(f"time_embedding_type='fourier' needs an even time_embed_dim; got {time_embed_dim}")
            self.time_proj = GaussianFourierProjection(time_embed_dim // 2, set_W_to_weight=False, log=False,
                                                       flip_sin_to_cos=flip_sin_to_cos)
            timestep_input_dim = time_embed_dim
        elif time_embedding_type == "positional":
            time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
            self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
            timestep_input_dim = block_out_channels[0]
        else:
            raise ValueError(f"time_embedding_type must be 'positional' or 'fourier'; got {time_embedding_type!r}")
        self.time_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim, act_fn=act_fn,
                                                post_act_fn=timestep_post_act, cond_proj_dim=time_cond_proj_dim)

        if encoder_hid_dim_type is None and encoder_hid_dim is not None:
            encoder_hid_dim_type = "text_proj"  # diffusers' default when only encoder_hid_dim is given
        if encoder_hid_dim_type is not None and encoder_hid_dim is None:
            raise ValueError(f"encoder_hid_dim_type={encoder_hid_dim_type!r} needs encoder_hid_dim; got None")
        reject_unsupported("UNet2DConditionModel", "encoder_hid_dim_type", encoder_hid_dim_type,
                           (None, "text_proj", "ip_image_proj"))
        if encoder_hid_dim_type == "text_proj":
            self.encoder_hid_proj = nn.Linear(encoder_hid_dim, cross_attention_dim)
        elif encoder_hid_dim_type == "ip_image_proj":
            self.encoder_hid_proj = ImageProjection(image_embed_dim=encoder_hid_dim,
                                                    cross_attention_dim=cross_attention_dim)
        else:
            self.encoder_hid_proj = None

        self.class_embedding = class_embedding(class_embed_type, num_class_embeds, time_embed_dim,
                                               timestep_input_dim, act_fn, projection_class_embeddings_input_dim)
        if addition_embed_type == "text_time":
            if addition_time_embed_dim is None or projection_class_embeddings_input_dim is None:
                raise ValueError(
                    "addition_embed_type='text_time' needs addition_time_embed_dim and "
                    f"projection_class_embeddings_input_dim; got {addition_time_embed_dim!r} and "
                    f"{projection_class_embeddings_input_dim!r}")
            self.add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift)
            self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)
        self.time_embed_act = get_activation(time_embedding_act_fn)
        blocks_temb_dim = 2 * time_embed_dim if class_embeddings_concat else time_embed_dim

        common = dict(temb_channels=blocks_temb_dim, resnet_eps=norm_eps, resnet_act_fn=act_fn,
                      resnet_groups=norm_num_groups, dual_cross_attention=dual_cross_attention,
                      use_linear_projection=use_linear_projection, upcast_attention=upcast_attention,
                      resnet_time_scale_shift=resnet_time_scale_shift, attention_type=attention_type,
                      resnet_skip_time_act=resnet_skip_time_act, cross_attention_norm=cross_attention_norm,
                      dropout=dropout)

        # down_blocks and up_blocks are registered before mid_block, as in diffusers: the order of
        # attn_processors and of set_attention_slice's per-layer list follows it
        def down_args(i: int, channels: int) -> dict:
            return dict(num_layers=layers[i], transformer_layers_per_block=transformer_layers[i],
                        cross_attention_dim=cross_dims[i], num_attention_heads=heads[i],
                        only_cross_attention=only_cross[i],
                        attention_head_dim=head_dims[i] if head_dims[i] is not None else channels)

        def up_args(i: int, channels: int) -> dict:
            j = num_blocks - 1 - i
            return dict(num_layers=layers[j] + 1, transformer_layers_per_block=reverse_transformer_layers[i],
                        cross_attention_dim=cross_dims[j], num_attention_heads=heads[j],
                        only_cross_attention=only_cross[j],
                        # diffusers indexes attention_head_dim here without reversing it; kept for identical blocks
                        attention_head_dim=head_dims[i] if head_dims[i] is not None else channels)

        registry = UNET_2D_CONDITION_BLOCKS
        self.down_blocks = self._build_down_blocks(registry.down, down_block_types, block_out_channels, down_args,
                                                   downsample_padding=downsample_padding,
                                                   resnet_out_scale_factor=resnet_out_scale_factor, **common)
        self.up_blocks = nn.ModuleList()
        self.mid_block = registry.mid(
            mid_block_type, in_channels=block_out_channels[-1], output_scale_factor=mid_block_scale_factor,
            transformer_layers_per_block=transformer_layers[-1], num_attention_heads=heads[-1],
            cross_attention_dim=cross_dims[-1], **common)
        self.up_blocks = self._build_up_blocks(registry.up, up_block_types, block_out_channels, up_args,
                                               resnet_out_scale_factor=resnet_out_scale_factor, **common)
        self.num_upsamplers = num_blocks - 1

        # out
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=norm_eps)
        self.conv_act = get_activation(act_fn)
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, conv_out_kernel,
                                  padding=(conv_out_kernel - 1) // 2)
        self._out_act = act_fn

        self._context_dim = encoder_hid_dim if encoder_hid_dim_type == "text_proj" else None
        self._attention_context_dims = sorted({
            dim for block, dim in [*zip(self.down_blocks, cross_dims), (self.mid_block, cross_dims[-1]),
                                   *zip(self.up_blocks, reversed(cross_dims))]
            if block is not None and getattr(block, "has_cross_attention", False)})

    # -- forward -----------------------------------------------------------------------------------

    @scales_lora("cross_attention_kwargs")
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: Sequence[torch.Tensor] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DConditionOutput | tuple:
        """Predict noise (or v, or x0) for ``sample`` ``(B, in_channels, H, W)`` at ``timestep`` (int,
        float, 0-d or ``(B,)``/``(1,)`` tensor) given ``encoder_hidden_states`` ``(B, M, D)``.

        ``attention_mask`` / ``encoder_attention_mask``: ``(B, M)`` keep-masks (1 keep, 0 discard) for
        ``attn1`` / ``attn2``, turned into ``-10000`` biases. ``added_cond_kwargs``: ``text_embeds`` and
        ``time_ids`` for SDXL's ``text_time``, ``image_embeds`` (a list, one ``(B, images, D)`` tensor per
        adapter) for IP-Adapter; ``cross_attention_kwargs["scale"]`` scales the LoRA adapters for this call. ``down_block_additional_residuals`` (one per skip) and
        ``mid_block_additional_residual``: ControlNet outputs; ``down_intrablock_additional_residuals``:
        T2I-Adapter features added inside the down blocks. Returns ``UNet2DConditionOutput`` or ``(sample,)``.
        """
        self._check_inputs(sample, encoder_hidden_states, attention_mask, encoder_attention_mask)
        check_mapping("added_cond_kwargs", added_cond_kwargs)
        cross_attention_kwargs = self._prepare_cross_attention_kwargs(cross_attention_kwargs)
        forward_upsample_size = any(size % 2**self.num_upsamplers for size in sample.shape[-2:])
        attention_mask = mask_to_bias(attention_mask, sample.dtype)
        encoder_attention_mask = mask_to_bias(encoder_attention_mask, sample.dtype)

        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        # 1. embeddings
        emb = self._embed_time(sample, timestep, timestep_cond)
        # one label broadcasts over the batch as in diffusers, unless it is concatenated to the time embedding
        class_emb = self._embed_class(class_labels, sample.shape[0], sample.dtype, width=emb.shape[-1],
                                      broadcast=not self.config.class_embeddings_concat)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if self.config.class_embeddings_concat else emb + class_emb
        if self.config.addition_embed_type == "text_time":
            emb = emb + self._text_time_embedding(emb, added_cond_kwargs)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        encoder_hidden_states = self._project_encoder_states(encoder_hidden_states, added_cond_kwargs)
        context = BlockContext(temb=emb, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                               cross_attention_kwargs=cross_attention_kwargs,
                               encoder_attention_mask=encoder_attention_mask)

        # 2.-4. down, mid, up: ControlNet needs both residual kinds; down residuals alone are the
        # deprecated T2I-Adapter form
        is_controlnet = mid_block_additional_residual is not None and down_block_additional_residuals is not None
        adapter = down_intrablock_additional_residuals
        if adapter is None and mid_block_additional_residual is None and down_block_additional_residuals is not None:
            warnings.warn("passing T2I-Adapter residuals as down_block_additional_residuals is deprecated (as in "
                          "diffusers); use down_intrablock_additional_residuals", FutureWarning, stacklevel=2)
            adapter = down_block_additional_residuals
        sample, _ = self._run_blocks(
            sample, context, down_block_additional_residuals=down_block_additional_residuals if is_controlnet else None,
            mid_block_additional_residual=mid_block_additional_residual if is_controlnet else None,
            down_intrablock_additional_residuals=adapter, forward_upsample_size=forward_upsample_size)

        # 5. out
        sample = self._output(sample)
        return UNet2DConditionOutput(sample=sample) if return_dict else (sample,)

    # -- forward helpers ---------------------------------------------------------------------------

    def _check_inputs(self, sample, encoder_hidden_states, attention_mask, encoder_attention_mask) -> None:
        self._check_sample_layout(sample, "(B, C, H, W)", self.config.in_channels)
        batch, device = sample.shape[0], sample.device
        if encoder_hidden_states is None:
            if self._attention_context_dims:
                raise ValueError("encoder_hidden_states (B, M, D) is required: this UNet has cross-attention blocks")
        else:
            expected = self._context_dim
            if expected is None and len(self._attention_context_dims) == 1:
                expected = self._attention_context_dims[0]
            dim = expected if expected is not None else "D"
            if not isinstance(encoder_hidden_states, torch.Tensor):
                raise TypeError(f"encoder_hidden_states must be a ({batch}, M, {dim}) torch.Tensor; got "
                                f"{type(encoder_hidden_states).__name__}")
            if (encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != batch
                    or (expected is not None and encoder_hidden_states.shape[-1] != expected)):
                raise ValueError(f"encoder_hidden_states must be ({batch}, M, {dim}) for a batch of {batch} samples;"
                                 f" got {tuple(encoder_hidden_states.shape)}")
            check_tensor("encoder_hidden_states", encoder_hidden_states, device, sample.dtype)
        for name, mask in (("attention_mask", attention_mask), ("encoder_attention_mask", encoder_attention_mask)):
            if mask is None:
                continue
            check_tensor(name, mask, device)
            if mask.dim() != 2 or mask.shape[0] != batch:
                raise ValueError(f"{name} must be a ({batch}, tokens) keep-mask (1 keep, 0 discard); "
                                 f"got shape {tuple(mask.shape)}")

    @staticmethod
    def _prepare_cross_attention_kwargs(cross_attention_kwargs):
        check_mapping("cross_attention_kwargs", cross_attention_kwargs)
        if cross_attention_kwargs is None:
            return None
        kwargs = dict(cross_attention_kwargs)
        if kwargs.pop("gligen", None) is not None:
            raise NotImplementedError("GLIGEN (cross_attention_kwargs['gligen']) is not supported by fastunet")
        kwargs.pop("scale", None)  # a LoRA scale, applied (or warned about) by forward's scales_lora
        return kwargs

    def _project_encoder_states(self, encoder_hidden_states, added_cond_kwargs):
        """``encoder_hid_proj``: a text projection, or IP-Adapter's image projections, which make the
        encoder states the pair ``(text states, [image tokens per adapter])`` the IP-Adapter processors take."""
        projection = self.encoder_hid_proj
        if projection is None:
            return encoder_hidden_states
        if not isinstance(projection, (ImageProjection, MultiIPAdapterImageProjection)):
            return projection(encoder_hidden_states)
        if not added_cond_kwargs or "image_embeds" not in added_cond_kwargs:
            raise ValueError("this UNet has an IP-Adapter image projection (encoder_hid_proj); it needs "
                             "added_cond_kwargs={'image_embeds': [...]}; got "
                             f"{sorted(added_cond_kwargs) if added_cond_kwargs else added_cond_kwargs}")
        text_projection = getattr(self, "text_encoder_hid_proj", None)
        if text_projection is not None:
            encoder_hidden_states = text_projection(encoder_hidden_states)
        return encoder_hidden_states, projection(added_cond_kwargs["image_embeds"])
