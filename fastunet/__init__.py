"""fastunet: drop-in, faster re-implementations of diffusers' UNets on hand-written Triton kernels."""

from .kernels import get_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = ["get_backend", "set_backend", "use_backend", "__version__"]
