"""DistributedDataParallel: two CPU ranks on gloo train as one process on the whole batch.

``ddp_train.py`` runs under ``torch.distributed.run`` (torchrun), and under ``accelerate launch``, with 2
ranks, each on half of every global batch, for a few SGD steps: a UNet2DModel with every parameter trained, and a UNet2DConditionModel
with a LoRA adapter (frozen base). The same steps in this process on the whole batches must give the same
parameters and last-step gradients (max-abs error relative to each tensor's largest value, below 1e-5), and
the two ranks must hold identical parameters.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_train import CASES, batches, build, train  # tests/training is on sys.path

from fastunet.testing import gradient_errors

TOL, KEY_BIAS_FLOOR = 1e-5, 1e-3
SCRIPT = Path(__file__).with_name("ddp_train.py")


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
    # what the README documents: accelerate's multi-process launcher (torchrun underneath) also runs on CPUs
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.fixture(scope="module", params=list(LAUNCHERS))
def ranks(request, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(f"ddp-{request.param}")
    # one thread per rank: the two ranks share the machine's cores
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONSAFEPATH="1")
    cmd = [sys.executable, *LAUNCHERS[request.param], str(SCRIPT), str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out


@pytest.mark.parametrize("case", CASES)
def test_two_gloo_ranks_match_one_process_on_the_whole_batch(ranks, case):
    rank0 = torch.load(ranks / f"{case}.rank0.pt")
    rank1 = torch.load(ranks / f"{case}.rank1.pt")
    model = build(case)
    single = train(model, batches(case))
    assert rank0["params"].keys() == single["params"].keys()
    if case == "lora":
        assert all("lora_" in n for n in single["params"]), "only the adapter is trainable"
    for name in rank0["params"]:
        assert torch.equal(rank0["params"][name], rank1["params"][name]), f"ranks disagree on {name}"
    # attention key-bias gradients vanish in exact arithmetic (a shift of every score of a row): rounding
    # noise on both sides, measured against 1e-3 of the largest gradient (1.3e-5 against 1e-4 of it)
    largest = max(g.abs().max().item() for g in single["grads"].values())
    floors = {n: KEY_BIAS_FLOOR * largest for n in single["grads"] if n.endswith("to_k.bias")}
    gradient_errors(rank0["grads"], single["grads"], norm="max", floors=floors).check(TOL)
    gradient_errors(rank0["params"], single["params"], norm="max").check(TOL)
