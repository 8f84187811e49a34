"""The attention kernels compile for real GPUs (sm_80, sm_90) in every config a launcher can select,
with the specialisation the launcher's real tensors give the JIT, with no register spills and shared
memory within the limit.

What is compiled is what is launched: for each entry of ``_attention_configs()`` (kernel, dtype,
BLOCK_D, arch, config) the test runs the launchers on Stable-Diffusion-shaped tensors with the kernels
stubbed and ``_backend.compute_capability`` forced to the entry's arch, captures the launch that uses
the entry's config, and turns its arguments into the signature, constants and attributes Triton's
runtime would derive (``triton.runtime.jit``'s own ``native_specialize_impl``: a pointer whose address
and an integer whose value is a multiple of 16 get ``tt.divisibility = 16``, an integer equal to 1 is
a constant). So the strides are those of the (B, N, H, D) projections the processors hand over
(innermost stride 1, a constant; ``H * D`` along the queries), and the lengths those of SD
(4096, 1024 or 256 queries; 77 keys with a mask, as in cross-attention, or as many keys as queries).

Each entry compiles with a mask (an fp32 additive bias ``(B, 1, N, M)``, the heaviest the kernels
take; a bool mask becomes a bias in q's dtype) and without. Half-precision entries alternate fp16 and
bf16; fp32 entries compile with ``input_precision="tf32x3"`` (``torch.get_float32_matmul_precision()
== "highest"``, the default) and the main kernels also once with plain ``"tf32"`` ("high"). The head
dim cycles through the dims of the entry's head-dim bucket (8 .. 256), so masked and unmasked head
dims (40, 80, 160 and 64, 128, 256) all appear; the main kernels' variants alternate between a head
dim split in two pieces (40, 80, 160: ``BLOCK_D2 > 0``) and a whole one, so each of their entries
compiles both ways; an entry that serves only one kind (a dK/dV tile of ``_SPLIT_CONFIGS``, for split
head dims, and its bucket's padded tile, then only for the others) compiles on the head dims it serves.
"""

from __future__ import annotations

import importlib
import inspect
import itertools

import pytest
import torch
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import native_specialize_impl

from gpu_compile import check_fits, compile_cases  # tests/ is on sys.path (rootdir conftest)

attn = importlib.import_module("fastunet.kernels.attention")
backend = importlib.import_module("fastunet.kernels._backend")

HEAD_DIMS = (8, 16, 32, 40, 64, 80, 128, 160, 256)
MAIN_KERNELS = ("_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel")
KERNELS = ("_attention_fwd_kernel", "_attention_bwd_preprocess_kernel", "_attention_bwd_dkdv_kernel",
           "_attention_bwd_dq_kernel", "_attention_short_fwd_kernel", "_attention_short_bwd_kernel")
#: Queries of the main kernels' SD shapes by BLOCK_D (SD 1.5: D 40 at 64x64 latents, D 80 at 32x32,
#: D 160 at 16x16).
QUERIES = {64: 4096, 128: 1024, 256: 256}


class _Capture:
    """Stands in for a ``@triton.jit`` kernel: records ``(kernel, positional args, kwargs)``."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.fn, args, kwargs))


def _launches(monkeypatch, cc: int, dtype, head_dim: int, short: int, masked: bool, precision: str):
    """Every launch of one forward and backward on SD-shaped inputs, kernels stubbed, arch ``cc``;
    ``short`` is the sequence length of the short kernels (0: the main kernels)."""
    log = []
    with monkeypatch.context() as mp:
        for name in KERNELS:
            mp.setattr(attn, name, _Capture(getattr(attn, name), log))
        mp.setattr(backend, "compute_capability", lambda device: cc)
        mp.setattr(attn, "interpreter_enabled", lambda: False)  # the launch is for a GPU: no interpreter workaround
        batch, heads = (64, 8) if short else (2, 2)
        seqlen_q = short or QUERIES[attn._block_d(head_dim)]
        seqlen_k = short or (77 if masked else seqlen_q)
        # (B, N, H, D) projections viewed as (B, H, N, D), as the attention processors pass them.
        q, k, v = (torch.randn(batch, n, heads, head_dim, dtype=dtype).transpose(1, 2)
                   for n in (seqlen_q, seqlen_k, seqlen_k))
        mask = torch.randn(batch, 1, seqlen_q, seqlen_k) if masked else None
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(precision)
        try:
            out, lse = attn._attention_fwd(q, k, v, mask, head_dim ** -0.5)
            out, lse = torch.randn_like(out), torch.randn_like(lse)  # the stubs wrote nothing
            attn._attention_bwd(torch.randn_like(out), q, k, v, out, lse, mask, head_dim ** -0.5)
        finally:
            torch.set_float32_matmul_precision(previous)
    return log


def _is_constexpr(fn, name: str) -> bool:
    """Whether kernel ``fn``'s parameter ``name`` is annotated ``tl.constexpr`` (``fn`` is the
    interpreter's wrapper here; its ``.fn`` is the Python function)."""
    return "constexpr" in str(inspect.signature(fn.fn).parameters[name].annotation)


def _specialised_case(fn, args, kwargs, cc: int) -> dict:
    """The compile case of one captured launch: Triton types, constants and divisibility attributes
    exactly as ``JITFunction.run`` derives them from the arguments (the launchers pass the runtime
    arguments by position and the constexprs by keyword)."""
    names = fn.arg_names
    if any(_is_constexpr(fn, n) for n in names[:len(args)]) or not all(
            _is_constexpr(fn, n) for n in names[len(args):]):
        raise AssertionError(f"{fn.__name__}: runtime args must come by position, constexprs by keyword")
    signature, constexprs, attrs = {}, {}, []
    for index, name in enumerate(names):
        if index >= len(args):
            signature[name], constexprs[name] = "constexpr", kwargs[name]
            continue
        ty, key = native_specialize_impl(BaseBackend, args[index], False, True, True)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = key
        elif key:
            attrs.append([index, BaseBackend.parse_attr(key)])
    return {"module": "fastunet.kernels.attention", "kernel": fn.__name__, "signature": signature,
            "constexprs": constexprs, "attrs": attrs, "cc": cc, "num_warps": kwargs["num_warps"],
            "num_stages": kwargs["num_stages"]}


def _config_of(kwargs) -> attn._AttentionConfig:
    return attn._AttentionConfig(kwargs["BLOCK_M"], kwargs.get("BLOCK_N", 16), kwargs["num_warps"],
                                 kwargs["num_stages"], kwargs.get("DOT_PRECISION") == "ieee")


def _split(name: str, head_dim: int, dtype, cc: int, masked: bool) -> bool:
    """Whether main kernel ``name`` runs ``head_dim`` split in two pieces."""
    return attn._block_dims(head_dim, name[11:-7].removeprefix("bwd_"), dtype, cc, masked)["BLOCK_D2"] > 0


def _bucket(kwargs) -> int:
    """The head-dim bucket of a launch (the tables' key), split head dims included."""
    return attn._block_d(kwargs["BLOCK_D"] + kwargs.get("BLOCK_D2", 0))


def _runs(name: str, cfg, head_dim: int, dtype, cc: int, masked: bool) -> bool:
    """Whether a launch of kernel ``name`` at ``head_dim`` takes ``cfg``: the dK/dV kernel tiles a split
    head dim by ``_SPLIT_CONFIGS`` where that lists its bucket, the forward a masked launch by
    ``_MASKED_FWD_CONFIGS``; every other entry serves its whole bucket."""
    if name == "_attention_fwd_kernel":
        return attn._attention_fwd_config(attn._block_d(head_dim), dtype, cc, masked=masked) == cfg
    if name != "_attention_bwd_dkdv_kernel":
        return True
    split = _split(name, head_dim, dtype, cc, masked)
    return attn._attention_bwd_dkdv_config(attn._block_d(head_dim), dtype, cc, split) == cfg


def compile_plan(monkeypatch) -> list[dict]:
    """The cases described in the module docstring, each captured from a real launcher call."""
    turn = {}
    cases = []
    for i, (name, dtype, bd, cc, cfg) in enumerate(attn._attention_configs()):
        short = cfg.block_m if "short" in name else 0
        variants = [(True, "highest"), (False, "highest")]
        if dtype == torch.float32 and not short and "preprocess" not in name:
            variants.append((False, "high"))
        dims = [d for d in HEAD_DIMS if attn._block_d(d) == bd]
        # a masked-only entry (_MASKED_FWD_CONFIGS) is compiled on its masked variants only
        variants = [(m, p) for m, p in variants if any(_runs(name, cfg, d, dtype, cc, m) for d in dims)]
        assert variants, f"{name} {cfg} on sm_{cc} serves no head dim of its bucket {bd}, masked or not"
        for j, (masked, precision) in enumerate(variants):
            served = [d for d in dims if _runs(name, cfg, d, dtype, cc, masked)]
            split = [d for d in served if name in MAIN_KERNELS and _split(name, d, dtype, cc, masked)]
            pools = (split, [d for d in served if d not in split]) if split and len(split) < len(served) else (served,)
            pool = pools[(i + j) % len(pools)]
            head_dim = pool[turn.get(tuple(pool), 0) % len(pool)]
            turn[tuple(pool)] = turn.get(tuple(pool), 0) + 1
            run_dtype = dtype if dtype == torch.float32 else (torch.float16, torch.bfloat16)[len(cases) % 2]
            found = [(fn, a, kw) for fn, a, kw in
                     _launches(monkeypatch, cc, run_dtype, head_dim, short, masked, precision)
                     if fn.__name__ == name and _config_of(kw) == cfg]
            assert found, f"no launch of {name} with {cfg} on sm_{cc} (D={head_dim}, {run_dtype}, mask={masked})"
            cases.append(_specialised_case(*found[0], cc))
    return cases


def test_config_enumeration_covers_every_kernel_arch_and_head_dim(monkeypatch):
    space = attn._attention_configs()
    for name, prec, cc in itertools.product(KERNELS, (torch.float16, torch.float32), attn._ARCHS):
        buckets = {bd for n, d, bd, c, _ in space if (n, d, c) == (name, prec, cc)}
        expected = {64, 128} if (name, prec) == ("_attention_short_bwd_kernel", torch.float32) else {64, 128, 256}
        assert buckets == expected, (name, prec, cc, buckets)  # larger fp32 heads: main kernels
    # The launchers select only enumerated configs, on every head dim, dtype, arch and length bucket.
    listed = {(n, d, bd, c, cfg) for n, d, bd, c, cfg in space}
    splits = set()
    for cc, dtype, head_dim, short in itertools.product(attn._ARCHS, (torch.float16, torch.bfloat16, torch.float32),
                                                         (40, 80, 160), (0, 16, 32)):
        for fn, _, kw in _launches(monkeypatch, cc, dtype, head_dim, short, short == 16, "highest"):
            table_dtype = torch.float32 if dtype == torch.float32 else torch.float16
            key = (fn.__name__, table_dtype, _bucket(kw), cc, _config_of(kw))
            assert key in listed, key
            # SD 1.5's head dims run split in two pieces (48, 80, 160 columns, not 64, 128, 256) in the
            # main kernels where the split table says, padded to one power of two elsewhere
            pieces = {40: (32, 16), 80: (64, 16), 160: (128, 32)}[head_dim]
            is_split = fn.__name__ in MAIN_KERNELS and _split(fn.__name__, head_dim, dtype, cc, short == 16)
            expected = pieces if is_split else (attn._block_d(head_dim), 0)
            assert (kw["BLOCK_D"], kw.get("BLOCK_D2", 0)) == expected, (fn.__name__, head_dim, kw)
            if is_split:
                prec = attn._precision_class(table_dtype)
                splits.add((fn.__name__[11:-7].removeprefix("bwd_"), prec, cc, attn._block_d(head_dim)))
    # every split the tables list is launched (the main kernels run unmasked here)
    assert splits == {(kernel, prec, cc, bucket)
                      for table in (attn._SPLIT_BUCKETS, attn._SPLIT_BUCKETS_UNMASKED)
                      for (kernel, prec, cc), buckets in table.items() for bucket in buckets}


def test_splits_that_hold_only_without_a_mask_pad_with_one():
    for kernel, prec, cc in attn._SPLIT_BUCKETS_UNMASKED:
        dtype = torch.float32 if prec == "fp32" else torch.float16
        for bucket in attn._SPLIT_BUCKETS_UNMASKED[kernel, prec, cc]:
            d = {64: 40, 128: 80, 256: 160}[bucket]
            assert attn._block_dims(d, kernel, dtype, cc, False)["BLOCK_D2"] > 0
            assert attn._block_dims(d, kernel, dtype, cc, True) == {"BLOCK_D": bucket, "BLOCK_D2": 0}


def test_launches_carry_the_runtime_specialisation(monkeypatch):
    """The captured cases hold what the JIT would see: aligned pointers and strides divisible by 16,
    unit strides as constants, the dot precision the matmul setting asks for."""
    (fn, args, kw), *_ = _launches(monkeypatch, 90, torch.float16, 40, 0, False, "highest")
    case = _specialised_case(fn, args, kw, 90)
    divisible = {fn.arg_names[i] for i, _ in case["attrs"]}
    assert {"q_ptr", "k_ptr", "v_ptr", "out_ptr", "lse_ptr", "stride_q_n"} <= divisible, divisible
    assert "stride_q_h" not in divisible  # 40 elements: not a multiple of 16
    assert case["constexprs"]["stride_q_d"] == 1 and case["signature"]["stride_q_d"] == "constexpr"
    for precision, expected in (("highest", "tf32x3"), ("high", "tf32"), ("medium", "tf32")):
        (fn, _, kw), *_ = _launches(monkeypatch, 80, torch.float32, 64, 0, True, precision)
        assert kw["DOT_PRECISION"] == expected, (precision, kw["DOT_PRECISION"])


@pytest.mark.parametrize("arch", (80, 90))
def test_configs_differ_by_arch_where_the_tables_say(arch):
    """The launchers' arch comes from ``_backend.compute_capability``; archs between table entries
    take the one below."""
    assert attn._arch(arch) == arch and attn._arch(arch + 6) == arch and attn._arch(75) == 80
    assert attn._attention_fwd_config(64, torch.float16, arch) == attn._AttentionConfig(
        *attn._FWD_CONFIGS["half", arch][64])


def test_every_attention_config_compiles_without_spills(monkeypatch):
    cases = compile_plan(monkeypatch)
    results = compile_cases(cases)
    problems = []
    for case, res in zip(cases, results):
        problems += check_fits(case, res)
        c = case["constexprs"]
        ptr = case["signature"]["q_ptr" if "q_ptr" in case["signature"] else "out_ptr"]
        print(f"sm_{case['cc']} {case['kernel'][11:-7]:<19} {ptr:<6} D={c.get('HEAD_DIM', c['HEAD_DIM_V']):<3}"
              f" {c['BLOCK_M']:>3}x{c.get('BLOCK_N', '-'):<3} BLOCK_D={c['BLOCK_D']:>3}+{c.get('BLOCK_D2', 0):<3}"
              f" mask={int(c.get('HAS_MASK', 0))} {c.get('DOT_PRECISION', '-'):<11} w{case['num_warps']}"
              f" s{case['num_stages']}: {res['registers']:>3} regs, {res['shared']:>6} B shared")
    assert not problems, "\n".join(problems)
