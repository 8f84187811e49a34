"""The group_norm_act kernels compile for real GPUs (sm_80, sm_90) in every config
``_group_norm_act_config`` can return, with fp32, fp16 and bf16 data, no spills (no local memory or
stack) and shared memory within the limit.

Each case is the heaviest variant of its config: every HAS_* flag on. The activation rotates with
the dtype so each one is compiled on every config and kernel (fp32 with mish, fp16 with gelu, bf16
with silu); the bf16 cases take their weight/bias/add/scale/shift in fp32, the mixed-precision form.
Integer arguments are compiled unspecialised (no divisibility hints), the worst case: odd spatial
sizes, for which the loads cannot be vectorised.
"""

from __future__ import annotations

import importlib

import pytest

from gpu_compile import check_fits, compile_cases  # tests/ is on sys.path (rootdir conftest)

gna = importlib.import_module("fastunet.kernels.group_norm_act")

KERNELS = ("_group_norm_act_stats_kernel", "_group_norm_act_fwd_kernel", "_group_norm_act_bwd_reduce_kernel",
           "_group_norm_act_bwd_dx_kernel")
# x's dtype -> (dtype of the (C,) and (B, C) vectors, activation)
VARIANTS = {"fp32": ("fp32", "mish"), "fp16": ("fp16", "gelu"), "bf16": ("fp32", "silu")}
DATA = {"x_ptr", "y_ptr", "dy_ptr", "dx_ptr"}
VECTORS = {"add_ptr", "weight_ptr", "bias_ptr", "scale_ptr", "shift_ptr"}


def make_case(kernel: str, cfg: dict, dtype: str, cc: int) -> dict:
    fn = getattr(gna, kernel)
    vec_dtype, activation = VARIANTS[dtype]
    values = dict(HAS_ADD=True, HAS_WEIGHT=True, HAS_BIAS=True, HAS_SCALE=True, HAS_SHIFT=True,
                  ACTIVATION=activation, BLOCK_C=cfg["BLOCK_C"], BLOCK_L=cfg["BLOCK_L"],
                  BLOCK_SPLIT=gna._MAX_SPLIT, BLOCK_SPLIT_L=gna._MAX_SPLIT_L)
    signature, constexprs = {}, {}
    for name in fn.arg_names:  # the constexpr arguments are exactly the keys of `values`
        if name in values:
            signature[name] = "constexpr"
            constexprs[name] = values[name]
        elif name in DATA:
            signature[name] = "*" + dtype
        elif name in VECTORS:
            signature[name] = "*" + vec_dtype
        elif name == "eps":
            signature[name] = "fp32"
        elif name in gna._SPLIT_ARGS or name == "L":
            signature[name] = "i32"
        else:  # statistics, partial sums, small gradients
            signature[name] = "*fp32"
    return dict(module="fastunet.kernels.group_norm_act", kernel=kernel, signature=signature,
                constexprs=constexprs, cc=cc, num_warps=cfg["num_warps"], num_stages=1)


def test_every_config_compiles_without_spills():
    configs = gna._group_norm_act_configs()
    assert len(configs) == 3
    cases = [make_case(kernel, cfg, dtype, cc) for cc in (80, 90) for cfg in configs for kernel in KERNELS
             for dtype in VARIANTS]
    results = compile_cases(cases)
    problems = [p for case, res in zip(cases, results) for p in check_fits(case, res)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kernel", KERNELS)
def test_signature_covers_every_argument(kernel):
    """Every kernel argument gets a type above (a renamed argument must not slip through as *fp32)."""
    known = DATA | VECTORS | set(gna._SPLIT_ARGS) | {"L", "eps", "part_ptr", "mean_ptr", "rstd_ptr", "gpart_ptr",
                                                     "cpart_ptr", "dadd_ptr", "dscale_ptr", "dshift_ptr",
                                                     "dweight_ptr", "dbias_ptr"}
    constexprs = {"HAS_ADD", "HAS_WEIGHT", "HAS_BIAS", "HAS_SCALE", "HAS_SHIFT", "ACTIVATION", "BLOCK_C", "BLOCK_L",
                  "BLOCK_SPLIT", "BLOCK_SPLIT_L"}
    assert set(getattr(gna, kernel).arg_names) <= known | constexprs
