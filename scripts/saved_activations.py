"""Activation bytes saved for backward, fastunet against diffusers (issue 12), with a breakdown.

    .venv/bin/python scripts/saved_activations.py [ddpm_cifar|sd_tiny|families|sd15|time] [--top N]

``ddpm_cifar`` and ``sd_tiny`` are the two configs tests/training/test_saved_activations.py asserts on;
``families`` the five tiny UNet families; ``sd15`` the real-size Stable Diffusion 1.5 UNet (batch 1, 64x64
latents, 77 tokens; about 3.4 GB of fp32 weights, one forward per model, no backward); ``time`` the
forward+backward time of the two configs, fastunet and diffusers alternating, median of 7. The
breakdown groups the counted storages by (innermost module, the op that saved them, the op that made
them).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "training"))

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

import test_saved_activations as cases  # noqa: E402
from fastunet.testing import saved_activation_bytes  # noqa: E402

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2, norm_num_groups=32, cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


class _Labeller(TorchFunctionMode):
    """Knows the innermost running module and torch function, to label each saved tensor."""

    def __init__(self):
        super().__init__()
        self.modules: list[str] = []
        self.funcs: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.funcs.append(getattr(func, "__name__", str(func)))
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.funcs.pop()

    def label(self, tensor_maker: str) -> str:
        module = self.modules[-1] if self.modules else "-"
        func = self.funcs[-1] if self.funcs else "-"
        return f"{module:24s} {func:34s} <- {tensor_maker}"


def measure(model, inputs, breakdown: bool = False):
    """Total saved bytes and, with ``breakdown``, ``{label: (bytes, count, example shape)}``."""
    if not breakdown:
        return saved_activation_bytes(lambda: model(**inputs).sample, model), None
    labeller = _Labeller()
    # global module hooks, not per-module ones: fastunet's fused paths step aside for modules with hooks
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
    handles = [register_module_forward_pre_hook(lambda m, a: labeller.modules.append(type(m).__name__)),
               register_module_forward_hook(lambda m, a, o: labeller.modules.pop() and None)]
    details: list = []
    current: list = [None]

    def label():
        return labeller.label(current[0])

    # the maker of a saved tensor (its grad_fn) is known only inside the pack hook: wrap the hook by
    # wrapping saved_tensors_hooks for the duration of the call
    original = torch.autograd.graph.saved_tensors_hooks

    class hooks(original):
        def __init__(self, pack, unpack):
            def wrapped(t):
                current[0] = type(t.grad_fn).__name__ if t.grad_fn is not None else "leaf/no-grad"
                return pack(t)
            super().__init__(wrapped, unpack)

    torch.autograd.graph.saved_tensors_hooks = hooks
    try:
        with labeller:
            total = saved_activation_bytes(lambda: model(**inputs).sample, model, details=details, label=label)
    finally:
        torch.autograd.graph.saved_tensors_hooks = original
        for h in handles:
            h.remove()
    groups: dict = defaultdict(lambda: [0, 0, None])
    for d in details:
        g = groups[d["label"]]
        g[0] += d["nbytes"]
        g[1] += 1
        g[2] = g[2] or d["shape"]
    return total, dict(groups)


def report(name, pair, breakdown=True, top=25):
    ours, theirs, inputs = pair
    rows = {}
    for who, model in (("fastunet", ours), ("diffusers", theirs)):
        total, groups = measure(model, inputs, breakdown)
        rows[who] = total
        if groups:
            print(f"\n== {name} / {who}: {total / 2**20:.2f} MiB")
            for lab, (nbytes, count, shape) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
                print(f"  {nbytes / 2**20:8.2f} MiB {100 * nbytes / total:5.1f}% x{count:<4d} {lab}  e.g. {shape}")
    ratio = rows["fastunet"] / rows["diffusers"]
    print(f"\n{name}: fastunet {rows['fastunet'] / 2**20:.2f} MiB, diffusers {rows['diffusers'] / 2**20:.2f} MiB, "
          f"ratio {ratio:.3f}")
    return ratio


def fwd_bwd_time(pair, repeats=7):
    """Median fwd+bwd seconds of fastunet, fastunet with its memory-saving fused paths off, and
    diffusers, run in turn (so that a busy machine slows all three alike). The fused paths step aside
    for modules with forward hooks, so a no-op hook on every module gives the unfused ops."""
    ours, theirs, inputs = pair

    def unfused():
        handles = [m.register_forward_pre_hook(lambda m, a: None) for m in ours.modules()]
        try:
            return ours(**inputs)
        finally:
            for h in handles:
                h.remove()

    runs = (("fastunet", lambda: ours(**inputs)), ("fastunet-unfused", unfused), ("diffusers", lambda: theirs(**inputs)))
    times = {who: [] for who, _ in runs}
    for _ in range(repeats + 1):
        for who, forward in runs:
            ours.zero_grad(set_to_none=True)
            theirs.zero_grad(set_to_none=True)
            start = time.perf_counter()
            forward().sample.square().mean().backward()
            times[who].append(time.perf_counter() - start)
    return {who: statistics.median(t[1:]) for who, t in times.items()}  # the first run warms up


def main(argv):
    what = argv[0] if argv else "ddpm_cifar"
    top = int(argv[argv.index("--top") + 1]) if "--top" in argv else 25
    torch.manual_seed(0)
    if what in ("ddpm_cifar", "sd_tiny"):
        report(what, cases.ddpm_cifar_pair() if what == "ddpm_cifar" else cases.sd_pair(), top=top)
    elif what == "families":
        for name in cases.NAMES:
            report(name, cases.family_pair(name), breakdown="--breakdown" in argv, top=top)
    elif what == "sd15":
        import diffusers
        import fastunet
        with torch.device("cpu"):
            ours = fastunet.UNet2DConditionModel(**SD15)
            theirs = diffusers.UNet2DConditionModel(**SD15)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        g = torch.Generator().manual_seed(15)
        inputs = dict(sample=torch.randn(1, 4, 64, 64, generator=g), timestep=torch.tensor([500]),
                      encoder_hidden_states=torch.randn(1, 77, 768, generator=g))
        report("sd15", (ours, theirs, inputs), breakdown="--breakdown" in argv, top=top)
    elif what == "time":
        for name, make in (("ddpm_cifar", cases.ddpm_cifar_pair), ("sd_tiny", cases.sd_pair)):
            t = fwd_bwd_time(make())
            print(f"{name}: fwd+bwd fastunet {t['fastunet'] * 1e3:.0f} ms, unfused {t['fastunet-unfused'] * 1e3:.0f} ms, "
                  f"diffusers {t['diffusers'] * 1e3:.0f} ms; fastunet/diffusers {t['fastunet'] / t['diffusers']:.3f}, "
                  f"fastunet/unfused {t['fastunet'] / t['fastunet-unfused']:.3f}")
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
