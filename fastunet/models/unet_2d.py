"""``UNet2DModel``: diffusers' unconditional (optionally class-conditional) 2-D UNet on fastunet's kernels.

    emb = time_embedding(time_proj(t)) [+ class_embedding(labels)]
    h   = conv_in(x);  down blocks (keeping skip connections);  mid block;  up blocks (consuming them)
    out = conv_out(silu(conv_norm_out(h)))  [+ NCSN++ skip image]  [/ t for the Fourier embedding]

Same constructor arguments, config, forward signature and state-dict keys as diffusers' ``UNet2DModel``,
so its checkpoints load strict and it drops into diffusers' pipelines (``DDPMPipeline``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..configuration import register_to_config
from ..layers.embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps, timesteps_to_tensor
from ..layers.normalization import auto_groups, check_groups
from ..outputs import ModelOutput
from ._unet import UNetSkeleton, check_ids, check_timestep, class_embedding
from .blocks import BlockContext
from .unet_2d_blocks import SKIP_CHANNELS, UNET_2D_BLOCKS, UNetMidBlock2D

_TIME_EMBEDDINGS = ("positional", "fourier", "learned")
_CLASS_EMBEDDINGS = (None, "timestep", "identity")


@dataclass
class UNet2DOutput(ModelOutput):
    """Output of :class:`UNet2DModel`: ``sample`` is ``(B, out_channels, H, W)``.

    Like diffusers' outputs it also reads as ``output[0]``, ``output["sample"]`` and ``output.to_tuple()``.
    """

    sample: torch.Tensor


class UNet2DModel(UNetSkeleton):
    """2-D UNet ``(sample (B, in_channels, H, W), timestep[, class_labels]) -> (B, out_channels, H, W)``.

    The arguments are diffusers' ``UNet2DModel``'s: ``time_embedding_type`` "positional" (sinusoidal),
    "fourier" (Gaussian Fourier features of log-sigma; the output is divided by the timestep) or
    "learned" (an ``nn.Embedding`` of ``num_train_timesteps`` rows); ``class_embed_type`` None (an
    ``nn.Embedding`` when ``num_class_embeds`` is set), "timestep" or "identity"; block types from
    :mod:`fastunet.models.unet_2d_blocks`; ``norm_num_groups=None`` lets the skip blocks pick their own
    groups. H and W must be divisible by ``2 ** (len(block_out_channels) - 1)``.
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int | None = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int | None = None,
    ):
        super().__init__()
        self._validate_config(in_channels, out_channels, time_embedding_type, down_block_types, mid_block_type,
                              up_block_types, block_out_channels, layers_per_block, resnet_time_scale_shift,
                              class_embed_type, num_class_embeds, num_train_timesteps, norm_num_groups,
                              downsample_type, upsample_type)
        self.sample_size = sample_size
        block_out_channels = tuple(block_out_channels)
        base = block_out_channels[0]
        time_embed_dim = time_embedding_dim or base * 4

        self.conv_in = nn.Conv2d(in_channels, base, kernel_size=3, padding=(1, 1))

        if time_embedding_type == "fourier":
            self.time_proj = GaussianFourierProjection(embedding_size=base, scale=16)
            timestep_input_dim = 2 * base
        elif time_embedding_type == "positional":
            self.time_proj = Timesteps(base, flip_sin_to_cos, freq_shift)
            timestep_input_dim = base
        else:
            self.time_proj = nn.Embedding(num_train_timesteps, base)
            timestep_input_dim = base
        self.time_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim)

        self.class_embedding = class_embedding(class_embed_type, num_class_embeds, time_embed_dim, timestep_input_dim)

        head_dim = attention_head_dim

        def per_block(i: int, channels: int) -> dict:
            return {"attention_head_dim": head_dim if head_dim is not None else channels}

        common = dict(temb_channels=time_embed_dim, resnet_eps=norm_eps, resnet_act_fn=act_fn,
                      resnet_groups=norm_num_groups, resnet_time_scale_shift=resnet_time_scale_shift,
                      dropout=dropout)
        self.down_blocks = self._build_down_blocks(UNET_2D_BLOCKS.down, down_block_types, block_out_channels,
                                                   per_block, num_layers=layers_per_block,
                                                   downsample_padding=downsample_padding,
                                                   downsample_type=downsample_type, **common)
        self.mid_block = None
        if mid_block_type is not None:
            self.mid_block = UNetMidBlock2D(
                in_channels=block_out_channels[-1], temb_channels=time_embed_dim, dropout=dropout,
                resnet_eps=norm_eps, resnet_act_fn=act_fn, output_scale_factor=mid_block_scale_factor,
                resnet_time_scale_shift=resnet_time_scale_shift,
                attention_head_dim=attention_head_dim if attention_head_dim is not None else block_out_channels[-1],
                resnet_groups=norm_num_groups, attn_groups=attn_norm_num_groups, add_attention=add_attention)
        self.up_blocks = self._build_up_blocks(UNET_2D_BLOCKS.up, up_block_types, block_out_channels, per_block,
                                               num_layers=layers_per_block + 1, upsample_type=upsample_type,
                                               **common)

        groups_out = norm_num_groups if norm_num_groups is not None else auto_groups(base)
        check_groups(base, groups_out, "UNet2DModel conv_norm_out")
        self.conv_norm_out = nn.GroupNorm(num_channels=base, num_groups=groups_out, eps=norm_eps)
        # the SiLU after conv_norm_out runs fused inside group_norm_act; kept as a module for diffusers' layout
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(base, out_channels, kernel_size=3, padding=1)
        self._out_act = "silu"

    @staticmethod
    def _validate_config(in_channels, out_channels, time_embedding_type, down_block_types, mid_block_type,
                         up_block_types, block_out_channels, layers_per_block, resnet_time_scale_shift,
                         class_embed_type, num_class_embeds, num_train_timesteps, norm_num_groups,
                         downsample_type, upsample_type) -> None:
        if len(down_block_types) != len(up_block_types):
            raise ValueError(f"down_block_types and up_block_types must have the same length; got "
                             f"{len(down_block_types)} ({list(down_block_types)}) and {len(up_block_types)} "
                             f"({list(up_block_types)})")
        if len(block_out_channels) != len(down_block_types):
            raise ValueError(f"block_out_channels must have one entry per down block ({len(down_block_types)}); "
                             f"got {len(block_out_channels)}: {list(block_out_channels)}")
        if len(block_out_channels) == 0:
            raise ValueError("block_out_channels must not be empty")
        if not isinstance(layers_per_block, int) or layers_per_block < 1:
            raise ValueError(f"layers_per_block must be a positive int; got {layers_per_block!r}")
        if time_embedding_type not in _TIME_EMBEDDINGS:
            raise ValueError(f"time_embedding_type must be one of {_TIME_EMBEDDINGS}; got {time_embedding_type!r}")
        if time_embedding_type == "learned" and not (isinstance(num_train_timesteps, int) and num_train_timesteps > 0):
            raise ValueError(f"time_embedding_type='learned' needs num_train_timesteps (a positive int); "
                             f"got {num_train_timesteps!r}")
        if class_embed_type not in _CLASS_EMBEDDINGS:
            raise ValueError(f"class_embed_type must be one of {_CLASS_EMBEDDINGS}; got {class_embed_type!r}")
        if mid_block_type not in ("UNetMidBlock2D", None):
            raise ValueError(f"mid_block_type must be 'UNetMidBlock2D' or None; got {mid_block_type!r}")
        if resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ValueError(f"resnet_time_scale_shift must be 'default' or 'scale_shift'; "
                             f"got {resnet_time_scale_shift!r}")
        for name, value in (("downsample_type", downsample_type), ("upsample_type", upsample_type)):
            if value not in ("conv", "resnet"):
                raise ValueError(f"{name} must be 'conv' or 'resnet'; got {value!r}")
        UNet2DModel._validate_skip_path(list(down_block_types), list(up_block_types), in_channels, out_channels)
        if norm_num_groups is None:
            plain = [t for t in (*down_block_types, *up_block_types) if "Skip" not in str(t)]
            if plain:
                raise ValueError(f"norm_num_groups=None is only supported by skip blocks; got {plain}")

    @staticmethod
    def _validate_skip_path(down_block_types, up_block_types, in_channels, out_channels) -> None:
        """The NCSN++ skip image only lines up with the hidden states along an unbroken run of skip blocks.

        Down: every skip block but the last one FIR-downsamples the skip image (the ``in_channels``-channel
        input) and adds its projection; the image is only at the block's resolution if no plain block
        downsampled before it. Up: every skip block but the last one starts a ``SKIP_CHANNELS``-channel
        image that later blocks upsample and the model adds to its output, so from there on every block
        must be a skip block. A skip block in last place resamples nothing and may stand anywhere.
        (diffusers builds the other arrangements, then fails in forward with a shape mismatch.)
        """
        def is_skip(block_type) -> bool:
            return "Skip" in str(block_type)

        for i, block_type in enumerate(down_block_types[:-1]):
            plain_before = [t for t in down_block_types[:i] if not is_skip(t)]
            if is_skip(block_type) and plain_before:
                raise ValueError(f"down block {i} ({block_type}) downsamples the skip image, which must not be "
                                 f"preceded by plain down blocks ({plain_before}): they downsample the hidden "
                                 f"states but not the image; got down_block_types={down_block_types}")
            if is_skip(block_type) and in_channels != SKIP_CHANNELS:
                raise ValueError(f"down block {i} ({block_type}) projects the input sample as a "
                                 f"{SKIP_CHANNELS}-channel skip image: in_channels must be {SKIP_CHANNELS}; "
                                 f"got {in_channels}")
        for i, block_type in enumerate(up_block_types[:-1]):
            if not is_skip(block_type):
                continue
            plain_after = [t for t in up_block_types[i + 1:] if not is_skip(t)]
            if plain_after:
                raise ValueError(f"up block {i} ({block_type}) starts a skip image that every later up block "
                                 f"must upsample, but {plain_after} follow it; got up_block_types={up_block_types}")
            if out_channels != SKIP_CHANNELS:
                raise ValueError(f"up block {i} ({block_type}) builds a {SKIP_CHANNELS}-channel skip image that is "
                                 f"added to the output: out_channels must be {SKIP_CHANNELS}; got {out_channels}")

    @property
    def downsample_factor(self) -> int:
        """How much the down blocks shrink H and W: the sample's sides must be multiples of it."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def _check_sample(self, sample: torch.Tensor) -> None:
        self._check_sample_layout(sample, "(B, C, H, W)", self.config.in_channels)
        factor = self.downsample_factor
        if sample.shape[-2] % factor or sample.shape[-1] % factor:
            raise ValueError(f"sample height and width must be multiples of {factor} (2 ** (number of blocks - 1)); "
                             f"got {tuple(sample.shape[-2:])}")

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                class_labels: torch.Tensor | None = None, return_dict: bool = True) -> UNet2DOutput | tuple:
        """Denoise ``sample`` ``(B, in_channels, H, W)`` at ``timestep`` (a number, a 0-d tensor, or a
        ``(B,)``/``(1,)`` tensor; Python numbers become int64 as in diffusers). ``class_labels``: ``(B,)``
        class ids (``num_class_embeds``), ``(B,)`` timesteps ("timestep") or ``(B, time_embed_dim)``
        ("identity"). Returns :class:`UNet2DOutput`, or ``(sample,)`` with ``return_dict=False``."""
        self._check_sample(sample)
        batch = sample.shape[0]
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        check_timestep(timestep, sample.device)
        timesteps = timesteps_to_tensor(timestep, batch, sample.device, scalar_dtype=torch.int64)
        if self.config.time_embedding_type == "learned":
            if timesteps.is_floating_point() or timesteps.dtype == torch.bool:
                raise TypeError(f"time_embedding_type='learned' looks timesteps up in a table: they must be "
                                f"integers; got {timesteps.dtype}")
            check_ids("timestep", timesteps, self.config.num_train_timesteps, "num_train_timesteps")
        emb = self._embed_time(sample, timesteps, dtype=self.dtype)
        class_emb = self._embed_class(class_labels, batch, self.dtype, strict=True)
        if class_emb is not None:
            emb = emb + class_emb

        sample, skip_sample = self._run_blocks(sample, BlockContext(temb=emb), skip_sample=sample)
        sample = self._output(sample)
        if skip_sample is not None:
            sample = sample + skip_sample
        if self.config.time_embedding_type == "fourier":
            sample = sample / timesteps.reshape(batch, 1, 1, 1)

        if not return_dict:
            return (sample,)
        return UNet2DOutput(sample=sample)


__all__ = ["UNet2DModel", "UNet2DOutput"]
