"""CPU training steps of the issue-12 configs: fastunet against diffusers, forward+backward, same weights.

Configs (those of ``tests/training/test_saved_activations.py``, whose saved-activation ratios are
asserted there): ``ddpm-cifar``, a DDPM-CIFAR-structured ``UNet2DModel`` (channels (32, 64, 64, 64), 32
groups, attention at 16x16) on a batch of 8 32x32 images; ``sd-tiny``, an SD-1.5-structured
``UNet2DConditionModel`` (channels (32, 64, 64, 64), 8-dim heads) on 4 32x32 latents and 77 tokens.
One step is ``model(**inputs).sample.square().mean().backward()`` after clearing the gradients, on one
torch thread (the 2-core machines' other core is then free for the rest of the system, and the figure
does not depend on how the two libraries split small ops over threads). Each run also records the
median process CPU time of its rounds (``cpu_ms``), steadier than wall time on a shared machine.
``scripts/cpu_speed.py`` times the same step with the two models alternating and prints the ratio.

Smoke sizes (the test suite's run): batch 1 at 16x16 (SD: 16x16 latents, 8 tokens).
"""

from __future__ import annotations

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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step = setup(provider, name)
        cpu_times = []

        def timed():
            start = time.process_time()
            step()
            cpu_times.append(time.process_time() - start)

        benchmark.group = f"{name} fwd+bwd"
        if benchmark.enabled:
            step()  # warm-up
            benchmark.pedantic(timed, rounds=9, iterations=1, warmup_rounds=1)
            cpu_times = sorted(cpu_times[-9:])  # the warm-up round left out
            benchmark.extra_info["cpu_ms"] = cpu_times[len(cpu_times) // 2] * 1e3
        else:  # a smoke run: once, nothing measured
            benchmark.pedantic(timed, rounds=1, iterations=1)
            assert len(cpu_times) == 1
    finally:
        torch.set_num_threads(threads)
