"""Compile Triton kernels for real NVIDIA GPUs without one (re-export for the compile tests).

The machinery lives in :mod:`fastunet.static_report`; see its docstring for the case format,
including the optional ``attrs`` (``[[arg_index, [["tt.divisibility", 16]]], ...]``).
"""

from fastunet.static_report import SHARED_LIMIT, check_fits, compile_cases

__all__ = ["SHARED_LIMIT", "check_fits", "compile_cases"]
