"""Benchmark fastunet's kernels and UNets against torch, torch.compile, SDPA's backends and diffusers.

`fastunet bench --device cuda` is the whole GPU run in one command, within --budget seconds (default
540, inside 10 minutes on one GPU; nothing is downloaded, every model is built from its config with
random weights):

1. the kernel tests, `pytest tests/ops`, on CUDA tensors with the real compiled kernels
   (FASTUNET_TEST_DEVICE=cuda, TRITON_INTERPRET unset), in a child process with --tests-budget seconds;
   its pass/fail counts go into the report;
2. every op, float16 and bfloat16, forward and forward+backward, at the shapes SD 1.5 (512x512), SDXL
   (1024x1024) and AnimateDiff (16 frames) really call it with (recorded from the models built on the
   meta device, fastunet/roofline.py): GroupNorm+act against eager torch and torch.compile; self-, cross-
   and temporal attention against SDPA's FlashAttention-2 and memory-efficient backends, eager
   softmax(QK^T)V and its torch.compile; FreeU's filter against diffusers' fourier_filter and its
   torch.compile;
3. an SD-1.5-sized UNet2DConditionModel at 64x64 latents, batch 2, against diffusers: inference and a
   training step (forward, backward, AdamW step);
4. the results in bench/results/<device name>/results.md, .csv and .png (and kernel_tests.txt).

Cases run in priority order (the UNets and fastunet's kernels against the strongest baseline first,
torch.compile last); each case gets a share of the time left (fewer rounds when time runs short) and
cases that no longer fit are listed as skipped. A provider that fails (an SDPA backend refusing a shape,
out of memory) is reported with its error and the run goes on. Without diffusers its providers are left
out with a message. --dry-run prints the plan and runs nothing (no GPU needed).

--size small runs the same pipeline on tiny shapes (seconds on a CPU); on a CPU the "fastunet" provider
runs the torch reference path, not the Triton kernels. --static hands over to `fastunet.cli.static`
(the static report of the compiled kernels).
"""

from __future__ import annotations

import argparse
import csv
import gc
import importlib
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fastunet

ROOT = Path(fastunet.__file__).resolve().parents[1]
BENCH_DIR = ROOT / "bench"

SUITES = ("kernel_tests", "group_norm_act", "attention", "fourier_filter", "sd15", "unet")

#: Small-size shapes (every suite in seconds on a CPU) and the UNet2DModel configs of the "unet" suite.
SMALL = {
    "group_norm_act": [((2, 64, 16, 16), "modulated", "silu"), ((2, 64, 16, 16), "add", "silu"),
                       ((1, 64, 4, 8, 8), None, None)],  # the last: a temporal transformer's (B, C, F, H, W) norm
    "attention": [("self", (1, 2, 256, 256, 32)), ("cross", (1, 2, 64, 77, 40)), ("temporal", (16, 2, 16, 16, 40))],
    "fourier_filter": [(2, 64, 32, 32)],
}
UNET2D = {
    "small": dict(batch=2, size=16, config=dict(sample_size=16, block_out_channels=(32, 64), norm_num_groups=8,
                                                layers_per_block=1, attention_head_dim=16,
                                                down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                                up_block_types=("AttnUpBlock2D", "UpBlock2D"))),
    "full": dict(batch=8, size=64, config=dict(
        sample_size=64, block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4)),
}
#: The SD 1.5 UNet2DConditionModel of the "sd15" suite (small: a tiny model of the same structure).
SD15 = {
    "small": dict(cls="UNet2DConditionModel", batch=2, size=16, tokens=77,
                  config=dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
                              norm_num_groups=8, attention_head_dim=8,
                              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))),
    "full": dict(cls="UNet2DConditionModel", batch=2, size=64, tokens=77,
                 config=dict(sample_size=64, cross_attention_dim=768)),
}
#: Per (op, model, kind): how many of the distinct shapes (heaviest first) the full plan times.
SHAPES_PER_KIND = {"group_norm_act": 4, "attention": 3, "fourier_filter": 4}
#: HBM bandwidth (bytes/s) and dense fp16 tensor-core peak (FLOP/s) of known GPUs, matched in the device name.
CEILINGS = {"H200": (4.8e12, 989e12), "H100": (3.35e12, 989e12), "A100": (2.0e12, 312e12)}
#: The least time a case must have left to start, by kind (compilation dominates the compile providers).
MIN_SECONDS = {"op": 1.0, "op-compile": 15.0, "unet": 20.0, "unet-compile": 240.0}
#: Kernel tests left out on CUDA because they test Triton's interpreter itself: test_traffic.py counts the
#: bytes the kernels move by wrapping the interpreter, and one backend test asserts the interpreter is on.
INTERPRETER_ONLY_TESTS = ("tests/ops/test_traffic.py",
                          "tests/ops/test_backend_api.py::test_use_triton_decisions_on_cpu_under_the_interpreter")
#: Kernel tests left out on CUDA because a GPU adds nothing to them (they compile for sm_80/sm_90 with
#: the bundled ptxas and read the cubins, as on any machine), so the budget goes to the kernels' runs.
NO_GPU_NEEDED_TESTS = ("tests/ops/test_attention_compile.py", "tests/ops/test_group_norm_act_compile.py")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="device to benchmark on: cpu, cuda or cuda:N (default: cuda when a GPU is present, else cpu); "
                        "cuda without a GPU is refused")
    p.add_argument("--size", choices=["small", "full"], default=None,
                   help="small: tiny shapes, seconds on a CPU; full: the real shapes of SD 1.5, SDXL and AnimateDiff "
                        "(default: full on a GPU, small on a CPU)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="where results.md, results.csv and results.png go (default: bench/results/<device name>/)")
    p.add_argument("--only", nargs="+", choices=SUITES, default=None, metavar="SUITE",
                   help=f"benchmarks to run, any of {', '.join(SUITES)} (default: all; kernel_tests only on CUDA)")
    p.add_argument("--rounds", type=int, default=None,
                   help="at most this many timed calls per benchmark, after one warm-up call; the median is reported "
                        "(default: 20 on a GPU, 5 on a CPU; fewer when the budget runs short)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="one dtype for inputs and models (default: float16 and bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="wall time for the whole run, kernel tests included; cases that no longer fit are "
                        "skipped and listed (default: 540 on a GPU, none on a CPU)")
    p.add_argument("--tests-budget", type=float, default=150.0, metavar="SECONDS",
                   help="wall time for the kernel tests' child process, within --budget (default: 150)")
    p.add_argument("--no-compile", action="store_true",
                   help="leave out the torch.compile providers (their compilation takes minutes on a CPU)")
    p.add_argument("--no-diffusers", action="store_true", help="leave out the diffusers providers")
    p.add_argument("--dry-run", action="store_true", help="print the plan (suites, shapes, providers) and run nothing")
    p.add_argument("--static", action="store_true",
                   help="run the static report instead (fastunet.cli.static: the kernels compiled for sm_80/sm_90 "
                        "and read from their cubins)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


@dataclass
class Case:
    """One timed run: a provider on one shape, dtype and mode. ``bytes``/``flops``: the least traffic and
    the FLOPs of the op (the rate columns); ``kind`` keys :data:`MIN_SECONDS`; ``args`` go to the bench
    file's ``setup``."""

    suite: str
    label: str
    provider: str
    dtype: torch.dtype
    backward: bool
    priority: int
    kind: str = "op"
    models: tuple = ()
    bytes: float = 0.0
    flops: float = 0.0
    args: dict = field(default_factory=dict)

    @property
    def mode(self) -> str:
        if self.suite in ("sd15", "unet"):
            return self.args["mode"].replace("_", "+")
        return "fwd+bwd" if self.backward else "fwd"

    @property
    def name(self) -> str:
        return f"{self.label} {str(self.dtype).removeprefix('torch.')} {self.mode}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
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


def _x(shape) -> str:
    return "x".join(map(str, shape))


def real_shapes() -> dict[str, list[tuple]]:
    """The distinct op shapes of SD 1.5, SDXL and AnimateDiff, heaviest first per (model, kind), at most
    :data:`SHAPES_PER_KIND` of each, merged over the models:
    ``group_norm_act``: ``(shape, variant, activation, models)``; ``attention``: ``(kind, (B, H, N, M, D),
    models)``; ``fourier_filter``: ``(shape, models)``."""
    from .. import roofline

    kinds = {"self-attention": "self", "cross-attention": "cross", "temporal attention": "temporal"}
    picked: dict[str, dict] = {"group_norm_act": {}, "attention": {}, "fourier_filter": {}}
    for model in roofline.MODELS:
        weight: dict[tuple, float] = {}
        for call in roofline.record(model):
            if call.category == "GroupNorm+act":
                variant = "modulated" if call.meta["has_scale"] else ("add" if call.meta["has_add"] else None)
                activation = None if call.meta["activation"] in (None, "none") else call.meta["activation"]
                key = ("group_norm_act", model, "gn", (call.shapes[0], variant, activation))
            elif call.category in kinds:
                key = ("attention", model, kinds[call.category], (kinds[call.category], call.meta["bhnmd"]))
            elif call.category == "FreeU filter":
                key = ("fourier_filter", model, "freeu", (call.shapes[0],))
            else:
                continue
            weight[key] = weight.get(key, 0.0) + roofline.lower_bound_s(call, "H100")
        by_kind: dict[tuple, list] = {}
        for key in sorted(weight, key=lambda k: -weight[k]):
            by_kind.setdefault(key[:3], []).append(key[3])
        for (op, _, _), shapes in by_kind.items():
            for shape in shapes[:SHAPES_PER_KIND[op]]:
                picked[op].setdefault(shape, []).append(model)
    return {op: [(*shape, tuple(models)) for shape, models in shapes.items()] for op, shapes in picked.items()}


def build_plan(size: str, device_type: str, dtypes: list[torch.dtype], compile_: bool, diffusers_ok: bool,
               only: list[str] | None = None) -> list[Case]:
    """Every case of a run, in the order they run (a pure function: nothing is built or timed).

    ``size`` "full" takes the ops' shapes from the real models (:func:`real_shapes`), "small" from
    :data:`SMALL`. CUDA-only providers (SDPA's forced backends) are left out on other devices, the
    torch.compile ones without ``compile_``, diffusers' without ``diffusers_ok``.
    """
    if size not in ("small", "full"):
        raise ValueError(f"size must be 'small' or 'full'; got {size!r}")
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda'; got {device_type!r}")
    suites = list(only) if only is not None else [s for s in SUITES if s != "kernel_tests" or device_type == "cuda"]
    for suite in suites:
        if suite not in SUITES:
            raise ValueError(f"suite must be one of {SUITES}; got {suite!r}")
    cuda = device_type == "cuda"
    cases: list[Case] = []

    def keep(provider: str) -> bool:
        if "compile" in provider and not compile_:
            return False
        if provider.startswith("diffusers") and not diffusers_ok:
            return False
        if provider.startswith("sdpa-") and not cuda:
            return False
        return True

    def add(case: Case) -> None:
        if keep(case.provider):
            cases.append(case)

    shapes = real_shapes() if size == "full" else {
        "group_norm_act": [(*s, ("small",)) for s in SMALL["group_norm_act"]],
        "attention": [(*s, ("small",)) for s in SMALL["attention"]],
        "fourier_filter": [(s, ("small",)) for s in SMALL["fourier_filter"]]}
    # priority: 1 UNets; 2/3 kernels against the strongest baseline (first dtype, then the others);
    # 4 the other baselines; 5 the compile providers (first shape of each kind and model only)
    for d_index, dtype in enumerate(dtypes):
        head = 2 if d_index == 0 else 3
        for backward in (False, True):
            if "group_norm_act" in suites:
                seen_compile: set = set()
                for shape, variant, activation, models in shapes["group_norm_act"]:
                    numel = torch.Size(shape).numel()
                    label = f"group_norm_act {_x(shape)} {variant or 'plain'} {activation or 'no-act'}"
                    common = dict(suite="group_norm_act", label=label, dtype=dtype, backward=backward, models=models,
                                  bytes=(5 if backward else 2) * numel * dtype.itemsize,
                                  args=dict(shape=shape, variant=variant or "plain", activation=activation))
                    for provider in ("fastunet", "torch"):
                        add(Case(provider=provider, priority=head, **common))
                    if models[0] not in seen_compile:
                        seen_compile.add(models[0])
                        add(Case(provider="torch.compile", priority=5, kind="op-compile", **common))
            if "attention" in suites:
                seen_compile = set()
                for kind, bhnmd, models in shapes["attention"]:
                    b, h, n, m, d = bhnmd
                    common = dict(suite="attention", label=f"attention {kind} {_x(bhnmd)}", dtype=dtype,
                                  backward=backward, models=models,
                                  flops=4.0 * b * h * n * m * d * (3.5 if backward else 1.0), args=dict(shape=bhnmd))
                    add(Case(provider="fastunet", priority=head, **common))
                    add(Case(provider="sdpa-flash", priority=head, **common))
                    add(Case(provider="sdpa-mem-efficient", priority=4, **common))
                    add(Case(provider="torch-math", priority=4, **common))
                    if (kind, models[0]) not in seen_compile:
                        seen_compile.add((kind, models[0]))
                        add(Case(provider="torch.compile", priority=5, kind="op-compile", **common))
            if "fourier_filter" in suites:
                seen_compile = set()
                for shape, models in shapes["fourier_filter"]:
                    numel = torch.Size(shape).numel()
                    common = dict(suite="fourier_filter", label=f"fourier_filter {_x(shape)}", dtype=dtype,
                                  backward=backward, models=models, bytes=(4 if backward else 2) * numel * dtype.itemsize,
                                  args=dict(shape=shape))
                    add(Case(provider="fastunet", priority=head, **common))
                    add(Case(provider="diffusers", priority=head, **common))
                    if models[0] not in seen_compile:
                        seen_compile.add(models[0])
                        add(Case(provider="torch.compile", priority=5, kind="op-compile", **common))
    unet_dtype = dtypes[0]
    if "sd15" in suites:
        spec = SD15[size]
        for mode in ("fwd", "train"):
            for provider, priority, kind in (("fastunet", 1, "unet"), ("diffusers", 1, "unet"),
                                             ("torch.compile", 6, "unet-compile"),
                                             ("diffusers+compile", 6, "unet-compile")):
                add(Case(suite="sd15", label=f"UNet2DConditionModel sd15-{size} b{spec['batch']} "
                         f"{spec['size']}x{spec['size']}", provider=provider, dtype=unet_dtype,
                         backward=mode != "fwd", priority=priority, kind=kind, models=("sd15",),
                         args=dict(spec=spec, mode=mode)))
    if "unet" in suites:
        spec = dict(cls="UNet2DModel", **UNET2D[size])
        for mode in ("fwd", "fwd_bwd"):
            for provider, priority, kind in (("fastunet", 4, "unet"), ("fastunet-torch", 4, "unet"),
                                             ("diffusers", 4, "unet"), ("torch.compile", 6, "unet-compile"),
                                             ("diffusers+compile", 6, "unet-compile")):
                add(Case(suite="unet", label=f"UNet2DModel {size} b{spec['batch']} {spec['size']}x{spec['size']}",
                         provider=provider, dtype=unet_dtype, backward=mode != "fwd", priority=priority, kind=kind,
                         args=dict(spec=spec, mode=mode)))
    return sorted(cases, key=lambda c: c.priority)  # stable: within a priority, the order above


def make_callable(case: Case, device: torch.device):
    """``(callable, its forward alone)`` for ``case``: the bench file's setup on ``device``."""
    a = case.args
    if case.suite == "group_norm_act":
        fn = _import_bench("bench_group_norm_act").setup(case.provider, a["shape"], case.dtype, a["variant"],
                                                         case.backward, device, activation=a["activation"])
        return fn, fn
    if case.suite == "attention":
        return _import_bench("bench_attention").setup(case.provider, a["shape"], case.dtype, case.backward, device)
    if case.suite == "fourier_filter":
        fn = _import_bench("bench_fourier_filter").setup(case.provider, a["shape"], case.dtype, device,
                                                         backward=case.backward)
        return fn, fn
    e2e = _import_bench("bench_e2e")
    spec = a["spec"]
    name = f"cli-{case.suite}-{spec['size']}"
    e2e.CONFIGS[name] = spec
    e2e.DTYPE = case.dtype
    fn = e2e.setup(case.provider, name, a["mode"], device)
    return fn, fn


def print_plan(cases: list[Case], out=None) -> None:
    """One line per case: priority, suite, name, provider and the models that call the shape."""
    out = out or sys.stdout
    print(f"{len(cases)} cases", file=out)
    for c in cases:
        print(f"  [{c.priority}] {c.suite:<15} {c.name:<60} {c.provider:<20} {','.join(c.models)}", file=out)


def kernel_test_command(device_type: str, paths: list[str] | None = None) -> list[str]:
    """The pytest command line of the kernel tests (verbose, so outcomes can be counted as they finish);
    on CUDA without :data:`INTERPRETER_ONLY_TESTS` and :data:`NO_GPU_NEEDED_TESTS`."""
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--tb=line", *(paths or ["tests/ops"])]
    if device_type == "cuda":
        cmd += [f"--deselect={p}" if "::" in p else f"--ignore={p}"
                for p in INTERPRETER_ONLY_TESTS + NO_GPU_NEEDED_TESTS]
    return cmd


def run_kernel_tests(device_type: str, timeout_s: float, paths: list[str] | None = None,
                     out_file: Path | None = None) -> dict:
    """``pytest tests/ops`` in a child process on ``device_type`` (FASTUNET_TEST_DEVICE; on CUDA with
    TRITON_INTERPRET unset), stopped after ``timeout_s``. Returns the counts per outcome read from its
    verbose output (so a run that timed out still reports what finished), ``timed_out``, ``seconds``,
    the command and the failing test ids."""
    cmd = kernel_test_command(device_type, paths)
    env = dict(os.environ, FASTUNET_TEST_DEVICE=device_type, PYTHONUNBUFFERED="1")  # unbuffered: a timed-out
    # child's finished tests are still in what it printed
    if device_type == "cuda":
        env.pop("TRITON_INTERPRET", None)
    else:
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        output, timed_out, rc = proc.stdout + proc.stderr, False, proc.returncode
    except subprocess.TimeoutExpired as e:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")

        output, timed_out, rc = text(e.stdout) + text(e.stderr), True, None
    seconds = time.perf_counter() - start
    if out_file is not None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(output)
    counts = {k: 0 for k in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")}
    failing = []
    for line in output.splitlines():
        m = re.match(r"^(\S+::\S.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", line)
        if m:
            outcome = {"XFAIL": "xfailed", "XPASS": "xpassed"}.get(m.group(2), m.group(2).lower())
            counts[outcome] += 1
            if outcome in ("failed", "error"):
                failing.append(m.group(1))
    return dict(counts=counts, timed_out=timed_out, returncode=rc, seconds=seconds, command=" ".join(cmd),
                failing=failing,
                ignored=list(INTERPRETER_ONLY_TESTS + NO_GPU_NEEDED_TESTS) if device_type == "cuda" else [])


def _rate(case: Case, seconds: float, device: torch.device) -> tuple[str, str]:
    """(rate, fraction of the device's ceiling) of one case: GB/s for memory-bound ops, TFLOP/s for attention."""
    ceiling = next((v for k, v in CEILINGS.items() if device.type == "cuda" and k in device_name(device)), None)
    if case.bytes:
        rate = case.bytes / seconds
        return f"{rate / 1e9:.3g} GB/s", f"{rate / ceiling[0]:.2f}" if ceiling else ""
    if case.flops:
        rate = case.flops / seconds
        return f"{rate / 1e12:.3g} TFLOP/s", f"{rate / ceiling[1]:.2f}" if ceiling else ""
    return "", ""


def run_cases(cases: list[Case], device: torch.device, rounds: int, budget_s: float | None,
              started: float, progress=None) -> list[dict]:
    """Time every case that fits in the budget; one row per case (status "ok", "skipped: ..." or "error: ...")."""
    harness = _import_bench("harness")
    rows = []
    for i, case in enumerate(cases):
        if progress is not None:
            progress(i, len(cases))
        row = dict(suite=case.suite, benchmark=case.name, provider=case.provider, models=" ".join(case.models),
                   median_ms="", min_ms="", rounds=0, rate="", of_peak="", saved_mib="", peak_mib="", status="ok")
        rows.append(row)
        left = None if budget_s is None else budget_s - (time.perf_counter() - started)
        if left is not None and left < MIN_SECONDS[case.kind]:
            row["status"] = f"skipped: time budget ({max(left, 0):.0f} s left, needs {MIN_SECONDS[case.kind]:.0f})"
            continue
        share = None if left is None else max(0.2, left / max(1, len(cases) - i) * 2)
        try:
            torch.manual_seed(0)
            fn, forward = make_callable(case, device)
            harness.warm_up(fn)
            start = time.perf_counter()
            fn()
            harness.sync()
            first = time.perf_counter() - start
            n = rounds if share is None else max(1, min(rounds, int(share / max(first, 1e-6))))
            times = [first]
            for _ in range(n - 1):
                start = time.perf_counter()
                fn()
                harness.sync()
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            row.update(median_ms=median * 1e3, min_ms=min(times) * 1e3, rounds=len(times))
            row["rate"], row["of_peak"] = _rate(case, median, device)
            if case.backward:
                row["saved_mib"] = f"{harness.saved_bytes(forward) / 2**20:.2f}"
            if device.type == "cuda":
                row["peak_mib"] = f"{harness.cuda_peak_bytes(fn) / 2**20:.2f}"
        except Exception as e:  # noqa: BLE001 - one provider failing (a backend refusing a shape, OOM) is a result
            row["status"] = "error: " + (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        finally:
            fn = forward = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


HEADER = ["suite", "benchmark", "provider", "models", "median_ms", "min_ms", "rounds", "rate", "of_peak",
          "saved_mib", "peak_mib", "status"]


def write_report(rows: list[dict], out: Path, title: str, tests: dict | None, notes: list[str]) -> None:
    """results.csv (every row), results.md (tests summary, then the table) and results.png."""
    out.mkdir(parents=True, exist_ok=True)

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else v

    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, HEADER)
        writer.writeheader()
        writer.writerows({k: fmt(r[k]) for k in HEADER} for r in rows)
    lines = [f"# {title}", ""]
    if tests is not None:
        c = tests["counts"]
        state = f"stopped after {tests['seconds']:.0f} s (budget)" if tests["timed_out"] else \
            f"finished in {tests['seconds']:.0f} s, exit {tests['returncode']}"
        lines += ["## Kernel tests", "", f"`{tests['command']}`: {state}.", "",
                  ", ".join(f"{v} {k}" for k, v in c.items()) + ".", ""]
        if tests["ignored"]:
            lines += [f"Not run on CUDA (interpreter-only, or compile-only without a GPU's help): "
                      f"{', '.join(tests['ignored'])}.", ""]
        if tests["failing"]:
            lines += ["Failing:", ""] + [f"- `{t}`" for t in tests["failing"][:50]] + [""]
    lines += ["## Timings", "", "| benchmark | provider | models | median ms | min ms | rounds | rate | of peak | "
              "saved for bwd MiB | peak MiB | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        med = f"{r['median_ms']:.3f}" if r["median_ms"] != "" else ""
        mn = f"{r['min_ms']:.3f}" if r["min_ms"] != "" else ""
        lines.append(f"| {r['benchmark']} | {r['provider']} | {r['models']} | {med} | {mn} | {r['rounds']} | "
                     f"{r['rate']} | {r['of_peak']} | {r['saved_mib']} | {r['peak_mib']} | {r['status']} |")
    lines += ["", *notes]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot([r for r in rows if r["median_ms"] != ""], out / "results.png", title)


def run(args) -> int:
    if args.static:
        try:
            static = importlib.import_module("fastunet.cli.static")
        except ModuleNotFoundError as e:
            if e.name != "fastunet.cli.static":
                raise
            print("error: --static needs fastunet/cli/static.py (the static report), which this checkout does not "
                  "have", file=sys.stderr)
            return 2
        return static.run(args)

    cuda_ok = torch.cuda.is_available()
    name = args.device or ("cuda" if cuda_ok else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        print(f"error: --device {name!r}: {e}", file=sys.stderr)
        return 2
    if device.type not in ("cpu", "cuda"):
        print(f"error: --device {name}: fastunet bench runs on cpu or cuda", file=sys.stderr)
        return 2
    if device.type == "cuda" and not cuda_ok and not args.dry_run:
        print(f"error: --device {name}: no CUDA GPU is available on this machine (torch {torch.__version__}, "
              f"CUDA build: {torch.version.cuda or 'no'}); run with --device cpu, or --dry-run to see the plan",
              file=sys.stderr)
        return 2
    if device.type == "cuda" and cuda_ok and device.index is not None and device.index >= torch.cuda.device_count():
        print(f"error: --device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0",
              file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    size = args.size or ("full" if cuda else "small")
    dtypes = [getattr(torch, args.dtype)] if args.dtype else (
        [torch.float16, torch.bfloat16] if cuda else [torch.float32])
    rounds = args.rounds if args.rounds is not None else (20 if cuda else 5)
    budget = args.budget if args.budget is not None else (540.0 if cuda else None)
    for flag, value, least in (("--rounds", rounds, 1), ("--budget", budget, 0), ("--tests-budget",
                                                                                    args.tests_budget, 0)):
        if value is not None and value < least:
            print(f"error: {flag} must be at least {least}, got {value}", file=sys.stderr)
            return 2
    notes = []
    diffusers_ok = False
    if not args.no_diffusers:
        try:
            import diffusers  # noqa: F401

            diffusers_ok = True
        except ImportError:
            message = "diffusers is not installed: its providers (diffusers' UNets and FreeU filter) are left out"
            print(message)
            notes.append(message + ".")
    started = time.perf_counter()
    only = args.only
    cases = build_plan(size, device.type, dtypes, not args.no_compile, diffusers_ok, only)
    want_tests = "kernel_tests" in (only if only is not None else (SUITES if cuda else ()))
    if args.dry_run:
        print(f"plan: size {size}, device {name}, dtypes {', '.join(str(d).removeprefix('torch.') for d in dtypes)}, "
              f"budget {budget if budget is not None else 'none'} s")
        if want_tests:
            print(f"kernel tests: pytest tests/ops on {device.type}, at most {args.tests_budget:.0f} s")
        print_plan(cases)
        return 0

    out = args.out or ROOT / "bench" / "results" / _slug(device_name(device))
    tests = None
    if want_tests and importlib.util.find_spec("pytest") is None:
        message = "pytest is not installed: the kernel tests are left out (pip install -e '.[test]')"
        print(message)
        notes.append(message + ".")
        want_tests = False
    if want_tests:
        tests_budget = args.tests_budget if budget is None else min(args.tests_budget, budget)
        print(f"kernel tests: pytest tests/ops on {device.type} (at most {tests_budget:.0f} s)")
        tests = run_kernel_tests(device.type, tests_budget, out_file=out / "kernel_tests.txt")
        print("kernel tests: " + ", ".join(f"{v} {k}" for k, v in tests["counts"].items())
              + (" (stopped: budget)" if tests["timed_out"] else ""))

    try:
        from tqdm import tqdm
    except ImportError:
        print("tqdm is not installed: no progress bar")
        tqdm = None
    bar = tqdm(total=len(cases), desc="benchmarks", disable=args.quiet) if tqdm is not None else None
    rows = run_cases(cases, device, rounds, budget, started,
                     progress=None if bar is None else (lambda i, n: bar.update(1) if i else None))
    if bar is not None:
        bar.update(len(cases) - bar.n)
        bar.close()
    title = (f"fastunet bench, {size} size, {', '.join(str(d).removeprefix('torch.') for d in dtypes)}, on "
             f"{device_name(device)} (torch {torch.__version__})")
    if not cuda:
        notes.append("On a CPU, `fastunet` runs the torch reference paths, not the Triton kernels.")
    skipped = sum(r["status"].startswith("skipped") for r in rows)
    notes.append(f"{len(rows) - skipped} of {len(rows)} cases ran in {time.perf_counter() - started:.0f} s"
                 + (f" (budget {budget:.0f} s; {skipped} skipped)" if budget is not None else "") + ".")
    write_report(rows, out, title, tests, notes)
    print(title)
    width = max((len(r["benchmark"]) for r in rows), default=10)
    print(f"{'benchmark':<{width}}  {'provider':<20} {'median ms':>10}  status")
    for r in rows:
        med = f"{r['median_ms']:.3f}" if r["median_ms"] != "" else "-"
        print(f"{r['benchmark']:<{width}}  {r['provider']:<20} {med:>10}  {r['status']}")
    print(notes[-1])
    print(f"wrote {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.png'}")
    return 0


def _plot(rows: list[dict], path: Path, title: str) -> None:
    """Median time per benchmark, one bar per provider (log scale); nothing without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no {path.name} (the tables are written)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = list(dict.fromkeys(r["benchmark"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / max(len(providers), 1)
    fig, ax = plt.subplots(figsize=(min(60.0, max(6.0, 0.5 * len(benches) + 2)), 6))
    for i, provider in enumerate(providers):
        xs = [k + i * width for k, b in enumerate(benches) for r in rows if r["benchmark"] == b and r["provider"] == provider]
        ys = [r["median_ms"] for b in benches for r in rows if r["benchmark"] == b and r["provider"] == provider]
        ax.bar(xs, ys, width, label=provider)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(benches))])
    ax.set_xticklabels(benches, rotation=60, ha="right", fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("median ms")
    ax.set_title(title, fontsize=8)
    if providers:  # a run whose every case was skipped still gets its (empty) figure
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
