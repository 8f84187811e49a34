"""The one UNet skeleton that the 2-D, conditional and video UNets share.

:class:`UNetSkeleton` is a ``ModelMixin`` + ``AttentionMixin`` that holds what every diffusers UNet
does the same way, so that each model file adds only what is its own:

* construction: the channel plan of the down and up blocks (:meth:`_build_down_blocks`,
  :meth:`_build_up_blocks`: widths, ``add_downsample``/``add_upsample``, ``resolution_idx``), the class
  embedding (:func:`class_embedding`) and the output norm;
* forward: the time embedding (:meth:`_embed_time`), class labels (:meth:`_embed_class`), and
  :meth:`_run_blocks` -- :meth:`_stem` (``conv_in``), down blocks keeping skip connections (T2I-Adapter residuals
  inside, ControlNet residuals on the skips), the mid block (+ ControlNet residual), up blocks popping
  the skips (with FreeU on the pairs), and :meth:`_output` (``conv_out(act(conv_norm_out(h)))``);
* feature switches: ``enable_freeu`` / ``disable_freeu`` and ``enable_forward_chunking`` /
  ``disable_forward_chunking``.

Every block is called the same way, ``block(h, context=ctx)`` with one :class:`BlockContext`; a
video model builds that context with ``num_frames`` and runs the same loop on ``(B * F, C, H, W)``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from ..layers.embeddings import TimestepEmbedding, timesteps_to_tensor
from ..layers.freeu import FreeUConfig, apply_freeu
from ..layers.normalization import norm_act
from ..modeling import AttentionMixin, ModelMixin
from .blocks import BlockContext, UpBlock


def _freeu_step(resolution_idx: int, config: FreeUConfig, hidden_states: torch.Tensor,
                res_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FreeU on one (backbone, skip) pair of an up block."""
    scaled, filtered = apply_freeu(resolution_idx, hidden_states, res_hidden_states, config)
    if res_hidden_states is hidden_states:
        # Without a mid block the first skip is the backbone tensor itself. diffusers scales the
        # backbone in place, so that skip is filtered after the scaling; reproduced without mutation.
        filtered = apply_freeu(resolution_idx, scaled, scaled, config)[1]
    return scaled, filtered


def class_embedding(class_embed_type: str | None, num_class_embeds: int | None, time_embed_dim: int,
                    timestep_input_dim: int, act_fn: str = "silu",
                    projection_dim: int | None = None) -> nn.Module | None:
    """diffusers' ``class_embedding`` module for ``class_embed_type`` (``None``: an ``nn.Embedding``
    table when ``num_class_embeds`` is set, else no class embedding)."""
    if class_embed_type is None:
        return nn.Embedding(num_class_embeds, time_embed_dim) if num_class_embeds is not None else None
    if class_embed_type == "timestep":
        return TimestepEmbedding(timestep_input_dim, time_embed_dim, act_fn=act_fn)
    if class_embed_type == "identity":
        return nn.Identity()
    if class_embed_type in ("projection", "simple_projection"):
        if projection_dim is None:
            raise ValueError(f"class_embed_type={class_embed_type!r} needs projection_class_embeddings_input_dim;"
                             " got None")
        if class_embed_type == "projection":
            return TimestepEmbedding(projection_dim, time_embed_dim)
        return nn.Linear(projection_dim, time_embed_dim)
    raise ValueError(f"class_embed_type must be None, 'timestep', 'identity', 'projection' or "
                     f"'simple_projection'; got {class_embed_type!r}")


class UNetSkeleton(ModelMixin, AttentionMixin):
    """The shared body of fastunet's UNets (see the module docstring).

    A subclass builds ``conv_in``, ``time_proj``, ``time_embedding``, ``class_embedding`` (or None),
    ``down_blocks`` / ``mid_block`` / ``up_blocks`` (with :meth:`_build_down_blocks` and
    :meth:`_build_up_blocks`), ``conv_norm_out`` (or None), its activation name ``_out_act`` and
    ``conv_out``, and calls :meth:`_run_blocks` from its ``forward``.
    """

    _freeu: FreeUConfig | None = None

    # -- construction --------------------------------------------------------------------------------

    @staticmethod
    def _check_block_plan(down_block_types: Sequence[str], up_block_types: Sequence[str],
                          block_out_channels: Sequence[int]) -> int:
        """The number of blocks, after checking that the three per-block lists agree on it."""
        num_blocks = len(down_block_types)
        if len(up_block_types) != num_blocks:
            raise ValueError(f"down_block_types and up_block_types must have the same length; got "
                             f"{len(down_block_types)} and {len(up_block_types)}")
        if len(block_out_channels) != num_blocks:
            raise ValueError(f"block_out_channels must have one entry per down block ({num_blocks}); got "
                             f"{len(block_out_channels)}: {list(block_out_channels)}")
        return num_blocks

    @staticmethod
    def _down_plan(block_out_channels: Sequence[int]) -> Iterator[tuple[int, int, int, bool]]:
        """``(index, in_channels, out_channels, is_final)`` of each down block."""
        output_channel = block_out_channels[0]
        for i, width in enumerate(block_out_channels):
            input_channel, output_channel = output_channel, width
            yield i, input_channel, output_channel, i == len(block_out_channels) - 1

    @staticmethod
    def _up_plan(block_out_channels: Sequence[int]) -> Iterator[tuple[int, int, int, int, bool]]:
        """``(index, prev_output_channel, out_channels, skip in_channels, is_final)`` of each up block."""
        reversed_channels = list(reversed(block_out_channels))
        output_channel = reversed_channels[0]
        for i, width in enumerate(reversed_channels):
            prev_output_channel, output_channel = output_channel, width
            input_channel = reversed_channels[min(i + 1, len(reversed_channels) - 1)]
            yield i, prev_output_channel, output_channel, input_channel, i == len(reversed_channels) - 1

    def _build_down_blocks(self, build: Callable[..., nn.Module], block_types: Sequence[str],
                           block_out_channels: Sequence[int], per_block: Callable[[int, int], dict[str, Any]],
                           **common) -> nn.ModuleList:
        """``build(type, in_channels=, out_channels=, add_downsample=, **per_block(i, out), **common)`` for
        each down block."""
        return nn.ModuleList(
            build(block_types[i], in_channels=cin, out_channels=cout, add_downsample=not final,
                  **per_block(i, cout), **common)
            for i, cin, cout, final in self._down_plan(block_out_channels))

    def _build_up_blocks(self, build: Callable[..., nn.Module], block_types: Sequence[str],
                         block_out_channels: Sequence[int], per_block: Callable[[int, int], dict[str, Any]],
                         **common) -> nn.ModuleList:
        """``build(type, in_channels=, out_channels=, prev_output_channel=, add_upsample=,
        resolution_idx=, **per_block(i, out), **common)`` for each up block (``i`` counts from the
        lowest resolution)."""
        return nn.ModuleList(
            build(block_types[i], in_channels=cin, out_channels=cout, prev_output_channel=prev,
                  add_upsample=not final, resolution_idx=i, **per_block(i, cout), **common)
            for i, prev, cout, cin, final in self._up_plan(block_out_channels))

    # -- forward pieces ------------------------------------------------------------------------------

    def _embed_time(self, sample: torch.Tensor, timestep, timestep_cond: torch.Tensor | None = None, *,
                    dtype: torch.dtype | None = None, scalar_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``time_embedding(time_proj(t), timestep_cond)`` for a batch of ``sample.shape[0]``."""
        if timestep_cond is not None and getattr(self.time_embedding, "cond_proj", None) is None:
            raise ValueError("timestep_cond was given but the model has no time_cond_proj_dim (cond_proj)")
        extra = {} if scalar_dtype is None else {"scalar_dtype": scalar_dtype}
        timesteps = timesteps_to_tensor(timestep, sample.shape[0], sample.device, **extra)
        t_emb = self.time_proj(timesteps).to(dtype or sample.dtype)
        if timestep_cond is None:
            return self.time_embedding(t_emb)
        return self.time_embedding(t_emb, timestep_cond)

    def _embed_class(self, class_labels: torch.Tensor | None, batch: int, dtype: torch.dtype, *,
                     strict: bool = False) -> torch.Tensor | None:
        """The class embedding of ``class_labels`` (``None`` when the model has none). ``strict``
        refuses labels for a model without a class embedding and labels of the wrong batch."""
        if self.class_embedding is None:
            if strict and class_labels is not None:
                raise ValueError("class_labels were given but the model has no class embedding (set class_embed_type "
                                 "or num_class_embeds)")
            return None
        if class_labels is None:
            raise ValueError(f"class_labels are required: the model has a class embedding "
                             f"(class_embed_type={self.config.class_embed_type!r}, "
                             f"num_class_embeds={self.config.num_class_embeds!r})")
        if strict and (not isinstance(class_labels, torch.Tensor) or class_labels.dim() == 0
                       or class_labels.shape[0] != batch):
            shape = tuple(class_labels.shape) if isinstance(class_labels, torch.Tensor) else type(class_labels).__name__
            raise ValueError(f"class_labels must be a tensor with one entry per sample (batch {batch}); got {shape}")
        if self.config.class_embed_type == "timestep":
            class_labels = self.time_proj(class_labels).to(dtype)
        return self.class_embedding(class_labels).to(dtype)

    def _run_blocks(self, sample: torch.Tensor, context: BlockContext, *,
                    down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
                    mid_block_additional_residual: torch.Tensor | None = None,
                    down_intrablock_additional_residuals: Sequence[torch.Tensor] | None = None,
                    forward_upsample_size: bool = False,
                    skip_sample: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``conv_in`` -> down -> mid -> up, returning ``(hidden_states, skip_sample)`` before the output
        norm (``skip_sample``: the NCSN++ skip image, or None).

        ``down_block_additional_residuals`` (one per skip connection) + ``mid_block_additional_residual``:
        ControlNet; ``down_intrablock_additional_residuals``: T2I-Adapter features added inside the down
        blocks (and one more after the mid block when its shape matches, as for T2I-Adapter-XL).
        ``forward_upsample_size``: give each up block the size of the next skip (inputs whose sides
        are not multiples of the total downsampling).
        """
        adapter = None if down_intrablock_additional_residuals is None else list(down_intrablock_additional_residuals)
        sample = self._stem(sample, context)
        skips: tuple[torch.Tensor, ...] = (sample,)
        for block in self.down_blocks:
            residual = adapter.pop(0) if adapter and block.has_cross_attention else None
            out = block(sample, context=context, skip_sample=skip_sample, additional_residuals=residual)
            sample, res_samples = out[0], out[1]
            if block.skip:
                skip_sample = out[2]
            if adapter and residual is None:
                # diffusers adds in place here, so the block's last skip (the same tensor) gets it too
                sample = sample + adapter.pop(0)
                res_samples = (*res_samples[:-1], sample)
            skips += tuple(res_samples)

        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals must have one tensor per skip connection "
                                 f"({len(skips)}); got {len(down_block_additional_residuals)}")
            for i, (skip, residual) in enumerate(zip(skips, down_block_additional_residuals)):
                if residual.shape != skip.shape:
                    raise ValueError(f"down_block_additional_residuals[{i}] must have the shape of skip connection "
                                     f"{i}, {tuple(skip.shape)}; got {tuple(residual.shape)}")
            skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals))

        if self.mid_block is not None:
            sample = self.mid_block(sample, context=context)
            if adapter and sample.shape == adapter[0].shape:  # T2I-Adapter-XL
                sample = sample + adapter.pop(0)
        if mid_block_additional_residual is not None:
            if mid_block_additional_residual.shape != sample.shape:
                raise ValueError(f"mid_block_additional_residual must have the mid block's output shape "
                                 f"{tuple(sample.shape)}; got {tuple(mid_block_additional_residual.shape)}")
            sample = sample + mid_block_additional_residual

        skip_sample = None
        for i, block in enumerate(self.up_blocks):
            count = len(block.resnets)
            skips, res_samples = skips[:-count], skips[-count:]
            upsample_size = skips[-1].shape[2:] if forward_upsample_size and i < len(self.up_blocks) - 1 else None
            out = block(sample, res_samples, upsample_size=upsample_size, context=context, skip_sample=skip_sample)
            if block.skip:
                sample, skip_sample = out
            else:
                sample = out
        return sample, skip_sample

    def _stem(self, sample: torch.Tensor, context: BlockContext) -> torch.Tensor:
        """What runs before the first down block: ``conv_in``."""
        return self.conv_in(sample)

    def _output(self, sample: torch.Tensor) -> torch.Tensor:
        """``conv_out(act(conv_norm_out(h)))``, the norm and activation in one ``group_norm_act`` call."""
        if self.conv_norm_out is not None:
            sample = norm_act(self.conv_norm_out, sample, self._out_act)
        return self.conv_out(sample)

    # -- feature switches ----------------------------------------------------------------------------

    @property
    def freeu(self) -> FreeUConfig | None:
        """The FreeU scales in force, or ``None``."""
        return self._freeu

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU (https://huggingface.co/papers/2309.11497) on up stages 0 and 1: backbone features
        scaled by ``b1``/``b2`` (first half of the channels), skip features' low frequencies by ``s1``/``s2``.
        As in diffusers, FreeU only acts when all four values are non-zero."""
        self._set_freeu(FreeUConfig(s1=s1, s2=s2, b1=b1, b2=b2))

    def disable_freeu(self) -> None:
        """Turn FreeU off."""
        self._set_freeu(None)

    def _set_freeu(self, config: FreeUConfig | None) -> None:
        self._freeu = config
        active = config is not None and all((config.s1, config.s2, config.b1, config.b2))
        for block in self.up_blocks:
            # diffusers applies FreeU in the plain and cross-attention up blocks only
            if isinstance(block, UpBlock) and block.supports_freeu:
                block.set_freeu(functools.partial(_freeu_step, block.resolution_idx, config) if active else None)

    def enable_forward_chunking(self, chunk_size: int | None = None, dim: int = 0) -> None:
        """Run every transformer feed-forward on slices of ``chunk_size`` (default 1) along ``dim``
        (0: batch, 1: tokens); same result, lower peak memory."""
        if dim not in (0, 1):
            raise ValueError(f"dim must be 0 (batch) or 1 (tokens); got {dim!r}")
        self._set_chunk_feed_forward(chunk_size or 1, dim)

    def disable_forward_chunking(self) -> None:
        self._set_chunk_feed_forward(None, 0)

    def _set_chunk_feed_forward(self, chunk_size: int | None, dim: int) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "set_chunk_feed_forward"):
                module.set_chunk_feed_forward(chunk_size, dim)


__all__ = ["UNetSkeleton", "class_embedding"]
