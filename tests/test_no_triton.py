"""fastunet without triton (pyproject installs triton on Linux only): the package imports, every model
runs forward and backward on the torch backend, and asking for the Triton backend gives the clear
error instead of an ImportError.

The check runs in a child process whose ``sys.meta_path`` starts with a finder that refuses
``triton`` and ``triton.*``, with this process's environment minus ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    r"""
    import sys


    class NoTriton:
        "A meta path finder under which triton is not installed."

        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ImportError(f"No module named {name!r} (blocked by the test)")
            return None


    sys.meta_path.insert(0, NoTriton())

    import torch

    import fastunet
    from fastunet.kernels import _backend, attention, fourier_filter, group_norm_act

    assert not _backend.HAS_TRITON
    assert fastunet.get_backend() == "auto"
    torch.manual_seed(0)


    def fwd_bwd(model, *args):
        out = model(*args).sample
        out.square().mean().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert out.isfinite().all() and all(g is not None and g.isfinite().all() for g in grads)


    unet1d = fastunet.UNet1DModel(
        in_channels=2, out_channels=2, extra_in_channels=16, sample_size=32, sample_rate=16000,
        time_embedding_type="fourier", time_embedding_dim=16, flip_sin_to_cos=True, use_timestep_embedding=False,
        block_out_channels=(16, 32, 64), down_block_types=("DownBlock1DNoSkip", "DownBlock1D", "AttnDownBlock1D"),
        up_block_types=("AttnUpBlock1D", "UpBlock1D", "UpBlock1DNoSkip"), mid_block_type="UNetMidBlock1D")
    fwd_bwd(unet1d, torch.randn(2, 2, 32), torch.rand(2))

    unet2d = fastunet.UNet2DModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    fwd_bwd(unet2d, torch.randn(2, 3, 8, 8), torch.tensor([10, 500]))

    cond = fastunet.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    cond.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)  # runs fourier_filter on the skips
    fwd_bwd(cond, torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 32))

    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    fourier_filter(x, 1, 0.5).sum().backward()
    group_norm_act(x, 4).sum().backward()
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    attention(q, q, q).sum().backward()

    fastunet.set_backend("triton")
    assert fastunet.get_backend() == "triton"
    calls = {
        "group_norm_act": lambda: group_norm_act(x, 4),
        "attention": lambda: attention(q, q, q),
        "fourier_filter": lambda: fourier_filter(x, 1, 0.5),
        "UNet2DModel": lambda: unet2d(torch.randn(1, 3, 8, 8), 10),
    }
    for name, call in calls.items():
        try:
            call()
        except RuntimeError as e:
            assert "triton is not installed" in str(e), (name, str(e))
        else:
            raise AssertionError(f"{name} ran on backend 'triton' without triton")
    with fastunet.use_backend("torch"):
        assert fastunet.get_backend() == "torch"
        group_norm_act(x, 4)
    assert fastunet.get_backend() == "triton"
    fastunet.set_backend("auto")
    assert not any(m == "triton" or m.startswith("triton.") for m in sys.modules), "triton was imported"
    print("ok")
    """
)


def test_package_runs_without_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONSAFEPATH"] = "1"
    env.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, cwd="/",
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-6000:]
