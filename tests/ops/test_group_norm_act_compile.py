"""The group_norm_act kernels compile for real GPUs (sm_80, sm_90) in every config
``_group_norm_act_config`` can return, with fp32, fp16 and bf16 data, in every stride layout the
launchers hand them, with no spills (no local memory or stack) and shared memory within the limit.

Each case is the heaviest variant of its config: every HAS_* flag on. The activation rotates with
the dtype so each one is compiled on every config and kernel (fp32 with mish, fp16 with gelu, bf16
with silu); the bf16 cases take their weight/bias/add/scale/shift in fp32, the mixed-precision form.
Each is compiled under the launchers' register cap (``maxnreg``, ``_MAX_REGISTERS``). Sizes are
compiled unspecialised (the launchers mark them ``do_not_specialize``). Strides are what
Triton's runtime specialisation makes of them: a unit stride becomes the constant 1, so the compiler
knows a tile is contiguous along it (where a tile is read along one axis and written along the other,
the store goes through one layout conversion); the others are compiled as plain i32, without
divisibility hints, the worst case (odd sizes: no vector loads). The stride layouts, by which axis of each tensor is the unit-stride one:

* ``contiguous``: every tensor ``(B, C, L)``-contiguous, the 2-D UNets; every dtype (the launchers
  then also say that y's, dy's and dx's strides are x's, so one offset tile serves all);
* ``video-tokens``: the video UNets' ``x`` (a ``(B, C, F, H, W)`` view of ``(B*F, C, H, W)`` memory,
  H*W innermost), ``y`` and the incoming gradient with the channels innermost (``out_layout=(0, 3,
  4, 2, 1)``), ``dx`` laid out as ``x``; two spatial rows ``(F, H*W)`` (``ONE_ROW`` off);
* ``channels-last``: ``x``, its gradient and ``dx`` channels-innermost, ``y`` contiguous;
* ``no-unit-stride``: no unit stride anywhere (an expanded gradient, a sliced input), two rows.

The last three rotate the dtype over the configs.
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
DATA = {"x", "y", "dy", "dx"}  # the big tensors, each with stride_<name>_{b,c,s0,s1}
VECTORS = {"add_ptr", "weight_ptr", "bias_ptr", "scale_ptr", "shift_ptr"}
STRIDE_DIMS = ("b", "c", "s0", "s1")
# layout -> (the unit-stride dim of each big tensor, the tensors whose strides are x's: the launchers'
# Y_LIKE_X / DY_LIKE_X / DX_LIKE_X flags, whether the spatial dims merge into one row: ONE_ROW)
LAYOUTS = {
    "contiguous": ({"x": "s1", "y": "s1", "dy": "s1", "dx": "s1"}, {"y", "dy", "dx"}, True),
    "video-tokens": ({"x": "s1", "y": "c", "dy": "c", "dx": "s1"}, {"dx"}, False),
    "channels-last": ({"x": "c", "y": "s1", "dy": "c", "dx": "c"}, {"dy", "dx"}, True),
    "no-unit-stride": ({}, set(), False),
}
LIKE_FLAGS = ("Y_LIKE_X", "DY_LIKE_X", "DX_LIKE_X")
# the kernels with a ONE_PASS mode (forward, backward), and their one-pass tiles (BLOCK_C, BLOCK_N): the
# largest of each warp count (16, 8, 4) and the extreme aspect ratios
ONE_PASS = {"_group_norm_act_fwd_kernel": False, "_group_norm_act_bwd_dx_kernel": True}
ONE_PASS_TILES = {False: [(2, 4096), (16, 512), (64, 128), (1, 8192), (4, 512), (32, 64), (8, 256)],
                  True: [(2, 2048), (16, 256), (64, 64), (1, 4096), (4, 256), (32, 32), (8, 128)]}


def make_case(kernel: str, cfg: dict, dtype: str, cc: int, layout: str = "contiguous", one_pass: bool = False) -> dict:
    fn = getattr(gna, kernel)
    vec_dtype, activation = VARIANTS[dtype]
    values = dict(HAS_ADD=True, HAS_WEIGHT=True, HAS_BIAS=True, HAS_SCALE=True, HAS_SHIFT=True,
                  ACTIVATION=activation, BLOCK_C=cfg["BLOCK_C"], BLOCK_L=cfg.get("BLOCK_L", cfg.get("BLOCK_N")),
                  BLOCK_SPLIT=1 if one_pass else gna._MAX_SPLIT, BLOCK_SPLIT_L=1 if one_pass else gna._MAX_SPLIT_L,
                  ONE_PASS=one_pass)
    unit, like_x, one_row = LAYOUTS[layout]
    values["ONE_ROW"] = one_row
    values.update({f"stride_{t}_{d}": 1 for t, d in unit.items()})
    values.update({flag: flag[:-7].lower() in like_x for flag in LIKE_FLAGS})
    signature, constexprs = {}, {}
    for name in fn.arg_names:
        if name in values:
            signature[name] = "constexpr"
            constexprs[name] = values[name]
        elif name.endswith("_ptr") and name[:-4] in DATA:
            signature[name] = "*" + dtype
        elif name in VECTORS:
            signature[name] = "*" + vec_dtype
        elif name == "eps":
            signature[name] = "fp32"
        elif name in gna._SIZE_ARGS or name.startswith("stride_"):
            signature[name] = "i32"
        else:  # statistics, partial sums, small gradients
            signature[name] = "*fp32"
    # what Triton's launcher marks on SD-sized tensors: 16-byte aligned pointers, strides that are
    # multiples of 16 (a merged-away row's stride 0 included); sizes are do_not_specialize
    attrs = [[i, [["tt.divisibility", 16]]] for i, name in enumerate(fn.arg_names)
             if signature[name].startswith("*") or (name.startswith("stride_") and signature[name] == "i32")]
    cap = cfg["maxnreg"] if one_pass else gna._MAX_REGISTERS[kernel]
    return dict(module="fastunet.kernels.group_norm_act", kernel=kernel, signature=signature,
                constexprs={k: v for k, v in constexprs.items() if k in fn.arg_names}, attrs=attrs, cc=cc,
                num_warps=cfg["num_warps"], num_stages=1, maxnreg=cap, layout=layout, one_pass=one_pass)


def compile_plan() -> list[dict]:
    """The cases described in the module docstring."""
    configs = gna._group_norm_act_configs()
    cases = [make_case(kernel, cfg, dtype, cc) for cc in (80, 90) for cfg in configs for kernel in KERNELS
             for dtype in VARIANTS]
    dtypes = list(VARIANTS)
    for i, layout in enumerate(list(LAYOUTS)[1:]):
        for j, cfg in enumerate(configs):
            dtype = dtypes[(i + j) % len(dtypes)]
            cases += [make_case(kernel, cfg, dtype, cc, layout) for cc in (80, 90) for kernel in KERNELS]
    # one pass: each tile in the layouts in turn, dtypes rotating
    layouts = list(LAYOUTS)
    for kernel, backward in ONE_PASS.items():
        for i, (block_c, block_n) in enumerate(ONE_PASS_TILES[backward]):
            cfg = gna._group_norm_act_one_pass_config(block_c, block_n, backward)
            assert (cfg["BLOCK_C"], cfg["BLOCK_N"]) == (block_c, block_n)
            cases += [make_case(kernel, cfg, dtypes[i % 3], cc, layouts[i % len(layouts)], one_pass=True)
                      for cc in (80, 90)]
    return cases


def test_every_config_and_layout_compiles_without_spills():
    configs = gna._group_norm_act_configs()
    assert len(configs) == 3
    cases = compile_plan()
    results = compile_cases(cases)
    problems = []
    for case, res in zip(cases, results):
        problems += check_fits(case, res)
        c = case["constexprs"]
        print(f"sm_{case['cc']} {case['kernel'][16:-7]:<10} {'1-pass' if case['one_pass'] else '':<6}"
              f" {case['layout']:<14} {case['signature']['x_ptr']:<6}"
              f" {c['BLOCK_C']:>2}x{c['BLOCK_L']:<4} {str(c.get('ACTIVATION', '-')):<4}: {res['registers']:>3} regs,"
              f" {res['shared']:>5} B shared")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kernel", KERNELS)
def test_signature_covers_every_argument(kernel, layout):
    """Every kernel argument gets a type above (a renamed argument must not slip through as *fp32),
    and each layout's unit strides are arguments of the kernels that take that tensor."""
    fn = getattr(gna, kernel)
    known = ({f"{t}_ptr" for t in DATA} | VECTORS | set(gna._SIZE_ARGS) | {"eps", "part_ptr", "mean_ptr", "rstd_ptr",
             "gpart_ptr", "cpart_ptr", "dadd_ptr", "dscale_ptr", "dshift_ptr", "dweight_ptr", "dbias_ptr"}
             | {f"stride_{t}_{d}" for t in DATA for d in STRIDE_DIMS})
    constexprs = {"HAS_ADD", "HAS_WEIGHT", "HAS_BIAS", "HAS_SCALE", "HAS_SHIFT", "ACTIVATION", "BLOCK_C", "BLOCK_L",
                  "BLOCK_SPLIT", "BLOCK_SPLIT_L", "ONE_ROW", "ONE_PASS", *LIKE_FLAGS}
    assert set(fn.arg_names) <= known | constexprs
    for t, d in LAYOUTS[layout][0].items():
        assert (f"stride_{t}_{d}" in fn.arg_names) == (f"{t}_ptr" in fn.arg_names)
