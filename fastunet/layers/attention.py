"""The transformer layers shared by the spatial and the temporal transformers: ``FeedForward`` (with its
GELU / GEGLU / approximate-GELU input projections), ``BasicTransformerBlock`` and the mask helper, with
diffusers' parameter names.

``BasicTransformerBlock`` on tokens ``h`` ``(B, N, dim)``::

    h = h + attn1(norm1(h) [+ pe])          # self-attention (cross-attention if only_cross_attention)
    h = h + attn2(norm2(h) [+ pe], context) # cross-attention (self-attention if double_self_attention)
    h = h + ff(norm3(h))                    # GEGLU/GELU MLP, optionally chunked along batch or tokens

``pe`` is the sinusoidal position table (``positional_embeddings="sinusoidal"``, the temporal
transformers': positions are frames), added to both normalised inputs of the attentions.

Attention goes through :class:`fastunet.layers.attention_processor.Attention` and its processors.

Saved activations: in a training forward each LayerNorm runs fused with what reads it, so that the
normalised tokens are recomputed in backward rather than kept: ``norm3`` with the whole feed-forward
(:func:`layer_norm_feed_forward`, which also recomputes the GELU/GEGLU output), ``norm1``/``norm2`` with
the query (self-attention: query, key and value) projections when the default processor runs
(:func:`layer_norm_attention`). Anything else (LoRA layers, hooks, other processors, autocast,
positions, chunking) takes the plain path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configuration import reject_unsupported
from .attention_processor import Attention, TritonAttnProcessor
from .embeddings import SinusoidalPositionalEmbedding


def mask_to_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Turn a ``(B, tokens)`` keep-mask (1 keep, 0 discard) into an additive ``(B, 1, tokens)`` bias
    (0 keep, -10000 discard), as diffusers does. ``None`` and already-converted biases (3-D) pass
    through unchanged."""
    if mask is None or mask.dim() != 2:
        return mask
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


# --------------------------------------------------------------------------------------------------
# Feed-forward
# --------------------------------------------------------------------------------------------------


class GELU(nn.Module):
    """``gelu(proj(x))``; ``approximate="tanh"`` for the tanh approximation."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none", bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)
        self.approximate = approximate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(hidden_states), approximate=self.approximate)


class GEGLU(nn.Module):
    """Gated GELU: ``proj`` maps to ``2 * dim_out`` features ``[value, gate]``; returns ``value * gelu(gate)``."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(hidden_states).chunk(2, dim=-1)
        return value * F.gelu(gate)


class ApproximateGELU(nn.Module):
    """``x * sigmoid(1.702 x)`` of ``proj(x)`` (diffusers' ``"geglu-approximate"``)."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.proj(hidden_states)
        return hidden_states * torch.sigmoid(1.702 * hidden_states)


_FEED_FORWARD_ACTIVATIONS = {
    "geglu": GEGLU,
    "gelu": GELU,
    "gelu-approximate": lambda dim_in, dim_out, bias: GELU(dim_in, dim_out, approximate="tanh", bias=bias),
    "geglu-approximate": ApproximateGELU,
}


def _plain_modules(*modules: nn.Module) -> bool:
    """Whether none of ``modules`` has forward hooks (which a fused path, not calling them, would skip)."""
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _inactive_dropout(module: nn.Module) -> bool:
    return type(module) is nn.Dropout and (not module.training or module.p == 0)


class _LayerNormFeedForward(torch.autograd.Function):
    """``linear2(act(linear1(layer_norm(h))))`` whose backward recomputes the elementwise parts.

    ``act`` is GEGLU (``value * gelu(gate)`` of the two halves of linear1's output) or GELU. Saved: the
    block's residual ``h``, linear1's output ``p`` (returned as a second, non-differentiable output, so
    that the context can keep it) and the weights; the normalised ``h`` that linear1 reads and the
    activation that linear2 reads are recomputed in backward (a LayerNorm and a GELU, elementwise
    passes) instead of being kept from forward. The gradients are those autograd would give through
    the unfused ops.
    """

    @staticmethod
    def forward(ctx, h, norm_weight, norm_bias, eps, weight1, bias1, weight2, bias2, gated, approximate):
        # forward(ctx, ...), not a separate setup_context: apply() then binds no default arguments
        # through inspect.signature, a cost on every call
        normed = F.layer_norm(h, h.shape[-1:], norm_weight, norm_bias, eps)
        p = F.linear(normed, weight1, bias1)
        ctx.save_for_backward(h, norm_weight, norm_bias, weight1, weight2, p)
        ctx.mark_non_differentiable(p)
        ctx.options = (eps, gated, approximate, bias1 is not None, bias2 is not None)
        return F.linear(_LayerNormFeedForward.activate(p, gated, approximate)[0], weight2, bias2), p

    @staticmethod
    def activate(p: torch.Tensor, gated: bool, approximate: str):
        """``(act(p), gelu(gate))``; the second is None for plain GELU."""
        if not gated:
            return F.gelu(p, approximate=approximate), None
        value, gate = p.chunk(2, dim=-1)
        gelu_gate = F.gelu(gate, approximate=approximate)
        return value * gelu_gate, gelu_gate

    @staticmethod
    def backward(ctx, dy, _dp):
        h, norm_weight, norm_bias, weight1, weight2, p = ctx.saved_tensors
        eps, gated, approximate, has_bias1, has_bias2 = ctx.options
        needs = ctx.needs_input_grad
        dims = [h.shape[-1]]
        normed, mean, rstd = torch.native_layer_norm(h, dims, norm_weight, norm_bias, eps)
        act, gelu_gate = _LayerNormFeedForward.activate(p, gated, approximate)
        # a permuted incoming gradient (the transformer's tokens-to-image transpose) is copied once here;
        # the row view and the matmul below would each copy it again
        dy = dy.contiguous()
        dy_rows = dy.view(-1, dy.shape[-1])
        dweight2 = dy_rows.t().mm(act.reshape(-1, act.shape[-1])) if needs[6] else None
        dbias2 = dy_rows.sum(0) if has_bias2 and needs[7] else None
        del act
        dact = dy.matmul(weight2)
        if gated:
            value, gate = p.chunk(2, dim=-1)
            dp = torch.cat([dact * gelu_gate, torch.ops.aten.gelu_backward(dact * value, gate, approximate=approximate)],
                           dim=-1)
        else:
            dp = torch.ops.aten.gelu_backward(dact, p, approximate=approximate)
        del dact, gelu_gate
        dp_rows = dp.reshape(-1, dp.shape[-1])
        dweight1 = dp_rows.t().mm(normed.reshape(-1, dims[0])) if needs[4] else None
        dbias1 = dp_rows.sum(0) if has_bias1 and needs[5] else None
        del normed
        dh = dnorm_weight = dnorm_bias = None
        if any(needs[:3]):
            dh, dnorm_weight, dnorm_bias = torch.ops.aten.native_layer_norm_backward(
                dp.matmul(weight1), h, dims, mean, rstd, norm_weight, norm_bias,
                [needs[0], norm_weight is not None and needs[1], norm_bias is not None and needs[2]])
        return dh, dnorm_weight, dnorm_bias, None, dweight1, dbias1, dweight2, dbias2, None, None


class _LayerNormLinears(torch.autograd.Function):
    """``[linear_i(layer_norm(h)) for each (weight_i, bias_i)]``, saving ``h`` instead of the normalised
    tensor the projections read: backward recomputes the LayerNorm (an elementwise pass), sums the
    projections' input gradients and runs LayerNorm's backward once."""

    @staticmethod
    def forward(ctx, h, norm_weight, norm_bias, eps, *projections):  # ctx first: see _LayerNormFeedForward
        normed = F.layer_norm(h, h.shape[-1:], norm_weight, norm_bias, eps)
        ctx.save_for_backward(h, norm_weight, norm_bias, *projections[0::2])
        ctx.eps = eps
        ctx.has_bias = [b is not None for b in projections[1::2]]
        return tuple(F.linear(normed, projections[i], projections[i + 1]) for i in range(0, len(projections), 2))

    @staticmethod
    def backward(ctx, *douts):
        h, norm_weight, norm_bias, *weights = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dims = [h.shape[-1]]
        normed, mean, rstd = torch.native_layer_norm(h, dims, norm_weight, norm_bias, ctx.eps)
        normed_rows = normed.reshape(-1, dims[0])
        grads, dnormed = [], None
        for i, (dout, weight, has_bias) in enumerate(zip(douts, weights, ctx.has_bias)):
            dout = dout.contiguous()  # once, not in both the row view and the matmul
            rows = dout.view(-1, dout.shape[-1])
            grads.append(rows.t().mm(normed_rows) if needs[4 + 2 * i] else None)
            grads.append(rows.sum(0) if has_bias and needs[5 + 2 * i] else None)
            if any(needs[:3]):
                dnormed = dout.matmul(weight) if dnormed is None else dnormed + dout.matmul(weight)
        del normed, normed_rows
        dh = dnorm_weight = dnorm_bias = None
        if any(needs[:3]):
            dh, dnorm_weight, dnorm_bias = torch.ops.aten.native_layer_norm_backward(
                dnormed, h, dims, mean, rstd, norm_weight, norm_bias,
                [needs[0], norm_weight is not None and needs[1], norm_bias is not None and needs[2]])
        return (dh, dnorm_weight, dnorm_bias, None, *grads)


def _fusable(h: torch.Tensor, norm: nn.Module) -> bool:
    """A training forward outside autocast, through a plain one-dimensional LayerNorm."""
    return (torch.is_grad_enabled() and not torch.is_autocast_enabled(h.device.type)
            and type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1)


def layer_norm_attention(norm: nn.LayerNorm, attn: Attention, h: torch.Tensor,
                         encoder_hidden_states: torch.Tensor | None,
                         attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``attn(norm(h), encoder_hidden_states, attention_mask)`` with the LayerNorm fused into the query
    projection (and, in self-attention, the key and value ones) by :class:`_LayerNormLinears`, so that
    the normalised tokens are not kept for backward; the attention itself and the output projection
    are the processor's own (:meth:`TritonAttnProcessor.attend` and ``project_out``).

    None where that does not apply, and the caller runs ``attn`` as usual: no gradient wanted,
    autocast, another processor than the default :class:`TritonAttnProcessor`, attention options the
    processor would act on (group/spatial/cross norms, added KV, fused projections, a residual or
    rescaled output), projections other than plain ``nn.Linear`` (LoRA), hooks, or encoder states
    of the wrong width (so that ``Attention`` raises its error).
    """
    if not _fusable(h, norm) or type(attn.processor) is not TritonAttnProcessor:
        return None
    if (attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_cross is not None
            or attn.added_kv_proj_dim is not None or attn.residual_connection or attn.rescale_output_factor != 1.0
            or getattr(attn, "fused_projections", False) or attn.to_k is None or h.shape[-1] != attn.query_dim):
        return None
    self_attention = encoder_hidden_states is None
    if not self_attention and (encoder_hidden_states.dim() != 3
                               or encoder_hidden_states.shape[-1] != attn.cross_attention_dim):
        return None
    projections = [attn.to_q, attn.to_k, attn.to_v] if self_attention else [attn.to_q]
    if any(type(p) is not nn.Linear for p in (attn.to_q, attn.to_k, attn.to_v)):
        return None
    if not _plain_modules(norm, attn, *projections):
        return None
    params = [t for p in projections for t in (p.weight, p.bias)]
    qkv = _LayerNormLinears.apply(h, norm.weight, norm.bias, float(norm.eps), *params)
    if self_attention:
        query, key, value = qkv
    else:
        query, key, value = qkv[0], attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
    out = attn.processor.attend(attn, query, key, value, attention_mask, query.shape[0])
    return attn.processor.project_out(attn, out)


def layer_norm_feed_forward(norm: nn.LayerNorm, ff: "FeedForward", h: torch.Tensor) -> torch.Tensor | None:
    """``ff(norm(h))`` as one :class:`_LayerNormFeedForward` node, or None where that does not apply:
    no gradient wanted, autocast, a feed-forward other than a GEGLU/GELU one of plain ``nn.Linear``
    layers with inactive dropouts (LoRA layers, say), or modules with hooks."""
    act = ff.net[0]
    if not _fusable(h, norm) or type(act) not in (GEGLU, GELU):
        return None
    proj, out = act.proj, ff.net[2]
    if type(proj) is not nn.Linear or type(out) is not nn.Linear:
        return None
    if not all(_inactive_dropout(m) for i, m in enumerate(ff.net) if i not in (0, 2)):
        return None
    if not _plain_modules(norm, ff, *ff.net, proj):
        return None
    gated = type(act) is GEGLU
    y, _ = _LayerNormFeedForward.apply(h, norm.weight, norm.bias, float(norm.eps), proj.weight, proj.bias,
                                       out.weight, out.bias, gated, "none" if gated else act.approximate)
    return y


class FeedForward(nn.Module):
    """Transformer MLP ``(..., dim) -> (..., dim_out)``: ``net = [activation-with-projection, Dropout,
    Linear(inner_dim, dim_out)(, Dropout)]`` (state-dict names ``net.0.proj``, ``net.2``)."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, dropout: float = 0.0,
                 activation_fn: str = "geglu", final_dropout: bool = False, inner_dim: int | None = None,
                 bias: bool = True):
        super().__init__()
        if activation_fn not in _FEED_FORWARD_ACTIVATIONS:
            raise NotImplementedError(
                f"activation_fn must be one of {sorted(_FEED_FORWARD_ACTIVATIONS)}; got {activation_fn!r}")
        inner_dim = int(dim * mult) if inner_dim is None else inner_dim
        dim_out = dim if dim_out is None else dim_out
        layers = [_FEED_FORWARD_ACTIVATIONS[activation_fn](dim, inner_dim, bias=bias), nn.Dropout(dropout),
                  nn.Linear(inner_dim, dim_out, bias=bias)]
        if final_dropout:
            layers.append(nn.Dropout(dropout))
        self.net = nn.ModuleList(layers)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            hidden_states = layer(hidden_states)
        return hidden_states


# --------------------------------------------------------------------------------------------------
# BasicTransformerBlock
# --------------------------------------------------------------------------------------------------


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block on tokens ``(B, N, dim)``: self-attention, cross-attention
    (present when ``cross_attention_dim`` or ``double_self_attention`` is set) and a feed-forward,
    each added to the residual stream.

    ``only_cross_attention`` makes ``attn1`` attend to ``encoder_hidden_states`` too;
    ``double_self_attention`` makes ``attn2`` a second self-attention. ``positional_embeddings=
    "sinusoidal"`` adds ``pos_embed`` (a table of ``num_positional_embeddings`` positions) to the
    normalised inputs of both attentions; longer sequences raise ``ValueError``. ``set_chunk_feed_forward``
    runs the feed-forward on slices of ``chunk_size`` along ``dim`` (0 batch, 1 tokens): same result,
    less peak memory.
    """

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, dropout: float = 0.0,
                 cross_attention_dim: int | None = None, activation_fn: str = "geglu",
                 num_embeds_ada_norm: int | None = None, attention_bias: bool = False,
                 only_cross_attention: bool = False, double_self_attention: bool = False,
                 upcast_attention: bool = False, norm_elementwise_affine: bool = True,
                 norm_type: str = "layer_norm", norm_eps: float = 1e-5, final_dropout: bool = False,
                 attention_type: str = "default", positional_embeddings: str | None = None,
                 num_positional_embeddings: int | None = None,
                 ada_norm_continous_conditioning_embedding_dim: int | None = None,
                 ada_norm_bias: int | None = None, ff_inner_dim: int | None = None, ff_bias: bool = True,
                 attention_out_bias: bool = True):
        super().__init__()
        reject_unsupported("Transformer2DModel", "norm_type", norm_type, ("layer_norm",))
        reject_unsupported("Transformer2DModel", "num_embeds_ada_norm", num_embeds_ada_norm, (None,))
        reject_unsupported("Transformer2DModel", "attention_type", attention_type, ("default",))
        reject_unsupported("BasicTransformerBlock", "positional_embeddings", positional_embeddings,
                           (None, "sinusoidal"))
        if positional_embeddings is not None and (
                isinstance(num_positional_embeddings, bool) or not isinstance(num_positional_embeddings, int)
                or num_positional_embeddings < 1):
            raise ValueError(f"positional_embeddings={positional_embeddings!r} needs num_positional_embeddings, "
                             f"the longest sequence, as a positive int; got {num_positional_embeddings!r}")
        self.dim = dim
        self.num_attention_heads = num_attention_heads
        self.attention_head_dim = attention_head_dim
        self.cross_attention_dim = cross_attention_dim
        self.only_cross_attention = only_cross_attention
        self.double_self_attention = double_self_attention
        self.norm_type = norm_type
        self.positional_embeddings = positional_embeddings
        self.num_positional_embeddings = num_positional_embeddings

        self.pos_embed = (SinusoidalPositionalEmbedding(dim, max_seq_length=num_positional_embeddings)
                          if positional_embeddings == "sinusoidal" else None)
        attention_args = dict(query_dim=dim, heads=num_attention_heads, dim_head=attention_head_dim,
                              dropout=dropout, bias=attention_bias, upcast_attention=upcast_attention,
                              out_bias=attention_out_bias)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.attn1 = Attention(cross_attention_dim=cross_attention_dim if only_cross_attention else None,
                               **attention_args)
        if cross_attention_dim is not None or double_self_attention:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
            self.attn2 = Attention(cross_attention_dim=None if double_self_attention else cross_attention_dim,
                                   **attention_args)
        else:
            self.norm2 = None
            self.attn2 = None
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn=activation_fn, final_dropout=final_dropout,
                              inner_dim=ff_inner_dim, bias=ff_bias)

        self._chunk_size: int | None = None
        self._chunk_dim: int = 0

    def set_chunk_feed_forward(self, chunk_size: int | None, dim: int = 0) -> None:
        """Run the feed-forward on slices of ``chunk_size`` along ``dim`` (0: batch, 1: tokens);
        ``None`` turns chunking off."""
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")
        if dim not in (0, 1):
            raise ValueError(f"dim must be 0 (batch) or 1 (tokens); got {dim!r}")
        self._chunk_size = chunk_size
        self._chunk_dim = dim

    def _feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._chunk_size is None:
            return self.ff(hidden_states)
        length = hidden_states.shape[self._chunk_dim]
        if length % self._chunk_size != 0:
            raise ValueError(
                f"feed-forward chunking along dim {self._chunk_dim}: its size {length} must be a multiple of "
                f"chunk_size {self._chunk_size}; pick another chunk_size in enable_forward_chunking")
        return torch.cat([self.ff(part) for part in hidden_states.split(self._chunk_size, self._chunk_dim)],
                         dim=self._chunk_dim)

    def _with_positions(self, normed: torch.Tensor) -> torch.Tensor:
        """``normed + pe`` for a LayerNorm output, added in place: the buffer is this block's own and
        LayerNorm's backward does not read it. (Out of place when the dtypes differ, to promote as
        ``+`` does.)"""
        if self.pos_embed is None:
            return normed
        pe = self.pos_embed.positions(normed.shape[1])
        return normed.add_(pe) if pe.dtype == normed.dtype else normed + pe

    def _attend(self, attn, norm, hidden_states, encoder_hidden_states, mask, kwargs) -> torch.Tensor:
        """``attn(norm(h) [+ pe], context, mask)``, fused with the norm where that applies (no positions,
        no extra processor arguments)."""
        if self.pos_embed is None and not kwargs:
            fused = layer_norm_attention(norm, attn, hidden_states, encoder_hidden_states, mask)
            if fused is not None:
                return fused
        return attn(self._with_positions(norm(hidden_states)), encoder_hidden_states=encoder_hidden_states,
                    attention_mask=mask, **kwargs)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, timestep: torch.Tensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None, class_labels: torch.Tensor | None = None,
                added_cond_kwargs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``hidden_states`` ``(B, N, dim)``, ``encoder_hidden_states`` ``(B, M, cross_attention_dim)``,
        masks as additive biases ``(B, 1, N)`` / ``(B, 1, M)``; ``timestep``, ``class_labels`` and
        ``added_cond_kwargs`` are accepted for signature compatibility (unused by ``layer_norm``)."""
        kwargs = dict(cross_attention_kwargs or {})
        if kwargs.pop("gligen", None) is not None:
            raise NotImplementedError("GLIGEN (cross_attention_kwargs['gligen']) is not supported by fastunet")

        hidden_states = hidden_states + self._attend(
            self.attn1, self.norm1, hidden_states, encoder_hidden_states if self.only_cross_attention else None,
            attention_mask, kwargs)
        if self.attn2 is not None:
            hidden_states = hidden_states + self._attend(self.attn2, self.norm2, hidden_states, encoder_hidden_states,
                                                         encoder_attention_mask, kwargs)
        fused = layer_norm_feed_forward(self.norm3, self.ff, hidden_states) if self._chunk_size is None else None
        return hidden_states + (fused if fused is not None else self._feed_forward(self.norm3(hidden_states)))
