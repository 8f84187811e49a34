"""fastunet's main job: one UNet2DModel training step on the Triton kernels, checked against plain torch.

    python -m fastunet.demo [--device cpu|cuda] [--size 16] [--batch 2] [--channels 32 64] [--steps 1]

Builds a small DDPM-style ``UNet2DModel`` (a plain and an attention block each way) with random
weights, runs forward + backward once with the ``"triton"`` backend (on a GPU, or on the CPU through
Triton's interpreter) and once with ``"torch"``, and prints the relative error of the output and of
every gradient, wall times and the number of Triton launches. With diffusers installed it also compares
the torch backend with diffusers' own ``UNet2DModel`` holding the same weights.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .kernels import launch_counts, use_backend
from .kernels._backend import interpreter_enabled
from .models.unet_2d import UNet2DModel
from .testing import gradient_errors, perturb_, rel_err


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fastunet.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=16, help="sample height and width")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64], help="block_out_channels")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per backend after the first one (default: 5 on GPU; 0 on CPU, where the "
                             "interpreter compiles nothing and the first step is timed)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_model(channels: list[int], size: int, seed: int = 0) -> UNet2DModel:
    """A DDPM-like UNet: plain resnet blocks at full resolution, attention below, random weights."""
    n = len(channels)
    model = UNet2DModel(
        sample_size=size, block_out_channels=tuple(channels), layers_per_block=1,
        norm_num_groups=min(8, channels[0]), attention_head_dim=16,
        down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (n - 1),
        up_block_types=("AttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
    )
    return perturb_(model, seed=seed)  # random values everywhere, the zero-initialised parameters included


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, sample, timestep, cotangent):
    """Forward + backward; returns the output, the gradients by name and the two wall times."""
    device = sample.device
    model.zero_grad(set_to_none=True)
    x = sample.clone().requires_grad_(True)
    _sync(device)
    start = time.perf_counter()
    out = model(x, timestep).sample
    _sync(device)
    middle = time.perf_counter()
    (out.float() * cotangent).sum().backward()
    _sync(device)
    end = time.perf_counter()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    grads["<sample>"] = x.grad.detach().clone()
    return out.detach(), grads, middle - start, end - middle


def run_backend(backend: str, model, sample, timestep, cotangent, steps: int):
    with use_backend(backend):
        launch_counts.clear()
        out, grads, fwd, bwd = train_step(model, sample, timestep, cotangent)  # warm-up (and compilation)
        launches = sum(launch_counts.values())
        kernels = sorted(launch_counts)
        timings = [train_step(model, sample, timestep, cotangent)[2:] for _ in range(steps)]
    fwd = min(t[0] for t in timings) if timings else fwd
    bwd = min(t[1] for t in timings) if timings else bwd
    return out, grads, fwd, bwd, launches, kernels


def report_parity(label: str, out, grads, out_ref, grads_ref) -> tuple[float, float]:
    """Print and return the output's relative L2 error and the largest relative gradient error."""
    # gradients that vanish in exact arithmetic (attention key biases) are measured against a floor
    errors = gradient_errors(grads, grads_ref, floor=1e-4)
    out_error = rel_err(out, out_ref)
    print(f"{label}: output rel. L2 error {out_error:.2e}; {errors.table(limit=3)}")
    return out_error, errors.max


def compare_with_diffusers(model, sample, timestep, cotangent, out_ref, grads_ref) -> None:
    try:
        from diffusers import UNet2DModel as DiffusersUNet2DModel
        from diffusers.utils import logging as diffusers_logging
    except ImportError:
        print("diffusers is not installed: skipping the comparison with diffusers' UNet2DModel")
        return
    diffusers_logging.set_verbosity_error()
    theirs = DiffusersUNet2DModel(**model.config).to(sample.device, model.dtype)
    theirs.load_state_dict(model.state_dict(), strict=True)
    out, grads, fwd, bwd = train_step(theirs, sample, timestep, cotangent)
    report_parity("torch backend vs diffusers", out_ref, grads_ref, out, grads)
    print(f"diffusers UNet2DModel: forward {fwd * 1e3:9.2f} ms   backward {bwd * 1e3:9.2f} ms")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and not interpreter_enabled():
        # Triton kernels run on CPU tensors only through its interpreter, chosen before triton is imported
        env = dict(os.environ, TRITON_INTERPRET="1")
        env.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
        print("restarting with TRITON_INTERPRET=1 (Triton's CPU interpreter)", flush=True)
        os.execve(sys.executable, [sys.executable, "-m", "fastunet.demo", *argv], env)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda was requested but no CUDA device is available", file=sys.stderr)
        return 2
    steps = args.steps if args.steps is not None else (5 if device.type == "cuda" else 0)
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(args.seed)
    model = build_model(args.channels, args.size, args.seed).to(device, dtype)
    sample = torch.randn(args.batch, 3, args.size, args.size, device=device, dtype=dtype)
    timestep = torch.randint(0, 1000, (args.batch,), device=device)
    cotangent = torch.randn(args.batch, 3, args.size, args.size, device=device)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"fastunet demo: UNet2DModel {model.num_parameters() / 1e6:.2f}M parameters, block_out_channels="
          f"{tuple(args.channels)}, sample {tuple(sample.shape)} {args.dtype} on {where}")

    results, triton_launches = {}, 0
    for backend in ("triton", "torch"):
        out, grads, fwd, bwd, launches, kernels = run_backend(backend, model, sample, timestep, cotangent, steps)
        results[backend] = (out, grads)
        triton_launches += launches if backend == "triton" else 0
        launched = f", {launches} Triton launches ({', '.join(kernels)})" if launches else ""
        print(f"{backend:>6} backend: forward {fwd * 1e3:9.2f} ms   backward {bwd * 1e3:9.2f} ms{launched}")

    out_error, grad_error = report_parity("triton vs torch", *results["triton"], *results["torch"])
    compare_with_diffusers(model, sample, timestep, cotangent, *results["torch"])
    tolerance = (1e-4, 2e-3) if dtype == torch.float32 else (2e-2, 5e-2)
    ok = out_error < tolerance[0] and grad_error < tolerance[1] and triton_launches > 0
    if triton_launches == 0:
        print("FAIL: the triton backend launched no Triton kernel")
    print("PASS" if ok else f"FAIL (tolerances: output {tolerance[0]}, gradients {tolerance[1]})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
