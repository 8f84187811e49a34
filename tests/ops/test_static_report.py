"""The static report (fastunet.static_report, ``python -m fastunet.cli.static``).

* the SASS parser and loop finder on a small hand-written SASS text, and the occupancy calculator on
  hand-computed cases (pure Python, fast);
* the checks (spills, shared memory, tensor cores, loop growth) on made-up results;
* the capture: the launchers' real launches, specialised by Triton's own runtime code, reach every
  config of the config tables (attention, group_norm_act, fourier filter) for sm_80 and sm_90;
* the compile check: a representative subset of the captured cases (every kernel x arch x dtype and
  each kernel's heaviest configs; ``FASTUNET_COMPILE_ALL=1``: every case) compiles with no spills,
  shared memory within the limit, tensor cores on every half-precision attention dot and no
  innermost loop longer than recorded in ``fastunet/static_baseline.json``;
* the command: its options, its report files and its message when the tools are missing.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import subprocess
import sys

import pytest

from fastunet import static_report as sr
from fastunet.cli import static as static_cli

# --------------------------------------------------------------------------------------------------
# SASS parsing
# --------------------------------------------------------------------------------------------------

# Two functions. toy_kernel: a forward branch, an outer loop (0x30 .. 0xb0) holding two inner loops
# (0x40 .. 0x60, written with a label, and 0x80 .. 0x90, written with an address), the EXIT and the
# trap that branches to itself. second: one loop closed by a BRA.U to an address (0x10 .. 0x30).
SASS = """
\tcode for sm_80
\t\tFunction : toy_kernel
\t.headerflags\t@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM80"
        /*0000*/                   MOV R1, c[0x0][0x28] ;                        /* 0x00000a0000017a02 */
                                                                                 /* 0x000fe40000000f00 */
        /*0010*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;           /* 0x0000001000007c0c */
                                                                                 /* 0x000fda0003f06270 */
        /*0020*/              @P0 BRA 0xc0 ;                                     /* 0x0000009000000947 */
                                                                                 /* 0x000fea0003800000 */
.L_x_0:
        /*0030*/                   IADD3 R2, R2, 0x1, RZ ;                       /* 0x0000000102027810 */
                                                                                 /* 0x000fe40007ffe0ff */
.L_x_1:
        /*0040*/                   HMMA.16816.F32 R4, R8, R10, R4 ;              /* 0x0000000a0804723c */
                                                                                 /* 0x000fe20000001804 */
        /*0050*/                   FFMA R3, R3, R3, R3 ;                         /* 0x0000000303037223 */
                                                                                 /* 0x000fe20000000003 */
        /*0060*/              @!P1 BRA `(.L_x_1) ;                               /* 0xfffffffd00009947 */
                                                                                 /* 0x000fea000383ffff */
        /*0070*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], R24 ;     /* 0x04e00004181879f0 */
                                                                                 /* 0x000fe20008000818 */
        /*0080*/                   FFMA R5, R5, R5, R5 ;                         /* 0x0000000505057223 */
                                                                                 /* 0x000fe20000000005 */
        /*0090*/               @P2 BRA 0x80 ;                                    /* 0xffffffe000002947 */
                                                                                 /* 0x000fea000383ffff */
        /*00a0*/                   ISETP.NE.AND P3, PT, R2, RZ, PT ;             /* 0x000000ff0200720c */
                                                                                 /* 0x000fda0003f65270 */
        /*00b0*/               @P3 BRA `(.L_x_0) ;                               /* 0xffffff7000003947 */
                                                                                 /* 0x000fea000383ffff */
        /*00c0*/                   EXIT ;                                        /* 0x000000000000794d */
                                                                                 /* 0x000fea0003800000 */
.L_x_2:
        /*00d0*/                   BRA `(.L_x_2);                                /* 0xfffffff000007947 */
                                                                                 /* 0x000fc0000383ffff */
        /*00e0*/                   NOP;                                          /* 0x0000000000007918 */
                                                                                 /* 0x000fc00000000000 */
\t\t..........

\t\tFunction : second
\t.headerflags\t@"EF_CUDA_SM90"
        /*0000*/                   MOV R1, c[0x0][0x28] ;                        /* 0x00000a0000017a02 */
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;              /* 0x0000000402047981 */
        /*0020*/                   FFMA R6, R4, R5, R6 ;                         /* 0x0000000504067223 */
        /*0030*/               @P0 BRA.U 0x10 ;                                  /* 0xfffffff400000947 */
        /*0040*/                   EXIT ;                                        /* 0x000000000000794d */
"""


def test_parse_sass_reads_instructions_and_resolves_labels():
    functions = sr.parse_sass(SASS)
    assert list(functions) == ["toy_kernel", "second"]
    toy = functions["toy_kernel"]
    assert [a for a, _ in toy] == list(range(0, 0xF0, 0x10))
    assert toy[2] == (0x20, "@P0 BRA 0xc0")
    assert toy[6] == (0x60, "@!P1 BRA 0x40")  # the label .L_x_1 stands before 0x40
    assert toy[11] == (0xB0, "@P3 BRA 0x30")
    assert toy[13] == (0xD0, "BRA 0xd0")
    assert [sr.opcode(t) for _, t in toy[4:8]] == ["HMMA.16816.F32", "FFMA", "BRA", "HGMMA.64x64x16.F32"]


def test_find_loops_keeps_the_innermost_loops_and_counts_their_bodies():
    functions = sr.parse_sass(SASS)
    assert sr.find_loops(functions["toy_kernel"]) == [
        {"start": 0x40, "end": 0x60, "instructions": 3},
        {"start": 0x80, "end": 0x90, "instructions": 2},
    ]  # the outer loop (0x30 .. 0xb0) holds both; the trap at 0xd0 branches to itself
    assert sr.find_loops(functions["second"]) == [{"start": 0x10, "end": 0x30, "instructions": 3}]
    # without the inner loops' branches the outer loop is innermost: 7 instructions, 0x30 .. 0xb0
    flat = [(a, t) for a, t in functions["toy_kernel"] if a not in (0x60, 0x90)]
    assert sr.find_loops(flat) == [{"start": 0x30, "end": 0xB0, "instructions": 7}]


def test_sass_summary_counts_tensor_core_instructions_and_loops():
    summary = sr.sass_summary(SASS)
    assert summary == {"instructions": 20, "hmma": 1, "hgmma": 1, "ffma": 3, "loops": [3, 2, 3]}
    with pytest.raises(ValueError, match="no function found"):
        sr.sass_summary("not sass")


# --------------------------------------------------------------------------------------------------
# Occupancy
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    # 255 regs round up to 8192 a warp: 8 warps fit, one block of 8
    ((255, 8, 0, 80), {"blocks": 1, "warps": 8, "limiter": "registers"}),
    # 40 regs -> 1280 a warp, 51 warps, 3 blocks of 16 (the warp limit would allow 4)
    ((40, 16, 0, 90), {"blocks": 3, "warps": 48, "limiter": "registers"}),
    # 128 regs, 4 warps: 4 blocks by registers; (48 + 1) KiB a block: 164 // 49 = 3 on sm_80
    ((128, 4, 49152, 80), {"blocks": 3, "warps": 12, "limiter": "shared"}),
    # the same block on sm_90: 228 // 49 = 4 = the register limit, registers named first
    ((128, 4, 49152, 90), {"blocks": 4, "warps": 16, "limiter": "registers"}),
    # 24 regs -> 768 a warp, 85 warps by registers; 64 warps // 8 = 8 blocks
    ((24, 8, 1024, 80), {"blocks": 8, "warps": 64, "limiter": "warps"}),
    # a 1-warp block of 16 regs: 32 blocks a SM at most
    ((16, 1, 0, 80), {"blocks": 32, "warps": 32, "limiter": "blocks"}),
    # 200000 B shared does not fit sm_80 (164 KiB) but fits sm_90 (228 KiB) once
    ((32, 4, 200000, 80), {"blocks": 0, "warps": 0, "limiter": "shared"}),
    ((32, 4, 200000, 90), {"blocks": 1, "warps": 4, "limiter": "shared"}),
])
def test_occupancy_hand_computed(args, expected):
    assert sr.occupancy(*args) == expected


def test_occupancy_rejects_bad_input():
    with pytest.raises(ValueError, match=r"cc must be one of \[80, 90\]; got 75"):
        sr.occupancy(32, 4, 0, 75)
    with pytest.raises(TypeError, match="registers must be a non-negative int; got 3.5"):
        sr.occupancy(3.5, 4, 0, 80)
    with pytest.raises(ValueError, match="num_warps must be >= 1; got 0"):
        sr.occupancy(32, 0, 0, 80)


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def _fake_case(kernel="_attention_fwd_kernel", dtype="fp16", cc=80):
    return {"module": "fastunet.kernels.attention", "kernel": kernel, "cc": cc, "num_warps": 4, "num_stages": 2,
            "signature": {"q_ptr": f"*{dtype}", "n": "i32"}, "constexprs": {"BLOCK_M": 64}, "attrs": []}


def _fake_result(**kw):
    res = {"registers": 100, "stack": 0, "local": 0, "shared": 1024, "has_dot": True, "hmma": 8, "hgmma": 0,
           "ffma": 0, "instructions": 500, "loops": [120, 80]}
    res.update(kw)
    return res


def test_check_case_flags_each_problem():
    case = _fake_case()
    assert sr.check_case(case, _fake_result(), {}, fp32_mma=False) == []
    assert "spills (local=8 B" in sr.check_case(case, _fake_result(local=8), {}, False)[0]
    assert "B shared >" in sr.check_case(case, _fake_result(shared=sr.SHARED_LIMIT[80] + 1), {}, False)[0]
    assert "tensor-core" in sr.check_case(case, _fake_result(hmma=0), {}, False)[0]
    assert sr.check_case(case, _fake_result(hmma=0, hgmma=4), {}, False) == []
    assert sr.check_case(case, _fake_result(has_dot=False, hmma=0), {}, False) == []
    fp32 = _fake_case(dtype="fp32")
    assert sr.check_case(fp32, _fake_result(hmma=0), {}, fp32_mma=False) == []  # exact FMA dots for now
    assert "tensor-core" in sr.check_case(fp32, _fake_result(hmma=0), {}, fp32_mma=True)[0]
    fp32["constexprs"]["DOT_PRECISION"] = "ieee"  # a config that chose exact FMA dots
    assert sr.check_case(fp32, _fake_result(hmma=0), {}, fp32_mma=True) == []
    fp32["constexprs"]["DOT_PRECISION"] = "tf32x3"
    assert "tensor-core" in sr.check_case(fp32, _fake_result(hmma=0), {}, fp32_mma=True)[0]
    gn = dict(_fake_case(), module="fastunet.kernels.group_norm_act", kernel="_group_norm_act_fwd_kernel")
    assert sr.check_case(gn, _fake_result(has_dot=False, hmma=0), {}, False) == []
    assert "compile failed: boom" in sr.check_case(case, {"error": "boom"}, {}, False)[0]


def test_check_case_against_the_loop_baseline():
    case = _fake_case()
    key = sr.baseline_key(case)
    assert sr.check_case(case, _fake_result(loops=[120, 80]), {key: [120, 80]}, False) == []
    assert sr.check_case(case, _fake_result(loops=[110, 70]), {key: [120, 80]}, False) == []  # shrank
    assert "grew" in sr.check_case(case, _fake_result(loops=[121, 80]), {key: [120, 80]}, False)[0]
    assert "grew" in sr.check_case(case, _fake_result(loops=[120, 80, 5]), {key: [120, 80]}, False)[0]
    assert sr.check_case(case, _fake_result(loops=[999]), {}, False) == []  # not recorded: a note, not a failure
    # the key is what is compiled: the probe name and source hash do not enter it
    assert sr.baseline_key(dict(case, probe="other", src_hash="x")) == key
    assert sr.baseline_key(dict(case, num_warps=8)) != key


def test_baseline_round_trip(tmp_path):
    path = str(tmp_path / "baseline.json")
    cases = [_fake_case(), _fake_case(cc=90)]
    assert sr.save_baseline(cases, [_fake_result(loops=[3]), _fake_result(loops=[4, 5])], path) == 2
    assert sr.load_baseline(path) == {sr.baseline_key(cases[0]): [3], sr.baseline_key(cases[1]): [4, 5]}
    sr.save_baseline(cases[:1], [_fake_result(loops=[2])], path)  # merged
    assert sr.load_baseline(path)[sr.baseline_key(cases[1])] == [4, 5]
    assert sr.load_baseline(str(tmp_path / "absent.json")) == {}


def test_package_baseline_is_well_formed():
    with open(sr.BASELINE_PATH) as f:
        data = json.load(f)
    assert len(data["cases"]) > 100
    for entry in data["cases"]:
        assert set(entry) == {"kernel", "cc", "key", "loops"}
        assert entry["cc"] in (80, 90) and all(isinstance(n, int) and n > 1 for n in entry["loops"])
        assert json.loads(entry["key"])["kernel"] == entry["kernel"]


# --------------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------------


def test_capture_substitutes_the_compute_capability_and_restores_it():
    from triton.runtime.jit import JITFunction

    backend = importlib.import_module("fastunet.kernels._backend")
    before_cc = getattr(backend, "compute_capability", None)
    before_run = JITFunction.run
    with sr.capture(90) as state:
        assert backend.compute_capability("cpu") == 90
        state.cc = 80
        assert backend.compute_capability(None) == 80
        assert JITFunction.run is not before_run
    assert getattr(backend, "compute_capability", None) is before_cc
    assert JITFunction.run is before_run


@pytest.fixture(scope="module")
def captured():
    """Every distinct launch of the probes, sm_80 and sm_90 (~20 s of CPU)."""
    return sr.collect_cases_in_child()


def test_capture_reaches_every_config_of_the_tables(captured):
    missing = sr.coverage(captured)
    assert missing["attention"] == [], missing["attention"]
    assert missing["group_norm_act"] == [], missing["group_norm_act"]
    # the fourier table entries no input reaches: each is absent from the launcher-derived plane plan
    # too, and gets a synthesised case. They are a row pad of 1 on a tile taller than one row (a
    # threshold selects an even number of rows), or a config the table gives only at a column pad
    # whose class (below 8, or 8) no threshold pairs with its row pad (both pads are
    # min(2 * threshold, side) rounded up)
    plan = sr._fourier_plane_plan()
    assert all(key not in plan for _, key in missing["fourier_filter"])
    assert sum(1 for _, key in missing["fourier_filter"] if key[4] == 1 and key[0] > 1) > \
        len(missing["fourier_filter"]) // 2
    table = sr.fourier_config_space()
    # 288 since a49a9ab (one-tile planes up to 2048 elements), 301 since 9d2bfd2 (configs at 8 column
    # pads), 306 with the three configs of the full compile's spills, 309 with the three row blocks on
    # 4 warps that the whole static set's spills gave, 310 with the opt-in table compile's (_ROW_BLOCKS_ON_4_WARPS)
    assert len(table) == 310 and len(missing["fourier_filter"]) < 2 * len(table) // 4
    synth = sr.synthesise_fourier(captured, missing["fourier_filter"])
    assert sr.coverage(captured + synth)["fourier_filter"] == []
    # every kernel, arch and dtype was launched
    kernels = {(c["kernel"], c["cc"], sr.dtype_of(c)) for c in captured}
    for module, prefix in (("attention", "_attention_"), ("group_norm_act", "_group_norm_act_"),
                           ("fourier_filter", "_fourier_filter_")):
        mod = importlib.import_module(f"fastunet.kernels.{module}")
        names = {c["kernel"] for c in captured if c["kernel"].startswith(prefix)}
        assert names and all(hasattr(mod, n) for n in names)
        for name in names:
            assert {(d, cc) for k, cc, d in kernels if k == name} == {(d, cc) for d in ("fp16", "bf16", "fp32")
                                                                      for cc in (80, 90)}, name


def _do_not_specialize(fn) -> set:
    """Names of a kernel's ``do_not_specialize`` arguments, compiled or interpreted (the suite runs
    under Triton's interpreter, whose functions keep the decorator's arguments in ``kwargs``)."""
    if hasattr(fn, "params"):
        return {p.name for p in fn.params if p.do_not_specialize}
    names = getattr(fn, "kwargs", {}).get("do_not_specialize") or []
    return {fn.arg_names[n] if isinstance(n, int) else n for n in names}


def test_capture_specialises_as_triton_does(captured):
    """Spot checks of what Triton's binder makes of the launchers' arguments."""
    gna = importlib.import_module("fastunet.kernels.group_norm_act")
    ff = importlib.import_module("fastunet.kernels.fourier_filter")
    for case in captured:
        fn = getattr(importlib.import_module(case["module"]), case["kernel"])
        assert list(case["signature"]) == fn.arg_names
        dns = _do_not_specialize(fn)
        attr_args = {fn.arg_names[i] for i, _ in case["attrs"]}
        for name in dns & set(fn.arg_names):  # sizes marked do_not_specialize: plain i32, no divisibility, never a constant
            assert case["signature"][name] == "i32" and name not in attr_args, (case["kernel"], name)
        if case["module"].endswith("group_norm_act"):
            assert case.get("maxnreg")  # the launchers cap the registers; the cap reaches the options
    # the loop above checked something: group_norm_act's and fourier's sizes are do_not_specialize
    for mod in (gna, ff):
        kernels = {c["kernel"] for c in captured if c["module"] == mod.__name__}
        assert kernels and all(_do_not_specialize(getattr(mod, k)) & set(getattr(mod, k).arg_names) for k in kernels)
    attn_cases = [c for c in captured if c["kernel"] == "_attention_fwd_kernel"]
    # a unit stride is specialised to the constant 1; a 4096-key sequence is divisible by 16, 77 keys not
    assert all(c["signature"]["stride_q_d"] == "constexpr" and c["constexprs"]["stride_q_d"] == 1 for c in attn_cases)
    fwd = attn_cases[0]
    idx = getattr(importlib.import_module(fwd["module"]), fwd["kernel"]).arg_names.index("seqlen_k")
    divisible = {any(i == idx for i, _ in c["attrs"]) for c in attn_cases if c["signature"]["seqlen_k"] == "i32"}
    assert divisible == {True, False}
    # deduplicated
    assert len({sr.case_key(c) for c in captured}) == len(captured)


# --------------------------------------------------------------------------------------------------
# Compiling
# --------------------------------------------------------------------------------------------------


def _plan(captured):
    missing = sr.coverage(captured)["fourier_filter"]
    cases = captured + sr.synthesise_fourier(captured, missing)
    return cases if os.environ.get("FASTUNET_COMPILE_ALL") == "1" else sr.representative_subset(cases)


def test_subset_covers_every_kernel_arch_and_dtype_and_the_heaviest_configs(captured):
    subset = sr.representative_subset(captured)
    assert {(c["kernel"], c["cc"], sr.dtype_of(c)) for c in subset} == \
        {(c["kernel"], c["cc"], sr.dtype_of(c)) for c in captured}
    keys = {sr.case_key(c) for c in subset}
    for kernel, cc in {(c["kernel"], c["cc"]) for c in captured}:
        heaviest = max((c for c in captured if (c["kernel"], c["cc"]) == (kernel, cc)), key=sr._weight)
        assert sr.case_key(heaviest) in keys
    assert sr.representative_subset(list(reversed(captured))) == subset  # deterministic
    assert len(subset) < len(captured) // 5


def test_captured_configs_compile_without_spills_with_tensor_cores_and_no_longer_loops(captured):
    cases = _plan(captured)
    baseline = sr.load_baseline()
    results, rows, problems = sr.run_report(cases, workers=2, progress=False, baseline=baseline)
    for r in sr.headline(rows):
        print(r)
    assert not problems, "\n".join(problems)
    # the SASS reading works on real cubins: half-precision attention dots are HMMA on sm_80 and
    # HMMA/HGMMA on sm_90, and the main attention kernels have their key loop
    for case, res in zip(cases, results):
        if case["kernel"] == "_attention_fwd_kernel" and sr.dtype_of(case) in ("fp16", "bf16"):
            assert res["hmma"] > 0 if case["cc"] == 80 else res["hmma"] + res["hgmma"] > 0
            assert res["loops"] and max(res["loops"]) > 50
        assert res["divisible_args"] == sum(1 for _, spec in case["attrs"] if ["tt.divisibility", 16] in spec)
    recorded = sum(1 for c in cases if sr.baseline_key(c) in baseline)
    print(f"{len(cases)} cases, {recorded} with a recorded loop baseline")
    if os.environ.get("FASTUNET_COMPILE_ALL") != "1":
        # a new or changed config of the subset must be recorded on purpose (--record --subset), so that
        # every loop the CI compiles is held to a count
        unrecorded = [sr.describe(c) for c in cases if sr.baseline_key(c) not in baseline]
        assert not unrecorded, "not in the loop baseline (python -m fastunet.cli.static --record --subset):\n" + \
            "\n".join(unrecorded)


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def test_help_explains_every_option():
    out = subprocess.run([sys.executable, "-m", "fastunet.cli.static", "--help"], capture_output=True, text=True,
                         check=True).stdout
    parser = argparse.ArgumentParser()
    static_cli.add_arguments(parser)
    for action in parser._actions:
        assert action.help, action.dest
        for flag in action.option_strings:
            assert flag in out
    assert "sm_80 and sm_90" in out and "exits 1" in out


def _problems(stderr: str) -> list[str]:
    return [line.strip() for line in stderr.splitlines() if line.startswith("  ")]


def test_cli_writes_markdown_and_csv_and_records(tmp_path):
    """The command's files and exit status. Its verdict on the kernels themselves is the compile
    test's business: here a run exits 1 exactly when it lists problems, and a loop record it wrote
    adds none, one it did not write adds one per case with a loop."""
    baseline = tmp_path / "baseline.json"
    args = ["--ops", "group_norm_act", "--arch", "80", "--subset", "--quiet", "--brief", "--out", str(tmp_path),
            "--baseline", str(baseline)]
    proc = subprocess.run([sys.executable, "-m", "fastunet.cli.static", *args, "--record"], capture_output=True,
                          text=True)
    first = _problems(proc.stderr)
    assert proc.returncode == (1 if first else 0), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("no problems" in proc.stdout) == (not first)
    assert not any("grew" in p for p in first)
    with open(tmp_path / "static.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["kernel"].startswith("_group_norm_act_") and r["cc"] == "80" for r in rows)
    assert {r["dtype"] for r in rows} == {"fp16", "bf16", "fp32"}
    assert all(int(r["registers"]) > 0 and r["limiter"] in ("registers", "shared", "warps", "blocks") for r in rows)
    spilling = sum(1 for r in rows if r["spill_local"] != "0" or r["spill_stack"] != "0")
    assert sum("spills" in p for p in first) == spilling
    md = (tmp_path / "static.md").read_text()
    assert "## Per kernel" in md and f"## Every case ({len(rows)})" in md and f"## Problems ({len(first)})" in md
    assert len(sr.load_baseline(str(baseline))) == len(rows)
    # checked against its own record: the same problems, no loop grew
    proc = subprocess.run([sys.executable, "-m", "fastunet.cli.static", *args], capture_output=True, text=True)
    assert _problems(proc.stderr) == first and proc.returncode == (1 if first else 0), proc.stderr[-3000:]
    # a record with shorter loops than the kernels have: one more problem per case with a loop
    data = json.loads(baseline.read_text())
    for entry in data["cases"]:
        entry["loops"] = [1 for _ in entry["loops"]]
    baseline.write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, "-m", "fastunet.cli.static", *args], capture_output=True, text=True)
    grown = sum(1 for r in rows if r["loops"])
    problems = _problems(proc.stderr)
    assert grown and proc.returncode == 1 and f"{len(first) + grown} problem(s)" in proc.stderr
    assert sum("innermost loops grew" in p for p in problems) == grown


def test_missing_tools_give_a_clear_message(monkeypatch, capsys):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if p.endswith("cuobjdump") else real_access(p, mode))
    with pytest.raises(RuntimeError, match="bundled NVIDIA tools; missing or not executable: .*cuobjdump"):
        sr.toolchain()
    assert static_cli.run(argparse.Namespace()) == 2
    assert "cuobjdump" in capsys.readouterr().err
