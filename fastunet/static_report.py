"""Static report: compile the Triton kernels for real NVIDIA GPUs without one and read the cubins.

Each case runs Triton's whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled
ptxas) for a target compute capability; the bundled ``cuobjdump`` then gives the registers, stack
and local memory (spills) of the cubin, and its SASS. Shared memory comes from Triton's metadata.

Compilation happens in child processes with ``TRITON_INTERPRET`` unset, because under the
interpreter ``@triton.jit`` yields interpreted functions that cannot be lowered.

A case is a dict: ``module`` (import path), ``kernel`` (attribute name), ``signature`` (argument
name -> Triton type string such as ``"*fp16"``, ``"i32"``, ``"fp32"`` or ``"constexpr"``),
``constexprs`` (values of the constexpr arguments), ``cc`` (80 or 90), ``num_warps``,
``num_stages``, optionally ``maxnreg`` (the launchers' register cap, ptx ``.maxnreg``) and
optionally ``attrs``: a JSON-friendly list of ``[arg_index, [["tt.divisibility", 16]]]`` pairs,
handed to Triton as its ``attrs`` dict ``{(arg_index,): [["tt.divisibility", 16]]}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

# Shared memory a block may use (opt-in maximum), bytes.
SHARED_LIMIT = {80: 166912, 90: 232448}

_CHILD = textwrap.dedent(
    r"""
    import importlib, json, os, re, subprocess, sys, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    want_sass = sys.argv[1] == "sass"
    results = []
    for case in json.load(sys.stdin):
        fn = getattr(importlib.import_module(case["module"]), case["kernel"])
        attrs = {(int(i),): [list(a) for a in spec] for i, spec in case.get("attrs") or []}
        src = ASTSource(fn=fn, signature=case["signature"], constexprs=case["constexprs"], attrs=attrs)
        options = {"num_warps": case["num_warps"], "num_stages": case["num_stages"]}
        if case.get("maxnreg"):
            options["maxnreg"] = case["maxnreg"]
        compiled = triton.compile(src, target=GPUTarget("cuda", case["cc"], 32), options=options)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"]); f.flush()
            report = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], check=True,
                                    capture_output=True, text=True).stdout
            sass = (subprocess.run([cuobjdump, "-sass", f.name], check=True, capture_output=True,
                                   text=True).stdout if want_sass else None)
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report)
        reg, stack, _, local = map(int, m.groups())
        res = {"registers": reg, "stack": stack, "local": local, "shared": compiled.metadata.shared}
        if want_sass:
            res["sass"] = sass
        results.append(res)
    json.dump(results, sys.stdout)
    """
)


def _child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def _compile_in_child(cases: list[dict], sass: bool) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", _CHILD, "sass" if sass else "nosass"],
                          input=json.dumps(cases), capture_output=True, text=True, env=_child_env())
    if proc.returncode != 0:
        raise RuntimeError(f"GPU compilation failed:\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout)


def compile_cases(cases: list[dict]) -> list[dict]:
    """Compile every case in one child process; returns one resource dict per case
    (``registers``, ``stack``, ``local``, ``shared``)."""
    return _compile_in_child(cases, sass=False)


def check_fits(case: dict, res: dict) -> list[str]:
    """Problems with one compiled case: spills, too many registers, too much shared memory."""
    what = f"{case['kernel']} {case['constexprs']} warps={case['num_warps']} stages={case['num_stages']} sm_{case['cc']}"
    problems = []
    if res["local"] or res["stack"]:
        problems.append(f"{what}: spills (local={res['local']} B, stack={res['stack']} B)")
    if res["registers"] > 255:
        problems.append(f"{what}: {res['registers']} registers")
    if res["shared"] > SHARED_LIMIT[case["cc"]]:
        problems.append(f"{what}: {res['shared']} B shared > {SHARED_LIMIT[case['cc']]} B")
    return problems
