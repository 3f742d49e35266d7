"""``mor-pretrain`` refuses bad input with exit code 2 and one line naming the field, before any heavy work.

Each case runs the entry point's ``main`` with ``--check`` (validate config and data, then stop); a subprocess
checks that a refused launch never imports torch or megatron-core, so under torchrun every worker fails in
about a second instead of after process groups and models are built.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mor_megatron.pretrain import main

REPO = Path(__file__).resolve().parents[2]
_PREFIX = "mor-pretrain: config error: "


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    """No launcher in the environment unless a test sets one (the batch check reads WORLD_SIZE)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)


def _tiny(tiny_data, *extra: str) -> list[str]:
    """A valid tiny job (tiny-mor-e-r3: vocab 2048, max_seq_length 256), then ``extra`` overrides."""
    return ["preset=tiny-mor-e-r3", "train.seq_length=64", "train.global_batch_size=8",
            "train.micro_batch_size=2", *tiny_data.overrides(), *extra]


def _refused(argv: list[str], capsys) -> str:
    """Run ``main(argv + --check)``, require exit code 2 and nothing on stdout; return the one stderr line."""
    assert main([*argv, "--check"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(_PREFIX), captured.err
    return lines[0].removeprefix(_PREFIX)


def test_valid_job_passes_the_check(tiny_data, capsys):
    assert main([*_tiny(tiny_data), "--check"]) == 0
    ok, data = capsys.readouterr().out.splitlines()
    assert ok == "mor-pretrain: config and data OK"
    assert data.startswith(f"  {tiny_data.prefix}: ") and data.endswith("tokens, every token id checked")


def test_missing_data_prefix(tiny_data, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "corpus"
    message = _refused(_tiny(tiny_data, f"data.blend=[{missing}]"), capsys)
    assert f"data.blend prefix '{missing}': {missing}.bin and {missing}.idx not found" in message
    assert "mor-data preprocess" in message  # the command that makes them


def test_tokenizer_larger_than_model_vocab(tiny_data, capsys):
    message = _refused(_tiny(tiny_data, "model.vocab_size=256"), capsys)
    assert "has 512 pieces but model.vocab_size=256; set model.vocab_size >= 512" in message


def test_data_tokenized_with_another_tokenizer(tiny_data, tmp_path, capsys):
    prefix = tmp_path / "retokenized"
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{tiny_data.prefix}{suffix}", f"{prefix}{suffix}")
    meta = json.loads(Path(f"{tiny_data.prefix}.meta.json").read_text())
    meta.update(tokenizer="/elsewhere/other.model", tokenizer_sha256="0" * 64)
    Path(f"{prefix}.meta.json").write_text(json.dumps(meta))
    message = _refused(_tiny(tiny_data, f"data.blend=[{prefix}]"), capsys)
    assert f"data.blend prefix '{prefix}' was tokenized with '/elsewhere/other.model'" in message
    assert f"not data.tokenizer='{tiny_data.tokenizer}'" in message


def test_no_tokenizer(tiny_data, capsys):
    message = _refused(_tiny(tiny_data, "data.tokenizer=null"), capsys)
    assert message.startswith("data.tokenizer is not set")


def test_sequence_longer_than_the_model(tiny_data, capsys):
    message = _refused(_tiny(tiny_data, "train.seq_length=512"), capsys)
    assert message == "train.seq_length=512 exceeds model.max_seq_length=256"


def test_global_batch_not_divisible_by_micro_batch_times_dp(tiny_data, monkeypatch, capsys):
    argv = _tiny(tiny_data, "train.micro_batch_size=3", "train.global_batch_size=9")
    assert main([*argv, "--check"]) == 0  # one process: 9 = 3 x 3
    capsys.readouterr()
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc-per-node 2 sets it: DP = 2
    message = _refused(argv, capsys)
    assert message.startswith("train.global_batch_size=9 is not divisible by train.micro_batch_size=3 x "
                              "data-parallel size 2")


@pytest.mark.parametrize(("override", "expected"), [
    ("optim.warmup=10", "unknown config key 'optim.warmup'; did you mean 'optim.warmup_steps'?"),
    ("trian.train_steps=10", "unknown config key 'trian'; did you mean 'train'?"),
    ("train.lr=1e-3", "unknown config key 'train.lr'; valid keys: train_steps,"),
], ids=["typo", "section", "misplaced"])
def test_unknown_key_on_the_command_line(tiny_data, capsys, override, expected):
    assert _refused(_tiny(tiny_data, override), capsys).startswith(expected)


def test_unknown_key_in_the_config_file(tiny_data, tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("preset: tiny-mor-e-r3\nmodel:\n  hiden_size: 128\n")
    message = _refused(["--config", str(config), *tiny_data.overrides()], capsys)
    assert message == "unknown config key 'model.hiden_size'; did you mean 'model.hidden_size'?"


def test_refused_launch_imports_neither_torch_nor_megatron(tiny_data, tmp_path):
    argv = _tiny(tiny_data, f"data.blend=[{tmp_path / 'missing'}]")  # fails in the data check, the last one
    probe = ("import sys; from mor_megatron.pretrain import main; code = main(sys.argv[1:]); "
             "loaded = {name.split('.')[0] for name in sys.modules}; "
             "print(code, sorted(loaded & {'torch', 'megatron', 'mlflow', 'deepspeed'}))")
    result = subprocess.run([sys.executable, "-c", probe, *argv], cwd=REPO, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.stdout.strip() == "2 []", result.stdout + result.stderr
    assert "not found" in result.stderr


# ----------------------------------------------------------------------------------- damaged or foreign data

_REMAKE = ("re-make them with `mor-data preprocess --input FILES --tokenizer {tokenizer} "
           "--output-prefix {prefix} --overwrite`")


def _truncate_bin(prefix: Path) -> str:
    with open(f"{prefix}.bin", "r+b") as stream:
        stream.truncate(Path(f"{prefix}.bin").stat().st_size - 10)
    return f"{prefix}.bin has "


def _truncate_idx(prefix: Path) -> str:
    with open(f"{prefix}.idx", "r+b") as stream:
        stream.truncate(100)
    return f"{prefix}.idx is truncated: 100 bytes, but its header's "


def _corrupt_idx_offsets(prefix: Path) -> str:
    data = bytearray(Path(f"{prefix}.idx").read_bytes())
    num_sequences = int.from_bytes(data[18:26], "little")
    second_offset = 34 + 4 * num_sequences + 8  # the byte offset of sequence 1 in the offsets array
    data[second_offset:second_offset + 8] = b"\x07" * 8
    Path(f"{prefix}.idx").write_bytes(bytes(data))
    return f"{prefix}.idx is corrupted: sequence 1 starts at byte "


def _corrupt_idx_magic(prefix: Path) -> str:
    data = bytearray(Path(f"{prefix}.idx").read_bytes())
    data[0:4] = b"JUNK"
    Path(f"{prefix}.idx").write_bytes(bytes(data))
    return f"{prefix}.idx is not a megatron-core index (it does not start with MMIDIDX)"


def _foreign_token_id(prefix: Path) -> str:
    """As if made by a tokenizer with more pieces, and by a tool that writes no .meta.json."""
    Path(f"{prefix}.meta.json").unlink()
    tokens = np.memmap(f"{prefix}.bin", dtype=np.uint16, mode="r+")
    tokens[1234] = 1000  # the tiny tokenizer has 512 pieces, the tiny model 2048 embedding rows
    tokens.flush()
    return (f"{prefix}.bin holds token id 1000 at token 1,234, but data.tokenizer has 512 pieces (every token "
            "checked): it was tokenized with another vocabulary")


_DAMAGES = {"truncated-bin": _truncate_bin, "truncated-idx": _truncate_idx,
            "corrupted-idx": _corrupt_idx_offsets, "idx-magic": _corrupt_idx_magic,
            "vocab-mismatch-no-meta": _foreign_token_id}


def _damaged_copy(tiny_data, tmp_path: Path, damage: str) -> tuple[Path, str]:
    prefix = tmp_path / "copy"
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copy(f"{tiny_data.prefix}{suffix}", f"{prefix}{suffix}")
    return prefix, _DAMAGES[damage](prefix)


@pytest.mark.parametrize("damage", list(_DAMAGES))
def test_damaged_data_is_refused_naming_the_file_and_the_fix(tiny_data, tmp_path, capsys, damage):
    prefix, problem = _damaged_copy(tiny_data, tmp_path, damage)
    message = _refused(_tiny(tiny_data, f"data.blend=[{prefix}]"), capsys)
    assert message.startswith(f"data.blend prefix '{prefix}': {problem}"), message
    assert message.endswith(_REMAKE.format(tokenizer=tiny_data.tokenizer, prefix=prefix)), message


@pytest.mark.parametrize("damage", ["truncated-bin", "corrupted-idx", "truncated-idx", "vocab-mismatch-no-meta"])
def test_damaged_data_fails_the_command_in_seconds(tiny_data, tmp_path, damage):
    prefix, problem = _damaged_copy(tiny_data, tmp_path, damage)
    argv = _tiny(tiny_data, f"data.blend=[{prefix}]")
    result = subprocess.run([sys.executable, "-m", "mor_megatron.pretrain", *argv], cwd=REPO,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and problem in result.stderr and "--overwrite`" in result.stderr


def test_stale_index_cache_is_refused(tiny_data, tmp_path, capsys):
    prefix, _ = _damaged_copy(tiny_data, tmp_path, "idx-magic")
    shutil.copy(f"{tiny_data.prefix}.idx", f"{prefix}.idx")  # intact again, written now
    cache = prefix / "cache" / "GPTDataset_indices"
    cache.mkdir(parents=True)
    description = cache / f"{'0' * 32}-GPTDataset-train-description.txt"
    description.write_text("{}")
    os.utime(description, (0, 0))  # cached long before the .idx was written
    message = _refused(_tiny(tiny_data, f"data.blend=[{prefix}]"), capsys)
    assert message.startswith(f"data.blend prefix '{prefix}' was rewritten after megatron-core cached indices")
    assert f"`rm {cache}/{'0' * 32}-GPTDataset-train-*`" in message and "--overwrite`" in message


def test_malformed_yaml_fails_the_command_with_one_line(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("preset: tiny-mor-e-r3\ntrain:\n  train_steps: 10\n   seq_length: 64\n")
    result = subprocess.run([sys.executable, "-m", "mor_megatron.pretrain", "--check", "--config", str(config)],
                            cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"mor-pretrain: config error: config file '{config}' is not valid YAML: mapping "
                             "values are not allowed here at line 4, column 14; fix the syntax there "
                             "(indentation, an unclosed quote or bracket, ': ' in an unquoted value)\n")
