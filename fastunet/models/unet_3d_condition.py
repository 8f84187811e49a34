"""``UNet3DConditionModel``: the text-to-video UNet of ModelScope / zeroscope, with diffusers'
constructor arguments, forward signature, outputs and state-dict names.

It is the UNet skeleton of :mod:`fastunet.models._unet` run on the frames as a batch::

    h = sample (B, C, F, H, W) -> (B*F, C, H, W);   emb, context repeated per frame
    h = transformer_in(conv_in(h))                  # a temporal transformer right after the stem
    down -> mid -> up                               # 3-D blocks: resnet, temp_conv, attention, temp_attention
    out = conv_out(silu(conv_norm_out(h))) -> (B, out_channels, F, H, W)

The temporal layers (``TemporalConvLayer``, ``TransformerTemporalModel``) read the ``(B*F, C, H, W)``
memory through strided views instead of copying it into ``(B, C, F, H, W)``. diffusers' quirks are
kept: ``attention_head_dim`` is the number of heads of each block (``num_attention_heads`` is refused,
as diffusers refuses it), ``class_labels`` and ``attention_mask`` are accepted and reach no layer, and
FreeU acts on the ``(B*F, ...)`` skips.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..configuration import register_to_config
from ..layers.attention import mask_to_bias
from ..layers.embeddings import TimestepEmbedding, Timesteps
from ..layers.transformer_temporal import TransformerTemporalModel
from ..outputs import ModelOutput
from ._unet import UNetSkeleton, check_mapping, check_tensor
from .blocks import BlockContext
from .unet_3d_blocks import UNET_3D_BLOCKS


@dataclass
class UNet3DConditionOutput(ModelOutput):
    """``sample``: ``(B, out_channels, F, H, W)``."""

    sample: torch.Tensor


class UNet3DConditionModel(UNetSkeleton):
    """Conditional 3-D UNet ``(B, in_channels, F, H, W) -> (B, out_channels, F, H, W)`` (see the module
    docstring); constructor arguments are diffusers'."""

    # diffusers' class says False; fastunet's blocks implement checkpointing (same gradients, tested)
    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["norm", "time_embedding"]

    @register_to_config
    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        down_block_types: Sequence[str] = ("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D",
                                           "DownBlock3D"),
        up_block_types: Sequence[str] = ("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D",
                                         "CrossAttnUpBlock3D"),
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1024,
        attention_head_dim: int | Sequence[int] = 64,
        num_attention_heads: int | Sequence[int] | None = None,
        time_cond_proj_dim: int | None = None,
    ):
        super().__init__()
        self.sample_size = sample_size
        if num_attention_heads is not None:
            raise NotImplementedError(
                "UNet3DConditionModel: num_attention_heads cannot be set, as in diffusers (attention_head_dim holds "
                f"the number of heads of each block); got num_attention_heads={num_attention_heads!r}")
        num_blocks = self._check_block_plan(down_block_types, up_block_types, block_out_channels)
        if isinstance(attention_head_dim, int):
            heads = [attention_head_dim] * num_blocks
        elif len(attention_head_dim) != num_blocks:
            raise ValueError(f"attention_head_dim must be an int or have one entry per down block ({num_blocks}); "
                             f"got {list(attention_head_dim)}")
        else:
            heads = list(attention_head_dim)
        if norm_num_groups is None:
            raise ValueError("norm_num_groups=None is not supported: the UNet's resnets and temporal layers need "
                             "GroupNorm groups (diffusers fails on it too); got None")
        if not isinstance(layers_per_block, int) or layers_per_block < 1:
            raise ValueError(f"layers_per_block must be a positive int; got {layers_per_block!r}")
        base = block_out_channels[0]

        self.conv_in = nn.Conv2d(in_channels, base, kernel_size=3, padding=1)
        time_embed_dim = base * 4
        self.time_proj = Timesteps(base, True, 0)
        self.time_embedding = TimestepEmbedding(base, time_embed_dim, act_fn=act_fn, cond_proj_dim=time_cond_proj_dim)
        self.class_embedding = None
        self.transformer_in = TransformerTemporalModel(num_attention_heads=8, attention_head_dim=attention_head_dim,
                                                       in_channels=base, num_layers=1, norm_num_groups=norm_num_groups)

        common = dict(temb_channels=time_embed_dim, resnet_eps=norm_eps, resnet_act_fn=act_fn,
                      resnet_groups=norm_num_groups, cross_attention_dim=cross_attention_dim,
                      dual_cross_attention=False, use_linear_projection=True)
        self.down_blocks = self._build_down_blocks(
            UNET_3D_BLOCKS.down, down_block_types, block_out_channels,
            lambda i, channels: dict(num_attention_heads=heads[i]), num_layers=layers_per_block,
            downsample_padding=downsample_padding, **common)
        self.up_blocks = nn.ModuleList()
        self.mid_block = UNET_3D_BLOCKS.mid("UNetMidBlock3DCrossAttn", in_channels=block_out_channels[-1],
                                            output_scale_factor=mid_block_scale_factor,
                                            num_attention_heads=heads[-1], **common)
        self.up_blocks = self._build_up_blocks(
            UNET_3D_BLOCKS.up, up_block_types, block_out_channels,
            lambda i, channels: dict(num_attention_heads=heads[num_blocks - 1 - i]),
            num_layers=layers_per_block + 1, **common)
        self.num_upsamplers = num_blocks - 1

        self.conv_norm_out = nn.GroupNorm(num_channels=base, num_groups=norm_num_groups, eps=norm_eps)
        self.conv_act = nn.SiLU()
        self._out_act = "silu"
        self.conv_out = nn.Conv2d(base, out_channels, kernel_size=3, padding=1)

    def _stem(self, sample: torch.Tensor, context: BlockContext) -> torch.Tensor:
        sample = self.conv_in(sample)
        return self.transformer_in(sample, num_frames=context.num_frames,
                                   cross_attention_kwargs=context.cross_attention_kwargs, return_dict=False)[0]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet3DConditionOutput | tuple:
        """Denoise ``sample`` ``(B, in_channels, F, H, W)`` at ``timestep`` given ``encoder_hidden_states``
        ``(B, M, cross_attention_dim)`` (or ``(B*F, M, D)``, one per frame).

        ``down_block_additional_residuals`` / ``mid_block_additional_residual``: ControlNet outputs in the
        frames-as-batch layout ``(B*F, C, h, w)``. ``class_labels`` and ``attention_mask`` are accepted and
        unused, as in diffusers. Returns :class:`UNet3DConditionOutput` or ``(sample,)``.
        """
        batch, num_frames = self._check_inputs(sample, encoder_hidden_states)
        check_mapping("cross_attention_kwargs", cross_attention_kwargs)
        if attention_mask is not None:
            check_tensor("attention_mask", attention_mask, sample.device)
        forward_upsample_size = any(size % 2**self.num_upsamplers for size in sample.shape[-2:])
        attention_mask = mask_to_bias(attention_mask, sample.dtype)

        emb = self._embed_time(sample, timestep, timestep_cond, dtype=self.dtype)
        emb = emb.repeat_interleave(num_frames, dim=0)
        if encoder_hidden_states.shape[0] == batch:
            encoder_hidden_states = encoder_hidden_states.repeat_interleave(num_frames, dim=0)
        context = BlockContext(temb=emb, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                               cross_attention_kwargs=cross_attention_kwargs, num_frames=num_frames)

        frames = sample.transpose(1, 2).reshape(batch * num_frames, *sample.shape[1:2], *sample.shape[3:])
        hidden, _ = self._run_blocks(frames, context, down_block_additional_residuals=down_block_additional_residuals,
                                     mid_block_additional_residual=mid_block_additional_residual,
                                     forward_upsample_size=forward_upsample_size)
        out = self._output(hidden)
        out = out.reshape(batch, num_frames, *out.shape[1:]).transpose(1, 2)
        return UNet3DConditionOutput(sample=out) if return_dict else (out,)

    def _check_inputs(self, sample: torch.Tensor, encoder_hidden_states: torch.Tensor) -> tuple[int, int]:
        self._check_sample_layout(sample, "(B, C, F, H, W)", self.config.in_channels)
        batch, num_frames = sample.shape[0], sample.shape[2]
        width = self.config.cross_attention_dim
        if not torch.is_tensor(encoder_hidden_states):
            raise TypeError(f"encoder_hidden_states must be a ({batch}, M, {width}) or ({batch * num_frames}, M, "
                            f"{width}) torch.Tensor; got {type(encoder_hidden_states).__name__}")
        if encoder_hidden_states.dim() != 3:
            raise ValueError(f"encoder_hidden_states must be ({batch}, M, {width}) or ({batch * num_frames}, M, "
                             f"{width}); got {tuple(encoder_hidden_states.shape)}")
        if (encoder_hidden_states.shape[0] not in (batch, batch * num_frames)
                or encoder_hidden_states.shape[-1] != width):
            raise ValueError(f"encoder_hidden_states must be ({batch}, M, {width}) for a batch of {batch} videos, or "
                             f"({batch * num_frames}, M, {width}) with one per frame ({num_frames} frames); got "
                             f"{tuple(encoder_hidden_states.shape)}")
        check_tensor("encoder_hidden_states", encoder_hidden_states, sample.device, sample.dtype)
        return batch, num_frames


__all__ = ["UNet3DConditionModel", "UNet3DConditionOutput"]
