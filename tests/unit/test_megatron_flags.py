"""Megatron-LM flag aliases and ``--print-config`` on both pretraining entry points."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mor_megatron import pretrain, pretrain_deepspeed
from mor_megatron.cli.megatron_flags import MEGATRON_FLAG_ALIASES, UNSUPPORTED_MEGATRON_FLAGS
from mor_megatron.config import config_from_dict, config_to_dict, load_config

REPO = Path(__file__).resolve().parents[2]
ENTRY_POINTS = {"mor-pretrain": pretrain.main, "mor-pretrain-deepspeed": pretrain_deepspeed.main}


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)


def _printed_config(main, argv: list[str], capsys) -> dict:
    assert main([*argv, "--print-config"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return yaml.safe_load(captured.out)


def test_every_alias_names_existing_config_fields():
    fields = config_to_dict(load_config(None, ["preset=tiny-mor-e-r3"]))
    for alias in MEGATRON_FLAG_ALIASES:
        for key in alias.keys:
            section, name = key.split(".")
            assert name in fields[section], f"{alias.flag} -> {key}"
    required = {"--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--micro-batch-size",
                "--global-batch-size", "--train-iters", "--seq-length", "--lr", "--min-lr", "--save", "--load",
                "--save-interval", "--eval-interval", "--eval-iters", "--log-interval", "--data-path", "--seed"}
    assert required <= {alias.flag for alias in MEGATRON_FLAG_ALIASES}
    assert not {alias.flag for alias in MEGATRON_FLAG_ALIASES} & set(UNSUPPORTED_MEGATRON_FLAGS)


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_megatron_flags_set_the_config_tree(entry_point, capsys):
    argv = ["preset=tiny-mor-e-r3", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
            "--micro-batch-size", "2", "--global-batch-size", "16", "--train-iters", "40", "--seq-length", "128",
            "--lr", "1e-4", "--min-lr", "1e-5", "--save", "ckpt/out", "--load", "ckpt/in", "--save-interval", "10",
            "--eval-interval", "20", "--eval-iters", "3", "--log-interval", "5", "--data-path", "0.7", "a", "0.3",
            "b", "--seed", "7", "--bf16", "--lr-decay-style", "WSD", "--adam-eps", "1e-8",
            "--distributed-timeout-minutes", "1.5"]
    config = _printed_config(ENTRY_POINTS[entry_point], argv, capsys)
    assert config["parallel"]["tensor_parallel_size"] == 2 and config["parallel"]["pipeline_parallel_size"] == 2
    assert config["parallel"]["collective_timeout_s"] == 90.0
    assert {key: config["train"][key] for key in ("micro_batch_size", "global_batch_size", "train_steps",
                                                  "seq_length", "eval_interval", "eval_steps", "log_interval",
                                                  "seed", "precision")} == {
        "micro_batch_size": 2, "global_batch_size": 16, "train_steps": 40, "seq_length": 128, "eval_interval": 20,
        "eval_steps": 3, "log_interval": 5, "seed": 7, "precision": "bf16"}
    assert (config["optim"]["lr"], config["optim"]["min_lr"], config["optim"]["adam_eps"]) == (1e-4, 1e-5, 1e-8)
    assert config["optim"]["schedule"] == "wsd"
    assert config["checkpoint"]["save_dir"] == "ckpt/out" and config["checkpoint"]["load_dir"] == "ckpt/in"
    assert config["checkpoint"]["save_interval"] == 10
    assert config["data"]["blend"] == ["0.7", "a", "0.3", "b"] and config["data"]["seed"] == 7


def test_dotted_overrides_win_over_megatron_flags_wherever_they_stand(capsys):
    config = _printed_config(pretrain.main, ["--micro-batch-size", "2", "preset=tiny-mor-e-r3",
                                             "train.micro_batch_size=4", "--lr", "1e-4"], capsys)
    assert config["train"]["micro_batch_size"] == 4 and config["optim"]["lr"] == 1e-4


@pytest.mark.parametrize(("argv", "message"), [
    (["--fp16"], "Megatron-LM flag --fp16 has no equivalent here: fp16 training is not supported; use --bf16"),
    (["--context-parallel-size", "2"], "Megatron-LM flag --context-parallel-size has no equivalent here: "),
    (["--micro-batch-size", "four"], "--micro-batch-size expects int values, got 'four'; it sets "
                                     "train.micro_batch_size"),
    (["--data-path", "a", "train.train_steps=5"], "--data-path took the override 'train.train_steps=5' as a "
                                                  "value; put dotted overrides before --data-path, or end its list"),
], ids=["switch", "with-value", "bad-value", "override-after-list"])
def test_refused_megatron_flag_is_one_line_with_a_hint(argv, message, capsys):
    assert pretrain.main(["preset=tiny-mor-e-r3", *argv, "--check"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"mor-pretrain: config error: {message}")


def test_refused_megatron_flag_exits_2_from_the_command():
    result = subprocess.run([sys.executable, "-m", "mor_megatron.pretrain", "--check", "preset=tiny-mor-e-r3",
                             "--fp16"], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("mor-pretrain: config error: Megatron-LM flag --fp16 has no equivalent here: fp16 "
                             "training is not supported; use --bf16 (train.precision=bf16)\n")


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_print_config_prints_the_resolved_config_that_loads_back(entry_point, capsys):
    argv = ["--config", str(REPO / "configs" / "demo.yaml"), "output_dir=runs/mine", "--train-iters", "70"]
    printed = _printed_config(ENTRY_POINTS[entry_point], argv, capsys)
    expected = load_config(REPO / "configs" / "demo.yaml", ["output_dir=runs/mine", "train.train_steps=70"])
    assert config_from_dict(printed) == expected
    assert printed["model"]["hidden_size"] == 64  # the preset, expanded
    assert printed["checkpoint"]["save_dir"] == "runs/mine/checkpoints"


def test_print_config_needs_no_data_and_no_world_size(capsys):
    # A TP-2 job, checked on a machine without its data or launcher: the config is still printed.
    tp2_config = REPO / "configs" / "1.7b-mor-e-r3-tp2.yaml"
    printed = _printed_config(pretrain.main, ["--config", str(tp2_config)], capsys)
    assert printed["parallel"]["tensor_parallel_size"] == 2


def test_print_config_refuses_an_invalid_config(capsys):
    assert pretrain.main(["preset=tiny-mor-e-r3", "train.seq_length=512", "--print-config"]) == 2
    assert capsys.readouterr().err == ("mor-pretrain: config error: train.seq_length=512 exceeds "
                                       "model.max_seq_length=256\n")
