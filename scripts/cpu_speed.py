"""CPU forward+backward speed, fastunet against diffusers on the same weights (issue 12).

    .venv/bin/python scripts/cpu_speed.py [ddpm_cifar|sd_tiny|all] [--repeats N] [--threads T] [--cpu-time] [--profile]

Configs (those of tests/training/test_saved_activations.py): ``ddpm_cifar``, a DDPM-CIFAR-structured
UNet2DModel (channels (32, 64, 64, 64), 32 groups, attention at 16x16), batch 8 of 32x32; ``sd_tiny``, an
SD-1.5-structured UNet2DConditionModel (channels (32, 64, 64, 64), 32 groups, 8-dim heads, cross
attention dim 32), batch 4 of 32x32 latents and 77 tokens. Both models get one perturbed state
(``fastunet.testing.perturbed_pair``). Each timed step is ``model(**inputs).sample.square().mean()
.backward()`` with the gradients cleared first; fastunet and diffusers alternate, so that a busy machine
slows both alike; after warm-up runs, the median of ``--repeats`` (at least 7) is reported, and the ratio
diffusers/fastunet (above 1: fastunet faster). ``--cpu-time`` times
with ``time.process_time`` instead of wall time (use with ``--threads 1``). ``--profile`` adds a torch.profiler table of each
model's step, sorted by self CPU time.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "training"))

import torch  # noqa: E402

import test_saved_activations as cases  # noqa: E402

WARMUP = 2


def _step(model, inputs):
    model.zero_grad(set_to_none=True)
    model(**inputs).sample.square().mean().backward()


def time_pair(ours, theirs, inputs, repeats: int, clock=time.perf_counter) -> dict[str, float]:
    """Median seconds of one fwd+bwd step of each model, the two alternating, on ``clock``
    (``time.process_time`` counts this process's CPU seconds only: with one thread, steadier than
    wall time on a machine that other jobs share)."""
    times = {"fastunet": [], "diffusers": []}
    for i in range(WARMUP + repeats):
        for who, model in (("fastunet", ours), ("diffusers", theirs)):
            start = clock()
            _step(model, inputs)
            if i >= WARMUP:
                times[who].append(clock() - start)
    return {who: statistics.median(t) for who, t in times.items()}


def profile_pair(ours, theirs, inputs, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile

    for who, model in (("fastunet", ours), ("diffusers", theirs)):
        _step(model, inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _step(model, inputs)
        print(f"\n== profile: {who} (one fwd+bwd step, sorted by self CPU time)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def make(name: str):
    if name == "ddpm_cifar":
        return cases.ddpm_cifar_pair(batch=8)
    if name == "sd_tiny":
        return cases.sd_pair(batch=4, latent=32, tokens=77, cross_attention_dim=32)
    raise SystemExit(__doc__)


def main(argv: list[str]) -> None:
    positional = [a for i, a in enumerate(argv) if not a.startswith("--")
                  and (i == 0 or argv[i - 1] not in ("--repeats", "--threads"))]
    what = positional[0] if positional else "all"
    repeats = max(7, int(argv[argv.index("--repeats") + 1])) if "--repeats" in argv else 7
    threads = int(argv[argv.index("--threads") + 1]) if "--threads" in argv else 2
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    names = ("ddpm_cifar", "sd_tiny") if what == "all" else (what,)
    for name in names:
        ours, theirs, inputs = make(name)
        ours.train()
        theirs.train()
        clock, what_clock = (time.process_time, "CPU time") if "--cpu-time" in argv else (time.perf_counter, "wall")
        t = time_pair(ours, theirs, inputs, repeats, clock)
        print(f"{name}: fwd+bwd median of {repeats} ({what_clock}), {threads} threads: fastunet "
              f"{t['fastunet'] * 1e3:.1f} ms, diffusers {t['diffusers'] * 1e3:.1f} ms; diffusers/fastunet "
              f"{t['diffusers'] / t['fastunet']:.3f}", flush=True)
        if "--profile" in argv:
            profile_pair(ours, theirs, inputs)


if __name__ == "__main__":
    main(sys.argv[1:])
