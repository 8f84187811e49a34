"""The attention kernels compile for real GPUs (sm_80, sm_90) in every config the config functions
produce, with no register spills and shared memory within the limit.

The config space is walked over head dims {8, 16, 32, 40, 64, 80, 128, 160, 256}, fp16/bf16/fp32 and
query/key lengths in every bucket the launchers distinguish, then deduplicated to one entry per
(kernel, precision, BLOCK_D, config): 44 entries. Each entry compiles three times (~90 s of CPU on a
cold Triton cache):

* with a mask for sm_80 and for sm_90. The mask is an fp32 additive bias, the heaviest the kernels
  take (a bool mask becomes a bias in q's dtype);
* without a mask (the common case, whose layouts differ) for one architecture, alternating.

The head dim cycles through the dims of the entry's BLOCK_D bucket, so every head dim of the list
is compiled, masked along D (8, 40, 80, 160 ...) and not; fp16 and bf16 alternate likewise.

Strides along the head dim and the mask's key stride are passed as the constant 1, as Triton's
runtime specialises them for the tensors the launchers hand over (see ``_aligned``).
"""

from __future__ import annotations

import importlib
import itertools

import torch

from gpu_compile import check_fits, compile_cases  # tests/ is on sys.path (rootdir conftest)

attn = importlib.import_module("fastunet.kernels.attention")

HEAD_DIMS = (8, 16, 32, 40, 64, 80, 128, 160, 256)
LENGTHS = (1, 17, 33, 4097)  # short tile 16, short tile 32, main kernels
KERNELS = {
    "fwd": "_attention_fwd_kernel",
    "dkdv": "_attention_bwd_dkdv_kernel",
    "dq": "_attention_bwd_dq_kernel",
    "preprocess": "_attention_bwd_preprocess_kernel",
    "short_fwd": "_attention_short_fwd_kernel",
    "short_bwd": "_attention_short_bwd_kernel",
}


def config_space():
    """Every distinct (kernel, precision, BLOCK_D, config) the launchers can pick, sorted."""
    seen = set()
    for dtype, d in itertools.product((torch.float16, torch.bfloat16, torch.float32), HEAD_DIMS):
        prec = "fp32" if dtype == torch.float32 else "half"
        bd = attn._block_d(d)
        for n, m in itertools.product(LENGTHS, LENGTHS):
            short = attn._attention_short_config(bd, n, m, dtype)
            if short is not None:
                seen.add(("short_fwd", prec, bd, short))
            else:
                seen.add(("fwd", prec, bd, attn._attention_fwd_config(bd, dtype)))
            short = attn._attention_short_config(bd, n, m, dtype, backward=True)
            if short is not None:
                seen.add(("short_bwd", prec, bd, short))
            else:
                seen.add(("preprocess", prec, bd, attn._attention_bwd_preprocess_config(bd)))
                seen.add(("dkdv", prec, bd, attn._attention_bwd_dkdv_config(bd, dtype)))
                seen.add(("dq", prec, bd, attn._attention_bwd_dq_config(bd, dtype)))
    return sorted(seen)


def _case(entry, cc: int, head_dim: int, half_dtype: str, has_mask: bool) -> dict:
    kind, prec, bd, cfg = entry
    fn = getattr(attn, KERNELS[kind])
    ptr = "*fp32" if prec == "fp32" else half_dtype
    constexprs = {"HEAD_DIM": head_dim, "HEAD_DIM_V": head_dim, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                  "BLOCK_D": bd, "HAS_MASK": has_mask,
                  "DOT_PRECISION": attn._dot_precision(torch.float32 if prec == "fp32" else torch.float16)}
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.startswith("stride_") and (name.endswith("_d") or name == "stride_mask_m"):
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif name in ("lse_ptr", "delta_ptr", "mask_ptr"):
            signature[name] = "*fp32"
        elif name.endswith("_ptr"):
            signature[name] = ptr
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return {"module": "fastunet.kernels.attention", "kernel": fn.__name__, "signature": signature,
            "constexprs": constexprs, "cc": cc, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def compile_plan() -> list[dict]:
    """The cases described in the module docstring."""
    bucket_dims = {bd: [d for d in HEAD_DIMS if attn._block_d(d) == bd] for bd in {attn._block_d(d) for d in HEAD_DIMS}}
    turn = dict.fromkeys(bucket_dims, 0)
    cases = []
    for i, entry in enumerate(config_space()):
        bd = entry[2]
        for cc, has_mask in ((80, True), (90, True), ((80, 90)[i % 2], False)):
            head_dim = bucket_dims[bd][turn[bd] % len(bucket_dims[bd])]
            turn[bd] += 1
            cases.append(_case(entry, cc, head_dim, ("*fp16", "*bf16")[len(cases) % 2], has_mask))
    return cases


def test_config_space_covers_every_kernel_and_head_dim():
    space = config_space()
    for kind in KERNELS:
        for prec in ("half", "fp32"):
            buckets = {bd for k, p, bd, _ in space if (k, p) == (kind, prec)}
            expected = {64, 128} if (kind, prec) == ("short_bwd", "fp32") else {64, 128, 256}
            assert buckets == expected, (kind, prec, buckets)  # larger fp32 heads: main kernels
    compiled = {(c["constexprs"]["HEAD_DIM_V"], c["constexprs"]["HAS_MASK"]) for c in compile_plan()
                if "HAS_MASK" in c["constexprs"]}
    assert compiled == set(itertools.product(HEAD_DIMS, (False, True)))


def test_every_attention_config_compiles_without_spills():
    cases = compile_plan()
    results = compile_cases(cases)
    problems = []
    for case, res in zip(cases, results):
        problems += check_fits(case, res)
        c = case["constexprs"]
        ptr = next(iter(case["signature"].values()))
        print(f"sm_{case['cc']} {case['kernel'][11:-7]:<19} {ptr:<6} D={c['HEAD_DIM_V']:<3}"
              f" {c['BLOCK_M']:>3}x{c.get('BLOCK_N', '-'):<3} BLOCK_D={c['BLOCK_D']:<3}"
              f" mask={int(c.get('HAS_MASK', 0))} w{case['num_warps']} s{case['num_stages']}:"
              f" {res['registers']:>3} regs, {res['shared']:>6} B shared")
    assert not problems, "\n".join(problems)
