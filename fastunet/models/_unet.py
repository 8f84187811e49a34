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
  ``disable_forward_chunking``;
* input validation: :func:`check_tensor`, :func:`check_timestep` and :func:`check_residuals` (also used
  by ``UNet1DModel``), and the checks of ``class_labels``, ``timestep_cond`` and SDXL's
  ``added_cond_kwargs``. A bad input raises ``TypeError`` (not a tensor, wrong dtype) or ``ValueError``
  (wrong shape, device or values) naming what was expected and what came, before the layer that would
  fail on it runs.

Every block is called the same way, ``block(h, context=ctx)`` with one :class:`BlockContext`; a
video model builds that context with ``num_frames`` and runs the same loop on ``(B * F, C, H, W)``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
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


# -- input validation ----------------------------------------------------------------------------------

# the dtypes torch.autocast computes in: under autocast an input of one of them meets weights of another
_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def input_device(model: nn.Module, first: nn.Module, weight: torch.Tensor) -> torch.device | None:
    """The device the inputs of ``model`` must be on: that of ``weight`` (a parameter of its first layer
    ``first``), or None when offloading hooks (accelerate's, diffusers') move the weights at call time."""
    hooked = lambda module: hasattr(module, "_hf_hook") or hasattr(module, "_diffusers_hook")  # noqa: E731
    if hooked(model) or hooked(first):
        return None
    if weight.device.type == "meta" and any(hooked(module) for module in model.modules()):
        return None  # sequential offloading keeps the weights on meta between calls
    return weight.device


def check_tensor(name: str, value: Any, device: torch.device | None,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """``value`` as a forward input of a model on ``device`` (None: any): ``TypeError`` unless it is a
    tensor (of ``dtype``, the weights' dtype, when given: outside ``torch.autocast`` a layer cannot mix
    them), ``ValueError`` unless it is on ``device``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on the model's device {device}; got a tensor on {value.device}")
    if dtype is not None and value.dtype != dtype:
        autocast = torch.is_autocast_enabled(value.device.type) and value.dtype in _AUTOCAST_DTYPES
        if not autocast:
            raise TypeError(f"{name} must have the model's dtype {dtype}; got {value.dtype} (cast it with "
                            f".to({dtype}), or run the model under torch.autocast)")
    return value


def check_mapping(name: str, value: Any) -> None:
    """``TypeError`` unless ``value`` is None or a dict-like of keyword arguments."""
    if value is not None and not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict or None; got {type(value).__name__}")


def check_timestep(timestep: Any, device: torch.device) -> None:
    """What ``timesteps_to_tensor`` cannot see coming: a timestep tensor it cannot copy to ``device``
    (a ``meta`` one holds no values), or of a complex dtype. Timesteps on another real device are fine:
    they are copied, as in diffusers."""
    if not isinstance(timestep, torch.Tensor):
        return
    if timestep.device.type == "meta" and device.type != "meta":
        raise ValueError(f"timestep must hold values the model on {device} can read; got a tensor on meta")
    if timestep.is_complex():
        raise TypeError(f"timestep must be real (an integer or floating-point tensor); got {timestep.dtype}")


def check_residuals(name: str, residuals: Any, device: torch.device | None) -> list[torch.Tensor] | None:
    """``residuals`` (a list or tuple of tensors on ``device``, or None) as a list."""
    if residuals is None:
        return None
    if not isinstance(residuals, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors; got {type(residuals).__name__}")
    for i, residual in enumerate(residuals):
        check_tensor(f"{name}[{i}]", residual, device)
    return list(residuals)


def check_ids(name: str, ids: torch.Tensor, count: int, what: str) -> None:
    """``ValueError`` unless every id of ``ids`` indexes a table of ``count`` rows (``what`` names the
    config value). It reads the values, so it is skipped while ``torch.compile`` traces."""
    if ids.numel() == 0 or torch.compiler.is_compiling() or ids.device.type == "meta":
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= count:
        raise ValueError(f"{name} must be ids in [0, {count}) ({what}={count}); got values from {low} to {high}")


def _batch_choices(batch: int, broadcast: bool) -> str:
    return f"{batch} (or 1, broadcast)" if broadcast and batch != 1 else f"{batch}"


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

    @property
    def _weights(self) -> torch.Tensor:
        """``conv_in.weight``: the dtype that the inputs must have."""
        return self.conv_in.weight

    @property
    def _input_device(self) -> torch.device | None:
        """The device that the inputs must be on (None: offloaded weights, any)."""
        return input_device(self, self.conv_in, self.conv_in.weight)

    def _check_sample_layout(self, sample: Any, layout: str, channels: int) -> torch.Tensor:
        """``sample`` as a ``layout`` tensor (``"(B, C, H, W)"``-like, one letter a dimension) with
        ``channels`` channels, of the model's device and dtype, without an empty dimension but the batch."""
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"sample must be a torch.Tensor {layout}; got {type(sample).__name__}")
        rank = layout.count(",") + 1
        if sample.dim() != rank or sample.shape[1] != channels:
            raise ValueError(f"sample must be a {layout.replace('C', str(channels), 1)} tensor; got "
                             f"{tuple(sample.shape)}")
        if 0 in sample.shape[2:]:
            raise ValueError(f"sample must be {layout} with every dimension after the channels at least 1; got "
                             f"{tuple(sample.shape)}")
        return check_tensor("sample", sample, self._input_device, self._weights.dtype)

    def _embed_time(self, sample: torch.Tensor, timestep, timestep_cond: torch.Tensor | None = None, *,
                    dtype: torch.dtype | None = None, scalar_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``time_embedding(time_proj(t), timestep_cond)`` for a batch of ``sample.shape[0]``."""
        cond_proj = getattr(self.time_embedding, "cond_proj", None)
        batch = sample.shape[0]
        if timestep_cond is not None:
            if cond_proj is None:
                raise ValueError("timestep_cond was given but the model has no time_cond_proj_dim (cond_proj)")
            check_tensor("timestep_cond", timestep_cond, sample.device, cond_proj.weight.dtype)
            width = cond_proj.in_features
            if timestep_cond.dim() != 2 or timestep_cond.shape[0] not in (1, batch) or timestep_cond.shape[1] != width:
                raise ValueError(f"timestep_cond must be ({_batch_choices(batch, True)}, {width}) "
                                 f"(time_cond_proj_dim={width}); got {tuple(timestep_cond.shape)}")
        check_timestep(timestep, sample.device)
        extra = {} if scalar_dtype is None else {"scalar_dtype": scalar_dtype}
        timesteps = timesteps_to_tensor(timestep, batch, sample.device, **extra)
        t_emb = self.time_proj(timesteps).to(dtype or sample.dtype)
        if timestep_cond is None:
            return self.time_embedding(t_emb)
        return self.time_embedding(t_emb, timestep_cond)

    def _embed_class(self, class_labels: torch.Tensor | None, batch: int, dtype: torch.dtype, *,
                     strict: bool = False, broadcast: bool | None = None,
                     width: int | None = None) -> torch.Tensor | None:
        """The class embedding of ``class_labels`` (``None`` when the model has none). ``strict``
        refuses labels for a model without a class embedding; ``broadcast`` (default: not ``strict``)
        lets one label serve the whole batch; ``width``: that of the time embedding, which identity
        labels must have."""
        if self.class_embedding is None:
            if strict and class_labels is not None:
                raise ValueError("class_labels were given but the model has no class embedding (set class_embed_type "
                                 "or num_class_embeds)")
            return None
        if class_labels is None:
            raise ValueError(f"class_labels are required: the model has a class embedding "
                             f"(class_embed_type={self.config.class_embed_type!r}, "
                             f"num_class_embeds={self.config.num_class_embeds!r})")
        self._check_class_labels(class_labels, batch, broadcast=not strict if broadcast is None else broadcast,
                                 width=width)
        if self.config.class_embed_type == "timestep":
            class_labels = self.time_proj(class_labels).to(dtype)
        return self.class_embedding(class_labels).to(dtype)

    def _check_class_labels(self, class_labels: Any, batch: int, *, broadcast: bool, width: int | None) -> None:
        weights, device = self._weights, self._input_device
        kind, table = self.config.class_embed_type, self.class_embedding
        batches = (1, batch) if broadcast else (batch,)
        rows = _batch_choices(batch, broadcast)
        if not isinstance(class_labels, torch.Tensor):
            raise TypeError(f"class_labels must be a torch.Tensor with one entry per sample (batch {rows}); got "
                            f"{type(class_labels).__name__}")
        if class_labels.dim() == 0:
            raise ValueError(f"class_labels must be a tensor with one entry per sample (batch {rows}); got a 0-d "
                             f"tensor, shape ()")
        if kind in ("projection", "simple_projection", "identity"):
            features = width if kind == "identity" else self.config.projection_class_embeddings_input_dim
            if class_labels.dim() != 2 or class_labels.shape[0] not in batches or (
                    features is not None and class_labels.shape[1] != features):
                raise ValueError(f"class_labels must be ({rows}, {features}) for class_embed_type={kind!r}; got "
                                 f"{tuple(class_labels.shape)}")
            check_tensor("class_labels", class_labels, device, None if kind == "identity" else weights.dtype)
            return
        if class_labels.dim() != 1 or class_labels.shape[0] not in batches:
            raise ValueError(f"class_labels must be ({rows},), one entry per sample (batch {rows}); got "
                             f"{tuple(class_labels.shape)}")
        check_tensor("class_labels", class_labels, device)
        if class_labels.is_complex():
            raise TypeError(f"class_labels must be real; got {class_labels.dtype}")
        if kind is None:  # ids into an nn.Embedding table
            count = table.num_embeddings
            if class_labels.is_floating_point() or class_labels.dtype == torch.bool:
                raise TypeError(f"class_labels are ids into a table of num_class_embeds={count} embeddings: they "
                                f"must be an integer tensor; got {class_labels.dtype}")
            check_ids("class_labels", class_labels, count, "num_class_embeds")

    def _text_time_embedding(self, emb: torch.Tensor, added_cond_kwargs: Any) -> torch.Tensor:
        """SDXL's ``text_time`` added embedding: ``add_embedding(cat(text_embeds, add_time_proj(time_ids)))``."""
        check_mapping("added_cond_kwargs", added_cond_kwargs)
        missing = [k for k in ("text_embeds", "time_ids") if not added_cond_kwargs or k not in added_cond_kwargs]
        if missing:
            raise ValueError(f"addition_embed_type='text_time' needs added_cond_kwargs with 'text_embeds' and "
                             f"'time_ids'; missing {missing}")
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        batch = emb.shape[0]
        check_tensor("added_cond_kwargs['text_embeds']", text_embeds, emb.device)
        check_tensor("added_cond_kwargs['time_ids']", time_ids, emb.device)
        if text_embeds.dim() != 2 or text_embeds.shape[0] not in (1, batch):
            raise ValueError(f"added_cond_kwargs['text_embeds'] must be ({_batch_choices(batch, True)}, E), the pooled "
                             f"text embeddings; got {tuple(text_embeds.shape)}")
        rows = text_embeds.shape[0]
        if not ((time_ids.dim() == 2 and time_ids.shape[0] == rows) or (time_ids.dim() == 1 and rows == 1)):
            raise ValueError(f"added_cond_kwargs['time_ids'] must be ({rows}, K), a row per text_embeds row; got "
                             f"{tuple(time_ids.shape)}")
        if time_ids.is_complex() or text_embeds.is_complex():
            raise TypeError(f"text_embeds and time_ids must be real; got {text_embeds.dtype} and {time_ids.dtype}")
        per_id, expected = self.add_time_proj.num_channels, self.add_embedding.linear_1.in_features
        count = time_ids.shape[-1]
        features = text_embeds.shape[1] + count * per_id
        if features != expected:
            raise ValueError(f"added_cond_kwargs give {text_embeds.shape[1]} text_embeds features + {count} time_ids x "
                             f"addition_time_embed_dim {per_id} = {features}; projection_class_embeddings_input_dim is "
                             f"{expected}")
        time_embeds = self.add_time_proj(time_ids.flatten()).reshape(rows, -1)
        return self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype))

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
        device = self._input_device
        adapter = check_residuals("down_intrablock_additional_residuals", down_intrablock_additional_residuals, device)
        down_block_additional_residuals = check_residuals("down_block_additional_residuals",
                                                          down_block_additional_residuals, device)
        if mid_block_additional_residual is not None:
            check_tensor("mid_block_additional_residual", mid_block_additional_residual, device)
        if adapter is not None and len(adapter) > len(self.down_blocks) + 1:
            raise ValueError(f"down_intrablock_additional_residuals takes at most one tensor per down block "
                             f"({len(self.down_blocks)}) and one after the mid block, {len(self.down_blocks) + 1}; "
                             f"got {len(adapter)}")
        if down_block_additional_residuals is not None:
            # one skip connection per layer and per downsampler, and conv_in's: counted before anything runs
            count = 1 + sum(len(block.resnets) + (block.downsamplers is not None) for block in self.down_blocks)
            if len(down_block_additional_residuals) != count:
                raise ValueError(f"down_block_additional_residuals must have one tensor per skip connection "
                                 f"({count}); got {len(down_block_additional_residuals)}")
        used = 0  # adapter residuals taken so far

        def adapter_residual(shape: tuple[int, ...]) -> torch.Tensor:
            nonlocal used
            residual = adapter.pop(0)
            if tuple(residual.shape) != tuple(shape):
                raise ValueError(f"down_intrablock_additional_residuals[{used}] must have the shape of down block "
                                 f"{used}'s output, {tuple(shape)}; got {tuple(residual.shape)}")
            used += 1
            return residual

        sample = self._stem(sample, context)
        skips: tuple[torch.Tensor, ...] = (sample,)
        for block in self.down_blocks:
            residual = None
            if adapter and block.has_cross_attention:
                # added inside the block, after its last layer: the resolution it gets, its out channels
                residual = adapter_residual((sample.shape[0], block.resnets[-1].out_channels, *sample.shape[2:]))
            out = block(sample, context=context, skip_sample=skip_sample, additional_residuals=residual)
            sample, res_samples = out[0], out[1]
            if block.skip:
                skip_sample = out[2]
            if adapter and residual is None:
                # diffusers adds in place here, so the block's last skip (the same tensor) gets it too
                sample = sample + adapter_residual(sample.shape)
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
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 0):
            raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim not in (0, 1):
            raise ValueError(f"dim must be 0 (batch) or 1 (tokens); got {dim!r}")
        self._set_chunk_feed_forward(chunk_size or 1, dim)

    def disable_forward_chunking(self) -> None:
        self._set_chunk_feed_forward(None, 0)

    def _set_chunk_feed_forward(self, chunk_size: int | None, dim: int) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "set_chunk_feed_forward"):
                module.set_chunk_feed_forward(chunk_size, dim)


__all__ = ["UNetSkeleton", "check_ids", "check_mapping", "check_residuals", "check_tensor", "check_timestep",
           "class_embedding", "input_device"]
