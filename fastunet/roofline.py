"""A roofline model of one UNet evaluation, counted from the real model structure.

Each model is built with its real configuration on the ``meta`` device (no memory, no weights) and run
once in float16 under a :class:`~torch.utils._python_dispatch.TorchDispatchMode` that records every
operator call with its tensor shapes: fastunet's custom ops (``fastunet::group_norm_act_fwd``,
``fastunet::attention_fwd``, ``fastunet::fourier_filter``) and the aten ops around them (convolutions,
matrix products, LayerNorm and elementwise ops). Views move no data and are left out.

Per call:

* bytes = every tensor argument read once + every output written once, at the dtypes the float16
  model runs them in (GroupNorm's statistics and attention's log-sum-exp are fp32 outputs);
* FLOPs: attention ``4 B H N M D``; convolution ``2 * output elements * Cin/groups * kh * kw``;
  ``mm``/``addmm`` ``2 M K N``; GroupNorm+act 8 per element (statistics 3, normalise and affine 3,
  activation 2); FreeU's filter ``16 H W (|R| + |K|)`` per plane (two passes of complex multiply-adds
  over the ``|R| = |K| = 2 * threshold`` scaled frequencies); other elementwise ops 1 per output element;
* lower bound = ``max(bytes / bandwidth, FLOPs / peak)`` for each device in :data:`DEVICES`, summed
  over the calls (a per-call roofline, not one over the totals).

The "achieved fraction" column is a **model, not a measurement**: the fraction of the lower bound a
call is expected to reach, ``efficiency of the binding resource x counted-traffic factor``, with the
constants of :data:`EFFICIENCY` and :func:`call_fraction` (documented there) and the kernels' counted
traffic (``tests/ops/test_traffic.py``). ``fastunet.static_report`` (compiled configs' registers,
spills, shared memory, occupancy and SASS loop summaries) landed after this model was written and
compiles in child processes for minutes, so no occupancy or per-loop term enters the model yet.
No GPU has timed these kernels; ``fastunet bench --device cuda`` measures them.

``python -m fastunet.roofline`` prints the Markdown; ``--write`` puts it into README.md between
``<!-- roofline:begin -->`` and ``<!-- roofline:end -->``; ``--check`` exits 1 when README.md is stale.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastunet

#: Peak HBM bandwidth (bytes/s) and dense fp16/bf16 tensor-core peak (FLOP/s), from the vendors' data sheets.
DEVICES = {"H100": (3.35e12, 989e12), "A100": (2.0e12, 312e12)}
#: The compute capability whose config tables each device runs (kernels/attention.py: sm_90, sm_80).
DEVICE_ARCH = {"H100": 90, "A100": 80}

#: The op categories of the README table, in its order.
CATEGORIES = ("GroupNorm+act", "self-attention", "cross-attention", "temporal attention", "conv", "linear/GEMM",
              "FreeU filter", "other (LayerNorm, elementwise, resample, concat)")

#: Modelled efficiencies (model, not a measurement). "stream": the fraction of peak HBM bandwidth a
#: streaming kernel reaches on large tensors; "mma": the fraction of the dense tensor-core peak reached
#: by an FA2-class attention kernel (about 0.35 on H100 without wgmma-specific pipelining and 0.6 on A100:
#: the published FlashAttention-2 figures); "gemm": cuBLAS/cuDNN on large GEMMs and convolutions;
#: "eager": PyTorch's eager elementwise and LayerNorm kernels.
EFFICIENCY = {
    "H100": {"stream": 0.9, "mma": 0.35, "gemm": 0.7, "eager": 0.8},
    "A100": {"stream": 0.9, "mma": 0.6, "gemm": 0.8, "eager": 0.8},
}

#: FreeU's recommended values per model family (the FreeU authors' table), used where FreeU is enabled.
FREEU = {"sd15": dict(s1=0.9, s2=0.2, b1=1.5, b2=1.6), "sdxl": dict(s1=0.9, s2=0.2, b1=1.3, b2=1.4)}
FREEU_THRESHOLD = 1
#: The largest group (padded lanes) the GroupNorm+act forward runs in one pass over memory
#: (kernels/group_norm_act.py's module docstring).
GROUP_NORM_ONE_PASS_LANES = 8192

SD15 = dict(cross_attention_dim=768)
SDXL = dict(sample_size=128, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)

#: name -> (title, batch, latent side, frames or None, text tokens)
MODELS = {
    "sd15": ("SD 1.5, 512x512 (64x64 latents)", 2, 64, None, 77),
    "sdxl": ("SDXL, 1024x1024 (128x128 latents)", 2, 128, None, 77),
    "animatediff": ("AnimateDiff (SD 1.5 + motion modules), 512x512, 16 frames", 2, 64, 16, 77),
}
BATCH_NOTE = "batch 2 (a classifier-free-guidance pair; AnimateDiff: 2 x 16 frames), float16, FreeU enabled"


@dataclass
class OpCall:
    """One recorded operator call: its category, the module it ran in, shapes, and the counted work."""

    category: str
    op: str
    module: str
    shapes: tuple
    bytes: int
    flops: float
    meta: dict = field(default_factory=dict)


def build(name: str, dtype: torch.dtype = torch.float16, freeu: bool = True):
    """``(model, forward kwargs)`` of model ``name`` on the meta device, in ``dtype``."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}; got {name!r}")
    _, batch, side, frames, tokens = MODELS[name]
    with torch.device("meta"):
        if name == "animatediff":
            unet2d = fastunet.UNet2DConditionModel(**SD15)
            model = fastunet.UNetMotionModel.from_unet2d(unet2d, fastunet.MotionAdapter(), load_weights=False)
            sample = torch.randn(batch, 4, frames, side, side)
            context = torch.randn(batch, tokens, 768)
        else:
            model = fastunet.UNet2DConditionModel(**(SD15 if name == "sd15" else SDXL))
            sample = torch.randn(batch, 4, side, side)
            context = torch.randn(batch, tokens, model.config["cross_attention_dim"])
        model = model.to(dtype)
        kwargs = dict(sample=sample.to(dtype), timestep=torch.full((batch,), 500, dtype=torch.long),
                      encoder_hidden_states=context.to(dtype))
        if name == "sdxl":
            kwargs["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, 1280, dtype=dtype),
                                               time_ids=torch.randn(batch, 6, dtype=dtype))
    if freeu:
        model.enable_freeu(**FREEU["sdxl" if name == "sdxl" else "sd15"])
    return model, kwargs


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _classify(func, args, out, module: str, in_motion: bool) -> tuple[str, float, dict]:
    """(category, FLOPs, extra facts) of one call."""
    name = str(func.overloadpacket)
    if name == "fastunet.group_norm_act_fwd":
        x = args[0]
        return "GroupNorm+act", 8.0 * x.numel(), dict(groups=args[6], activation=args[8], has_add=args[3] is not None,
                                                       has_scale=args[4] is not None)
    if name == "fastunet.attention_fwd":
        q, k, v = args[:3]
        b, h, n, d = q.shape
        m = k.shape[2]
        category = "temporal attention" if in_motion and n == m else ("self-attention" if n == m else "cross-attention")
        return category, 4.0 * b * h * n * m * d, dict(bhnmd=(b, h, n, m, d))
    if name == "fastunet.fourier_filter":
        x = args[0]
        hw = x.shape[-1] * x.shape[-2]
        planes = x.numel() // hw
        side = min(2 * args[1], x.shape[-1]) + min(2 * args[1], x.shape[-2])
        return "FreeU filter", 16.0 * planes * hw * side, dict(plane=tuple(x.shape[-2:]))
    if name == "aten.convolution":
        weight = args[1]
        return "conv", 2.0 * out.numel() * weight[0].numel(), {}
    if name in ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm"):
        a, b = args[-2], args[-1]
        batch = a.shape[0] if a.dim() == 3 else 1
        return "linear/GEMM", 2.0 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1], {}
    outs = list(_tensors(out))
    return "other (LayerNorm, elementwise, resample, concat)", float(sum(t.numel() for t in outs)), {}


class _Recorder(TorchDispatchMode):
    def __init__(self, stack: list[str]):
        super().__init__()
        self.stack = stack
        self.calls: list[OpCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _is_view(func):
            return out
        ins = list(_tensors(list(args) + list(kwargs.values())))
        outs = list(_tensors(out))
        module = self.stack[-1] if self.stack else ""
        in_motion = any("motion_modules" in m for m in self.stack)
        category, flops, meta = _classify(func, args, out, module, in_motion)
        self.calls.append(OpCall(category, str(func.overloadpacket), module, tuple(tuple(t.shape) for t in ins),
                                 sum(map(_nbytes, ins)) + sum(map(_nbytes, outs)), flops, meta))
        return out


def _pop(stack: list[str]) -> None:
    stack.pop()  # returns None: a forward hook that returns a value replaces the module's output


def record(name: str, freeu: bool = True) -> list[OpCall]:
    """Every operator call of one forward of model ``name`` (see :data:`MODELS`), on the meta device."""
    model, kwargs = build(name, freeu=freeu)
    stack: list[str] = []
    handles = []
    for mod_name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, n=mod_name: stack.append(n)))
        handles.append(module.register_forward_hook(lambda m, a, o: _pop(stack)))
    recorder = _Recorder(stack)
    try:
        with recorder, torch.no_grad(), fastunet.use_backend("auto"):
            model(**kwargs)
    finally:
        for h in handles:
            h.remove()
    return recorder.calls


def lower_bound_s(call: OpCall, device: str) -> float:
    """``max(bytes / bandwidth, FLOPs / peak)`` of one call on ``device``."""
    bandwidth, peak = DEVICES[device]
    return max(call.bytes / bandwidth, call.flops / peak)


def _next_pow2(d: int, least: int = 16) -> int:
    return max(least, 1 << (d - 1).bit_length())


def head_dim_tile(d: int, device: str) -> int:
    """Columns of the head dim that the fp16 attention forward computes for head dim ``d`` on ``device``
    (unmasked; split pieces summed)."""
    # the module, not the package's ``attention`` function of the same name
    dims = importlib.import_module("fastunet.kernels.attention")._block_dims(d, "fwd", torch.float16,
                                                                            DEVICE_ARCH[device], False)
    return dims["BLOCK_D"] + dims["BLOCK_D2"]


def call_fraction(call: OpCall, device: str) -> float:
    """Modelled fraction of the lower bound that ``call`` reaches on ``device`` (model, not a measurement).

    * memory-bound calls: ``stream`` x (minimum traffic / the kernel's counted traffic). fastunet's
      GroupNorm+act forward moves 2x the tensor (the minimum) where a group fits one program's register
      tile (``next_pow2(C / G) * next_pow2(spatial)`` at most :data:`GROUP_NORM_ONE_PASS_LANES`), else 3x
      (``tests/ops/test_traffic.py``); the
      Fourier filter 2x on planes of up to 4,096 padded elements and 3x above; conv/GEMM/eager ops
      are taken at their traffic floor with ``gemm``/``eager``;
    * compute-bound attention: ``mma`` x ``D / D_tile``, where ``D_tile`` is the head-dim width the
      fp16 forward computes on the device's arch, unmasked (``_block_dims``): a power of two (40 -> 64
      wastes 37.5% of the MMA work) or, where the kernel splits the head dim, the two pieces' sum (on
      sm_90 80 = 64 + 16 and 160 = 128 + 32, no waste; on sm_80 80 is split, 160 padded to 256);
    * compute-bound conv/GEMM: ``gemm``.
    """
    eff = EFFICIENCY[device]
    bandwidth, peak = DEVICES[device]
    memory_bound = call.bytes / bandwidth >= call.flops / peak
    if call.category == "GroupNorm+act":
        x = call.shapes[0]
        cg, spatial = x[1] // call.meta["groups"], torch.Size(x[2:]).numel()
        one_pass = _next_pow2(cg, 1) * _next_pow2(spatial, 1) <= GROUP_NORM_ONE_PASS_LANES
        return eff["stream"] * (1.0 if one_pass else 2.0 / 3.0)
    if call.category == "FreeU filter":
        h, w = call.meta["plane"]
        return eff["stream"] * (1.0 if _next_pow2(h, 1) * _next_pow2(w, 1) <= 4096 else 2.0 / 3.0)
    if call.category.endswith("attention"):
        if memory_bound:
            return eff["stream"]
        d = call.meta["bhnmd"][4]
        return eff["mma"] * d / head_dim_tile(d, device)
    if call.category in ("conv", "linear/GEMM"):
        return eff["stream"] if memory_bound else eff["gemm"]
    return eff["eager"]


def summarize(calls: list[OpCall]) -> dict[str, dict]:
    """Per category: calls, bytes, FLOPs, and per device the summed lower bound and modelled time (s)."""
    rows = defaultdict(lambda: dict(calls=0, bytes=0, flops=0.0, **{f"lb_{d}": 0.0 for d in DEVICES},
                                    **{f"model_{d}": 0.0 for d in DEVICES}))
    for call in calls:
        row = rows[call.category]
        row["calls"] += 1
        row["bytes"] += call.bytes
        row["flops"] += call.flops
        for d in DEVICES:
            lb = lower_bound_s(call, d)
            row[f"lb_{d}"] += lb
            row[f"model_{d}"] += lb / call_fraction(call, d)
    return {c: rows[c] for c in CATEGORIES if c in rows}


def table(name: str, calls: list[OpCall] | None = None) -> str:
    """The Markdown table of model ``name``."""
    calls = record(name) if calls is None else calls
    summary = summarize(calls)
    head = ("| op | calls | GB | GFLOP | H100 lower bound ms | A100 lower bound ms | "
            "H100 fraction (model) | A100 fraction (model) |")
    lines = [f"**{MODELS[name][0]}**", "", head, "|---|---|---|---|---|---|---|---|"]
    total = dict(calls=0, bytes=0, flops=0.0, **{f"lb_{d}": 0.0 for d in DEVICES}, **{f"model_{d}": 0.0 for d in DEVICES})
    for category, row in summary.items():
        for key in total:
            total[key] += row[key]
        lines.append(_row(category, row))
    lines.append(_row("**total**", total))
    return "\n".join(lines)


def _row(label: str, row: dict) -> str:
    fractions = [row[f"lb_{d}"] / row[f"model_{d}"] if row[f"model_{d}"] else 0.0 for d in DEVICES]
    return (f"| {label} | {row['calls']} | {row['bytes'] / 1e9:.3f} | {row['flops'] / 1e9:,.1f} | "
            f"{row['lb_H100'] * 1e3:.3f} | {row['lb_A100'] * 1e3:.3f} | {fractions[0]:.2f} | {fractions[1]:.2f} |")


BEGIN, END = "<!-- roofline:begin -->", "<!-- roofline:end -->"


def block(calls: dict[str, list[OpCall]] | None = None) -> str:
    """The README block: the tables of every model between the markers (``calls``: recorded calls per
    model, recorded here when not given)."""
    calls = calls or {}
    specs = ", ".join(f"{d} {bw / 1e12:.2f} TB/s, {pk / 1e12:.0f} TFLOP/s" for d, (bw, pk) in DEVICES.items())
    parts = [BEGIN, "<!-- generated by python -m fastunet.roofline --write; do not edit by hand -->",
             "### Roofline per op: a model, not a measurement", "",
             f"Counted from the real model structures (built on the meta device, every op call recorded). "
             f"One UNet forward, {BATCH_NOTE}. Lower bound per call = max(bytes / bandwidth, FLOPs / peak) "
             f"({specs}), summed per op. The fraction columns are a **model, not a measurement** "
             "(`fastunet/roofline.py`, `call_fraction`): lower bound / modelled time.", ""]
    for name in MODELS:
        parts += [table(name, calls.get(name)), ""]
    parts.append(END)
    return "\n".join(parts)


def replace_block(text: str, new_block: str) -> str:
    """``text`` with its one roofline block replaced by ``new_block``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"README.md must hold exactly one {BEGIN} ... {END} block")
    start, stop = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + new_block + text[stop:]


README = Path(__file__).resolve().parents[1] / "README.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastunet.roofline", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the block into README.md")
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md's block is stale")
    args = parser.parse_args(argv)
    new = block()
    if not (args.write or args.check):
        print(new)
        return 0
    text = README.read_text()
    updated = replace_block(text, new)
    if args.check:
        if updated != text:
            print("README.md's roofline block is stale: run python -m fastunet.roofline --write", file=sys.stderr)
            return 1
        return 0
    README.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
