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

import contextlib
import functools
import hashlib
import importlib
import json
import math
import os
import re
import subprocess
import sys
import textwrap
# Shared memory a block may use (opt-in maximum), bytes.
SHARED_LIMIT = {80: 166912, 90: 232448}

_CHILD = textwrap.dedent(
    r"""
    import json, os, re, subprocess, sys, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from fastunet.static_report import _ast_source, _options
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    want_sass = sys.argv[1] == "sass"
    results = []
    for case in json.load(sys.stdin):
        compiled = triton.compile(_ast_source(case), target=GPUTarget("cuda", case["cc"], 32), options=_options(case))
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


def _ast_source(case: dict):
    """Triton's ``ASTSource`` of a case: its kernel, signature, constexprs and ``attrs`` (the JSON list
    ``[[arg_index, [["tt.divisibility", 16]]], ...]`` becomes ``{(arg_index,): [["tt.divisibility", 16]]}``)."""
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(case["module"]), case["kernel"])
    attrs = {}
    for entry in case.get("attrs") or []:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], int)):
            raise ValueError(f"attrs entries must be [arg_index, [[name, value], ...]]; got {entry!r}")
        index, spec = entry
        attrs[(index,)] = [list(a) for a in spec]
    return ASTSource(fn=fn, signature=case["signature"], constexprs=case["constexprs"], attrs=attrs)


def _options(case: dict) -> dict:
    options = {"num_warps": case["num_warps"], "num_stages": case["num_stages"]}
    if case.get("maxnreg"):
        options["maxnreg"] = case["maxnreg"]
    return options


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


def _cases_fingerprint(case: dict) -> str:
    return json.dumps({k: case[k] for k in sorted(case) if k not in _CASE_NOTES}, sort_keys=True, default=str)


# ==================================================================================================
# Occupancy
# ==================================================================================================

#: Per-SM limits of the two targets (CUDA occupancy rules for compute capability 8.0 and 9.0).
ARCH = {
    80: {"regs": 65536, "warps": 64, "blocks": 32, "shared": 164 * 1024},
    90: {"regs": 65536, "warps": 64, "blocks": 32, "shared": 228 * 1024},
}
#: Shared memory the driver reserves per resident block, bytes.
SHARED_RESERVED_PER_BLOCK = 1024
#: Registers are allocated per warp in units of this many.
REG_ALLOC_UNIT = 256


def occupancy(registers: int, num_warps: int, shared: int, cc: int) -> dict:
    """Resident blocks and warps per SM of a kernel using ``registers`` per thread, ``num_warps`` warps
    and ``shared`` bytes of shared memory per block on compute capability ``cc`` (80 or 90).

    Returns ``{"blocks", "warps", "limiter"}``; ``limiter`` is the resource that caps the block count
    ("registers", "shared", "warps" or "blocks"), the first in that order among equals. A block that
    does not fit at all gives 0 blocks."""
    if cc not in ARCH:
        raise ValueError(f"cc must be one of {sorted(ARCH)}; got {cc!r}")
    for name, v in (("registers", registers), ("num_warps", num_warps), ("shared", shared)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise TypeError(f"{name} must be a non-negative int; got {v!r}")
    if num_warps < 1:
        raise ValueError(f"num_warps must be >= 1; got {num_warps}")
    lim = ARCH[cc]
    per_warp = -(-max(registers, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by = {
        "registers": (lim["regs"] // per_warp) // num_warps,
        "shared": lim["shared"] // (shared + SHARED_RESERVED_PER_BLOCK),
        "warps": lim["warps"] // num_warps,
        "blocks": lim["blocks"],
    }
    blocks = min(by.values())
    limiter = next(k for k, v in by.items() if v == blocks)
    return {"blocks": blocks, "warps": blocks * num_warps, "limiter": limiter}


# ==================================================================================================
# SASS: tensor-core instructions and loops
# ==================================================================================================

_SASS_LINE = re.compile(r"^\s*/\*([0-9a-fA-F]{4,})\*/\s+(.*?)\s*;")
_BRANCH_TARGET = re.compile(r"(?:^|\s)BRA(?:\.[A-Z0-9.]+)?\s+(?:`\(\.L_x_(\d+)\)|0x([0-9a-fA-F]+))")
_LABEL = re.compile(r"^\s*\.L_x_(\d+):")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")


def parse_sass(text: str) -> dict[str, list[tuple[int, str]]]:
    """``cuobjdump -sass`` text -> per function, its instructions as ``(address, text)`` in order
    (the predicate included, the encoding comments dropped). Branch targets written as labels
    (``.L_x_3``) are resolved to the address of the instruction after the label and rewritten as
    ``0x<address>``."""
    functions: dict[str, list[tuple[int, str]]] = {}
    current = None
    pending: list[str] = []
    labels: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            current = m.group(1)
            functions[current] = []
            labels[current] = {}
            pending = []
            continue
        if current is None:
            continue
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _SASS_LINE.match(line)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[current][lab] = addr
            pending = []
            functions[current].append((addr, m.group(2)))
    for name, instrs in functions.items():
        table = labels[name]
        functions[name] = [(a, re.sub(r"`\(\.L_x_(\d+)\)", lambda m: hex(table.get(m.group(1), -1)), t))
                           for a, t in instrs]
    return functions


def opcode(instruction: str) -> str:
    """Opcode of one SASS instruction text (its predicate ``@P0``/``@!P1`` skipped), modifiers kept."""
    parts = instruction.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def find_loops(instrs: list[tuple[int, str]]) -> list[dict]:
    """Loops of one function: every backward ``BRA`` (a branch to an address at or before its own)
    spans ``[target, branch]``. Returns the innermost ones (no other loop inside their span), one
    entry per span, in address order: ``{"start", "end", "instructions"}``, ``instructions`` counting
    every instruction of the body including the branch. A branch to itself (the ``BRA`` trap after
    ``EXIT``) is not a loop."""
    spans = set()
    for addr, text in instrs:
        m = _BRANCH_TARGET.search(" " + text)
        if not m or not opcode(text).startswith("BRA"):
            continue
        target = int(m.group(2), 16) if m.group(2) else None
        if target is not None and target < addr:
            spans.add((target, addr))
    spans = sorted(spans)
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    return [{"start": s, "end": e, "instructions": sum(1 for a, _ in instrs if s <= a <= e)} for s, e in inner]


def sass_summary(text: str) -> dict:
    """Instruction statistics of a one-kernel cubin's SASS: total instructions, tensor-core
    instructions (``HMMA``: mma.sync, ``HGMMA``: wgmma), FMA-pipe fp32 ``FFMA`` and the innermost
    loops (see :func:`find_loops`; ``loops`` lists their instruction counts in address order)."""
    functions = parse_sass(text)
    if not functions:
        raise ValueError("no function found in the SASS text (is it cuobjdump -sass output?)")
    instrs = [i for f in functions.values() for i in f]
    ops = [opcode(t).split(".")[0] for _, t in instrs]
    loops = [lp for f in functions.values() for lp in find_loops(f)]
    return {"instructions": len(instrs), "hmma": ops.count("HMMA"), "hgmma": ops.count("HGMMA"),
            "ffma": ops.count("FFMA"), "loops": [lp["instructions"] for lp in loops]}


# ==================================================================================================
# Capturing the launchers' launches
# ==================================================================================================

KERNEL_PACKAGE = "fastunet.kernels"
#: Keys of a case that describe it for people (not part of what is compiled).
_CASE_NOTES = ("probe", "src_hash", "note")


class Launch:
    """One intercepted ``kernel[grid](*args, **kwargs)``: the JIT function, its arguments and the
    compute capability in force when the launcher ran."""

    __slots__ = ("fn", "args", "kwargs", "cc", "probe")

    def __init__(self, fn, args, kwargs, cc, probe):
        self.fn, self.args, self.kwargs, self.cc, self.probe = fn, args, kwargs, cc, probe


class _Capture:
    def __init__(self):
        self.launches: list[Launch] = []
        self.cc = 80
        self.probe = ""


@contextlib.contextmanager
def capture(cc: int = 80):
    """Intercept every launch of a ``@triton.jit`` kernel defined under ``fastunet.kernels`` and record
    it (a :class:`Launch`) instead of running it; other Triton kernels run as usual.

    ``fastunet.kernels._backend.compute_capability`` is replaced by a function returning the
    capture's ``cc`` (settable on the yielded object), created if the module has none yet. Needs the
    compiled ``JITFunction`` (``TRITON_INTERPRET`` unset): under the interpreter the kernels are
    interpreted functions and nothing would be captured."""
    from triton.runtime.jit import JITFunction

    backend = importlib.import_module(f"{KERNEL_PACKAGE}._backend")
    state = _Capture()
    state.cc = cc
    original_run = JITFunction.run
    missing = object()
    original_cc = getattr(backend, "compute_capability", missing)

    def run(self, *args, grid, warmup, **kwargs):
        if not getattr(self.fn, "__module__", "").startswith(KERNEL_PACKAGE + "."):
            return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        state.launches.append(Launch(self, args, dict(kwargs), state.cc, state.probe))
        return None

    def compute_capability(device=None) -> int:
        return state.cc

    JITFunction.run = run
    backend.compute_capability = compute_capability
    try:
        yield state
    finally:
        JITFunction.run = original_run
        if original_cc is missing:
            del backend.compute_capability
        else:
            backend.compute_capability = original_cc


def _json_value(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    value = getattr(v, "value", missing := object())
    if value is not missing:  # tl.constexpr
        return _json_value(value)
    return str(v)


def specialize(launch: Launch) -> dict:
    """The compile case of one captured launch, specialised exactly as Triton's runtime does it:
    its own binder (``create_function_from_signature``, honouring ``do_not_specialize``) and
    ``JITFunction._pack_args`` for the signature, constexprs, attributes and options, for a CUDA
    backend of the launch's compute capability."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = launch.fn
    backend = CUDABackend(GPUTarget("cuda", launch.cc, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", fn.debug)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = JITFunction._pack_args(fn, backend, kwargs, bound, specialization,
                                                                   options)
    names = fn.arg_names
    for path in constexprs:
        if len(path) != 1:
            raise NotImplementedError(f"{fn.__name__}: tuple arguments are not supported (constexpr at {path})")
    case = {
        "module": fn.fn.__module__,
        "kernel": fn.__name__,
        "cc": launch.cc,
        "signature": dict(signature),
        "constexprs": {names[p[0]]: _json_value(v) for p, v in sorted(constexprs.items())},
        "attrs": [[p[0], [list(a) for a in spec]] for p, spec in sorted(attrs.items()) if spec],
        "num_warps": options.num_warps,
        "num_stages": options.num_stages,
    }
    if getattr(options, "maxnreg", None):
        case["maxnreg"] = options.maxnreg
    case["probe"] = launch.probe
    case["src_hash"] = fn.cache_key
    return case


def case_key(case: dict) -> str:
    """A stable, readable identity of a compile case: what is compiled, not how it was found."""
    return _cases_fingerprint(case)


# ==================================================================================================
# Probes: launcher calls on CPU tensors of representative shapes
# ==================================================================================================

_DTYPES = ("float16", "bfloat16", "float32")


def _attention_probes():
    """(name, thunk) pairs calling the attention launchers: SD 1.5, SDXL and AnimateDiff shapes (few
    images: the batch changes no config), every query/key length bucket, every head dim bucket and
    masked and unmasked head dims, layouts (contiguous, ``(B, N, H, D)`` transposed, a slice of a
    fused qkv projection), masks (none, bool, bias in q's dtype, fp32 bias, broadcast), every dtype;
    fp32 under torch's fp32 matmul precision "highest" (the default) and "high"."""
    import torch

    attn = importlib.import_module(f"{KERNEL_PACKAGE}.attention")
    probes = []

    def qkv(dtype, b, h, n, m, d, dv, layout):
        if layout == "bhnd":
            return (torch.empty(b, h, n, d, dtype=dtype), torch.empty(b, h, m, d, dtype=dtype),
                    torch.empty(b, h, m, dv, dtype=dtype))
        if layout == "bnhd":
            return (torch.empty(b, n, h, d, dtype=dtype).transpose(1, 2),
                    torch.empty(b, m, h, d, dtype=dtype).transpose(1, 2),
                    torch.empty(b, m, h, dv, dtype=dtype).transpose(1, 2))
        # fused qkv projection (B, N, 3, H, D) sliced (self-attention: m == n, dv == d)
        fused = torch.empty(b, n, 3, h, d, dtype=dtype)
        return tuple(fused[:, :, i].transpose(1, 2) for i in range(3))

    def mask_of(kind, dtype, b, h, n, m):
        if kind is None:
            return None
        if kind == "bool":
            return torch.ones(b, 1, n, m, dtype=torch.bool)
        if kind == "bias":
            return torch.zeros(b, h, n, m, dtype=dtype)
        if kind == "fp32-bias":
            return torch.zeros(1, 1, n, m, dtype=torch.float32)
        if kind == "key-bias":  # (B, 1, 1, M): broadcast over heads and queries, stride 0
            return torch.zeros(b, 1, 1, m, dtype=dtype)
        raise ValueError(kind)

    def add(name, dtype, b, h, n, m, d, dv=None, layout="bhnd", mask=None, backward=True):
        dv = d if dv is None else dv
        dt = getattr(torch, dtype)

        def thunk(precision):
            previous = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(precision)
            try:
                q, k, v = qkv(dt, b, h, n, m, d, dv, layout)
                msk = mask_of(mask, dt, b, h, n, m)
                scale = 1.0 / math.sqrt(d)
                out, lse = attn._attention_fwd(q, k, v, msk, scale)
                if backward:
                    do = torch.empty_like(out)
                    attn._attention_bwd(do, q, k, v, out, lse, msk, scale)
            finally:
                torch.set_float32_matmul_precision(previous)

        # fp32 launches depend on torch's fp32 matmul precision: PyTorch's default "highest", and
        # "high", which pipelines often set
        for precision in ("highest", "high") if dtype == "float32" else ("highest",):
            probes.append((f"attention {name} {dtype} B{b} H{h} N{n} M{m} D{d}/{dv} {layout} mask={mask}"
                           f"{' matmul=high' if precision == 'high' else ''}",
                           functools.partial(thunk, precision)))

    for dtype in _DTYPES:
        # SD 1.5 (heads 8, head dims 40/80/160), self and cross (77 text tokens); latents 64/32/16/8 scaled
        for n, d in ((4096, 40), (1024, 80), (256, 160), (64, 160)):
            add("sd15-self", dtype, 1, 8, n, n, d, layout="bnhd")
            add("sd15-cross", dtype, 1, 8, n, 77, d, layout="bnhd")
        add("sd15-fused-qkv", dtype, 1, 8, 1024, 1024, 80, layout="fused")
        # SDXL (head dim 64, 10 and 20 heads), cross attention to 77 tokens, bool text mask
        add("sdxl-self", dtype, 1, 10, 4096, 4096, 64, layout="bnhd")
        add("sdxl-cross", dtype, 1, 20, 1024, 77, 64, layout="bnhd", mask="bool")
        # AnimateDiff temporal attention: 16 frames per position, many sequences (short kernels)
        for d in (40, 80, 160):
            add("animatediff-temporal", dtype, 2 * 64 * 64 // 32, 8, 16, 16, d, layout="bnhd")
        add("animatediff-temporal-32f", dtype, 64, 8, 32, 32, 40, layout="bnhd")
        # every length bucket x head dim bucket (masked along D or not), masks of every kind
        for d in (8, 16, 32, 64, 128, 256):
            for n, m in ((1, 1), (17, 17), (33, 33), (17, 4097), (4097, 17), (4097, 4097)):
                add("buckets", dtype, 1, 2, n, m, d)
            add("buckets-bias", dtype, 1, 2, 4097, 4097 if d <= 64 else 333, d, mask="bias")
            add("buckets-fp32-bias", dtype, 1, 2, 300, 300, d, mask="fp32-bias")
            add("buckets-short-mask", dtype, 2, 2, 17, 30, d, mask="key-bias")
            add("buckets-short-mask32", dtype, 2, 2, 32, 32, d, mask="bias")
        for d in (40, 80, 96, 160, 200):
            add("odd-heads", dtype, 1, 3, 100, 100, d, mask="key-bias")
        add("mixed-dv", dtype, 1, 2, 200, 150, 64, dv=40)
    return probes


def _group_norm_act_probes():
    """(name, thunk) pairs calling the group_norm_act launchers (forward and backward): SD 1.5 / SDXL
    channel counts with 32 groups on their latent sizes (one image), AnimateDiff's 5-D video tensors
    with the channels-innermost ``out_layout``, channels-last inputs, a sliced (no unit stride) input,
    odd sizes; the optional inputs and activations the UNets use, every dtype (bf16 with fp32 affine
    parameters, the mixed-precision form)."""
    import torch

    gna = importlib.import_module(f"{KERNEL_PACKAGE}.group_norm_act")
    probes = []

    def add(name, dtype, shape, groups=32, layout="contiguous", flags=("weight", "bias"), activation="silu"):
        dt = getattr(torch, dtype)
        vdt = torch.float32 if dtype == "bfloat16" else dt

        def thunk():
            B, C = shape[:2]
            out_layout = None
            if layout == "video":  # (B, C, F, H, W) view of (B*F, C, H, W) memory
                F_ = shape[2]
                x = torch.empty(B * F_, C, *shape[3:], dtype=dt).view(B, F_, C, *shape[3:]).transpose(1, 2)
                out_layout = (0, 3, 4, 2, 1)
            elif layout == "channels-last":
                x = torch.empty(shape, dtype=dt).to(memory_format=torch.channels_last)
            elif layout == "sliced":  # every other position of the last dim: no unit stride
                x = torch.empty(*shape[:-1], 2 * shape[-1], dtype=dt)[..., ::2]
            else:
                x = torch.empty(shape, dtype=dt)
            vec = {f: torch.empty(C, dtype=vdt) for f in ("weight", "bias") if f in flags}
            emb = {f: torch.empty(B, C, dtype=vdt) for f in ("scale", "shift") if f in flags}
            add_t = torch.empty(B, C, dtype=vdt) if "add" in flags else None
            args = (vec.get("weight"), vec.get("bias"), add_t, emb.get("scale"), emb.get("shift"))
            y, mean, rstd = gna._group_norm_act_fwd(x, *args, groups, 1e-5, activation, out_layout=out_layout)
            dy = torch.empty_like(y)
            gna._group_norm_act_bwd(dy, x, *args, mean, rstd, groups, activation)

        probes.append((f"group_norm_act {name} {dtype} {tuple(shape)} {layout} {'+'.join(flags) or '-'} "
                       f"{activation}", thunk))

    all_flags = ("weight", "bias", "add", "scale", "shift")
    for dtype in _DTYPES:
        for c, hw in ((320, 64), (640, 32), (1280, 16), (1280, 8), (2560, 8)):
            add("sd15", dtype, (1, c, hw, hw))
        add("sdxl-time-scale-shift", dtype, (1, 640, 32, 32), flags=("weight", "bias", "scale", "shift"))
        add("all-inputs-gelu", dtype, (1, 64, 24, 24), flags=all_flags, activation="gelu")
        add("all-inputs-mish", dtype, (1, 64, 7, 9), groups=8, flags=all_flags, activation="mish")
        add("no-affine-no-act", dtype, (2, 64, 5, 5), groups=16, flags=(), activation=None)
        add("animatediff-video", dtype, (1, 320, 16, 16, 16), layout="video")
        add("animatediff-video-all", dtype, (1, 64, 8, 4, 4), groups=8, layout="video", flags=all_flags,
            activation="gelu")
        add("channels-last", dtype, (1, 320, 32, 32), layout="channels-last")
        add("channels-last-all", dtype, (1, 64, 16, 16), groups=4, layout="channels-last", flags=all_flags,
            activation="mish")
        add("sliced", dtype, (1, 128, 16, 16), layout="sliced")
        add("sliced-all", dtype, (1, 64, 6, 10), groups=8, layout="sliced", flags=all_flags, activation="gelu")
        add("1d", dtype, (2, 64, 1000), groups=32)
        add("odd", dtype, (3, 96, 13, 11), groups=32, flags=("weight", "bias", "add"))
    return probes


def _fourier_plane_plan() -> dict[tuple, tuple]:
    """One (H, W, threshold) per distinct launch configuration of the fourier filter launcher (its
    tiles, warps and row pad), found by running the launcher's own frequency and config functions
    over plane sizes 1 .. 2048 a side (powers of two and their neighbours) and thresholds the kernel
    takes: the plane with the largest column pad of that config (the pads only add work: the column
    loop and the coefficients grow with them), powers of two preferred (the sizes FreeU meets).
    Returns ``{(BLOCK_H, BLOCK_W, ONE_TILE, num_warps, R_PAD): (H, W, threshold, K_PAD)}``."""
    ff = importlib.import_module(f"{KERNEL_PACKAGE}.fourier_filter")
    import triton

    sides = sorted({s for p in range(12) for s in (1 << p, (1 << p) - 1, (1 << p) + 1) if 1 <= s <= 2048})
    plan = {}
    for h in sides:
        for w in sides:
            pow2 = (h & (h - 1)) == 0 and (w & (w - 1)) == 0
            for t in range(1, 9):
                _, n_rows = ff._scaled_frequencies(h, t)
                _, n_cols = ff._scaled_frequencies(w, t)
                if n_rows == 0 or n_cols == 0 or max(n_rows, n_cols) > ff._MAX_FREQS:
                    continue
                r_pad, k_pad = triton.next_power_of_2(n_rows), triton.next_power_of_2(n_cols)
                cfg = ff._fourier_filter_config(h, w, r_pad, k_pad)
                key = (cfg["BLOCK_H"], cfg["BLOCK_W"], cfg["ONE_TILE"], cfg["num_warps"], r_pad)
                rank = (k_pad, pow2)
                if key not in plan or rank > plan[key][0]:
                    plan[key] = (rank, (h, w, t, k_pad))
    return {k: v for k, (_, v) in plan.items()}


def _fourier_filter_probes():
    """(name, thunk) pairs calling the fourier filter launcher: one plane per distinct launch
    configuration (see :func:`_fourier_plane_plan`), 2 channels, every dtype; and FreeU's skip
    tensors (SD 1.5 / SDXL channel counts on their latent sizes), contiguous and channels-last."""
    import torch

    ff = importlib.import_module(f"{KERNEL_PACKAGE}.fourier_filter")
    probes = []

    def add(name, dtype, shape, threshold, channels_last=False):
        dt = getattr(torch, dtype)

        def thunk():
            x = torch.empty(shape, dtype=dt)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            ff._fourier_filter_fwd(x, threshold, 0.9)

        probes.append((f"fourier_filter {name} {dtype} {tuple(shape)} t={threshold}"
                       f"{' channels-last' if channels_last else ''}", thunk))

    plan = _fourier_plane_plan()
    for dtype in _DTYPES:
        for key, (h, w, t, _) in sorted(plan.items()):
            add("plane", dtype, (1, 2, h, w), t)
        for c, hw in ((1280, 8), (1280, 16), (640, 32), (320, 64)):
            add("freeu", dtype, (1, c, hw, hw), 1)
            add("freeu", dtype, (1, c, hw, hw), 1, channels_last=True)
    return probes


PROBE_SETS = {"attention": _attention_probes, "group_norm_act": _group_norm_act_probes,
              "fourier_filter": _fourier_filter_probes}


def collect_cases(ccs=(80, 90), ops=tuple(PROBE_SETS)) -> list[dict]:
    """Run every probe of ``ops`` under :func:`capture` for each compute capability and return the
    distinct compile cases (deduplicated by kernel, signature, attributes, constexprs, options and
    cc; the first probe reaching a case names it). Must run without ``TRITON_INTERPRET`` (see
    :func:`collect_cases_in_child`)."""
    if _interpreting():
        raise RuntimeError("collect_cases needs Triton's compiler: unset TRITON_INTERPRET (or call "
                           "collect_cases_in_child)")
    import torch

    seen: dict[str, dict] = {}
    for op in ops:
        if op not in PROBE_SETS:
            raise ValueError(f"ops must be among {list(PROBE_SETS)}; got {op!r}")
        probes = PROBE_SETS[op]()
        for cc in ccs:
            with capture(cc) as state, torch.no_grad():
                for name, thunk in probes:
                    state.probe = name
                    thunk()
            for launch in state.launches:
                case = specialize(launch)
                seen.setdefault(case_key(case), case)
    return list(seen.values())


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def collect_cases_in_child(ccs=(80, 90), ops=tuple(PROBE_SETS)) -> list[dict]:
    """:func:`collect_cases` in a child process without ``TRITON_INTERPRET`` (usable from the
    interpreter-based test suite)."""
    code = ("import json, sys; from fastunet.static_report import collect_cases; "
            f"json.dump(collect_cases({tuple(ccs)!r}, {tuple(ops)!r}), sys.stdout)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_child_env())
    if proc.returncode != 0:
        raise RuntimeError(f"capturing the launches failed:\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout)


# ==================================================================================================
# Compiling in parallel, with a disk cache
# ==================================================================================================

_WORKER = textwrap.dedent(
    r"""
    import json, sys
    from fastunet.static_report import _compile_one
    for line in sys.stdin:
        case = json.loads(line)
        try:
            res = _compile_one(case)
        except Exception as e:  # reported per case, the others still compile
            res = {"error": f"{type(e).__name__}: {e}"[-3000:]}
        sys.stdout.write(json.dumps(res) + "\n"); sys.stdout.flush()
    """
)

#: Bumped when what a cached result holds changes.
_CACHE_VERSION = 2


def toolchain() -> dict:
    """Paths of the bundled ``ptxas`` and ``cuobjdump``; ``RuntimeError`` with what is missing."""
    try:
        import triton
    except Exception as e:
        raise RuntimeError(f"the static report needs triton (pip install triton); importing it failed: {e}") from e
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    tools = {name: os.path.join(bindir, name) for name in ("ptxas", "cuobjdump")}
    missing = [p for p in tools.values() if not os.access(p, os.X_OK)]
    if missing:
        raise RuntimeError("the static report needs triton's bundled NVIDIA tools; missing or not executable: "
                           + ", ".join(missing))
    return tools


def _compile_one(case: dict) -> dict:
    """Compile one case (in a process without ``TRITON_INTERPRET``) and summarise the cubin."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget

    tools = toolchain()
    compiled = triton.compile(_ast_source(case), target=GPUTarget("cuda", case["cc"], 32), options=_options(case))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([tools["cuobjdump"], "--dump-resource-usage", f.name], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([tools["cuobjdump"], "-sass", f.name], check=True, capture_output=True,
                              text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    reg, stack, _, local = map(int, m.groups())
    ttir = compiled.asm["ttir"]
    header = next((line for line in ttir.splitlines() if "tt.func" in line), "")
    res = {"registers": reg, "stack": stack, "local": local, "shared": compiled.metadata.shared,
           "has_dot": "tt.dot" in ttir, "divisible_args": header.count("tt.divisibility = 16")}
    res.update(sass_summary(sass))
    return res


def cache_dir() -> str:
    """Where compile results are cached: ``$FASTUNET_STATIC_CACHE``, else ``~/.cache/fastunet/static``."""
    return os.environ.get("FASTUNET_STATIC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastunet",
                                                                   "static")


def _cache_path(case: dict) -> str:
    import triton

    key = json.dumps([_CACHE_VERSION, triton.__version__, case.get("src_hash"), case_key(case)])
    return os.path.join(cache_dir(), hashlib.sha256(key.encode()).hexdigest() + ".json")


def compile_all(cases: list[dict], workers: int = 2, use_cache: bool = True, progress: bool = True) -> list[dict]:
    """Compile ``cases`` (each with its ``src_hash``, as :func:`collect_cases` gives them) in
    ``workers`` child processes, reusing cached results; returns one result per case, in order
    (``{"error": ...}`` for a case that failed to compile)."""
    import queue
    import threading

    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    toolchain()
    results: list = [None] * len(cases)
    todo = queue.Queue()
    for i, case in enumerate(cases):
        path = _cache_path(case) if use_cache else None
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    results[i] = json.load(f)
                continue
            except (OSError, ValueError):
                pass
        todo.put(i)
    pending = todo.qsize()
    bar = None
    if progress and pending:
        from tqdm import tqdm

        bar = tqdm(total=pending, desc="compiling", unit="case", file=sys.stderr)
    lock = threading.Lock()
    failures = []

    def work():
        proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_child_env())
        try:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    break
                proc.stdin.write(json.dumps(cases[i]) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if not line:
                    failures.append(proc.stderr.read()[-6000:])
                    break
                res = json.loads(line)
                results[i] = res
                if use_cache and "error" not in res:
                    os.makedirs(cache_dir(), exist_ok=True)
                    tmp = _cache_path(cases[i]) + f".{os.getpid()}.{threading.get_ident()}.tmp"
                    with open(tmp, "w") as f:
                        json.dump(res, f)
                    os.replace(tmp, _cache_path(cases[i]))
                if bar is not None:
                    with lock:
                        bar.update(1)
        finally:
            proc.stdin.close()
            proc.wait()

    threads = [threading.Thread(target=work) for _ in range(min(workers, max(pending, 1)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if bar is not None:
        bar.close()
    if failures or any(r is None for r in results):
        raise RuntimeError("a compile worker died:\n" + "\n".join(failures))
    return results


# ==================================================================================================
# Checks, baseline and the report
# ==================================================================================================


def dtype_of(case: dict) -> str:
    """The data dtype of a case: its first pointer argument's element type."""
    return next((t[1:] for t in case["signature"].values() if t.startswith("*")), "-")


def op_of(case: dict) -> str:
    return case["module"].rsplit(".", 1)[-1]


def fp32_tensor_cores_expected() -> bool:
    """Whether fp32 attention dots are meant to run on tensor cores: the attention module's
    ``_FP32_TENSOR_CORES`` flag (False where it has none)."""
    return bool(getattr(importlib.import_module(f"{KERNEL_PACKAGE}.attention"), "_FP32_TENSOR_CORES", False))


def baseline_key(case: dict) -> str:
    """The key of a case in the loop baseline (``static_baseline.json``)."""
    return case_key(case)


BASELINE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static_baseline.json")


def load_baseline(path: str = BASELINE_PATH) -> dict:
    """``{baseline_key: [loop instruction counts]}``; empty where the file does not exist."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    return {entry["key"]: entry["loops"] for entry in data["cases"]}


def save_baseline(cases: list[dict], results: list[dict], path: str = BASELINE_PATH, merge: bool = True) -> int:
    """Write the loop instruction counts of ``cases`` to the baseline (merged into what is there
    unless ``merge`` is False); returns the number of entries written."""
    old = {}
    if merge and os.path.exists(path):
        with open(path) as f:
            old = {e["key"]: e for e in json.load(f)["cases"]}
    for case, res in zip(cases, results):
        if "error" not in res:
            old[baseline_key(case)] = {"kernel": case["kernel"], "cc": case["cc"], "key": baseline_key(case),
                                       "loops": res["loops"]}
    entries = sorted(old.values(), key=lambda e: (e["kernel"], e["cc"], e["key"]))
    with open(path, "w") as f:
        json.dump({"about": "SASS instructions per iteration of the innermost loops of each compiled case "
                            "(fastunet.static_report; rewrite with `python -m fastunet.cli.static --record`)",
                   "cases": entries}, f, indent=1)
        f.write("\n")
    return len(entries)


def check_case(case: dict, res: dict, baseline: dict | None = None, fp32_mma: bool | None = None) -> list[str]:
    """Problems of one compiled case: a compile error, spills, too many registers, shared memory over
    the limit, an attention dot without tensor-core instructions (fp32 only once
    :func:`fp32_tensor_cores_expected`, and not where the launch's ``DOT_PRECISION`` is "ieee", the
    exact FMA dots a config may choose), an innermost loop grown past the baseline (its largest loop
    or the loops' total)."""
    what = describe(case)
    if "error" in res:
        return [f"{what}: compile failed: {res['error']}"]
    problems = check_fits(case, res)
    if fp32_mma is None:
        fp32_mma = fp32_tensor_cores_expected()
    if op_of(case) == "attention" and res["has_dot"] and not (res["hmma"] or res["hgmma"]):
        # fp32: tensor cores once the module says so, except where the launch asks for exact FMA dots
        if dtype_of(case) != "fp32" or (fp32_mma and case["constexprs"].get("DOT_PRECISION") != "ieee"):
            problems.append(f"{what}: tl.dot did not lower to tensor-core instructions (no HMMA/HGMMA)")
    if baseline is not None and baseline_key(case) in baseline:
        old, new = baseline[baseline_key(case)], res["loops"]
        if max(new, default=0) > max(old, default=0) or sum(new) > sum(old):
            problems.append(f"{what}: innermost loops grew: {new} instructions, recorded {old}")
    return problems


def describe(case: dict) -> str:
    c = case["constexprs"]
    tiles = " ".join(f"{k}={v}" for k, v in c.items() if k.startswith("BLOCK") or k in ("R_PAD", "K_PAD"))
    return (f"{case['kernel']} sm_{case['cc']} {dtype_of(case)} [{tiles}] w{case['num_warps']} s{case['num_stages']}"
            f" ({case.get('probe', '')})")


def summarise(cases: list[dict], results: list[dict]) -> list[dict]:
    """One row per case for the table."""
    rows = []
    for case, res in zip(cases, results):
        row = {"op": op_of(case), "kernel": case["kernel"], "cc": case["cc"], "dtype": dtype_of(case),
               "config": " ".join(f"{k}={v}" for k, v in case["constexprs"].items()
                                  if k.startswith("BLOCK") or k in ("R_PAD", "K_PAD", "ONE_TILE", "HEAD_DIM",
                                                                    "HAS_MASK", "ACTIVATION")),
               "num_warps": case["num_warps"], "num_stages": case["num_stages"], "maxnreg": case.get("maxnreg", ""),
               "probe": case.get("probe", "")}
        if "error" in res:
            row.update(error=res["error"].splitlines()[0][:200])
        else:
            occ = occupancy(res["registers"], case["num_warps"], res["shared"], case["cc"])
            mma = ("wgmma" if res["hgmma"] else "mma" if res["hmma"] else "no") if res["has_dot"] else "-"
            row.update(registers=res["registers"], spill_local=res["local"], spill_stack=res["stack"],
                       shared=res["shared"], warps_per_sm=occ["warps"], blocks_per_sm=occ["blocks"],
                       limiter=occ["limiter"], mma=mma, hmma=res["hmma"], hgmma=res["hgmma"],
                       instructions=res["instructions"], loops=" ".join(map(str, res["loops"])), error="")
        rows.append(row)
    return rows


COLUMNS = ("op", "kernel", "cc", "dtype", "config", "num_warps", "num_stages", "maxnreg", "registers",
           "spill_local", "spill_stack", "shared", "warps_per_sm", "blocks_per_sm", "limiter", "mma", "hmma",
           "hgmma", "instructions", "loops", "probe", "error")


def headline(rows: list[dict]) -> list[dict]:
    """Per (kernel, cc, dtype): cases, register and shared-memory range, fewest warps per SM, MMA
    kinds, largest innermost loop."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["cc"], r["dtype"]), []).append(r)
    out = []
    for (kernel, cc, dtype), rs in sorted(groups.items()):
        ok = [r for r in rs if not r.get("error")]
        loops = [int(x) for r in ok for x in r["loops"].split()]
        out.append({"kernel": kernel, "cc": cc, "dtype": dtype, "cases": len(rs), "errors": len(rs) - len(ok),
                    "registers": f"{min(r['registers'] for r in ok)}-{max(r['registers'] for r in ok)}" if ok else "-",
                    "shared": f"{min(r['shared'] for r in ok)}-{max(r['shared'] for r in ok)}" if ok else "-",
                    "min_warps_per_sm": min((r["warps_per_sm"] for r in ok), default=0),
                    "limiters": ",".join(sorted({r["limiter"] for r in ok})),
                    "mma": ",".join(sorted({r["mma"] for r in ok})),
                    "spills": sum(r["spill_local"] + r["spill_stack"] for r in ok),
                    "max_loop": max(loops, default=0)})
    return out


def format_table(rows: list[dict], columns) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_report(out_dir: str, rows: list[dict], problems: list[str], notes: list[str]) -> None:
    """``static.csv`` (every case) and ``static.md`` (headline per kernel, every case, problems, notes)."""
    import csv

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "static.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COLUMNS})

    def md(rs, cols):
        head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
        return head + "".join("| " + " | ".join(str(r.get(c, "")).replace("|", "/") for c in cols) + " |\n"
                              for r in rs)

    heads = headline(rows)
    with open(os.path.join(out_dir, "static.md"), "w") as f:
        f.write("# Static report\n\nEvery config the launchers select, compiled for sm_80 and sm_90 with the "
                "specialisation the launchers give the JIT (fastunet.static_report).\n\n## Per kernel\n\n")
        f.write(md(heads, list(heads[0]) if heads else []))
        f.write(f"\n## Problems ({len(problems)})\n\n" + "".join(f"- {p}\n" for p in problems))
        if notes:
            f.write("\n## Notes\n\n" + "".join(f"- {n}\n" for n in notes))
        f.write(f"\n## Every case ({len(rows)})\n\n" + md(rows, COLUMNS))


# ==================================================================================================
# Coverage of the config tables, and the CI subset
# ==================================================================================================

ATTENTION_KINDS = {
    "_attention_fwd_kernel": "fwd", "_attention_bwd_dkdv_kernel": "dkdv", "_attention_bwd_dq_kernel": "dq",
    "_attention_bwd_preprocess_kernel": "preprocess", "_attention_short_fwd_kernel": "short_fwd",
    "_attention_short_bwd_kernel": "short_bwd",
}
ATTENTION_HEAD_DIMS = (8, 16, 32, 40, 64, 80, 128, 160, 256)
ATTENTION_LENGTHS = (1, 17, 33, 4097)


def attention_config_space(ccs=(80, 90)) -> set[tuple]:
    """Every ``(cc, (kind, precision, BLOCK_D, (block_m, block_n, num_warps, num_stages, fma)))`` the
    attention config functions return for compute capability ``cc`` over the head dims and length
    buckets the launchers distinguish (block_n is None for the preprocess kernel, which has no key
    tile; fma: the config asks for exact FMA dots, ``DOT_PRECISION="ieee"``), together with what the
    module's own ``_attention_configs()`` lists where it has one."""
    import inspect

    import torch

    attn = importlib.import_module(f"{KERNEL_PACKAGE}.attention")

    def norm(cfg, preprocess=False):
        return (cfg[0], None if preprocess else cfg[1], cfg[2], cfg[3], bool(getattr(cfg, "fma", False)))

    def call(f, *args, **kw):  # passes only the keywords f takes (cc, masked: later parameters)
        params = inspect.signature(getattr(f, "__wrapped__", f)).parameters
        return f(*args, **{k: v for k, v in kw.items() if k in params})

    seen = set()
    for cc in ccs:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            prec = "fp32" if dtype == torch.float32 else "half"
            for d in ATTENTION_HEAD_DIMS:
                bd = attn._block_d(d)
                for n in ATTENTION_LENGTHS:
                    for m in ATTENTION_LENGTHS:
                        for backward in (False, True):
                            short = call(attn._attention_short_config, bd, n, m, dtype, backward=backward, cc=cc)
                            if short is not None:
                                seen.add((cc, ("short_bwd" if backward else "short_fwd", prec, bd, norm(short))))
                            elif not backward:
                                for masked in (False, True):
                                    seen.add((cc, ("fwd", prec, bd, norm(call(attn._attention_fwd_config, bd, dtype,
                                                                              cc=cc, masked=masked)))))
                            else:
                                pre = attn._attention_bwd_preprocess_config(bd)
                                seen.add((cc, ("preprocess", prec, bd, norm(pre, preprocess=True))))
                                for kind, f in (("dkdv", attn._attention_bwd_dkdv_config),
                                                ("dq", attn._attention_bwd_dq_config)):
                                    seen.add((cc, (kind, prec, bd, norm(call(f, bd, dtype, cc=cc)))))
        for entry in getattr(attn, "_attention_configs", lambda: [])():
            name, dtype, bd, arch, cfg = entry
            if getattr(attn, "_arch", lambda c: c)(cc) != arch:
                continue
            kind = ATTENTION_KINDS[name]
            seen.add((cc, (kind, "fp32" if dtype == torch.float32 else "half", bd,
                           norm(cfg, preprocess=kind == "preprocess"))))
    return seen


def attention_config_of(case: dict) -> tuple:
    """``(kind, precision class, head-dim bucket, config)`` of an attention case; the bucket is the
    padded head dim the config tables are keyed on, also for a head dim split in two pieces
    (``BLOCK_D + BLOCK_D2``)."""
    attn = importlib.import_module(f"{KERNEL_PACKAGE}.attention")
    c = case["constexprs"]
    kind = ATTENTION_KINDS.get(case["kernel"], case["kernel"])
    prec = "fp32" if dtype_of(case) == "fp32" else "half"
    block_n = None if kind == "preprocess" else c.get("BLOCK_N")
    fma = c.get("DOT_PRECISION") == "ieee"
    bucket = attn._block_d(c["BLOCK_D"] + c.get("BLOCK_D2", 0))
    return (kind, prec, bucket, (c.get("BLOCK_M"), block_n, case["num_warps"], case["num_stages"], fma))


def group_norm_act_config_space() -> list[dict]:
    """``_group_norm_act_configs()``: every config the group_norm_act launchers can pick."""
    return importlib.import_module(f"{KERNEL_PACKAGE}.group_norm_act")._group_norm_act_configs()


def fourier_config_space() -> dict[tuple, int]:
    """Every (BLOCK_H, BLOCK_W, ONE_TILE, num_warps, R_PAD) of the fourier config table over the
    power-of-two plane buckets up to 2048 a side, row pads 1..8 (at most the padded height) and column
    pads 1..8 (at most the padded width), each mapped to the largest column pad that reaches it (the
    table gives some configs only below 8 column pads, where 8 spilled)."""
    ff = importlib.import_module(f"{KERNEL_PACKAGE}.fourier_filter")
    keys: dict[tuple, int] = {}
    for log_h in range(12):
        for log_w in range(12):
            for r_pad in (1, 2, 4, 8):
                for k_pad in (1, 2, 4, 8):
                    if r_pad <= 1 << log_h and k_pad <= 1 << log_w:
                        cfg = ff._fourier_filter_config(1 << log_h, 1 << log_w, r_pad, k_pad)
                        key = (cfg["BLOCK_H"], cfg["BLOCK_W"], cfg["ONE_TILE"], cfg["num_warps"], r_pad)
                        keys[key] = max(keys.get(key, 0), k_pad)
    return keys


def fourier_config_of(case: dict) -> tuple:
    c = case["constexprs"]
    return (c["BLOCK_H"], c["BLOCK_W"], c["ONE_TILE"], case["num_warps"], c["R_PAD"])


def coverage(cases: list[dict], ccs=(80, 90)) -> dict[str, list]:
    """Per op, the table configs no case reaches (per compute capability): ``{"attention": [(cc,
    config), ...], "group_norm_act": [...], "fourier_filter": [...]}``."""
    missing = {}
    by_op = {op: [c for c in cases if op_of(c) == op] for op in PROBE_SETS}
    got = {(c["cc"], attention_config_of(c)) for c in by_op["attention"]}
    missing["attention"] = sorted(e for e in attention_config_space(ccs) if e not in got)
    gna = importlib.import_module(f"{KERNEL_PACKAGE}.group_norm_act")
    miss = []
    for cc in ccs:
        for cfg in group_norm_act_config_space():
            tiles = {k: v for k, v in cfg.items() if k != "num_warps"}
            kernels = sorted({c["kernel"] for c in by_op["group_norm_act"]
                              if set(tiles) <= set(getattr(gna, c["kernel"]).arg_names)})
            for kernel in kernels:
                if not any(c["kernel"] == kernel and c["cc"] == cc and c["num_warps"] == cfg["num_warps"]
                           and all(c["constexprs"].get(k) == v for k, v in tiles.items())
                           for c in by_op["group_norm_act"]):
                    miss.append((cc, kernel, tuple(sorted(cfg.items()))))
            if not kernels:
                miss.append((cc, "no kernel takes", tuple(sorted(cfg.items()))))
    missing["group_norm_act"] = miss
    got = {(c["cc"], fourier_config_of(c)) for c in by_op["fourier_filter"]}
    missing["fourier_filter"] = sorted((cc, k) for cc in ccs for k in fourier_config_space() if (cc, k) not in got)
    return missing


def synthesise_fourier(cases: list[dict], missing: list[tuple]) -> list[dict]:
    """Cases for the fourier table configs no launch reaches (``coverage()["fourier_filter"]``): a
    captured fourier case of the same cc given the config's tiles, warps and row pad and the largest
    column pad the table gives it (:func:`fourier_config_space`); one dtype per config, rotating.
    Their probe says ``synthesised``."""
    space = fourier_config_space()
    templates = {}
    for c in cases:
        if op_of(c) == "fourier_filter" and c["constexprs"].get("ONE_TILE") is not None:
            templates.setdefault((c["cc"], dtype_of(c)), c)
    out = []
    for i, (cc, (bh, bw, one, nw, r_pad)) in enumerate(sorted(missing)):
        options = [t for (tcc, _), t in sorted(templates.items()) if tcc == cc]
        if not options:
            continue
        case = json.loads(json.dumps(options[i % len(options)]))
        case["constexprs"].update(BLOCK_H=bh, BLOCK_W=bw, ONE_TILE=one, R_PAD=r_pad,
                                 K_PAD=space[(bh, bw, one, nw, r_pad)])
        case["num_warps"] = nw
        case["probe"] = "fourier_filter synthesised from the config table (no input reaches it)"
        out.append(case)
    return out


def _weight(case: dict) -> tuple:
    """How heavy a case is likely to be before compiling: tile elements per thread, then the optional
    inputs switched on, then warps."""
    c = case["constexprs"]
    tile = 1
    for k, v in c.items():
        if k.startswith("BLOCK") and isinstance(v, int) and not isinstance(v, bool):
            tile *= v
    flags = sum(1 for k, v in c.items() if k.startswith("HAS_") and v is True)
    return (tile / case["num_warps"], flags, case["num_warps"], case_key(case))


def representative_subset(cases: list[dict], per_kernel: int = 8) -> list[dict]:
    """A deterministic subset for CI that keeps, for every (kernel, cc, dtype), its heaviest case (see
    :func:`_weight`), and for every (kernel, cc) the heaviest case of each of its ``per_kernel``
    heaviest tile configs (BLOCK_*, warps, stages; all of them where it has no more), the dtypes
    rotating over the configs."""
    chosen = {}
    groups: dict[tuple, list[dict]] = {}
    for c in cases:
        groups.setdefault((c["kernel"], c["cc"], dtype_of(c)), []).append(c)
    for g in groups.values():
        best = max(g, key=_weight)
        chosen[case_key(best)] = best
    configs: dict[tuple, dict[tuple, list[dict]]] = {}
    for c in cases:
        tiles = tuple(sorted((k, v) for k, v in c["constexprs"].items() if k.startswith("BLOCK")))
        configs.setdefault((c["kernel"], c["cc"]), {}).setdefault((tiles, c["num_warps"], c["num_stages"]),
                                                                  []).append(c)
    dtypes = sorted({dtype_of(c) for c in cases})
    for _, by_cfg in sorted(configs.items()):
        ranked = sorted(by_cfg.items(), key=lambda kv: max(_weight(c) for c in kv[1]), reverse=True)
        for i, (_, g) in enumerate(ranked[:per_kernel]):
            want = dtypes[i % len(dtypes)]
            best = max([c for c in g if dtype_of(c) == want] or g, key=_weight)
            chosen.setdefault(case_key(best), best)
    return sorted(chosen.values(), key=lambda c: (c["kernel"], c["cc"], case_key(c)))


def run_report(cases: list[dict], workers: int = 2, use_cache: bool = True, progress: bool = True,
               baseline: dict | None = None) -> tuple[list[dict], list[dict], list[str]]:
    """Compile ``cases`` and check them: ``(results, rows, problems)``."""
    results = compile_all(cases, workers=workers, use_cache=use_cache, progress=progress)
    fp32_mma = fp32_tensor_cores_expected()
    problems = [p for case, res in zip(cases, results) for p in check_case(case, res, baseline, fp32_mma)]
    return results, summarise(cases, results), problems
