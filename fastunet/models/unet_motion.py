"""``UNetMotionModel`` and ``MotionAdapter``: AnimateDiff, with diffusers' constructor arguments,
forward signature, outputs and state-dict names.

An AnimateDiff UNet is a Stable Diffusion ``UNet2DConditionModel`` with a motion module after every
spatial layer; the motion modules come in a separate checkpoint, the :class:`MotionAdapter`.
It is the UNet skeleton of :mod:`fastunet.models._unet` run on the frames as a batch::

    h = sample (B, C, F, H, W) -> (B*F, C, H, W);  emb (+ SDXL text_time), context repeated per frame
    h = conv_in(h)
    down -> mid -> up                      # motion blocks: resnet, attention, motion_module
    out = conv_out(silu(conv_norm_out(h))) -> (B, out_channels, F, H, W)

:meth:`UNetMotionModel.from_unet2d` builds one from a fastunet or a diffusers ``UNet2DConditionModel``
(and an adapter); :meth:`~UNetMotionModel.load_motion_modules` / :meth:`~UNetMotionModel.save_motion_modules`
move the motion modules in and out as a ``MotionAdapter``; :meth:`~UNetMotionModel.freeze_unet2d_params`
leaves only them trainable. Differences from diffusers, each where diffusers would fail or lose
weights: ``encoder_hidden_states`` may be ``(B, M, D)`` (repeated per frame here) as well as the
pipeline's ``(B*F, M, D)``; ``from_unet2d`` also copies an SDXL UNet's ``add_embedding``; adapters
that do not fit raise ``ValueError`` naming the mismatch.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..checkpoint import load_state_dict_under
from ..configuration import register_to_config
from ..layers.attention import mask_to_bias
from ..layers.embeddings import TimestepEmbedding, Timesteps
from ..layers.transformer_temporal import AnimateDiffTransformer3D
from ..modeling import ModelMixin
from ._unet import UNetSkeleton, check_mapping, check_tensor
from .blocks import BlockContext
from .unet_3d_condition import UNet3DConditionOutput
from .unet_motion_blocks import UNET_MOTION_BLOCKS

#: diffusers names it UNetMotionOutput; it is the same (B, C, F, H, W) sample output
UNetMotionOutput = UNet3DConditionOutput


def _per_block(value, count: int, name: str) -> list:
    """An int (or None) repeated ``count`` times, or a sequence of exactly ``count`` entries."""
    if value is None or isinstance(value, int):
        return [value] * count
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be an int or a sequence of {count} (one per block); got {value!r}")
    if len(value) != count:
        raise ValueError(f"{name} must have one entry per down block ({count}); got {len(value)}: {list(value)}")
    return [tuple(v) if isinstance(v, (list, tuple)) else v for v in value]


# -- the motion adapter ---------------------------------------------------------------------------------


class MotionModules(nn.Module):
    """``motion_modules``: ``layers_per_block`` AnimateDiff motion modules over ``in_channels`` features
    (one block of a :class:`MotionAdapter`)."""

    def __init__(self, in_channels: int, layers_per_block: int = 2,
                 transformer_layers_per_block: int | Sequence[int] = 8, num_attention_heads: int = 8,
                 attention_bias: bool = False, cross_attention_dim: int | None = None,
                 activation_fn: str = "geglu", norm_num_groups: int = 32, max_seq_length: int = 32):
        super().__init__()
        if isinstance(transformer_layers_per_block, int):
            depths = [transformer_layers_per_block] * layers_per_block
        else:
            depths = list(transformer_layers_per_block)
            if len(depths) != layers_per_block:
                raise ValueError(f"transformer_layers_per_block must be an int or {layers_per_block} ints (one per "
                                 f"motion layer); got {transformer_layers_per_block!r}")
        if in_channels % num_attention_heads:
            raise ValueError(f"motion_num_attention_heads must divide the {in_channels} channels; "
                             f"got {num_attention_heads}")
        self.motion_modules = nn.ModuleList(
            AnimateDiffTransformer3D(in_channels=in_channels, num_layers=depth, norm_num_groups=norm_num_groups,
                                     cross_attention_dim=cross_attention_dim, activation_fn=activation_fn,
                                     attention_bias=attention_bias, num_attention_heads=num_attention_heads,
                                     attention_head_dim=in_channels // num_attention_heads,
                                     positional_embeddings="sinusoidal", num_positional_embeddings=max_seq_length)
            for depth in depths)


class MotionAdapter(ModelMixin):
    """The motion modules of an AnimateDiff checkpoint, in the layout of a UNet's blocks:
    ``down_blocks.<i>.motion_modules``, ``mid_block.motion_modules`` (or no mid block),
    ``up_blocks.<i>.motion_modules`` (one more layer per block, as the up blocks have), and a
    ``conv_in`` for PIA checkpoints (``conv_in_channels``). Constructor arguments are diffusers'."""

    @register_to_config
    def __init__(self, block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
                 motion_layers_per_block: int | Sequence[int] = 2,
                 motion_transformer_layers_per_block: int | Sequence[int] | Sequence[Sequence[int]] = 1,
                 motion_mid_block_layers_per_block: int = 1,
                 motion_transformer_layers_per_mid_block: int | Sequence[int] = 1,
                 motion_num_attention_heads: int | Sequence[int] = 8, motion_norm_num_groups: int = 32,
                 motion_max_seq_length: int = 32, use_motion_mid_block: bool = True,
                 conv_in_channels: int | None = None):
        super().__init__()
        count = len(block_out_channels)
        layers = _per_block(motion_layers_per_block, count, "motion_layers_per_block")
        depths = _per_block(motion_transformer_layers_per_block, count, "motion_transformer_layers_per_block")
        heads = _per_block(motion_num_attention_heads, count, "motion_num_attention_heads")
        common = dict(norm_num_groups=motion_norm_num_groups, max_seq_length=motion_max_seq_length)

        self.conv_in = (nn.Conv2d(conv_in_channels, block_out_channels[0], kernel_size=3, padding=1)
                        if conv_in_channels else None)
        down_blocks = [MotionModules(width, layers_per_block=layers[i], transformer_layers_per_block=depths[i],
                                     num_attention_heads=heads[i], **common)
                       for i, width in enumerate(block_out_channels)]
        up_blocks = [MotionModules(width, layers_per_block=layers[count - 1 - i] + 1,
                                   transformer_layers_per_block=depths[count - 1 - i],
                                   num_attention_heads=heads[count - 1 - i], **common)
                     for i, width in enumerate(reversed(block_out_channels))]
        # registered as diffusers does (conv_in, mid_block, down_blocks, up_blocks): the state-dict order
        self.mid_block = (MotionModules(block_out_channels[-1], layers_per_block=motion_mid_block_layers_per_block,
                                        transformer_layers_per_block=motion_transformer_layers_per_mid_block,
                                        num_attention_heads=heads[-1], **common)
                          if use_motion_mid_block else None)
        self.down_blocks = nn.ModuleList(down_blocks)
        self.up_blocks = nn.ModuleList(up_blocks)

    def forward(self, sample):
        """An adapter holds weights only; it is never called (diffusers' does nothing either)."""
        raise TypeError("MotionAdapter holds motion modules for UNetMotionModel; it has no forward of its own")


# -- the motion UNet ----------------------------------------------------------------------------------------


class UNetMotionModel(UNetSkeleton):
    """AnimateDiff's UNet ``(B, in_channels, F, H, W) -> (B, out_channels, F, H, W)`` (see the module
    docstring). Constructor arguments are diffusers'; ``reverse_motion_num_attention_heads`` is accepted
    and, as in diffusers, unused (the up blocks take the reversed ``motion_num_attention_heads``)."""

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        down_block_types: Sequence[str] = ("CrossAttnDownBlockMotion", "CrossAttnDownBlockMotion",
                                           "CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types: Sequence[str] = ("UpBlockMotion", "CrossAttnUpBlockMotion", "CrossAttnUpBlockMotion",
                                         "CrossAttnUpBlockMotion"),
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        layers_per_block: int | Sequence[int] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int | Sequence[int] = 1280,
        transformer_layers_per_block: int | Sequence[int] | Sequence[Sequence[int]] = 1,
        reverse_transformer_layers_per_block: int | Sequence[int] | Sequence[Sequence[int]] | None = None,
        temporal_transformer_layers_per_block: int | Sequence[int] | Sequence[Sequence[int]] = 1,
        reverse_temporal_transformer_layers_per_block: int | Sequence[int] | Sequence[Sequence[int]] | None = None,
        transformer_layers_per_mid_block: int | Sequence[int] | None = None,
        temporal_transformer_layers_per_mid_block: int | Sequence[int] | None = 1,
        use_linear_projection: bool = False,
        num_attention_heads: int | Sequence[int] = 8,
        motion_max_seq_length: int = 32,
        motion_num_attention_heads: int | Sequence[int] = 8,
        reverse_motion_num_attention_heads: int | Sequence[int] | None = None,
        use_motion_mid_block: bool = True,
        mid_block_layers: int = 1,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        projection_class_embeddings_input_dim: int | None = None,
        time_cond_proj_dim: int | None = None,
    ):
        super().__init__()
        self.sample_size = sample_size
        num_blocks = self._check_block_plan(down_block_types, up_block_types, block_out_channels)
        if norm_num_groups is None:
            raise ValueError("norm_num_groups=None is not supported: the resnets and motion modules need GroupNorm "
                             "groups (diffusers fails on it too); got None")
        if encoder_hid_dim_type is not None:
            raise NotImplementedError(f"UNetMotionModel: encoder_hid_dim_type={encoder_hid_dim_type!r} is not "
                                      "supported (diffusers builds no encoder_hid_proj for it either)")
        heads = _per_block(num_attention_heads, num_blocks, "num_attention_heads")
        cross_dims = _per_block(cross_attention_dim, num_blocks, "cross_attention_dim")
        layers = _per_block(layers_per_block, num_blocks, "layers_per_block")
        motion_heads = _per_block(motion_num_attention_heads, num_blocks, "motion_num_attention_heads")
        depths = _per_block(transformer_layers_per_block, num_blocks, "transformer_layers_per_block")
        temporal_depths = _per_block(temporal_transformer_layers_per_block, num_blocks,
                                     "temporal_transformer_layers_per_block")
        reverse_depths = self._reverse(depths, reverse_transformer_layers_per_block, "transformer_layers_per_block")
        reverse_temporal = self._reverse(temporal_depths, reverse_temporal_transformer_layers_per_block,
                                         "temporal_transformer_layers_per_block")
        if reverse_motion_num_attention_heads is not None and \
                _per_block(reverse_motion_num_attention_heads, num_blocks, "reverse_motion_num_attention_heads") \
                != motion_heads[::-1]:
            warnings.warn("reverse_motion_num_attention_heads is unused, as in diffusers: the up blocks take the "
                          f"reversed motion_num_attention_heads {motion_heads[::-1]}", UserWarning, stacklevel=3)
        base = block_out_channels[0]

        self.conv_in = nn.Conv2d(in_channels, base, kernel_size=3, padding=1)
        time_embed_dim = base * 4
        self.time_proj = Timesteps(base, True, 0)
        self.time_embedding = TimestepEmbedding(base, time_embed_dim, act_fn=act_fn, cond_proj_dim=time_cond_proj_dim)
        self.encoder_hid_proj = None
        self.class_embedding = None
        if addition_embed_type == "text_time":
            if addition_time_embed_dim is None or projection_class_embeddings_input_dim is None:
                raise ValueError("addition_embed_type='text_time' needs addition_time_embed_dim and "
                                 f"projection_class_embeddings_input_dim; got {addition_time_embed_dim!r} and "
                                 f"{projection_class_embeddings_input_dim!r}")
            self.add_time_proj = Timesteps(addition_time_embed_dim, True, 0)
            self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)
        elif addition_embed_type is not None:
            raise NotImplementedError(f"UNetMotionModel: addition_embed_type must be None or 'text_time'; "
                                      f"got {addition_embed_type!r}")

        common = dict(temb_channels=time_embed_dim, resnet_eps=norm_eps, resnet_act_fn=act_fn,
                      resnet_groups=norm_num_groups, use_linear_projection=use_linear_projection,
                      temporal_max_seq_length=motion_max_seq_length)
        registry = UNET_MOTION_BLOCKS

        def down_args(i: int, channels: int) -> dict:
            return dict(num_layers=layers[i], transformer_layers_per_block=depths[i], num_attention_heads=heads[i],
                        cross_attention_dim=cross_dims[i], temporal_num_attention_heads=motion_heads[i],
                        temporal_transformer_layers_per_block=temporal_depths[i])

        def up_args(i: int, channels: int) -> dict:
            j = num_blocks - 1 - i
            return dict(num_layers=layers[j] + 1, transformer_layers_per_block=reverse_depths[i],
                        num_attention_heads=heads[j], cross_attention_dim=cross_dims[j],
                        temporal_num_attention_heads=motion_heads[j],
                        temporal_transformer_layers_per_block=reverse_temporal[i])

        # diffusers registers down_blocks and up_blocks before mid_block: attn_processors follows that order
        self.down_blocks = self._build_down_blocks(registry.down, down_block_types, block_out_channels, down_args,
                                                   downsample_padding=downsample_padding, **common)
        self.up_blocks = nn.ModuleList()
        if transformer_layers_per_mid_block is None:
            transformer_layers_per_mid_block = depths[-1] if isinstance(depths[-1], int) else 1
        mid = dict(in_channels=block_out_channels[-1], output_scale_factor=mid_block_scale_factor,
                   cross_attention_dim=cross_dims[-1], num_attention_heads=heads[-1], num_layers=mid_block_layers,
                   transformer_layers_per_block=transformer_layers_per_mid_block, dual_cross_attention=False, **common)
        if use_motion_mid_block:
            self.mid_block = registry.mid("UNetMidBlockCrossAttnMotion", temporal_num_attention_heads=motion_heads[-1],
                                          temporal_transformer_layers_per_block=temporal_transformer_layers_per_mid_block,
                                          **mid)
        else:
            self.mid_block = registry.mid("UNetMidBlock2DCrossAttn", **mid)
        self.up_blocks = self._build_up_blocks(registry.up, up_block_types, block_out_channels, up_args, **common)
        self.num_upsamplers = num_blocks - 1

        self.conv_norm_out = nn.GroupNorm(num_channels=base, num_groups=norm_num_groups, eps=norm_eps)
        self.conv_act = nn.SiLU()
        self._out_act = "silu"
        self.conv_out = nn.Conv2d(base, out_channels, kernel_size=3, padding=1)

    @staticmethod
    def _reverse(forward: list, reverse, name: str) -> list:
        """The up blocks' depths: ``reverse`` per block, or the down blocks' reversed when they are symmetric."""
        if reverse is None:
            if any(isinstance(d, tuple) for d in forward):
                raise ValueError(f"{name} with per-layer lists needs reverse_{name} for the up blocks; got None")
            return forward[::-1]
        return _per_block(reverse, len(forward), f"reverse_{name}")

    # -- forward -----------------------------------------------------------------------------------

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet3DConditionOutput | tuple:
        """Denoise ``sample`` ``(B, in_channels, F, H, W)`` at ``timestep`` given ``encoder_hidden_states``
        ``(B*F, M, D)`` (one per frame, as AnimateDiffPipeline passes them) or ``(B, M, D)``.

        ``added_cond_kwargs``: ``text_embeds`` ``(B, E)`` and ``time_ids`` ``(B, 6)`` for SDXL's
        ``text_time``. ``down_block_additional_residuals`` / ``mid_block_additional_residual``: ControlNet
        outputs in the frames-as-batch layout ``(B*F, C, h, w)``. ``attention_mask`` is turned into a bias
        and handed to the spatial transformers, as diffusers does. Returns :class:`UNet3DConditionOutput`
        or ``(sample,)``.
        """
        batch, num_frames = self._check_inputs(sample, encoder_hidden_states)
        check_mapping("cross_attention_kwargs", cross_attention_kwargs)
        check_mapping("added_cond_kwargs", added_cond_kwargs)
        if attention_mask is not None:
            check_tensor("attention_mask", attention_mask, sample.device)
        forward_upsample_size = any(size % 2**self.num_upsamplers for size in sample.shape[-2:])
        attention_mask = mask_to_bias(attention_mask, sample.dtype)

        emb = self._embed_time(sample, timestep, timestep_cond, dtype=self.dtype)
        if self.config.addition_embed_type == "text_time":
            emb = emb + self._text_time_embedding(emb, added_cond_kwargs)
        emb = emb.repeat_interleave(num_frames, dim=0)
        if encoder_hidden_states.shape[0] != batch * num_frames:
            encoder_hidden_states = encoder_hidden_states.repeat_interleave(num_frames, dim=0)
        context = BlockContext(temb=emb, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                               cross_attention_kwargs=cross_attention_kwargs, num_frames=num_frames)

        frames = sample.transpose(1, 2).reshape(batch * num_frames, sample.shape[1], *sample.shape[3:])
        hidden, _ = self._run_blocks(frames, context, down_block_additional_residuals=down_block_additional_residuals,
                                     mid_block_additional_residual=mid_block_additional_residual,
                                     forward_upsample_size=forward_upsample_size)
        out = self._output(hidden)
        out = out.reshape(batch, num_frames, *out.shape[1:]).transpose(1, 2)
        return UNet3DConditionOutput(sample=out) if return_dict else (out,)

    def _check_inputs(self, sample: torch.Tensor, encoder_hidden_states: torch.Tensor) -> tuple[int, int]:
        self._check_sample_layout(sample, "(B, C, F, H, W)", self.config.in_channels)
        batch, num_frames = sample.shape[0], sample.shape[2]
        if num_frames > self.config.motion_max_seq_length:
            raise ValueError(f"sample has {num_frames} frames, more than motion_max_seq_length="
                             f"{self.config.motion_max_seq_length}, the length of the motion modules' frame table")
        widths = sorted({d for d in _per_block(self.config.cross_attention_dim, len(self.down_blocks), "")})
        width = widths[0] if len(widths) == 1 else "D"
        expected = (f"({batch * num_frames}, M, {width}) with one per frame ({batch} videos of {num_frames} frames), "
                    f"or ({batch}, M, {width})")
        if not torch.is_tensor(encoder_hidden_states):
            raise TypeError(f"encoder_hidden_states must be a torch.Tensor {expected}; got "
                            f"{type(encoder_hidden_states).__name__}")
        if (encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] not in (batch, batch * num_frames)
                or (len(widths) == 1 and encoder_hidden_states.shape[-1] != width)):
            raise ValueError(f"encoder_hidden_states must be {expected}; got {tuple(encoder_hidden_states.shape)}")
        check_tensor("encoder_hidden_states", encoder_hidden_states, sample.device, sample.dtype)
        return batch, num_frames

    # -- AnimateDiff methods --------------------------------------------------------------------------

    @classmethod
    def from_unet2d(cls, unet: nn.Module, motion_adapter: MotionAdapter | None = None,
                    load_weights: bool = True) -> UNetMotionModel:
        """A motion UNet with the structure of ``unet`` (a fastunet or a diffusers
        ``UNet2DConditionModel``) and its weights (``load_weights``), plus the motion modules of
        ``motion_adapter`` (fastunet's or diffusers'); without an adapter the motion modules keep their
        initial weights. A PIA adapter (``conv_in_channels``) widens ``conv_in``."""
        config = dict(unet.config)
        adapter = dict(motion_adapter.config) if motion_adapter is not None else None
        if adapter is not None:
            cls._check_adapter_config(adapter, config["block_out_channels"], config["layers_per_block"],
                                      "the UNet2DConditionModel")
        config["down_block_types"] = [
            "CrossAttnDownBlockMotion" if "CrossAttn" in t else "DownBlockMotion" for t in config["down_block_types"]]
        config["up_block_types"] = [
            "CrossAttnUpBlockMotion" if "CrossAttn" in t else "UpBlockMotion" for t in config["up_block_types"]]
        if adapter is not None:
            config.update(motion_num_attention_heads=adapter["motion_num_attention_heads"],
                          motion_max_seq_length=adapter["motion_max_seq_length"],
                          use_motion_mid_block=adapter["use_motion_mid_block"],
                          layers_per_block=adapter["motion_layers_per_block"],
                          temporal_transformer_layers_per_mid_block=adapter["motion_transformer_layers_per_mid_block"],
                          temporal_transformer_layers_per_block=adapter["motion_transformer_layers_per_block"])
            if adapter["conv_in_channels"]:
                config["in_channels"] = adapter["conv_in_channels"]
        if not config.get("num_attention_heads"):
            # SD checkpoints store the heads in attention_head_dim
            config["num_attention_heads"] = config["attention_head_dim"]
        model = cls(**cls.extract_init_kwargs(config, warn=False))
        if not load_weights:
            return model

        if adapter is not None and adapter["conv_in_channels"]:
            # PIA: the first 4 input channels from the UNet, the others from the adapter
            weight = torch.cat([unet.conv_in.weight, motion_adapter.conv_in.weight[:, 4:]], dim=1)
            model.conv_in.load_state_dict({"weight": weight, "bias": unet.conv_in.bias})
        else:
            model.conv_in.load_state_dict(unet.conv_in.state_dict())
        model.time_embedding.load_state_dict(unet.time_embedding.state_dict())
        if model.config.addition_embed_type == "text_time":
            model.add_embedding.load_state_dict(unet.add_embedding.state_dict())
        for ours, theirs in [*zip(model.down_blocks, unet.down_blocks), *zip(model.up_blocks, unet.up_blocks),
                             (model.mid_block, unet.mid_block)]:
            for name in ("resnets", "attentions", "downsamplers", "upsamplers"):
                if getattr(ours, name, None) is not None:
                    getattr(ours, name).load_state_dict(getattr(theirs, name).state_dict())
        model.conv_norm_out.load_state_dict(unet.conv_norm_out.state_dict())
        model.conv_out.load_state_dict(unet.conv_out.state_dict())
        if motion_adapter is not None:
            model.load_motion_modules(motion_adapter)
        return model.to(device=unet.conv_in.weight.device, dtype=unet.conv_in.weight.dtype)

    @staticmethod
    def _check_adapter_config(adapter: dict, block_out_channels, layers_per_block, what: str) -> None:
        """Raise ``ValueError`` unless an adapter's widths and layers per block are those of ``what``."""
        theirs, ours = list(adapter["block_out_channels"]), list(block_out_channels)
        if theirs != ours:
            raise ValueError(f"the motion adapter's block_out_channels {theirs} do not match {what}'s {ours}")
        count = len(ours)
        adapter_layers = _per_block(adapter["motion_layers_per_block"], count, "motion_layers_per_block")
        unet_layers = _per_block(layers_per_block, count, "layers_per_block")
        if adapter_layers != unet_layers:
            raise ValueError(f"the motion adapter's motion_layers_per_block {adapter_layers} do not match "
                             f"{what}'s layers_per_block {unet_layers}")

    def load_motion_modules(self, motion_adapter: MotionAdapter) -> None:
        """Copy the motion modules of ``motion_adapter`` (fastunet's or diffusers') into this UNet."""
        self._check_adapter_config(dict(motion_adapter.config), self.config.block_out_channels,
                                   self.config.layers_per_block, "the UNetMotionModel")
        if hasattr(self.mid_block, "motion_modules") and motion_adapter.mid_block is None:
            raise ValueError("the UNetMotionModel has a motion mid block (use_motion_mid_block=True) but the "
                             "motion adapter has none (use_motion_mid_block=False)")
        # all or nothing: every motion module's entries are checked before any is copied
        load_state_dict_under(self, motion_adapter.state_dict(),
                              [name for name, _ in self.named_modules() if name.endswith("motion_modules")])

    def save_motion_modules(self, save_directory, is_main_process: bool = True, safe_serialization: bool = True,
                            variant: str | None = None, push_to_hub: bool = False, **kwargs) -> None:
        """Write the motion modules as a ``MotionAdapter`` checkpoint (``config.json`` + weights) that
        diffusers' and fastunet's ``MotionAdapter.from_pretrained`` read."""
        if push_to_hub:
            raise NotImplementedError("save_motion_modules(push_to_hub=True): fastunet writes local directories only")
        if kwargs:
            raise TypeError(f"save_motion_modules got unexpected arguments {sorted(kwargs)}")
        if not is_main_process:
            return
        config = self.config
        adapter = MotionAdapter(
            block_out_channels=config.block_out_channels, motion_layers_per_block=config.layers_per_block,
            motion_transformer_layers_per_block=config.temporal_transformer_layers_per_block,
            motion_mid_block_layers_per_block=config.mid_block_layers,
            motion_transformer_layers_per_mid_block=config.temporal_transformer_layers_per_mid_block,
            motion_norm_num_groups=config.norm_num_groups, motion_num_attention_heads=config.motion_num_attention_heads,
            motion_max_seq_length=config.motion_max_seq_length, use_motion_mid_block=config.use_motion_mid_block)
        adapter.load_state_dict({k: v for k, v in self.state_dict().items() if "motion_modules" in k})
        adapter.save_pretrained(save_directory, safe_serialization=safe_serialization, variant=variant)

    def freeze_unet2d_params(self) -> None:
        """Freeze every parameter but the motion modules' (for training motion modules only)."""
        self.requires_grad_(False)
        for block in [*self.down_blocks, *self.up_blocks, self.mid_block]:
            if hasattr(block, "motion_modules"):
                block.motion_modules.requires_grad_(True)


__all__ = ["MotionAdapter", "MotionModules", "UNetMotionModel", "UNetMotionOutput"]
