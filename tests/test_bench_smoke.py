"""The benchmarks' reporting: the README's figures are what scripts/bench_tables.py makes of
bench/results/, and the pytest config collects bench/ (run there at small sizes, benchmarking disabled).
"""

from __future__ import annotations

import importlib.util
import pathlib
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_tables", ROOT / "scripts" / "bench_tables.py")
bench_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_tables)


def test_readme_block_matches_the_committed_results():
    text = (ROOT / "README.md").read_text()
    assert bench_tables.replace_block(text, bench_tables.block()) == text, (
        "README.md's benchmark block differs from bench/results/: run .venv/bin/python scripts/bench_tables.py")
    assert bench_tables.main(["--check"]) == 0


def test_block_replacement_needs_exactly_one_block():
    new = f"{bench_tables.BEGIN}\nnew\n{bench_tables.END}"
    assert bench_tables.replace_block(f"a\n{bench_tables.BEGIN}\nold\n{bench_tables.END}\nb", new) == f"a\n{new}\nb"
    for text in ("no markers", f"{bench_tables.END} {bench_tables.BEGIN}", f"{new}\n{new}"):
        with pytest.raises(ValueError, match="exactly one"):
            bench_tables.replace_block(text, new)


def test_provider_of_prefers_the_longest_provider():
    assert bench_tables.provider_of("test_x[fastunet-torch-2x4-torch.float32]") == "fastunet-torch"
    assert bench_tables.provider_of("test_x[fastunet-2x4-torch.float32]") == "fastunet"
    assert bench_tables.provider_of("test_unet[diffusers+compile-UNet-fwd]") == "diffusers+compile"
    with pytest.raises(ValueError, match="no known provider"):
        bench_tables.provider_of("test_x[nobody-2x4]")


def test_missing_result_is_an_error(tmp_path):
    (tmp_path / "bench_fourier_filter.csv").write_text("group,name,median_ms\ng,test_f[fastunet-s],1.0\n")
    _, rows = bench_tables.load("bench_fourier_filter", tmp_path)
    with pytest.raises(KeyError, match="no 'diffusers' run"):
        bench_tables.cell(rows, "g", "diffusers", "median_ms", "here")
    with pytest.raises(KeyError, match="has no 'peak_mib'"):
        bench_tables.cell(rows, "g", "fastunet", "peak_mib", "here")


def test_default_run_collects_bench_files():
    """`pytest` and `pytest bench/` collect bench/bench_*.py (bench/conftest.py then picks small sizes)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "bench" in config["testpaths"] and "bench_*.py" in config["python_files"]
    assert "--benchmark-disable" in config["addopts"]
