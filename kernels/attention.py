"""Scaled dot-product attention (placeholder: torch reference only; the Triton kernels land next)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_reference(q, k, v, attn_mask=None, scale=None):
    """SDPA semantics: q ``(B, H, N, D)``, k/v ``(B, H, M, D)``, mask bool (True keeps) or additive."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def attention(q, k, v, attn_mask=None, scale=None):
    """Attention with ``scaled_dot_product_attention`` semantics (no dropout, no causal mask)."""
    return attention_reference(q, k, v, attn_mask, scale)
