"""``UNet1DModel``: diffusers' 1-D UNet (Dance Diffusion audio models, Diffuser planning and value
functions) with the same config, forward signature, outputs and state-dict keys."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..configuration import register_to_config
from ..layers.embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps, timesteps_to_tensor
from ..layers.normalization import auto_groups
from ..layers.utils import maybe_checkpoint
from ..modeling import AttentionMixin, ModelMixin
from ..outputs import ModelOutput
from ._unet import check_tensor, check_timestep, input_device

from .unet_1d_blocks import (
    DownBlock1DNoSkip,
    DownResnetBlock1D,
    MidResTemporalBlock1D,
    OutValueFunctionBlock,
    UpResnetBlock1D,
    ValueFunctionMidBlock1D,
    get_down_block,
    get_mid_block,
    get_out_block,
    get_up_block,
)


# the blocks built on ResidualTemporalBlock1D (and the value head), which take a (batch, channels) embedding
_PLANNING_BLOCKS = (DownResnetBlock1D, UpResnetBlock1D, MidResTemporalBlock1D, ValueFunctionMidBlock1D,
                    OutValueFunctionBlock)


@dataclass
class UNet1DOutput(ModelOutput):
    """Output of :class:`UNet1DModel`: ``sample`` is ``(B, out_channels, L)``, or ``(B, 1)`` for a value
    function. Like diffusers' outputs (and ``UNet2DOutput``) it is a dict that also reads as
    ``output[0]``, ``output["sample"]`` and ``output.to_tuple()``."""

    sample: torch.Tensor


class UNet1DModel(ModelMixin, AttentionMixin):
    """A 1-D UNet: ``(sample (B, in_channels, L), timestep) -> (B, out_channels, L)`` (or ``(B, 1)`` with
    ``out_block_type="ValueFunction"``).

    The arguments are diffusers' ``UNet1DModel``'s. The time embedding is Gaussian Fourier features
    (``"fourier"``, ``time_embedding_dim`` wide, default ``2 * block_out_channels[0]``) or sinusoidal
    (``"positional"``, ``block_out_channels[0]`` wide); ``use_timestep_embedding`` adds an MLP to
    ``block_out_channels[0]`` channels. Without the MLP, ``DownBlock1DNoSkip`` concatenates the embedding to
    the sample along channels, so for it ``extra_in_channels`` must equal the embedding width.

    The audio blocks' ``SelfAttention1d`` layers run through attention processors: ``attn_processors``,
    ``set_attn_processor``, ``set_attention_slice`` and ``fuse_qkv_projections`` work as on the 2-D UNets.
    """

    # diffusers' class says False; fastunet's blocks implement checkpointing (same gradients, tested)
    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 65536,
        sample_rate: int | None = None,
        in_channels: int = 2,
        out_channels: int = 2,
        extra_in_channels: int = 0,
        time_embedding_type: str = "fourier",
        time_embedding_dim: int | None = None,
        flip_sin_to_cos: bool = True,
        use_timestep_embedding: bool = False,
        freq_shift: float = 0.0,
        down_block_types: tuple[str, ...] = ("DownBlock1DNoSkip", "DownBlock1D", "AttnDownBlock1D"),
        up_block_types: tuple[str, ...] = ("AttnUpBlock1D", "UpBlock1D", "UpBlock1DNoSkip"),
        mid_block_type: str = "UNetMidBlock1D",
        out_block_type: str | None = None,
        block_out_channels: tuple[int, ...] = (32, 32, 64),
        act_fn: str | None = None,
        norm_num_groups: int = 8,
        layers_per_block: int = 1,
        downsample_each_block: bool = False,
    ):
        super().__init__()
        for name, types in (("down_block_types", down_block_types), ("up_block_types", up_block_types)):
            if len(types) > len(block_out_channels):
                raise ValueError(f"{name} has {len(types)} entries but block_out_channels only "
                                 f"{len(block_out_channels)}: {tuple(block_out_channels)}")
        self.sample_size = sample_size
        self.gradient_checkpointing = False
        base = block_out_channels[0]

        if time_embedding_type == "fourier":
            width = time_embedding_dim or 2 * base
            if width % 2:
                raise ValueError(f"the fourier time embedding needs an even time_embedding_dim; got {width}")
            self.time_proj = GaussianFourierProjection(width // 2, set_W_to_weight=False, log=False,
                                                       flip_sin_to_cos=flip_sin_to_cos)
        elif time_embedding_type == "positional":
            width = base
            self.time_proj = Timesteps(base, flip_sin_to_cos=flip_sin_to_cos, downscale_freq_shift=freq_shift)
        else:
            raise ValueError(f"time_embedding_type must be 'fourier' or 'positional'; got {time_embedding_type!r}")
        if use_timestep_embedding:
            self.time_mlp = TimestepEmbedding(width, 4 * base, act_fn=act_fn, out_dim=base)
            width = base
        else:
            self.time_mlp = None
        self.temb_channels = width  # channels of the embedding the blocks receive

        self.down_blocks = nn.ModuleList()
        channels = in_channels
        for i, block_type in enumerate(down_block_types):
            block_in, channels = channels + (extra_in_channels if i == 0 else 0), block_out_channels[i]
            self.down_blocks.append(get_down_block(
                block_type, num_layers=layers_per_block, in_channels=block_in, out_channels=channels,
                temb_channels=base, add_downsample=i != len(block_out_channels) - 1 or downsample_each_block))

        top = block_out_channels[-1]
        self.mid_block = get_mid_block(mid_block_type, num_layers=layers_per_block, in_channels=top,
                                       mid_channels=top, out_channels=top, embed_dim=base,
                                       add_downsample=downsample_each_block)

        self.up_blocks = nn.ModuleList()
        reversed_channels = list(reversed(block_out_channels))
        channels = reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            last = i == len(up_block_types) - 1
            block_in = channels
            channels = (out_channels if out_block_type is None else base) if last else reversed_channels[i + 1]
            self.up_blocks.append(get_up_block(
                block_type, num_layers=layers_per_block, in_channels=block_in, out_channels=channels,
                temb_channels=base, add_upsample=i != len(block_out_channels) - 1))

        self.out_block = get_out_block(
            out_block_type=out_block_type,
            num_groups_out=norm_num_groups if norm_num_groups is not None else auto_groups(base),
            embed_dim=base, out_channels=out_channels, act_fn=act_fn, fc_dim=top // 4)

        # every halving of the length before the deepest point: a length that divides 2**halvings always
        # lines up with the skips again (when the blocks do), and a value function reduces one up to 2**halvings to 1
        self._halvings = sum(block.halvings for block in self.down_blocks) + self.mid_block.halvings
        # blocks that add a Linear projection of a (B, C) embedding: without the MLP the embedding they
        # would get is the (B, C, L) one broadcast over the length, which diffusers' blocks fail on too
        self._blocks_needing_mlp = sorted({type(block).__name__ for block in (
            *self.down_blocks, self.mid_block, *self.up_blocks, self.out_block) if isinstance(block, _PLANNING_BLOCKS)})

    def _check_sample(self, sample: torch.Tensor) -> None:
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"sample must be a torch.Tensor; got {type(sample).__name__}")
        if sample.dim() != 3:
            raise ValueError(f"sample must be (batch, channels, length); got shape {tuple(sample.shape)}")
        if sample.shape[2] == 0:
            raise ValueError(f"sample must be (batch, channels, length) with a length of at least 1; got shape "
                             f"{tuple(sample.shape)}")
        cfg = self.config
        if isinstance(self.down_blocks[0], DownBlock1DNoSkip):
            if cfg.extra_in_channels != self.temb_channels:
                raise ValueError(
                    f"the first block (DownBlock1DNoSkip) appends the {self.temb_channels}-channel time embedding to "
                    f"the sample, so extra_in_channels must be {self.temb_channels}; got {cfg.extra_in_channels} "
                    f"(with the fourier embedding, time_embedding_dim={cfg.extra_in_channels} makes them agree, as "
                    "Dance Diffusion checkpoints need)")
            expected, what = cfg.in_channels, f"in_channels = {cfg.in_channels}"
        else:
            expected = cfg.in_channels + cfg.extra_in_channels
            what = f"in_channels + extra_in_channels = {cfg.in_channels} + {cfg.extra_in_channels} = {expected}"
        if sample.shape[1] != expected:
            raise ValueError(f"sample has {sample.shape[1]} channels; expected {what}")
        if self.time_mlp is None and self._blocks_needing_mlp:
            raise ValueError(f"{', '.join(self._blocks_needing_mlp)} project a (batch, {self.config.block_out_channels[0]}) "
                             "time embedding and need use_timestep_embedding=True; without it the embedding is "
                             "broadcast over the length to (batch, channels, length), which they cannot take "
                             "(diffusers' UNet1DModel fails on this config too)")
        self._check_length(sample.shape[2])
        weight = next(self.parameters())
        check_tensor("sample", sample, input_device(self, self, weight), self.dtype)

    def _trace_length(self, length: int) -> tuple[int, str | None]:
        """Follow ``length`` through the blocks as diffusers' forward does: ``(length reaching the output
        block, None)``, or ``(-1, what goes wrong)`` when an up block's input and the skip it concatenates
        differ in length (the audio blocks' FIR decimation floors odd lengths, the planning blocks' strided
        convs round them up, every upsampler doubles)."""
        skips = []
        for block in self.down_blocks:
            length, skip = block.output_lengths(length)
            skips.append(skip)
        length = self.mid_block.output_length(length)
        if isinstance(self.out_block, OutValueFunctionBlock):
            return length, None
        for i, block in enumerate(self.up_blocks):
            if not skips:
                return -1, (f"up block {i} ({type(block).__name__}) has no skip connection left: the model has "
                            f"{len(self.down_blocks)} down blocks but {len(self.up_blocks)} up blocks")
            skip = skips.pop()
            if length != skip:
                return -1, (f"up block {i} ({type(block).__name__}) would get length {length} but its skip "
                            f"connection has length {skip}")
            length = block.output_length(length)
        return length, None

    def _check_length(self, length: int) -> None:
        factor = 2 ** self._halvings
        reached, problem = self._trace_length(length)
        if isinstance(self.out_block, OutValueFunctionBlock):
            if reached != 1:
                raise ValueError(f"the value function halves the length {self._halvings} times and needs it reduced "
                                 f"to 1, so the sample length must be at most {factor}; got {length}")
        elif problem is not None:
            if length % factor and self._trace_length(factor)[1] is None:
                raise ValueError(f"sample length {length} is not divisible by {factor}, the model's downsampling "
                                 f"factor (2 ** {self._halvings}): {problem}; pad or crop it to a multiple of {factor}")
            raise ValueError(f"the up blocks do not undo the down and mid blocks' resampling at sample length "
                             f"{length} (nor at multiples of {factor}): {problem}")

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                return_dict: bool = True) -> UNet1DOutput | tuple:
        """Denoise ``sample`` ``(B, in_channels, L)`` at ``timestep`` (a number, or a 0-d, ``(1,)`` or ``(B,)``
        tensor; Python numbers are truncated to integers, as in diffusers).

        Returns ``UNet1DOutput(sample=...)``, or ``(sample,)`` with ``return_dict=False``.
        """
        self._check_sample(sample)
        check_timestep(timestep, sample.device)
        timesteps = timesteps_to_tensor(timestep, sample.shape[0], sample.device, scalar_dtype=torch.long)
        temb = self.time_proj(timesteps)
        temb = self.time_mlp(temb.to(sample.dtype)) if self.time_mlp is not None else temb.to(sample.dtype)

        def run(block, *args):
            return maybe_checkpoint(self.gradient_checkpointing, block, *args)

        skips = []
        for block in self.down_blocks:
            sample, block_skips = run(block, sample, temb)
            skips.extend(block_skips)
        sample = run(self.mid_block, sample, temb)
        for block in self.up_blocks:
            sample = run(block, sample, (skips.pop(),), temb)
        if self.out_block is not None:
            sample = self.out_block(sample, temb)

        return UNet1DOutput(sample=sample) if return_dict else (sample,)
