"""``register_once``: every op file registers its custom ops from the package's own module only.

transformers imports a top-level ``kernels`` while probing for the PyPI package of that name; with the
repository root on sys.path that is a second copy of kernels/, with its own backend state. Imported
before or after the package, it must neither register the ops nor take them over: the ops, and the
copy's public functions, run the package's implementations.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import fastunet.kernels

ROOT = pathlib.Path(fastunet.kernels.__file__).resolve().parents[1]


@pytest.mark.parametrize("bare_first", [True, False], ids=["bare-copy-first", "package-first"])
def test_bare_kernels_copy_never_registers(bare_first):
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        if {bare_first}:
            import kernels
        import fastunet.kernels as fk
        import kernels
        assert kernels.__name__ == "kernels" and kernels is not fk
        x = torch.randn(2, 8, 6, 6)
        q = torch.randn(1, 2, 5, 8)
        with fk.use_backend("triton"):  # the package's backend state; the copy's stays "auto"
            for module in (fk, kernels):
                module.group_norm_act(x, 2)
                module.attention(q, q, q)
                module.fourier_filter(x, 1, 0.5)
        expected = {{"_group_norm_act_fwd_kernel": 2, "_attention_short_fwd_kernel": 2,
                     "_fourier_filter_fwd_kernel": 2}}
        assert all(fk.launch_counts[k] == n for k, n in expected.items()), dict(fk.launch_counts)
        assert not kernels.launch_counts, dict(kernels.launch_counts)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
