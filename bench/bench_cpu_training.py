"""CPU training steps of the issue-12 configs: fastunet against diffusers, forward+backward, same weights.

Configs (those of ``tests/training/test_saved_activations.py``, whose saved-activation ratios are
asserted there): ``ddpm-cifar``, a DDPM-CIFAR-structured ``UNet2DModel`` (channels (32, 64, 64, 64), 32
groups, attention at 16x16) on a batch of 8 32x32 images; ``sd-tiny``, an SD-1.5-structured
``UNet2DConditionModel`` (channels (32, 64, 64, 64), 8-dim heads) on 4 32x32 latents and 77 tokens.
One step is ``model(**inputs).sample.square().mean().backward()`` after clearing the gradients, on one
torch thread (the 2-core machines' other core is then free for the rest of the system, and the figure
does not depend on how the two libraries split small ops over threads). Each run also records the
median process CPU time of its rounds (``cpu_ms``), steadier than wall time on a shared machine, and
fastunet's run the speed ratio against diffusers steps alternating with its own (``vs_diffusers``,
above 1: fastunet faster).
``scripts/cpu_speed.py`` times the same step with the two models alternating and prints the ratio.

Smoke sizes (the test suite's run): batch 1 at 16x16 (SD: 16x16 latents, 8 tokens).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import pytest
import torch
from harness import small

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "training"))
diffusers = pytest.importorskip("diffusers")  # the baseline; without it there is nothing to compare

import test_saved_activations as cases  # noqa: E402

CONFIGS = ("ddpm-cifar", "sd-tiny")
PROVIDERS = ("fastunet", "diffusers")
_PAIRS: dict = {}


def _pair(name: str):
    """(fastunet model, diffusers model, inputs) of config ``name``, built once (same perturbed weights)."""
    if name not in _PAIRS:
        torch.manual_seed(0)
        if name == "ddpm-cifar":
            pair = cases.ddpm_cifar_pair(batch=1, sample_size=16) if small() else cases.ddpm_cifar_pair(batch=8)
        else:
            pair = (cases.sd_pair(batch=1, latent=16, tokens=8, cross_attention_dim=32) if small()
                    else cases.sd_pair(batch=4, latent=32, tokens=77, cross_attention_dim=32))
        _PAIRS.clear()
        _PAIRS[name] = pair
    return _PAIRS[name]


def setup(provider: str, name: str):
    """A zero-argument callable running one fwd+bwd step of ``provider``'s model of config ``name``."""
    ours, theirs, inputs = _pair(name)
    model = ours if provider == "fastunet" else theirs
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        model(**inputs).sample.square().mean().backward()

    return step


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_training_step(benchmark, provider, name):
    """One provider's step. fastunet's rounds alternate with untimed-by-the-benchmark diffusers steps
    (pytest-benchmark's per-round ``setup``), whose CPU time is recorded too: ``vs_diffusers`` is the
    median diffusers CPU time over fastunet's from those alternating rounds, the figure a drifting,
    shared machine leaves intact."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step = setup(provider, name)
        baseline = setup("diffusers", name) if provider == "fastunet" else None
        cpu_times, baseline_times = [], []

        def timed():
            start = time.process_time()
            step()
            cpu_times.append(time.process_time() - start)

        def before_round():
            if baseline is not None:
                start = time.process_time()
                baseline()
                baseline_times.append(time.process_time() - start)

        benchmark.group = f"{name} fwd+bwd"
        if benchmark.enabled:
            step()  # warm-up
            if baseline is not None:
                baseline()
            benchmark.pedantic(timed, setup=before_round, rounds=11, iterations=1, warmup_rounds=0)
            ours = statistics.median(cpu_times)
            benchmark.extra_info["cpu_ms"] = ours * 1e3
            if baseline is not None:
                benchmark.extra_info["vs_diffusers"] = statistics.median(baseline_times) / ours
        else:  # a smoke run: once, nothing measured
            benchmark.pedantic(timed, setup=before_round, rounds=1, iterations=1)
            assert len(cpu_times) == 1 and len(baseline_times) == (provider == "fastunet")
    finally:
        torch.set_num_threads(threads)
