"""The backend API of fastunet.kernels (kernels/_backend.py): get_backend, set_backend, use_backend,
the errors for bad names, and the RuntimeError for "triton" on CPU tensors without the interpreter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import fastunet
from fastunet.kernels import _backend


def test_default_is_auto_and_set_backend_switches_it():
    assert fastunet.get_backend() == "auto"  # the autouse fixture resets it before every test
    for name in ("triton", "torch", "auto"):
        fastunet.set_backend(name)
        assert fastunet.get_backend() == name


@pytest.mark.parametrize("bad", ["cuda", "Triton", "", "torch "])
def test_bad_name_is_a_value_error_naming_the_choices(bad):
    message = re.escape(f"backend must be one of ('auto', 'triton', 'torch'); got {bad!r}")
    with pytest.raises(ValueError, match=message):
        fastunet.set_backend(bad)
    with pytest.raises(ValueError, match=message):
        with fastunet.use_backend(bad):
            pass
    assert fastunet.get_backend() == "auto"


@pytest.mark.parametrize("bad", [None, 1, ("torch",)])
def test_non_str_name_is_a_type_error(bad):
    with pytest.raises(TypeError, match="backend must be a str"):
        fastunet.set_backend(bad)
    with pytest.raises(TypeError, match="backend must be a str"):
        with fastunet.use_backend(bad):
            pass


def test_use_backend_overrides_and_restores_even_on_error():
    fastunet.set_backend("torch")
    with fastunet.use_backend("triton"):
        assert fastunet.get_backend() == "triton"
        with fastunet.use_backend("auto"):
            assert fastunet.get_backend() == "auto"
        assert fastunet.get_backend() == "triton"
        fastunet.set_backend("auto")  # the block's override still wins inside it
        assert fastunet.get_backend() == "triton"
    assert fastunet.get_backend() == "auto"
    with pytest.raises(KeyError):
        with fastunet.use_backend("torch"):
            raise KeyError("inside")
    assert fastunet.get_backend() == "auto"


def test_use_backend_is_per_thread():
    seen = {}
    with fastunet.use_backend("torch"):
        worker = threading.Thread(target=lambda: seen.setdefault("other", fastunet.get_backend()))
        worker.start()
        worker.join()
        assert fastunet.get_backend() == "torch"
    assert seen["other"] == "auto"  # the process-wide choice, not this thread's block


def test_use_triton_decisions_on_cpu_under_the_interpreter():
    x = torch.randn(2)
    assert _backend.interpreter_enabled()  # tests/conftest.py sets TRITON_INTERPRET=1
    with fastunet.use_backend("torch"):
        assert not _backend.use_triton(x)
    with fastunet.use_backend("auto"):
        assert not _backend.use_triton(x)  # auto picks Triton for CUDA tensors only
    with fastunet.use_backend("triton"):
        assert _backend.use_triton(x, None)


def test_triton_on_cpu_without_the_interpreter_raises():
    """In a child process with TRITON_INTERPRET removed: "triton" on CPU tensors raises a RuntimeError
    saying what to do, and "auto"/"torch" still run the op."""
    child = textwrap.dedent(
        """
        import torch, fastunet
        from fastunet.kernels import fourier_filter
        x = torch.randn(1, 2, 8, 8)
        for name in ("auto", "torch"):
            with fastunet.use_backend(name):
                fourier_filter(x, 1, 0.5)
        fastunet.set_backend("triton")
        try:
            fourier_filter(x, 1, 0.5)
        except RuntimeError as e:
            print("RuntimeError:", e)
        else:
            print("no error")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RuntimeError:" in proc.stdout, proc.stdout
    assert "TRITON_INTERPRET=1" in proc.stdout and "'auto'/'torch'" in proc.stdout
