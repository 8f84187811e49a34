"""The ``fastunet`` command: train (interrupt + resume = one run), check, bench, and every --help."""

from __future__ import annotations

import argparse
import json
from importlib.metadata import entry_points

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastunet.cli import __main__ as cli
from fastunet.cli.train import INTERRUPT_ENV
from fastunet.testing import perturb_

diffusers = pytest.importorskip("diffusers")

TINY_TRAIN = ["--steps", "20", "--save-every", "10", "--batch-size", "8", "--block-out-channels", "16", "32",
              "--timesteps", "10", "--num-samples", "4", "--ema", "--lr", "1e-3", "--warmup-steps", "5", "--quiet"]


def _weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("command", list(cli.SUBCOMMANDS))
def test_help_lists_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    for action in sub._actions:
        names = action.option_strings or [action.metavar or action.dest]
        for name in names:
            assert name in text, f"{command} --help does not mention {name}"
        if not isinstance(action, argparse._HelpAction):
            assert action.help, f"{command}: {names} has no help text"


def test_console_script_is_registered():
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("fastunet") == "fastunet.cli.__main__:main"


def test_train_interrupted_and_resumed_equals_one_run(tmp_path, monkeypatch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert cli.main(["train", *TINY_TRAIN, "--out", str(whole)]) == 0

    monkeypatch.setenv(INTERRUPT_ENV, "10")
    assert cli.main(["train", *TINY_TRAIN, "--out", str(parts)]) == 130
    state = torch.load(parts / "checkpoint" / "training_state.pt", weights_only=False)
    assert state["step"] == 10 and len(state["losses"]) == 10
    assert not (parts / "unet").exists() and not list(parts.glob(".checkpoint.tmp-*"))
    monkeypatch.delenv(INTERRUPT_ENV)
    assert cli.main(["train", *TINY_TRAIN, "--out", str(parts), "--resume"]) == 0

    for sub in ("checkpoint/unet", "unet"):  # the raw weights and the EMA weights
        a, b = _weights(whole / sub), _weights(parts / sub)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{sub}: {k} differs after interrupt + resume"
    m_whole = json.loads((whole / "metrics.json").read_text())
    m_parts = json.loads((parts / "metrics.json").read_text())
    assert m_whole["losses"] == m_parts["losses"] and len(m_parts["losses"]) == 20
    assert m_parts["resumed_from"] == 10
    assert m_whole["loss_last"] < m_whole["loss_first"]
    q = m_whole["quality"]
    assert set(q["nn_distance"]) == {"samples", "noise", "data"} and "classifier_confidence" in q
    for name in ("samples.png", "loss.png"):
        assert (whole / name).stat().st_size > 0

    # the output checkpoint is diffusers format: diffusers loads it and computes what fastunet computes
    import fastunet

    ours = fastunet.UNet2DModel.from_pretrained(whole / "unet").eval()
    theirs = diffusers.UNet2DModel.from_pretrained(whole / "unet").eval()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 7])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t).sample, theirs(x, t).sample, rtol=1e-5, atol=1e-5)


def test_train_refuses_bad_options(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--resume: no checkpoint"):
        cli.main(["train", "--out", str(tmp_path), "--resume", "--quiet"])
    with pytest.raises(SystemExit, match="16 or 32"):
        cli.main(["train", "--out", str(tmp_path), "--resolution", "24", "--quiet"])


def _diffusers_checkpoint(directory):
    config = dict(sample_size=16, block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1,
                  attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    model = perturb_(diffusers.UNet2DModel(**config), seed=3)
    model.save_pretrained(directory)
    return directory


def test_check_passes_on_a_diffusers_checkpoint(tmp_path, capsys):
    directory = _diffusers_checkpoint(tmp_path / "unet")
    assert cli.main(["check", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "PASS UNet2DModel" in out and "rel_err" in out


def test_check_fails_clearly_on_a_mismatched_checkpoint(tmp_path, capsys):
    directory = _diffusers_checkpoint(tmp_path / "unet")
    weights = _weights(directory)
    weights.pop("conv_in.bias")
    weights["conv_out.weight"] = weights["conv_out.weight"][:, :8].clone()
    weights["not_a_layer.weight"] = torch.randn(3)
    save_file(weights, str(directory / "diffusion_pytorch_model.safetensors"))
    assert cli.main(["check", str(directory)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL")
    for name in ("conv_in.bias", "conv_out.weight", "not_a_layer.weight", "missing", "unexpected"):
        assert name in out


def test_check_fails_clearly_without_a_model(tmp_path, capsys):
    assert cli.main(["check", str(tmp_path)]) == 1
    assert "no config.json" in capsys.readouterr().out
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    assert cli.main(["check", str(tmp_path)]) == 1
    assert "AutoencoderKL" in capsys.readouterr().out


def test_bench_small_on_cpu_writes_its_report(tmp_path, capsys):
    out = tmp_path / "report"
    rc = cli.main(["bench", "--device", "cpu", "--size", "small", "--no-compile", "--rounds", "1", "--quiet",
                   "--only", "attention", "fourier_filter", "--out", str(out)])
    assert rc == 0
    for name in ("results.md", "results.csv", "results.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "results.md").read_text()
    assert "attention" in table and "fourier_filter" in table and "diffusers" in table


def test_bench_refuses_cuda_without_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
