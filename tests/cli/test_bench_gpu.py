"""`fastunet bench --device cuda`, the one-command GPU run, as far as a machine without a GPU can check it:
the refusal, the plan (a pure function), the dry run, the whole pipeline at small sizes on the CPU, the
time budget, the kernel-test runner, the diffusers-absent and --static paths, and the tests' CUDA switch."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from fastunet.cli import __main__ as cli
from fastunet.cli import bench

ROOT = Path(__file__).resolve().parents[2]
HALF = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def cuda_plan() -> list[bench.Case]:
    return bench.build_plan("full", "cuda", HALF, compile_=True, diffusers_ok=True)


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_is_refused_without_a_gpu(device, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "--device", device]) == 2
    err = capsys.readouterr().err
    assert f"--device {device}: no CUDA GPU is available" in err and "--device cpu" in err


def test_a_gpu_index_past_the_last_gpu_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.main(["bench", "--device", "cuda:3"]) == 2
    assert "--device cuda:3: this machine has 1 CUDA GPU(s), numbered from 0" in capsys.readouterr().err


def test_full_cuda_plan_covers_every_op_at_the_real_shapes(cuda_plan):
    by_suite = {}
    for c in cuda_plan:
        by_suite.setdefault(c.suite, []).append(c)
    assert set(by_suite) == {"group_norm_act", "attention", "fourier_filter", "sd15", "unet"}
    for suite in ("group_norm_act", "attention", "fourier_filter"):
        cases = by_suite[suite]
        assert {(c.dtype, c.backward) for c in cases} == {(d, b) for d in HALF for b in (False, True)}, suite
        assert {m for c in cases for m in c.models} == {"sd15", "sdxl", "animatediff"}, suite
    providers = {s: {c.provider for c in cs} for s, cs in by_suite.items()}
    assert providers["group_norm_act"] == {"fastunet", "torch", "torch.compile"}
    assert providers["attention"] == {"fastunet", "sdpa-flash", "sdpa-mem-efficient", "torch-math", "torch.compile"}
    assert providers["fourier_filter"] == {"fastunet", "diffusers", "torch.compile"}
    assert providers["sd15"] == {"fastunet", "diffusers", "torch.compile", "diffusers+compile"}
    attention = {(c.label.split()[1], c.args["shape"]) for c in by_suite["attention"]}
    assert {shape[4] for _, shape in attention} == {40, 64, 80, 160}
    assert {kind for kind, _ in attention} == {"self", "cross", "temporal"}
    assert ("self", (2, 8, 4096, 4096, 40)) in attention  # SD 1.5's first level
    assert ("cross", (2, 10, 4096, 77, 64)) in attention  # SDXL's first attention level
    assert ("temporal", (2 * 64 * 64, 8, 16, 16, 40)) in attention  # AnimateDiff's first motion module
    norms = {c.args["shape"] for c in by_suite["group_norm_act"]}
    # the variants and activations are ones the benchmark's setup takes (the op records "none" as a string)
    assert {(c.args["variant"], c.args["activation"]) for c in by_suite["group_norm_act"]} <= {
        (v, a) for v in ("plain", "add", "modulated") for a in ("silu", None)}
    assert (2, 320, 16, 64, 64) in norms  # AnimateDiff's temporal transformer norm, (B, C, F, H, W)
    assert {(2, 320, 64, 64), (2, 320, 128, 128), (32, 320, 64, 64)} <= norms
    assert (2, 1280, 16, 16) in {c.args["shape"] for c in by_suite["fourier_filter"]}
    sd15 = {(c.provider, c.args["mode"]) for c in by_suite["sd15"]}
    assert {("fastunet", "fwd"), ("diffusers", "fwd"), ("fastunet", "train"), ("diffusers", "train")} <= sd15
    assert all(c.dtype == torch.float16 and c.args["spec"]["batch"] == 2 and c.args["spec"]["size"] == 64
               for c in by_suite["sd15"])
    priorities = [c.priority for c in cuda_plan]
    assert priorities == sorted(priorities) and cuda_plan[0].suite == "sd15"
    assert all(c.priority >= 5 for c in cuda_plan if "compile" in c.provider)


def test_attention_flops_and_norm_bytes_of_the_plan(cuda_plan):
    att = next(c for c in cuda_plan if c.suite == "attention" and c.args["shape"] == (2, 8, 4096, 77, 40))
    assert att.flops == 4 * 2 * 8 * 4096 * 77 * 40 * (3.5 if att.backward else 1)
    gn = next(c for c in cuda_plan if c.suite == "group_norm_act" and not c.backward)
    assert gn.bytes == 2 * torch.Size(gn.args["shape"]).numel() * gn.dtype.itemsize


def test_cpu_plan_leaves_out_cuda_only_compile_and_diffusers_providers():
    plan = bench.build_plan("small", "cpu", [torch.float32], compile_=False, diffusers_ok=False)
    providers = {c.provider for c in plan}
    assert providers == {"fastunet", "fastunet-torch", "torch", "torch-math"}
    assert "kernel_tests" not in {c.suite for c in plan}
    with pytest.raises(ValueError, match="size must be 'small' or 'full'; got 'huge'"):
        bench.build_plan("huge", "cpu", [torch.float32], False, False)
    with pytest.raises(ValueError, match="suite must be one of .*; got 'nope'"):
        bench.build_plan("small", "cpu", [torch.float32], False, False, only=["nope"])


def test_dry_run_prints_the_cuda_plan_without_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "--device", "cuda", "--dry-run", "--only", "attention", "kernel_tests"]) == 0
    out = capsys.readouterr().out
    assert "plan: size full, device cuda, dtypes float16, bfloat16, budget 540.0 s" in out
    assert "kernel tests: pytest tests/ops on cuda" in out
    assert "sdpa-mem-efficient" in out and "attention temporal 8192x8x16x16x40 bfloat16 fwd+bwd" in out


def test_small_pipeline_on_cpu_writes_every_report(tmp_path):
    out = tmp_path / "report"
    assert cli.main(["bench", "--device", "cpu", "--size", "small", "--no-compile", "--rounds", "1", "--quiet",
                     "--only", "group_norm_act", "attention", "fourier_filter", "sd15", "--out", str(out)]) == 0
    for name in ("results.md", "results.csv", "results.png"):
        assert (out / name).stat().st_size > 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    expected = bench.build_plan("small", "cpu", [torch.float32], False, True,
                                only=["group_norm_act", "attention", "fourier_filter", "sd15"])
    assert [(r["benchmark"], r["provider"]) for r in rows] == [(c.name, c.provider) for c in expected]
    assert all(r["status"] == "ok" and float(r["median_ms"]) > 0 for r in rows), rows
    assert {r["rate"].split()[-1] for r in rows if r["suite"] in ("group_norm_act", "fourier_filter")} == {"GB/s"}
    assert {r["rate"].split()[-1] for r in rows if r["suite"] == "attention"} == {"TFLOP/s"}
    assert all(float(r["saved_mib"]) > 0 for r in rows if "fwd+bwd" in r["benchmark"] and r["suite"] != "fourier_filter")
    table = (out / "results.md").read_text()
    assert "## Timings" in table and "UNet2DConditionModel sd15-small" in table and "diffusers" in table


def test_budget_skips_what_no_longer_fits(tmp_path, capsys):
    out = tmp_path / "report"
    assert cli.main(["bench", "--device", "cpu", "--size", "small", "--no-compile", "--quiet", "--budget", "0",
                     "--only", "attention", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert rows and all(r["status"].startswith("skipped: time budget") for r in rows)
    assert f"0 of {len(rows)} cases ran" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value", [("--rounds", "0"), ("--budget", "-1"), ("--tests-budget", "-5")])
def test_bad_numbers_are_refused(flag, value, capsys):
    assert cli.main(["bench", "--device", "cpu", flag, value]) == 2
    assert f"{flag} must be at least" in capsys.readouterr().err


def test_kernel_test_runner_counts_outcomes_and_stops_at_its_budget(tmp_path):
    tests = tmp_path / "test_outcomes.py"
    tests.write_text(textwrap.dedent("""
        import time, pytest
        def test_passes(): pass
        def test_fails(): assert 1 == 2
        @pytest.mark.xfail(strict=True)
        def test_xfails(): assert 1 == 2
        def test_sleeps(): time.sleep(float(__import__("os").environ.get("SLEEP", "0")))
    """))
    log = tmp_path / "kernel_tests.txt"
    done = bench.run_kernel_tests("cpu", 300, paths=[str(tests)], out_file=log)
    assert not done["timed_out"] and done["returncode"] == 1
    assert done["counts"] == dict(passed=2, failed=1, error=0, skipped=0, xfailed=1, xpassed=0)
    assert [t.rsplit("::", 1)[1] for t in done["failing"]] == ["test_fails"]
    assert "PASSED" in log.read_text()
    os.environ["SLEEP"] = "60"
    try:
        stopped = bench.run_kernel_tests("cpu", 15, paths=[str(tests)])
    finally:
        del os.environ["SLEEP"]
    assert stopped["timed_out"] and stopped["returncode"] is None and stopped["seconds"] < 60
    assert stopped["counts"]["passed"] == 1 and stopped["counts"]["failed"] == 1  # what finished before the stop


def test_cuda_kernel_test_command_leaves_out_the_interpreter_tests():
    cuda = bench.kernel_test_command("cuda")
    assert cuda[1:4] == ["-m", "pytest", "-v"] and "tests/ops" in cuda
    assert "--ignore=tests/ops/test_traffic.py" in cuda
    assert "--deselect=tests/ops/test_backend_api.py::test_use_triton_decisions_on_cpu_under_the_interpreter" in cuda
    assert "--ignore=tests/ops/test_attention_compile.py" in cuda
    for path in bench.INTERPRETER_ONLY_TESTS + bench.NO_GPU_NEEDED_TESTS:  # the files named still exist
        assert (ROOT / path.split("::")[0]).is_file(), path
    assert not any(a.startswith(("--ignore", "--deselect")) for a in bench.kernel_test_command("cpu"))


def test_without_diffusers_its_providers_are_left_out_with_a_message(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    assert cli.main(["bench", "--device", "cpu", "--dry-run", "--only", "fourier_filter", "sd15"]) == 0
    out = capsys.readouterr().out
    assert "diffusers is not installed: its providers" in out
    plan = out.split("cases", 1)[1]
    assert "fastunet" in plan and "diffusers" not in plan


def test_static_dispatches_to_the_static_report(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("fastunet.cli.static")
    fake.run = lambda args: seen.append(args.static) or 7
    monkeypatch.setitem(sys.modules, "fastunet.cli.static", fake)
    assert cli.main(["bench", "--static"]) == 7 and seen == [True]


def test_static_without_its_module_is_a_clear_error(monkeypatch, capsys):
    real = bench.importlib.import_module

    def import_module(name, *a):
        if name == "fastunet.cli.static":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *a)

    monkeypatch.setattr(bench.importlib, "import_module", import_module)
    assert cli.main(["bench", "--static"]) == 2
    assert "--static needs fastunet/cli/static.py" in capsys.readouterr().err


def test_tests_cuda_switch_refuses_a_machine_without_a_gpu():
    """FASTUNET_TEST_DEVICE=cuda (tests/conftest.py) puts the kernel tests on the GPU; without one it stops
    at collection with a message instead of silently testing the CPU."""
    env = dict(os.environ, FASTUNET_TEST_DEVICE="cuda", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                           "tests/ops/test_register_once.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "FASTUNET_TEST_DEVICE=cuda, but torch sees no CUDA GPU" in proc.stdout + proc.stderr


def test_a_failing_provider_is_a_result_and_the_run_goes_on(tmp_path):
    """SDPA's forced backends are CUDA providers; on a CPU the flash one runs and the memory-efficient one
    has no kernel: its row records the error and the next case still runs."""
    shape = (1, 2, 64, 64, 32)
    cases = [bench.Case(suite="attention", label=f"attention self {bench._x(shape)}", provider=p, dtype=torch.float32,
                        backward=b, priority=2, flops=4.0 * 2 * 64 * 64 * 32, args=dict(shape=shape))
             for p in ("sdpa-mem-efficient", "sdpa-flash") for b in (False, True)]
    rows = bench.run_cases(cases, torch.device("cpu"), 2, None, bench.time.perf_counter())
    assert [r["status"].split(":")[0] for r in rows] == ["error", "error", "ok", "ok"]
    assert "No viable backend" in rows[0]["status"] and rows[0]["median_ms"] == ""
    assert all(r["rounds"] == 2 and r["rate"].endswith("TFLOP/s") for r in rows[2:])
    tests = dict(counts=dict(passed=90, failed=2, error=0, skipped=0, xfailed=0, xpassed=0), timed_out=True,
                 returncode=None, seconds=150.2, command="python -m pytest tests/ops", failing=["t.py::a", "t.py::b"],
                 ignored=["tests/ops/test_traffic.py"])
    bench.write_report(rows, tmp_path, "title", tests, ["a note."])
    md = (tmp_path / "results.md").read_text()
    assert "stopped after 150 s (budget)" in md and "90 passed, 2 failed" in md and "- `t.py::b`" in md
    assert "compile-only without a GPU's help): tests/ops/test_traffic.py" in md and md.rstrip().endswith("a note.")
    assert md.count("| attention self 1x2x64x64x32 float32 ") == 4


def test_without_matplotlib_and_tqdm_the_tables_are_still_written(tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "tqdm"):
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "report"
    assert cli.main(["bench", "--device", "cpu", "--size", "small", "--budget", "0", "--only", "fourier_filter",
                     "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "matplotlib is not installed: no results.png" in text and "tqdm is not installed" in text
    assert (out / "results.md").is_file() and (out / "results.csv").is_file() and not (out / "results.png").exists()
