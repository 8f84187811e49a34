"""Benchmark fastunet's kernels and a whole UNet2DModel against torch, torch.compile and diffusers.

Runs, on the device it is given (or finds), the kernel microbenchmarks of the checkout's bench/ folder
(group_norm_act, attention, fourier_filter: each file's setup() and bench/harness.py's warm-up, sync and
memory helpers, the same code pytest-benchmark times) and a UNet2DModel forward and forward+backward
(bench/bench_e2e.py's providers: fastunet, fastunet-torch, diffusers, torch.compile, diffusers+compile;
diffusers' providers only when it is installed). Prints a table of median times and writes
results.md, results.csv and results.png under --out.

Sizes: --size small is a few seconds on a CPU (tiny shapes); --size full uses Stable-Diffusion-sized shapes
(meant for a GPU). On a CPU the "fastunet" provider runs the torch reference path, not the Triton kernels,
which need a GPU outside Triton's interpreter.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import re
import statistics
import sys
import time
from pathlib import Path

import torch

import fastunet

BENCH_DIR = Path(fastunet.__file__).resolve().parents[1] / "bench"

SHAPES = {
    "small": {"group_norm_act": (2, 64, 32, 32), "attention": (1, 2, 256, 256, 32), "fourier_filter": (2, 64, 32, 32),
              "unet": dict(batch=2, size=16, config=dict(sample_size=16, block_out_channels=(32, 64), norm_num_groups=8,
                                                         layers_per_block=1, attention_head_dim=16,
                                                         down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                                         up_block_types=("AttnUpBlock2D", "UpBlock2D")))},
    "full": {"group_norm_act": (2, 320, 64, 64), "attention": (2, 8, 4096, 4096, 64),
             "fourier_filter": (2, 1280, 32, 32),
             "unet": dict(batch=8, size=64, config=dict(
                 sample_size=64, block_out_channels=(128, 128, 256, 256, 512, 512),
                 down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4))},
}
SUITES = ("group_norm_act", "attention", "fourier_filter", "unet")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="device to benchmark on: cpu, cuda or cuda:N (default: cuda when a GPU is present, else cpu); "
                        "cuda without a GPU is refused")
    p.add_argument("--size", choices=["small", "full"], default=None,
                   help="small: tiny shapes, seconds on a CPU; full: Stable-Diffusion-sized shapes "
                        "(default: full on a GPU, small on a CPU)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="where results.md, results.csv and results.png go (default: bench/results/<device name>/)")
    p.add_argument("--only", nargs="+", choices=SUITES, default=list(SUITES), metavar="SUITE",
                   help=f"benchmarks to run, any of {', '.join(SUITES)} (default: all)")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed calls per benchmark, after one warm-up call; the median is reported "
                        "(default: 20 on a GPU, 5 on a CPU)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="dtype of the inputs and models (default: float16 on a GPU, float32 on a CPU)")
    p.add_argument("--no-compile", action="store_true",
                   help="leave out the torch.compile providers (their compilation takes minutes on a CPU)")
    p.add_argument("--no-diffusers", action="store_true", help="leave out the diffusers providers")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    return f"CPU ({os.cpu_count()} cores)"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower()


def _import_bench(module: str):
    """One of the checkout's bench/ modules (they import ``harness`` as a top-level name, as under pytest)."""
    if not (BENCH_DIR / "harness.py").is_file():
        raise SystemExit(f"error: fastunet bench needs the source checkout's bench/ folder (looked in {BENCH_DIR}); "
                         "install fastunet in editable mode from its repository")
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    return importlib.import_module(module)


def _cases(size: str, device: torch.device, dtype: torch.dtype, compile_: bool, diffusers_ok: bool):
    """(suite, benchmark name, provider, zero-argument setup returning the callable, backward?) for every run."""
    cuda = device.type == "cuda"
    shapes = SHAPES[size]
    cases = []

    def keep(provider: str) -> bool:
        if "compile" in provider and not compile_:
            return False
        if provider.startswith("diffusers") and not diffusers_ok:
            return False
        if provider == "fastunet-triton" and not cuda:
            return False
        return True

    for backward in (False, True):
        mode = "fwd+bwd" if backward else "fwd"
        shape = shapes["group_norm_act"]
        for provider in ("fastunet", "fastunet-torch", "fastunet-triton", "torch", "torch.compile"):
            if keep(provider):
                cases.append(("group_norm_act", f"group_norm_act {'x'.join(map(str, shape))} {mode}", provider,
                              lambda p=provider, b=backward, s=shape: _import_bench("bench_group_norm_act").setup(
                                  p, s, dtype, "modulated", b, device), backward))
        shape = shapes["attention"]
        for provider in ("fastunet", "fastunet-torch", "torch", "torch.compile"):
            if keep(provider):
                cases.append(("attention", f"attention {'x'.join(map(str, shape))} {mode}", provider,
                              lambda p=provider, b=backward, s=shape: _import_bench("bench_attention").setup(
                                  p, s, dtype, b, device), backward))
    shape = shapes["fourier_filter"]
    if diffusers_ok:  # the fourier_filter benchmark module imports diffusers' filter as its baseline
        for provider in ("fastunet", "fastunet-torch", "fastunet-triton", "diffusers", "torch.compile"):
            if keep(provider):
                cases.append(("fourier_filter", f"fourier_filter {'x'.join(map(str, shape))}", provider,
                              lambda p=provider, s=shape: _import_bench("bench_fourier_filter").setup(p, s, dtype, device),
                              False))
    spec = dict(cls="UNet2DModel", **shapes["unet"])
    for mode in ("fwd", "fwd_bwd"):
        for provider in ("fastunet", "fastunet-torch", "diffusers", "torch.compile", "diffusers+compile"):
            if keep(provider):
                cases.append(("unet", f"UNet2DModel {size} b{spec['batch']} {spec['size']}x{spec['size']} "
                              f"{mode.replace('_', '+')}", provider,
                              lambda p=provider, m=mode: _unet_setup(p, spec, m, device, dtype), mode == "fwd_bwd"))
    return cases


def _unet_setup(provider: str, spec: dict, mode: str, device, dtype):
    """bench_e2e.setup over this command's UNet spec and dtype."""
    e2e = _import_bench("bench_e2e")
    e2e.CONFIGS[f"cli-{spec['size']}"] = spec
    e2e.DTYPE = dtype
    return e2e.setup(provider, f"cli-{spec['size']}", mode, device)


def run(args) -> int:
    from tqdm import tqdm

    cuda_ok = torch.cuda.is_available()
    name = args.device or ("cuda" if cuda_ok else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        print(f"error: --device {name!r}: {e}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not cuda_ok:
        print(f"error: --device {name}: no CUDA GPU is available on this machine (torch {torch.__version__}, "
              f"CUDA build: {torch.version.cuda or 'no'}); run with --device cpu", file=sys.stderr)
        return 2
    if device.type not in ("cpu", "cuda"):
        print(f"error: --device {name}: fastunet bench runs on cpu or cuda", file=sys.stderr)
        return 2
    size = args.size or ("full" if device.type == "cuda" else "small")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    rounds = args.rounds or (20 if device.type == "cuda" else 5)
    if rounds < 1:
        print(f"error: --rounds must be at least 1, got {rounds}", file=sys.stderr)
        return 2
    diffusers_ok = False
    if not args.no_diffusers:
        try:
            import diffusers  # noqa: F401

            diffusers_ok = True
        except ImportError:
            print("diffusers is not installed: its providers are left out")
    harness = _import_bench("harness")
    out = args.out or Path("bench/results") / _slug(device_name(device))
    cases = [c for c in _cases(size, device, dtype, not args.no_compile, diffusers_ok) if c[0] in args.only]

    rows = []
    for suite, bench, provider, make, backward in tqdm(cases, desc="benchmarks", disable=args.quiet):
        torch.manual_seed(0)
        made = make()  # a callable, or (callable, its forward alone) where a bench file returns both
        fn, forward = made if isinstance(made, tuple) else (made, made)
        harness.warm_up(fn)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            harness.sync()
            times.append(time.perf_counter() - start)
        row = dict(suite=suite, benchmark=bench, provider=provider, median_ms=statistics.median(times) * 1e3,
                   min_ms=min(times) * 1e3, rounds=rounds, saved_mib="", peak_mib="")
        if backward:
            row["saved_mib"] = f"{harness.saved_bytes(forward) / 2**20:.2f}"
        if device.type == "cuda":
            row["peak_mib"] = f"{harness.cuda_peak_bytes(fn) / 2**20:.2f}"
        rows.append(row)

    out.mkdir(parents=True, exist_ok=True)
    header = ["suite", "benchmark", "provider", "median_ms", "min_ms", "rounds", "saved_mib", "peak_mib"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, header)
        writer.writeheader()
        writer.writerows({**r, "median_ms": f"{r['median_ms']:.4f}", "min_ms": f"{r['min_ms']:.4f}"} for r in rows)
    title = f"fastunet bench, {size} size, {str(dtype).removeprefix('torch.')}, on {device_name(device)} " \
            f"(torch {torch.__version__})"
    table = ["| benchmark | provider | median ms | min ms | saved for bwd MiB | peak MiB |", "|---|---|---|---|---|---|"]
    table += [f"| {r['benchmark']} | {r['provider']} | {r['median_ms']:.3f} | {r['min_ms']:.3f} | {r['saved_mib']} | "
              f"{r['peak_mib']} |" for r in rows]
    note = [] if device.type == "cuda" else ["", "On a CPU, `fastunet` runs the torch reference paths, not the Triton "
                                             "kernels."]
    (out / "results.md").write_text("\n".join([f"# {title}", "", *table, *note]) + "\n")
    _plot(rows, out / "results.png", title)
    print(title)
    width = max(len(r["benchmark"]) for r in rows) if rows else 10
    print(f"{'benchmark':<{width}}  {'provider':<18} {'median ms':>10}")
    for r in rows:
        print(f"{r['benchmark']:<{width}}  {r['provider']:<18} {r['median_ms']:>10.3f}")
    print(f"wrote {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.png'}")
    return 0


def _plot(rows: list[dict], path: Path, title: str) -> None:
    """Median time per benchmark, one bar per provider (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = list(dict.fromkeys(r["benchmark"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / max(len(providers), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(benches) + 2), 5))
    for i, provider in enumerate(providers):
        xs = [k + i * width for k, b in enumerate(benches) for r in rows if r["benchmark"] == b and r["provider"] == provider]
        ys = [r["median_ms"] for b in benches for r in rows if r["benchmark"] == b and r["provider"] == provider]
        ax.bar(xs, ys, width, label=provider)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(benches))])
    ax.set_xticklabels(benches, rotation=30, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("median ms")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
