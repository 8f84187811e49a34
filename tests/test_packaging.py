"""The kernels/ folder is installed as fastunet.kernels and must never be importable as a bare
``kernels`` (another PyPI project owns that name, and diffusers/transformers probe for it)."""

import importlib.util
import sys

import fastunet.kernels


def test_kernels_is_not_a_top_level_package():
    assert importlib.util.find_spec("kernels") is None, sys.path
    assert "kernels" not in sys.modules


def test_fastunet_kernels_maps_to_the_kernels_folder():
    assert fastunet.kernels.__name__ == "fastunet.kernels"
    assert fastunet.kernels.__file__.replace("\\", "/").endswith("kernels/__init__.py")
