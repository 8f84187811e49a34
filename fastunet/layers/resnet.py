"""``ResnetBlock2D``, the residual block of the 2-D UNets, and ``TemporalConvLayer``, the residual
frame convolutions of the video UNets, with GroupNorm+activation fused.

``ResnetBlock2D``:

    h = conv1(resample(act(norm1(x))))
    h = conv2(dropout(act(norm2(h + t))))                      time_embedding_norm="default"
    h = conv2(dropout(act(norm2(h) * (1 + scale) + shift)))    time_embedding_norm="scale_shift"
    out = (shortcut(resample(x)) + h) / output_scale_factor

with ``t`` (or ``scale, shift``) = ``time_emb_proj(act(temb))``. Both norm+act pairs run as one
``fastunet.kernels.group_norm_act`` call, the time embedding folded in as its ``add`` or ``scale``/``shift``;
in training each runs with the conv after it as one :func:`~fastunet.layers.normalization.norm_act_conv`
node, which keeps the norm's input instead of the activation the conv reads (recomputed in backward).

``TemporalConvLayer`` on frames ``(B*F, C, H, W)``, seen as ``x`` ``(B, C, F, H, W)``::

    h = x
    for conv_i in conv1..conv4:  h = conv3d_(3,1,1)(dropout(silu(GroupNorm(h))))
    out = x + h

``x`` is a strided view of the input, which the layer never copies: the first GroupNorm+SiLU is given
it as it is (and writes a contiguous ``(B, C, F, H, W)`` for the Conv3d), and the residual add writes
its result straight in the input's ``(B*F, C, H, W)`` layout.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .activations import get_activation
from .normalization import check_groups, norm_act, norm_act_conv
from .resampling import Downsample2D, FirDownsample2D, FirUpsample2D, Upsample2D
from .utils import frames_per_sample


class ResnetBlock2D(nn.Module):
    """Residual block ``(B, in_channels, H, W) -> (B, conv_2d_out_channels, H', W')``.

    Arguments and sub-module names follow diffusers' ``ResnetBlock2D``. ``up``/``down`` resample
    both paths after ``norm1``+act by 2x (nearest/avg-pool, the ``(1, 3, 3, 1)`` FIR filter for
    ``kernel="fir"``, plain nearest/avg-pool for ``kernel="sde_vp"``); ``pre_norm`` and
    ``conv_shortcut`` are accepted for compatibility (the shortcut is always a 1x1 conv, as in diffusers).
    """

    def __init__(self, *, in_channels: int, out_channels: int | None = None, conv_shortcut: bool = False,
                 dropout: float = 0.0, temb_channels: int | None = 512, groups: int = 32,
                 groups_out: int | None = None, pre_norm: bool = True, eps: float = 1e-6,
                 non_linearity: str = "swish", skip_time_act: bool = False, time_embedding_norm: str = "default",
                 kernel: str | None = None, output_scale_factor: float = 1.0, use_in_shortcut: bool | None = None,
                 up: bool = False, down: bool = False, conv_shortcut_bias: bool = True,
                 conv_2d_out_channels: int | None = None):
        super().__init__()
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"ResnetBlock2D time_embedding_norm must be 'default' or 'scale_shift'; got "
                             f"{time_embedding_norm!r} ('ada_group'/'spatial' need ResnetBlockCondNorm2D)")
        if kernel not in (None, "fir", "sde_vp"):
            raise ValueError(f"kernel must be None, 'fir' or 'sde_vp'; got {kernel!r}")
        out_channels = in_channels if out_channels is None else out_channels
        groups_out = groups if groups_out is None else groups_out
        conv_2d_out_channels = conv_2d_out_channels or out_channels
        check_groups(in_channels, groups, "ResnetBlock2D norm1")
        check_groups(out_channels, groups_out, "ResnetBlock2D norm2")
        get_activation(non_linearity)  # validates the name

        self.pre_norm = True
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut
        self.up = up
        self.down = down
        self.output_scale_factor = output_scale_factor
        self.time_embedding_norm = time_embedding_norm
        self.skip_time_act = skip_time_act
        self.act_fn = non_linearity

        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels is None:
            self.time_emb_proj = None
        else:
            proj_out = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels
            self.time_emb_proj = nn.Linear(temb_channels, proj_out)
        self.norm2 = nn.GroupNorm(groups_out, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, conv_2d_out_channels, kernel_size=3, stride=1, padding=1)
        self.nonlinearity = get_activation(non_linearity)

        self.upsample = self.downsample = None
        if up:
            self.upsample = FirUpsample2D(in_channels) if kernel == "fir" else Upsample2D(in_channels)
        elif down:
            self.downsample = (FirDownsample2D(in_channels) if kernel == "fir"
                               else Downsample2D(in_channels, use_conv=False, padding=1, name="op"))

        self.use_in_shortcut = in_channels != conv_2d_out_channels if use_in_shortcut is None else use_in_shortcut
        self.conv_shortcut = None
        if self.use_in_shortcut:
            self.conv_shortcut = nn.Conv2d(in_channels, conv_2d_out_channels, kernel_size=1, stride=1, padding=0,
                                           bias=conv_shortcut_bias)

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """input_tensor ``(B, in_channels, H, W)``, temb ``(B, temb_channels)`` (required when the block
        has ``time_emb_proj``) -> ``(B, conv_2d_out_channels, H', W')``."""
        if input_tensor.dim() != 4 or input_tensor.shape[1] != self.in_channels:
            raise ValueError(f"ResnetBlock2D expects (B, {self.in_channels}, H, W) input; "
                             f"got shape {tuple(input_tensor.shape)}")
        resample = self.upsample if self.upsample is not None else self.downsample
        if resample is not None:
            hidden_states = norm_act(self.norm1, input_tensor, self.act_fn)
            input_tensor = resample(input_tensor)
            hidden_states = self.conv1(resample(hidden_states))
        else:
            hidden_states = norm_act_conv(self.norm1, input_tensor, self.conv1, self.act_fn)

        modulation = {}
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("ResnetBlock2D built with temb_channels needs a temb (B, temb_channels); got None")
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)
            if self.time_embedding_norm == "scale_shift":
                modulation["scale"], modulation["shift"] = temb.chunk(2, dim=1)
            else:
                modulation["add"] = temb
        hidden_states = norm_act_conv(self.norm2, hidden_states, self.conv2, self.act_fn, dropout=self.dropout,
                                      **modulation)

        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        output = input_tensor + hidden_states
        # x / 1.0 is x bit for bit: the common factor costs no pass over the output, forward or backward
        return output if self.output_scale_factor == 1.0 else output / self.output_scale_factor


class TemporalConvLayer(nn.Module):
    """Residual stack of four frame convolutions ``(B*F, in_dim, H, W) -> (B*F, in_dim, H, W)``.

    Arguments and sub-module names follow diffusers' ``TemporalConvLayer``: ``conv1`` is
    ``Sequential(GroupNorm, SiLU, Conv3d)``, ``conv2``..``conv4`` are ``Sequential(GroupNorm, SiLU,
    Dropout, Conv3d)``; every Conv3d has kernel ``(3, 1, 1)`` and padding ``(1, 0, 0)``, so it mixes
    neighbouring frames only, and ``conv4``'s is zero-initialised, so a fresh layer is the identity.
    The forward runs each GroupNorm+SiLU as one fused ``norm_act`` with the Sequential's GroupNorm
    parameters (the Sequentials are containers of parameters; they are not called as a whole).

    diffusers builds ``out_dim != in_dim`` but cannot run it (``conv3``'s GroupNorm of ``out_dim``
    channels receives ``in_dim``); fastunet raises ``ValueError`` at construction instead.
    """

    def __init__(self, in_dim: int, out_dim: int | None = None, dropout: float = 0.0, norm_num_groups: int = 32):
        super().__init__()
        out_dim = out_dim or in_dim
        if out_dim != in_dim:
            raise ValueError(f"TemporalConvLayer maps in_dim channels back to in_dim for its residual, and its "
                             f"third GroupNorm expects out_dim: out_dim must equal in_dim={in_dim}; got {out_dim}")
        check_groups(in_dim, norm_num_groups, "TemporalConvLayer")
        self.in_dim = in_dim
        self.out_dim = out_dim

        def frame_conv(channels_in: int, channels_out: int) -> nn.Conv3d:
            return nn.Conv3d(channels_in, channels_out, (3, 1, 1), padding=(1, 0, 0))

        self.conv1 = nn.Sequential(nn.GroupNorm(norm_num_groups, in_dim), nn.SiLU(), frame_conv(in_dim, out_dim))
        self.conv2 = nn.Sequential(nn.GroupNorm(norm_num_groups, out_dim), nn.SiLU(), nn.Dropout(dropout),
                                   frame_conv(out_dim, in_dim))
        self.conv3 = nn.Sequential(nn.GroupNorm(norm_num_groups, out_dim), nn.SiLU(), nn.Dropout(dropout),
                                   frame_conv(out_dim, in_dim))
        self.conv4 = nn.Sequential(nn.GroupNorm(norm_num_groups, out_dim), nn.SiLU(), nn.Dropout(dropout),
                                   frame_conv(out_dim, in_dim))
        nn.init.zeros_(self.conv4[-1].weight)
        nn.init.zeros_(self.conv4[-1].bias)

    def forward(self, hidden_states: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        """hidden_states ``(B*F, in_dim, H, W)``, frames of a sample consecutive -> the same shape, in the
        input's memory layout."""
        batch = frames_per_sample(hidden_states, num_frames, self.in_dim, "TemporalConvLayer")
        _, channels, height, width = hidden_states.shape
        x = hidden_states.view(batch, num_frames, channels, height, width).transpose(1, 2)  # a view
        h = norm_act_conv(self.conv1[0], x, self.conv1[2], "silu")  # reads x in place
        for stage in (self.conv2, self.conv3, self.conv4):
            h = norm_act_conv(stage[0], h, stage[3], "silu", dropout=stage[2])
        # Where the operands' layouts differ, an elementwise op lays its output out like the first: x's
        # memory is (B, F, C, H, W), so the sum is already the (B*F, C, H, W) result and the reshape
        # below is a view.
        return (x + h).transpose(1, 2).reshape(batch * num_frames, channels, height, width)
