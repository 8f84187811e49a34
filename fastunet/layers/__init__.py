"""Building blocks shared by the fastunet models (diffusers' names, fastunet's kernels)."""

from .transformer_2d import BasicTransformerBlock, FeedForward, Transformer2DModel

__all__ = ["BasicTransformerBlock", "FeedForward", "Transformer2DModel"]
