"""diffusers' ``Attention`` layer and its processors, with the attention itself on fastunet's kernels.

The module keeps diffusers' constructor, sub-module names (``to_q``, ``to_k``, ``to_v``, ``to_out``,
``group_norm``, ``spatial_norm``, ``norm_cross``, ``add_k_proj``, ``add_v_proj``) and helper methods,
so diffusers checkpoints load strict and diffusers' own processors run on it.

A processor is a plain callable ``processor(attn, hidden_states, encoder_hidden_states=None,
attention_mask=None, temb=None)``.  The four here share one pipeline (spatial norm, tokens from
``(B, C, H, W)``, group norm, projections, output projection, residual, rescale) and differ only in how
they compute ``softmax(q k^T * scale + mask) v``:

* :class:`TritonAttnProcessor` -- ``fastunet.kernels.attention`` on strided ``(B, H, N, D)`` views of
  the projections; the default;
* :class:`AttnProcessor2_0`    -- ``torch.nn.functional.scaled_dot_product_attention``;
* :class:`AttnProcessor`       -- explicit scores through ``attn.get_attention_scores`` (baddbmm and
  softmax, honouring ``upcast_attention``/``upcast_softmax``);
* :class:`SlicedAttnProcessor` -- the same, ``slice_size`` batch*heads rows at a time;
* :class:`TritonSlicedAttnProcessor` -- :class:`TritonAttnProcessor`'s kernel on at most ``slice_size``
  batch*heads rows per launch; what ``set_attention_slice`` (and pipelines' ``enable_attention_slicing``)
  installs, so slicing never leaves the kernel.

They use only what diffusers' ``Attention`` also has, so the same objects can be set on a diffusers
model: ``diffusers_unet.set_attn_processor(TritonAttnProcessor())``.

:class:`fastunet.modeling.AttentionMixin` gives models diffusers' processor API on top of these.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from typing import Callable, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configuration import reject_unsupported
from ..kernels import attention as attention_kernel
from .normalization import norm_act

logger = logging.getLogger(__name__)

AttentionProcessor = Callable[..., torch.Tensor]

# kwargs diffusers passes around for IP-adapters; dropped without a warning when a processor lacks them
_QUIET_KWARGS = frozenset({"ip_adapter_masks", "ip_hidden_states"})


class SpatialNorm(nn.Module):
    """GroupNorm of ``f`` modulated by a spatial condition: ``norm(f) * conv_y(zq) + conv_b(zq)``.

    ``f`` is ``(B, f_channels, H, W)``; ``zq`` is ``(B, zq_channels, h, w)``, resized to ``(H, W)``
    by nearest-neighbour interpolation first.  (MoVQ, https://huggingface.co/papers/2209.09002.)
    """

    def __init__(self, f_channels: int, zq_channels: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(num_channels=f_channels, num_groups=32, eps=1e-6, affine=True)
        self.conv_y = nn.Conv2d(zq_channels, f_channels, kernel_size=1)
        self.conv_b = nn.Conv2d(zq_channels, f_channels, kernel_size=1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        zq = F.interpolate(zq, size=f.shape[-2:], mode="nearest")
        norm = self.norm_layer
        normed = norm_act(norm, f)
        return normed * self.conv_y(zq) + self.conv_b(zq)


class Attention(nn.Module):
    """Multi-head (cross-)attention with diffusers' constructor, parameter names and processor API.

    ``forward(hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs)``:
    ``hidden_states`` is ``(B, N, query_dim)`` or ``(B, query_dim, H, W)``, ``encoder_hidden_states``
    ``(B, M, cross_attention_dim)``; the output has the shape of ``hidden_states``.  The computation is
    delegated to ``self.processor`` (:class:`TritonAttnProcessor` unless another is given).

    Unsupported diffusers options (``qk_norm``, grouped-query ``kv_heads``, ``context_pre_only``,
    ``pre_only``, ``is_causal``) raise ``NotImplementedError``; no diffusers UNet uses them.
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        kv_heads: int | None = None,
        dim_head: int = 64,
        dropout: float = 0.0,
        bias: bool = False,
        upcast_attention: bool = False,
        upcast_softmax: bool = False,
        cross_attention_norm: str | None = None,
        cross_attention_norm_num_groups: int = 32,
        qk_norm: str | None = None,
        added_kv_proj_dim: int | None = None,
        added_proj_bias: bool | None = True,
        norm_num_groups: int | None = None,
        spatial_norm_dim: int | None = None,
        out_bias: bool = True,
        scale_qk: bool = True,
        only_cross_attention: bool = False,
        eps: float = 1e-5,
        rescale_output_factor: float = 1.0,
        residual_connection: bool = False,
        _from_deprecated_attn_block: bool = False,
        processor: AttentionProcessor | None = None,
        out_dim: int | None = None,
        out_context_dim: int | None = None,
        context_pre_only: bool | None = None,
        pre_only: bool = False,
        elementwise_affine: bool = True,
        is_causal: bool = False,
    ):
        super().__init__()
        for name, value in (("query_dim", query_dim), ("heads", heads), ("dim_head", dim_head)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        reject_unsupported("Attention", "qk_norm", qk_norm, (None,))
        reject_unsupported("Attention", "context_pre_only", context_pre_only, (None,))
        reject_unsupported("Attention", "pre_only", pre_only, (False,))
        reject_unsupported("Attention", "is_causal", is_causal, (False,))
        if kv_heads is not None and kv_heads != (out_dim // dim_head if out_dim is not None else heads):
            raise NotImplementedError(
                f"Attention: grouped-query attention is not supported by fastunet: kv_heads={kv_heads} "
                f"must equal heads={heads}"
            )
        if out_dim is not None and out_dim % dim_head != 0:
            raise ValueError(f"out_dim must be a multiple of dim_head={dim_head}; got out_dim={out_dim}")
        if added_kv_proj_dim is None and only_cross_attention:
            raise ValueError(
                "only_cross_attention=True needs added_kv_proj_dim (the key/value projections of the "
                "encoder states); got added_kv_proj_dim=None"
            )
        if cross_attention_norm not in (None, "layer_norm", "group_norm"):
            raise ValueError(
                f"cross_attention_norm must be None, 'layer_norm' or 'group_norm'; got {cross_attention_norm!r}"
            )

        self.inner_dim = out_dim if out_dim is not None else dim_head * heads
        self.inner_kv_dim = self.inner_dim
        self.query_dim = query_dim
        self.use_bias = bias
        self.is_cross_attention = cross_attention_dim is not None
        self.cross_attention_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.upcast_attention = upcast_attention
        self.upcast_softmax = upcast_softmax
        self.rescale_output_factor = rescale_output_factor
        self.residual_connection = residual_connection
        self.dropout = dropout
        self.out_dim = out_dim if out_dim is not None else query_dim
        self.out_context_dim = out_context_dim if out_context_dim is not None else query_dim
        self.context_pre_only = context_pre_only
        self.pre_only = pre_only
        self.is_causal = is_causal
        # Tells the checkpoint loader to rename the old ``query/key/value/proj_attn`` keys.
        self._from_deprecated_attn_block = _from_deprecated_attn_block
        self.scale_qk = scale_qk
        self.scale = dim_head**-0.5 if scale_qk else 1.0
        self.heads = out_dim // dim_head if out_dim is not None else heads
        # set_attention_slice slices over batch*heads; a slice may hold at most ``heads`` rows per sample
        self.sliceable_head_dim = heads
        self.added_kv_proj_dim = added_kv_proj_dim
        self.added_proj_bias = added_proj_bias
        self.only_cross_attention = only_cross_attention
        #: True once ``fuse_projections`` has built ``to_qkv`` (self-attention) or ``to_kv`` (cross).
        self.fused_projections: bool = False

        self.group_norm = (
            nn.GroupNorm(num_channels=query_dim, num_groups=norm_num_groups, eps=eps, affine=True)
            if norm_num_groups is not None else None
        )
        self.spatial_norm = (
            SpatialNorm(f_channels=query_dim, zq_channels=spatial_norm_dim) if spatial_norm_dim is not None else None
        )
        # diffusers' processors look for these; fastunet builds none of them
        self.norm_q = self.norm_k = self.norm_added_q = self.norm_added_k = None

        if cross_attention_norm == "layer_norm":
            self.norm_cross = nn.LayerNorm(self.cross_attention_dim)
        elif cross_attention_norm == "group_norm":
            channels = added_kv_proj_dim if added_kv_proj_dim is not None else self.cross_attention_dim
            self.norm_cross = nn.GroupNorm(
                num_channels=channels, num_groups=cross_attention_norm_num_groups, eps=1e-5, affine=True
            )
        else:
            self.norm_cross = None

        self.to_q = nn.Linear(query_dim, self.inner_dim, bias=bias)
        if only_cross_attention:
            self.to_k = self.to_v = None
        else:
            self.to_k = nn.Linear(self.cross_attention_dim, self.inner_kv_dim, bias=bias)
            self.to_v = nn.Linear(self.cross_attention_dim, self.inner_kv_dim, bias=bias)
        if added_kv_proj_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, self.inner_kv_dim, bias=added_proj_bias)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, self.inner_kv_dim, bias=added_proj_bias)
        else:
            self.add_k_proj = self.add_v_proj = None
        self.add_q_proj = None
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, self.out_dim, bias=out_bias), nn.Dropout(dropout)])
        self.to_add_out = None

        self.set_processor(processor if processor is not None else TritonAttnProcessor())

    # -- processor ---------------------------------------------------------------------------------

    def set_processor(self, processor: AttentionProcessor) -> None:
        """Use ``processor`` for the attention computation (an ``nn.Module`` one becomes a sub-module)."""
        if not callable(processor):
            raise TypeError(f"processor must be callable; got {type(processor).__name__}")
        if isinstance(getattr(self, "processor", None), nn.Module) and not isinstance(processor, nn.Module):
            # the old processor was registered as a sub-module: unregister it before a plain attribute
            logger.info("replacing processor %s (and its weights) with %s", self.processor, processor)
            del self._modules["processor"]
        self.processor = processor

    def get_processor(self, return_deprecated_lora: bool = False) -> AttentionProcessor | None:
        """The processor in use (``None`` when asked for a deprecated LoRA processor, as in diffusers)."""
        return None if return_deprecated_lora else self.processor

    def set_attention_slice(self, slice_size: int | None) -> None:
        """Slice attention over batch*heads, ``slice_size`` rows at a time; ``None`` turns slicing off."""
        if slice_size is not None and slice_size > self.sliceable_head_dim:
            raise ValueError(f"slice_size {slice_size} has to be smaller or equal to {self.sliceable_head_dim}.")
        self.set_processor(TritonSlicedAttnProcessor(slice_size) if slice_size is not None else TritonAttnProcessor())

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **cross_attention_kwargs,
    ) -> torch.Tensor:
        """Run the processor.  Keyword arguments it does not declare are dropped with a warning."""
        channels = hidden_states.shape[1] if hidden_states.ndim == 4 else hidden_states.shape[-1]
        if channels != self.query_dim:
            raise ValueError(
                f"hidden_states must have query_dim={self.query_dim} channels; got shape {tuple(hidden_states.shape)}"
            )
        # IP-Adapter passes (text states, [image tokens per adapter]); the text states are checked here
        text_states = encoder_hidden_states[0] if isinstance(encoder_hidden_states, tuple) else encoder_hidden_states
        if text_states is not None:
            encoder_hidden_states_shape = tuple(text_states.shape)
            expected = self.added_kv_proj_dim if self.added_kv_proj_dim is not None else self.cross_attention_dim
            if encoder_hidden_states_shape[-1] != expected:
                raise ValueError(
                    f"encoder_hidden_states must have {expected} features in its last dimension; "
                    f"got shape {encoder_hidden_states_shape}"
                )
        accepted = _call_parameters(type(self.processor))
        unused = [k for k in cross_attention_kwargs if k not in accepted and k not in _QUIET_KWARGS]
        if unused:
            logger.warning(
                "cross_attention_kwargs %s are not expected by %s and will be ignored.",
                unused, type(self.processor).__name__,
            )
        kwargs = {k: v for k, v in cross_attention_kwargs.items() if k in accepted}
        return self.processor(
            self, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
        )

    # -- helpers the processors use (diffusers' semantics) -------------------------------------------

    def head_to_batch_dim(self, tensor: torch.Tensor, out_dim: int = 3) -> torch.Tensor:
        """``(B, N, H*D)`` (or ``(B, E, N, H*D)``) -> ``(B*H, N', D)`` for ``out_dim=3``, ``(B, H, N', D)`` for 4."""
        if out_dim not in (3, 4):
            raise ValueError(f"out_dim must be 3 or 4; got {out_dim}")
        if tensor.ndim == 3:
            batch, tokens, dim = tensor.shape
        else:
            batch, extra, tokens, dim = tensor.shape
            tokens *= extra
        heads = self.heads
        tensor = tensor.reshape(batch, tokens, heads, dim // heads).permute(0, 2, 1, 3)
        return tensor.reshape(batch * heads, tokens, dim // heads) if out_dim == 3 else tensor

    def batch_to_head_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(B*H, N, D)`` -> ``(B, N, H*D)``."""
        rows, tokens, dim = tensor.shape
        heads = self.heads
        return tensor.reshape(rows // heads, heads, tokens, dim).permute(0, 2, 1, 3).reshape(
            rows // heads, tokens, heads * dim
        )

    def get_attention_scores(
        self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``softmax(scale * q k^T + mask)`` for ``(B*H, N, D)`` query and ``(B*H, M, D)`` key; the result
        has the query's dtype.  ``upcast_attention`` computes the scores in fp32, ``upcast_softmax`` the
        softmax."""
        dtype = query.dtype
        if self.upcast_attention:
            query, key = query.float(), key.float()
        if attention_mask is None:
            scores = torch.bmm(query, key.transpose(-1, -2)) * self.scale
        else:
            scores = torch.baddbmm(attention_mask.to(query.dtype), query, key.transpose(-1, -2), beta=1, alpha=self.scale)
        if self.upcast_softmax:
            scores = scores.float()
        return scores.softmax(dim=-1).to(dtype)

    def prepare_attention_mask(
        self, attention_mask: torch.Tensor | None, target_length: int, batch_size: int, out_dim: int = 3
    ) -> torch.Tensor | None:
        """Repeat a ``(B, N', M)`` (or ``(B, M)``) mask per head: ``(B*H, N', M)`` for ``out_dim=3``,
        ``(B, H, N', M)`` for 4.  ``M`` must equal ``target_length`` (diffusers pads a mismatched mask in a
        way no processor can use; fastunet raises instead)."""
        if attention_mask is None:
            return None
        if out_dim not in (3, 4):
            raise ValueError(f"out_dim must be 3 or 4; got {out_dim}")
        heads = self.heads
        if attention_mask.ndim not in (2, 3):
            raise ValueError(
                f"attention_mask must be (batch, keys) or (batch[*heads], queries, keys); got shape "
                f"{tuple(attention_mask.shape)}"
            )
        if attention_mask.shape[-1] != target_length:
            raise ValueError(
                f"attention_mask must have {target_length} keys in its last dimension; got shape "
                f"{tuple(attention_mask.shape)}"
            )
        if attention_mask.shape[0] not in (batch_size, batch_size * heads):
            raise ValueError(
                f"attention_mask must have batch {batch_size} or batch*heads {batch_size * heads} in its first "
                f"dimension; got shape {tuple(attention_mask.shape)}"
            )
        if out_dim == 3:
            if attention_mask.shape[0] < batch_size * heads:
                attention_mask = attention_mask.repeat_interleave(heads, dim=0)
            return attention_mask
        return attention_mask.unsqueeze(1).repeat_interleave(heads, dim=1)

    def norm_encoder_hidden_states(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Apply ``norm_cross`` to ``(B, M, C)`` encoder states (a GroupNorm over the channel dim)."""
        if self.norm_cross is None:
            raise ValueError("norm_encoder_hidden_states needs cross_attention_norm; this Attention has none")
        if isinstance(self.norm_cross, nn.GroupNorm):
            return self.norm_cross(encoder_hidden_states.transpose(1, 2)).transpose(1, 2)
        return self.norm_cross(encoder_hidden_states)

    # -- fused projections ---------------------------------------------------------------------------

    @torch.no_grad()
    def fuse_projections(self, fuse: bool = True) -> None:
        """Build one projection for q, k and v (``to_qkv``; self-attention) or for k and v (``to_kv``;
        cross-attention) from the current weights, and set ``fused_projections``."""
        if self.to_k is None:
            raise ValueError("fuse_projections needs to_k/to_v; only_cross_attention=True has none")
        parts = (self.to_k, self.to_v) if self.is_cross_attention else (self.to_q, self.to_k, self.to_v)
        for part in parts:
            if type(part) is not nn.Linear:
                # a fused copy would silently drop what the wrapper adds (a LoRA adapter's update)
                raise ValueError(
                    f"fuse_projections needs plain nn.Linear q/k/v projections; got {type(part).__module__}."
                    f"{type(part).__name__} (a LoRA adapter is loaded: fuse_lora() then unload_lora() keeps its "
                    f"effect in plain weights, unload_lora() drops it)")
        weight = torch.cat([p.weight for p in parts])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=self.use_bias,
                          device=weight.device, dtype=weight.dtype)
        fused.weight.copy_(weight)
        if self.use_bias:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
        if self.is_cross_attention:
            self.to_kv = fused
        else:
            self.to_qkv = fused
        self.fused_projections = bool(fuse)

    def unfuse_projections(self) -> None:
        """Drop ``to_qkv``/``to_kv`` and go back to the separate projections."""
        for name in ("to_qkv", "to_kv"):
            if name in self._modules:
                del self._modules[name]
        self.fused_projections = False


@functools.lru_cache(maxsize=None)
def _call_parameters(processor_type: type) -> frozenset:
    return frozenset(inspect.signature(processor_type.__call__).parameters)


# -- processors ----------------------------------------------------------------------------------------


def _project(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    """q ``(B, N, H*D)`` and k, v ``(B, M, H*D)``, through the fused projections when ``attn`` has them.

    Fused results are split with views, so q, k and v share one buffer.
    """
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if getattr(attn, "fused_projections", False):
        to_qkv, to_kv = getattr(attn, "to_qkv", None), getattr(attn, "to_kv", None)
        if encoder_hidden_states is None and to_qkv is not None:
            return to_qkv(hidden_states).chunk(3, dim=-1)
        if to_kv is not None:
            key, value = to_kv(context).chunk(2, dim=-1)
            return attn.to_q(hidden_states), key, value
    return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)


def _check_mask(mask: torch.Tensor, batch: int, heads: int, queries: int, keys: int) -> torch.Tensor:
    """A user mask -> a ``(B|1, H|1, N|1, M)`` view, broadcast instead of repeated per head."""
    shape = tuple(mask.shape)
    if mask.ndim == 2:
        mask = mask.unsqueeze(1)
    if mask.ndim != 3 or mask.shape[-1] != keys or mask.shape[1] not in (1, queries) \
            or mask.shape[0] not in (batch, batch * heads):
        raise ValueError(
            f"attention_mask must be (batch, keys), (batch, 1|queries, keys) or (batch*heads, 1|queries, keys) "
            f"with batch={batch}, heads={heads}, queries={queries}, keys={keys}; got shape {shape}"
        )
    if mask.shape[0] == batch * heads and heads > 1:
        return mask.view(batch, heads, mask.shape[1], keys)
    return mask.unsqueeze(1)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool keep-mask as an additive one (0 kept, -inf dropped); a float mask cast to ``dtype``."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


class _AttnProcessorBase:
    """The pipeline every processor shares; subclasses implement :meth:`attend`."""

    def attend(self, attn, query, key, value, attention_mask, batch: int) -> torch.Tensor:
        """``(B, N, H*D)`` query, ``(B, M, H*D)`` key/value, the caller's mask -> ``(B, N, H*D)``."""
        raise NotImplementedError

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        if isinstance(encoder_hidden_states, tuple):
            raise TypeError(
                f"{type(self).__name__} takes encoder_hidden_states as one (B, M, C) tensor; got a (text, image) "
                "tuple, which only IP-Adapter processors take (load_ip_adapter / _load_ip_adapter_weights set them)")
        if getattr(attn, "added_kv_proj_dim", None) is not None:
            return self._added_kv_call(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        tokens, encoder_hidden_states, residual, image_shape = self._tokens(attn, hidden_states,
                                                                            encoder_hidden_states, temb)
        query, key, value = self.project(attn, tokens, encoder_hidden_states)
        out = self.attend(attn, query, key, value, attention_mask, query.shape[0])
        return self._finish(attn, self.project_out(attn, out), residual, image_shape)

    def _tokens(self, attn, hidden_states, encoder_hidden_states, temb):
        """Spatial norm, ``(B, C, H, W)`` -> ``(B, H*W, C)`` tokens, group norm, cross norm; returns the
        tokens, the (normed) encoder states, the residual and the image shape (``None`` for tokens)."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if attn.group_norm is not None and image_shape is not None:
            hidden_states = self.group_norm(attn.group_norm, hidden_states)
        if image_shape is not None:
            batch, channels = image_shape[:2]
            hidden_states = hidden_states.view(batch, channels, -1).transpose(1, 2)
        elif attn.group_norm is not None:
            hidden_states = self.group_norm(attn.group_norm, hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross is not None:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        return hidden_states, encoder_hidden_states, residual, image_shape

    def _finish(self, attn, hidden_states, residual, image_shape):
        """Back to the input's layout, then the residual and the output rescale."""
        if image_shape is not None:
            # a channels-last view of the (B, H*W, C) tokens; the residual add below, with the contiguous
            # residual as its first operand, writes a contiguous (B, C, H, W) result in the same pass, so
            # the next GroupNorm and convolution read NCHW instead of copying it (diffusers' sum, in the
            # other order, stays channels-last)
            hidden_states = hidden_states.transpose(1, 2).reshape(image_shape[0], -1, *image_shape[2:])
        if attn.residual_connection:
            hidden_states = residual + hidden_states
        if attn.rescale_output_factor != 1.0:
            hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    def project(self, attn, hidden_states, encoder_hidden_states):
        """q ``(B, N, H*D)``, k and v ``(B, M, H*D)`` from ``(B, N, C)`` tokens and the encoder states."""
        return _project(attn, hidden_states, encoder_hidden_states)

    def project_out(self, attn, hidden_states):
        """The output projection (and dropout) of ``(B, N, H*D)`` attention output."""
        return attn.to_out[1](attn.to_out[0](hidden_states))

    def group_norm(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        """``norm`` applied to ``(B, C, *)``."""
        return norm(x)

    def _added_kv_call(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
        # diffusers' added-KV layout (SimpleCrossAttn blocks): keys are the projected encoder states
        # followed (unless only_cross_attention) by the block's own tokens; the residual is always added.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        batch, channels = hidden_states.shape[:2]
        hidden_states = hidden_states.view(batch, channels, -1).transpose(1, 2)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross is not None:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        if attn.group_norm is not None:
            hidden_states = self.group_norm(attn.group_norm, hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key = attn.add_k_proj(encoder_hidden_states)
        value = attn.add_v_proj(encoder_hidden_states)
        if not attn.only_cross_attention:
            key = torch.cat([key, attn.to_k(hidden_states)], dim=1)
            value = torch.cat([value, attn.to_v(hidden_states)], dim=1)
            if attention_mask is not None and attention_mask.shape[-1] == encoder_hidden_states.shape[1]:
                # a mask over the encoder tokens (UNet2DConditionModel's encoder_attention_mask): the block's
                # own tokens, appended to the keys, are all kept, as in diffusers (which pads the mask by them)
                attention_mask = F.pad(attention_mask, (0, hidden_states.shape[1]),
                                       value=True if attention_mask.dtype == torch.bool else 0.0)
        hidden_states = self.attend(attn, query, key, value, attention_mask, batch)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return residual + hidden_states.transpose(1, 2).reshape(residual.shape)  # contiguous, see _finish


class TritonAttnProcessor(_AttnProcessorBase):
    """fastunet's default processor: ``fastunet.kernels.attention`` on ``(B, H, N, D)`` strided views of
    the projections (no copies), the mask (bool, or an additive bias in any float dtype) broadcast over
    heads instead of repeated, and the group norm through ``fastunet.kernels.group_norm_act``."""

    def group_norm(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        return norm_act(norm, x)

    def attend(self, attn, query, key, value, attention_mask, batch):
        q, k, v, mask = _heads_views(attn, query, key, value, attention_mask, batch)
        out = attention_kernel(q, k, v, attn_mask=mask, scale=attn.scale)
        return out.transpose(1, 2).reshape(batch, -1, query.shape[-1])


def _heads_views(attn, query, key, value, attention_mask, batch):
    """``(B, H, N|M, D)`` strided views of the projections and the mask checked for them."""
    heads = attn.heads
    head_dim = query.shape[-1] // heads
    q = query.view(batch, -1, heads, head_dim).transpose(1, 2)
    k = key.view(batch, -1, heads, head_dim).transpose(1, 2)
    v = value.view(batch, -1, heads, head_dim).transpose(1, 2)
    mask = None
    if attention_mask is not None:
        mask = _check_mask(attention_mask, batch, heads, q.shape[2], k.shape[2])
    return q, k, v, mask


class AttnProcessor2_0(_AttnProcessorBase):
    """``torch.nn.functional.scaled_dot_product_attention`` on the projections, with ``attn.scale``."""

    def attend(self, attn, query, key, value, attention_mask, batch):
        heads = attn.heads
        head_dim = query.shape[-1] // heads
        if attention_mask is not None:
            _check_mask_queries(attention_mask, query.shape[1])
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[1], batch)
            attention_mask = attention_mask.view(batch, heads, -1, attention_mask.shape[-1])
            if attention_mask.dtype != torch.bool:
                attention_mask = attention_mask.to(query.dtype)
        q = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        k = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        v = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
        return out.transpose(1, 2).reshape(batch, -1, heads * head_dim)


def _check_mask_queries(mask: torch.Tensor, queries: int) -> None:
    if mask.ndim == 3 and mask.shape[1] not in (1, queries):
        raise ValueError(
            f"attention_mask must have 1 or {queries} (the number of queries) rows; got shape {tuple(mask.shape)}"
        )


def _batched_mask(attn, attention_mask, queries, keys, batch, dtype):
    """The mask as ``(B*H, N|1, M)`` additive scores, as ``get_attention_scores`` takes it."""
    if attention_mask is None:
        return None
    _check_mask_queries(attention_mask, queries)
    mask = attn.prepare_attention_mask(attention_mask, keys, batch)
    if mask.ndim == 2:
        mask = mask.unsqueeze(1)
    return _additive(mask, dtype)


class AttnProcessor(_AttnProcessorBase):
    """Explicit attention scores (``attn.get_attention_scores``: baddbmm, softmax) times values."""

    def attend(self, attn, query, key, value, attention_mask, batch):
        mask = _batched_mask(attn, attention_mask, query.shape[1], key.shape[1], batch, query.dtype)
        q, k, v = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(q, k, mask)
        return attn.batch_to_head_dim(torch.bmm(probs, v))


class SlicedAttnProcessor(_AttnProcessorBase):
    """:class:`AttnProcessor` computed ``slice_size`` rows of batch*heads at a time, to bound the
    memory of the ``(rows, N, M)`` score matrix."""

    def __init__(self, slice_size: int):
        if isinstance(slice_size, bool) or not isinstance(slice_size, int):
            raise TypeError(f"slice_size must be an int; got {type(slice_size).__name__}")
        if slice_size < 1:
            raise ValueError(f"slice_size must be at least 1; got {slice_size}")
        self.slice_size = slice_size

    def attend(self, attn, query, key, value, attention_mask, batch):
        mask = _batched_mask(attn, attention_mask, query.shape[1], key.shape[1], batch, query.dtype)
        q, k, v = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        out = torch.empty_like(q)
        for start in range(0, q.shape[0], self.slice_size):
            rows = slice(start, start + self.slice_size)
            probs = attn.get_attention_scores(q[rows], k[rows], mask[rows] if mask is not None else None)
            out[rows] = torch.bmm(probs, v[rows])
        return attn.batch_to_head_dim(out)


class TritonSlicedAttnProcessor(SlicedAttnProcessor, TritonAttnProcessor):
    """:class:`TritonAttnProcessor`'s kernel launched on at most ``slice_size`` of the batch*heads rows
    at a time (in batch-major order, as diffusers slices them).

    The kernel's memory is already linear in the sequence length, so slicing only bounds how many
    (sample, head) pairs one launch holds; the result equals the unsliced kernel's."""

    def attend(self, attn, query, key, value, attention_mask, batch):
        heads = attn.heads
        if self.slice_size >= batch * heads:
            return TritonAttnProcessor.attend(self, attn, query, key, value, attention_mask, batch)
        q, k, v, mask = _heads_views(attn, query, key, value, attention_mask, batch)
        out = query.new_empty(query.shape)
        out_heads = out.view(batch, -1, heads, q.shape[-1]).transpose(1, 2)
        for b, h0, h1 in _row_slices(batch, heads, self.slice_size):
            part = None
            if mask is not None:
                part = mask[b if mask.shape[0] > 1 else 0].unsqueeze(0)
                part = part[:, h0:h1] if part.shape[1] > 1 else part
            rows = (slice(b, b + 1), slice(h0, h1))
            out_heads[rows] = attention_kernel(q[rows], k[rows], v[rows], attn_mask=part, scale=attn.scale)
        return out


def _row_slices(batch: int, heads: int, size: int):
    """``(sample, first head, end head)`` pieces covering the batch*heads rows ``size`` at a time; a
    slice that crosses a sample boundary is split there, so that each piece is one sample's heads."""
    for start in range(0, batch * heads, size):
        stop = min(start + size, batch * heads)
        while start < stop:
            b, h0 = divmod(start, heads)
            h1 = min(heads, h0 + stop - start)
            yield b, h0, h1
            start += h1 - h0


# -- IP-Adapter ------------------------------------------------------------------------------------


def downsample_ip_adapter_mask(mask: torch.Tensor, batch: int, queries: int) -> torch.Tensor:
    """One IP image's mask ``(1|B, h, w)`` -> ``(B, queries, 1)`` weights on the query tokens.

    The mask is resized (bicubic) to the token grid of an attention layer: ``queries`` tokens in rows of
    the mask's aspect ratio, the row count rounded up when it does not divide ``queries``. A grid of
    another area (the image and the mask differ in aspect ratio) is zero-padded or cut to ``queries``.
    """
    if mask.ndim != 3:
        raise ValueError(f"an IP-Adapter mask must be (1|batch, height, width); got shape {tuple(mask.shape)}")
    height, width = mask.shape[1:]
    rows = int(math.sqrt(queries / (width / height)))
    rows = max(rows, 1)
    rows += int(queries % rows != 0)
    cols = queries // rows
    resized = F.interpolate(mask.unsqueeze(0), size=(rows, cols), mode="bicubic").squeeze(0)
    if resized.shape[0] < batch:
        resized = resized.repeat(batch, 1, 1)
    flat = resized.reshape(resized.shape[0], -1)
    if flat.shape[1] < queries:
        logger.warning("the IP-Adapter mask's aspect ratio differs from the image's; the mask is zero-padded")
        flat = F.pad(flat, (0, queries - flat.shape[1]), value=0.0)
    return flat[:, :queries].unsqueeze(-1)


class _IPAdapterProcessor(nn.Module):
    """Attention with IP-Adapter's decoupled image cross-attention (https://huggingface.co/papers/2308.06721).

    ``encoder_hidden_states`` is the pair ``(text (B, M, C), [image tokens per adapter])``; each adapter's
    tokens ``(B, I, T, C)`` (``I`` images of ``T`` tokens; or ``(B, T, C)``) get their own key/value
    projections ``to_k_ip[i]``/``to_v_ip[i]``, and the query attends to them separately; the result is
    added to the text attention's output times ``scale[i]`` (a float, or one per image), optionally
    weighted per query by ``ip_adapter_masks[i]`` ``(1, I, h, w)``. Both attentions run through
    :meth:`attend` of the processor class this is mixed with.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int | None = None,
                 num_tokens: int | Sequence[int] = (4,), scale: float | Sequence = 1.0):
        # nn.Module's init by name, not super(): a subclass may also derive from diffusers' processor
        # class (see fastunet.loaders), whose __init__ must not run a second time without arguments
        nn.Module.__init__(self)
        num_tokens = [num_tokens] if isinstance(num_tokens, int) else list(num_tokens)
        scale = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(num_tokens)
        if len(scale) != len(num_tokens):
            raise ValueError(f"scale must have one entry per IP-Adapter ({len(num_tokens)}); got {len(scale)}")
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim or hidden_size
        self.num_tokens = num_tokens
        #: one strength per adapter (a float, or a list with one per image); pipe.set_ip_adapter_scale writes it
        self.scale = scale
        self.to_k_ip = nn.ModuleList(
            [nn.Linear(self.cross_attention_dim, hidden_size, bias=False) for _ in num_tokens])
        self.to_v_ip = nn.ModuleList(
            [nn.Linear(self.cross_attention_dim, hidden_size, bias=False) for _ in num_tokens])

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 scale: float = 1.0, ip_adapter_masks: torch.Tensor | list | None = None) -> torch.Tensor:
        if not isinstance(encoder_hidden_states, tuple) or len(encoder_hidden_states) != 2:
            raise TypeError(
                f"{type(self).__name__} needs encoder_hidden_states=(text states, [image tokens]) from a UNet "
                f"with encoder_hid_proj an IP-Adapter image projection; got {type(encoder_hidden_states).__name__}")
        encoder_hidden_states, ip_states = encoder_hidden_states
        if len(ip_states) != len(self.to_k_ip):
            raise ValueError(f"got image tokens for {len(ip_states)} IP-Adapters; this processor has "
                             f"{len(self.to_k_ip)}")
        masks = self._check_masks(ip_adapter_masks, ip_states)
        tokens, encoder_hidden_states, residual, image_shape = self._tokens(attn, hidden_states,
                                                                            encoder_hidden_states, temb)
        query, key, value = self.project(attn, tokens, encoder_hidden_states)
        batch = query.shape[0]
        out = self.attend(attn, query, key, value, attention_mask, batch)
        for states, strength, to_k, to_v, mask in zip(ip_states, self.scale, self.to_k_ip, self.to_v_ip, masks):
            strengths = strength if isinstance(strength, list) else None
            if (all(s == 0 for s in strengths) if strengths is not None else strength == 0):
                continue
            if mask is None:
                flat = states.reshape(batch, -1, states.shape[-1])
                out = out + strength * self.attend(attn, query, to_k(flat), to_v(flat), None, batch)
                continue
            strengths = strengths if strengths is not None else [strength] * mask.shape[1]
            for image in range(mask.shape[1]):
                image_states = states[:, image]
                image_out = self.attend(attn, query, to_k(image_states), to_v(image_states), None, batch)
                weights = downsample_ip_adapter_mask(mask[:, image], batch, query.shape[1]).to(image_out)
                out = out + strengths[image] * (image_out * weights)
        return self._finish(attn, self.project_out(attn, out), residual, image_shape)

    def _check_masks(self, masks, ip_states) -> list:
        if masks is None:
            return [None] * len(ip_states)
        if torch.is_tensor(masks):
            masks = list(masks.unsqueeze(1))
        if len(masks) != len(ip_states):
            raise ValueError(f"ip_adapter_masks must have one entry per IP-Adapter ({len(ip_states)}); "
                             f"got {len(masks)}")
        for index, (mask, states, strength) in enumerate(zip(masks, ip_states, self.scale)):
            if mask is None:
                continue
            if not torch.is_tensor(mask) or mask.ndim != 4:
                shape = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
                raise ValueError(f"ip_adapter_masks[{index}] must be a (1, images, height, width) tensor "
                                 f"(IPAdapterMaskProcessor's output); got {shape}")
            if states.ndim != 4 or mask.shape[1] != states.shape[1]:
                raise ValueError(f"ip_adapter_masks[{index}] has {mask.shape[1]} masks; IP-Adapter {index} got "
                                 f"image tokens of shape {tuple(states.shape)} (batch, images, tokens, dim)")
            if isinstance(strength, list) and len(strength) != mask.shape[1]:
                raise ValueError(f"ip_adapter_masks[{index}] has {mask.shape[1]} masks but IP-Adapter {index} "
                                 f"has {len(strength)} scales")
        return list(masks)


class TritonIPAdapterAttnProcessor(_IPAdapterProcessor, TritonAttnProcessor):
    """IP-Adapter attention (see :class:`_IPAdapterProcessor`) with the text and every image attention on
    ``fastunet.kernels.attention``. Weights: ``to_k_ip.{i}.weight``, ``to_v_ip.{i}.weight``
    ``(hidden_size, cross_attention_dim)``, as diffusers' ``IPAdapterAttnProcessor2_0``."""


class IPAdapterAttnProcessor2_0(_IPAdapterProcessor, AttnProcessor2_0):
    """IP-Adapter attention on ``torch.nn.functional.scaled_dot_product_attention``."""


# -- Custom Diffusion ------------------------------------------------------------------------------


class TritonCustomDiffusionAttnProcessor(nn.Module, TritonAttnProcessor):
    """Custom Diffusion (https://huggingface.co/papers/2212.04488): fine-tuned copies of a cross-attention's
    key/value projections (``train_kv``: ``to_k_custom_diffusion``, ``to_v_custom_diffusion``
    ``(hidden_size, cross_attention_dim)``) and optionally of its query and output projections
    (``train_q_out``: ``to_q_custom_diffusion``, ``to_out_custom_diffusion.0``), used instead of the
    layer's own; attention on ``fastunet.kernels.attention``. In cross-attention the first (start)
    token's key and value get no gradient, as in the paper. State-dict names are diffusers'."""

    def __init__(self, train_kv: bool = True, train_q_out: bool = True, hidden_size: int | None = None,
                 cross_attention_dim: int | None = None, out_bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if (train_kv or train_q_out) and hidden_size is None:
            raise ValueError("train_kv / train_q_out need hidden_size; got None")
        self.train_kv = train_kv
        self.train_q_out = train_q_out
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        if train_kv:
            self.to_k_custom_diffusion = nn.Linear(cross_attention_dim or hidden_size, hidden_size, bias=False)
            self.to_v_custom_diffusion = nn.Linear(cross_attention_dim or hidden_size, hidden_size, bias=False)
        if train_q_out:
            self.to_q_custom_diffusion = nn.Linear(hidden_size, hidden_size, bias=False)
            self.to_out_custom_diffusion = nn.ModuleList(
                [nn.Linear(hidden_size, hidden_size, bias=out_bias), nn.Dropout(dropout)])

    # nn.Module's __call__ (which runs forward) would come first in the method order
    __call__ = _AttnProcessorBase.__call__

    def project(self, attn, hidden_states, encoder_hidden_states):
        dtype = attn.to_q.weight.dtype
        query = self.to_q_custom_diffusion(hidden_states).to(dtype) if self.train_q_out else attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if self.train_kv:
            weight_dtype = self.to_k_custom_diffusion.weight.dtype
            key = self.to_k_custom_diffusion(context.to(weight_dtype)).to(dtype)
            value = self.to_v_custom_diffusion(context.to(weight_dtype)).to(dtype)
        else:
            key, value = attn.to_k(context), attn.to_v(context)
        if encoder_hidden_states is not None:
            key = torch.cat([key[:, :1].detach(), key[:, 1:]], dim=1)
            value = torch.cat([value[:, :1].detach(), value[:, 1:]], dim=1)
        return query, key, value

    def project_out(self, attn, hidden_states):
        if self.train_q_out:
            return self.to_out_custom_diffusion[1](self.to_out_custom_diffusion[0](hidden_states))
        return super().project_out(attn, hidden_states)


__all__ = [
    "Attention",
    "AttnProcessor",
    "AttnProcessor2_0",
    "IPAdapterAttnProcessor2_0",
    "SlicedAttnProcessor",
    "SpatialNorm",
    "TritonAttnProcessor",
    "TritonCustomDiffusionAttnProcessor",
    "TritonIPAdapterAttnProcessor",
    "downsample_ip_adapter_mask",
]
