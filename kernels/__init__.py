"""fastunet.kernels: hand-written Triton kernels, one op per file, each with a torch reference.

Every public op picks its backend through :mod:`fastunet.kernels._backend` (``auto``, ``triton``,
``torch``).  This package never imports the model code in :mod:`fastunet`.
"""

from ._backend import get_backend, launch_counts, set_backend, use_backend
from .attention import attention, attention_reference
from .fourier_filter import fourier_filter, fourier_filter_reference
from .group_norm_act import group_norm_act, group_norm_act_reference

__all__ = [
    "attention",
    "attention_reference",
    "fourier_filter",
    "fourier_filter_reference",
    "get_backend",
    "group_norm_act",
    "group_norm_act_reference",
    "launch_counts",
    "set_backend",
    "use_backend",
]
