"""Shared set-up of the benchmarks: environment, device, sizes, and a Markdown/CSV report of every run.

``.venv/bin/python -m pytest bench/ --benchmark-enable`` times every case at full size and writes
``bench/results/<module>.md`` and ``.csv`` (and a plot). Without ``--benchmark-enable`` the repository's
pytest config disables benchmarking: then every case runs once at small sizes and nothing is written,
which is how the test suite (whose testpaths include bench/) smoke-tests the benchmarks.
``FASTUNET_BENCH_SIZE=small|full`` overrides the size either way. Each benchmark may put
``extra_info`` entries (``gbps``, ``tflops``, ``peak_mib``, ...); they become columns of the report.
"""

import os

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import csv  # noqa: E402
import pathlib  # noqa: E402
from collections import defaultdict  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import harness  # noqa: E402  (bench/ is on sys.path: pytest inserts this conftest's folder)

RESULTS = pathlib.Path(__file__).parent / "results"
SIZES = ("small", "full")


def pytest_configure(config):
    """Pick the problem sizes before the benchmark files import (they read ``harness.SIZE`` then)."""
    size = os.environ.get("FASTUNET_BENCH_SIZE")
    if size is None:
        # pytest-benchmark's own rule (its session object is made later, in a trylast hook)
        disabled = config.getoption("benchmark_disable") and not config.getoption("benchmark_enable")
        size = "small" if disabled else "full"
    if size not in SIZES:
        raise pytest.UsageError(f"FASTUNET_BENCH_SIZE must be one of {SIZES}; got {size!r}")
    harness.SIZE = size


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CUDA when present, else CPU (where the Triton kernels cannot run, only the torch paths)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, torch {torch.__version__})"


def pytest_sessionfinish(session):
    bench_session = getattr(session.config, "_benchmarksession", None)
    if bench_session is None or bench_session.disabled or not bench_session.benchmarks:
        return
    by_module = defaultdict(list)
    for bench in bench_session.benchmarks:
        module = bench.fullname.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
        by_module[module].append(bench)
    RESULTS.mkdir(exist_ok=True)
    for module, benches in by_module.items():
        extra_keys = sorted({k for b in benches for k in b.extra_info})
        header = ["group", "name", "median_ms", "min_ms", "rounds", *extra_keys]
        rows = []
        for b in sorted(benches, key=lambda b: (b.group or "", b.name)):
            rows.append([b.group or "", b.name, f"{b.stats.median * 1e3:.3f}", f"{b.stats.min * 1e3:.3f}",
                         str(b.stats.rounds), *[_fmt(b.extra_info.get(k, "")) for k in extra_keys]])
        with open(RESULTS / f"{module}.csv", "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
        lines = [f"# {module}", "", f"Device: {device_name()}", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        (RESULTS / f"{module}.md").write_text("\n".join(lines) + "\n")
        _plot(module, benches)


def _provider(bench) -> str:
    """The provider parameter of a benchmark id such as ``test_x[fastunet-torch-2x320x64x64-...]``."""
    params = bench.params or {}
    return str(params.get("provider", bench.name))


def _plot(module: str, benches) -> None:
    """``bench/results/<module>.png``: median time per group, one bar per provider (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the bench extra installs matplotlib; without it the tables are enough
        return
    groups = sorted({b.group or "" for b in benches})
    providers = sorted({_provider(b) for b in benches})
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) + 2), 4.5))
    for i, provider in enumerate(providers):
        xs, ys = [], []
        for j, group in enumerate(groups):
            match = [b for b in benches if (b.group or "") == group and _provider(b) == provider]
            if match:
                xs.append(j + (i - (len(providers) - 1) / 2) * width)
                ys.append(match[0].stats.median * 1e3)
        ax.bar(xs, ys, width, label=provider)
    ax.set_xticks(range(len(groups)), groups, rotation=35, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("median time (ms, log scale)")
    ax.set_title(f"{module} on {device_name()}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{module}.png", dpi=110)
    plt.close(fig)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
