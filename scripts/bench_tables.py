"""Write the README's benchmark figures from the committed results in bench/results/.

The README block between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` is generated: each row
below names a results file (``bench/results/<module>.csv``, written by ``pytest bench/
--benchmark-enable``), a group, the two providers compared and the column shown. Edit the rows here,
rerun the benchmarks or both, then::

    .venv/bin/python scripts/bench_tables.py          # rewrite the README block
    .venv/bin/python scripts/bench_tables.py --check  # exit 1 if the README block is stale

``tests/test_bench_smoke.py`` runs the check, so committed figures cannot drift from the results.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# Longest first, so "fastunet-torch-..." is not read as provider "fastunet".
PROVIDERS = sorted(["fastunet", "fastunet-torch", "fastunet-triton", "torch", "torch.compile", "diffusers",
                    "diffusers+compile", "sdpa-flash"], key=len, reverse=True)
COLUMNS = {"median_ms": ("median ms", "{:.1f}"), "peak_mib": ("peak MiB", "{:.1f}"),
           "saved_mib": ("saved for backward, MiB", "{:.1f}"), "gbps": ("GB/s", "{:.2f}"),
           "cpu_ms": ("median CPU ms, one thread", "{:.1f}")}
MEMORY_COLUMNS = ("peak_mib", "saved_mib")

# (label, results module, group, fastunet's provider, baseline provider, baseline label, column)
ROWS = [
    ("`fourier_filter` 2x640x64x64", "bench_fourier_filter", "2x640x64x64 float32",
     "fastunet", "diffusers", "diffusers FFT filter", "median_ms"),
    ("`fourier_filter` 2x1280x32x32", "bench_fourier_filter", "2x1280x32x32 float32",
     "fastunet", "diffusers", "diffusers FFT filter", "median_ms"),
    ("`group_norm_act` 2x320x64x64 GroupNorm+SiLU fwd+bwd", "bench_group_norm_act",
     "2x320x64x64 float32 plain fwd+bwd", "fastunet", "torch", "F.group_norm + F.silu", "median_ms"),
    ("`group_norm_act` 2x320x64x64 modulated fwd+bwd", "bench_group_norm_act",
     "2x320x64x64 float32 modulated fwd+bwd", "fastunet", "torch", "unfused torch ops", "median_ms"),
    ("`attention` self 1x2x4096x4096x64 fwd+bwd", "bench_attention",
     "self-4096 (1, 2, 4096, 4096, 64) float32 fwd+bwd", "fastunet", "torch", "SDPA", "median_ms"),
    ("`attention` self 1x2x4096x4096x64 fwd+bwd", "bench_attention",
     "self-4096 (1, 2, 4096, 4096, 64) float32 fwd+bwd", "fastunet", "torch", "SDPA", "peak_mib"),
    ("`attention` self 1x2x4096x4096x64 fwd+bwd", "bench_attention",
     "self-4096 (1, 2, 4096, 4096, 64) float32 fwd+bwd", "fastunet", "torch", "SDPA", "saved_mib"),
    ("tiny `UNet2DModel` fwd+bwd", "bench_e2e", "UNet2DModel-ddpm-tiny fwd_bwd",
     "fastunet", "diffusers", "diffusers", "median_ms"),
    ("tiny `UNet2DModel` fwd+bwd", "bench_e2e", "UNet2DModel-ddpm-tiny fwd_bwd",
     "fastunet", "diffusers", "diffusers", "saved_mib"),
    ("tiny `UNet2DConditionModel` fwd+bwd", "bench_e2e", "UNet2DConditionModel-sd-tiny fwd_bwd",
     "fastunet", "diffusers", "diffusers", "median_ms"),
    ("tiny `UNet2DConditionModel` fwd+bwd", "bench_e2e", "UNet2DConditionModel-sd-tiny fwd_bwd",
     "fastunet", "diffusers", "diffusers", "saved_mib"),
    ("DDPM-CIFAR `UNet2DModel` training step, batch 8", "bench_cpu_training", "ddpm-cifar fwd+bwd",
     "fastunet", "diffusers", "diffusers", "cpu_ms"),
    ("SD-tiny `UNet2DConditionModel` training step, batch 4", "bench_cpu_training", "sd-tiny fwd+bwd",
     "fastunet", "diffusers", "diffusers", "cpu_ms"),
]
# (label, results module, group): fastunet's speed over the baseline from alternating rounds (above 1: faster)
RATIO_ROWS = [
    ("DDPM-CIFAR `UNet2DModel` training step, batch 8", "bench_cpu_training", "ddpm-cifar fwd+bwd"),
    ("SD-tiny `UNet2DConditionModel` training step, batch 4", "bench_cpu_training", "sd-tiny fwd+bwd"),
]


def provider_of(name: str) -> str:
    """The provider of a benchmark name such as ``test_x[fastunet-torch-2x320x64x64-torch.float32]``."""
    params = name[name.index("[") + 1:-1]
    for provider in PROVIDERS:
        if params == provider or params.startswith(provider + "-"):
            return provider
    raise ValueError(f"no known provider in benchmark name {name!r}")


def load(module: str, results: pathlib.Path = RESULTS) -> tuple[list[str], dict]:
    """The columns of ``<module>.csv`` and its rows keyed by ``(group, provider)``."""
    with open(results / f"{module}.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = {(row["group"], provider_of(row["name"])): row for row in reader}
        return list(reader.fieldnames or []), rows


def device_of(module: str, results: pathlib.Path = RESULTS) -> str:
    """The ``Device:`` line of ``<module>.md``."""
    match = re.search(r"^Device: (.+)$", (results / f"{module}.md").read_text(), re.MULTILINE)
    return match.group(1) if match else "unknown device"


def cell(rows: dict, group: str, provider: str, column: str, where: str) -> str:
    row = rows.get((group, provider))
    if row is None:
        raise KeyError(f"{where}: no {provider!r} run in group {group!r}")
    if not row.get(column):
        raise KeyError(f"{where}: the {provider!r} run in group {group!r} has no {column!r}")
    return COLUMNS[column][1].format(float(row[column]))


def block(results: pathlib.Path = RESULTS) -> str:
    """The generated README block, markers included."""
    modules = sorted({row[1] for row in ROWS})
    loaded = {m: load(m, results) for m in modules}
    devices = sorted({device_of(m, results) for m in modules})
    lines = [BEGIN,
             "<!-- generated by scripts/bench_tables.py from bench/results/*.csv; do not edit by hand -->",
             f"Measured on: {'; '.join(devices)}. fp32.", "",
             "| benchmark | measure | fastunet | baseline |", "|---|---|---|---|"]
    for label, module, group, ours, theirs, their_label, column in ROWS:
        rows = loaded[module][1]
        where = f"bench/results/{module}.csv"
        lines.append(f"| {label} | {COLUMNS[column][0]} | {cell(rows, group, ours, column, where)} | "
                     f"{their_label}: {cell(rows, group, theirs, column, where)} |")
    for label, module, group in RATIO_ROWS:
        row = loaded[module][1].get((group, "fastunet"))
        if row is None or not row.get("vs_diffusers"):
            raise KeyError(f"bench/results/{module}.csv: no fastunet run with vs_diffusers in group {group!r}")
        lines.append(f"| {label} | diffusers / fastunet CPU time, alternating rounds | "
                     f"{float(row['vs_diffusers']):.2f} | 1.00 |")
    lines.append("")
    memory = []
    for module in modules:
        held = [c for c in MEMORY_COLUMNS if c in loaded[module][0]]
        memory.append(f"`{module}`: {', '.join(f'`{c}`' for c in held) if held else 'none'}")
    lines.append("Memory columns in the committed results: " + "; ".join(memory) + ".")
    lines.append(END)
    return "\n".join(lines)


def replace_block(text: str, new_block: str) -> str:
    """``text`` with its one ``BEGIN ... END`` block replaced by ``new_block``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"README must hold exactly one {BEGIN} ... {END} block")
    start, stop = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + new_block + text[stop:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the README block differs; write nothing")
    args = parser.parse_args(argv)
    text = README.read_text()
    updated = replace_block(text, block())
    if args.check:
        if updated != text:
            print("README.md's benchmark block is stale: run .venv/bin/python scripts/bench_tables.py",
                  file=sys.stderr)
            return 1
        return 0
    if updated != text:
        README.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
