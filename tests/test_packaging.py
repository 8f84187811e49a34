"""The kernels/ folder is installed as fastunet.kernels and must never be importable as a bare
``kernels``: another PyPI project owns that name (Hugging Face's kernel hub client, which transformers
5.25 requires and imports), and diffusers/transformers probe for it."""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import fastunet.kernels

KERNELS_FOLDER = Path(fastunet.kernels.__file__).resolve().parent


def _is_this_folder(origin: str | None) -> bool:
    return origin is not None and Path(origin).resolve().parent == KERNELS_FOLDER


def test_kernels_folder_is_not_a_top_level_package():
    # a top-level ``kernels`` may exist (the PyPI project, pulled in by transformers); it must not be ours
    for spec in (importlib.util.find_spec("kernels"), importlib.machinery.PathFinder.find_spec("kernels", sys.path)):
        assert spec is None or not _is_this_folder(spec.origin), (spec, sys.path)
    module = sys.modules.get("kernels")
    assert module is None or not _is_this_folder(getattr(module, "__file__", None)), module


def test_fastunet_kernels_maps_to_the_kernels_folder():
    assert fastunet.kernels.__name__ == "fastunet.kernels"
    assert fastunet.kernels.__file__.replace("\\", "/").endswith("kernels/__init__.py")
