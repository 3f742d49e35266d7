"""Checkpoint safety without a process group: checksums, step selection, config comparison on resume, the
save_dir lock, writer processes that die with their parent, weights-only RNG state, conversion refusals."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from mor_megatron.checkpoint.integrity import (CheckpointDamaged, select_intact_step, verify_manifest,
                                               write_manifest)
from mor_megatron.checkpoint.megatron import COMPLETE_MARKER as MARKER
from mor_megatron.checkpoint.resume_config import ConfigChangedOnResume, check_resume_config
from mor_megatron.checkpoint.save_dir_lock import LOCK_FILE, SaveDirLock, SaveDirLocked

REPO = Path(__file__).resolve().parents[2]


def _step(root: Path, step: int, *, manifest: bool = True) -> Path:
    """A fake published step: two shard files and the completion marker, with or without checksums."""
    folder = root / f"step_{step:08d}"
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    (folder / "common.pt").write_bytes(b"common")
    (folder / "metadata.json").write_text("{}")
    if manifest:
        write_manifest(folder)
    (root / "latest").write_text(f"{step}\n")
    return folder


def _flip(path: Path, offset: int = 100, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = bytes(b ^ 0xFF for b in data[offset:offset + count])
    path.write_bytes(bytes(data))


# -- checksums -------------------------------------------------------------------------------------------------
def test_the_manifest_names_flipped_truncated_and_missing_files(tmp_path):
    folder = _step(tmp_path, 1)
    assert verify_manifest(folder) == (True, [])
    _flip(folder / "__0_0.distcp")
    (folder / "common.pt").write_bytes(b"comm")
    (folder / "metadata.json").unlink()
    has_manifest, problems = verify_manifest(folder)
    assert has_manifest
    assert problems == [f"{folder / '__0_0.distcp'}: contents differ from the recorded checksum (corrupted)",
                        f"{folder / 'common.pt'}: 4 bytes, 6 recorded (truncated or overwritten)",
                        f"{folder / 'metadata.json'}: missing"]


def test_a_damaged_newest_step_is_an_error_unless_fallback_is_allowed(tmp_path, caplog):
    _step(tmp_path, 1)
    newest = _step(tmp_path, 2)
    _flip(newest / "__0_0.distcp")
    with pytest.raises(CheckpointDamaged) as error:
        select_intact_step(tmp_path, marker=MARKER, fallback_to_previous=False)
    message = str(error.value)
    assert f"checkpoint {newest} is damaged" in message and f"{newest / '__0_0.distcp'}: contents" in message
    assert "checkpoint.fallback_to_previous=true" in message
    with caplog.at_level(logging.WARNING):
        assert select_intact_step(tmp_path, marker=MARKER, fallback_to_previous=True) == 1
    assert f"checkpoint {newest} is damaged" in caplog.text and "trying the previous step" in caplog.text


def test_an_incomplete_newest_step_is_reported_not_skipped(tmp_path):
    _step(tmp_path, 1)
    newest = _step(tmp_path, 2)
    (newest / "metadata.json").unlink()
    with pytest.raises(CheckpointDamaged, match=f"{newest / 'metadata.json'}: missing"):
        select_intact_step(tmp_path, marker=MARKER, fallback_to_previous=False)
    (tmp_path / "step_00000001" / "common.pt").unlink()
    with pytest.raises(CheckpointDamaged, match=r"steps \[2, 1\] are all damaged or incomplete"):
        select_intact_step(tmp_path, marker=MARKER, fallback_to_previous=True)


def test_a_step_saved_before_checksums_loads_with_a_warning(tmp_path, caplog):
    _step(tmp_path, 4, manifest=False)
    with caplog.at_level(logging.WARNING):
        assert select_intact_step(tmp_path, marker=MARKER, fallback_to_previous=False) == 4
    assert "has no checksums.json" in caplog.text
    assert select_intact_step(tmp_path / "none", marker=MARKER, fallback_to_previous=False) is None


# -- config on resume ------------------------------------------------------------------------------------------
def _config_dict(*overrides: str) -> dict:
    from mor_megatron.config import config_to_dict, load_config

    return config_to_dict(load_config(None, ["preset=tiny-mor-e-r3", *overrides]))


@pytest.mark.parametrize("override,field", [
    ("model.rotary_base=500000", "model.rotary_base"), ("model.vocab_size=1024", "model.vocab_size"),
    ("recursion.capacities=[1.0,0.5,0.25]", "recursion.capacities"),
    ("recursion.router_alpha=0.3", "recursion.router_alpha"), ("recursion.kv_mode=shared", "recursion.kv_mode"),
    ("recursion.sharing=cycle", "recursion.sharing"), ("model.hidden_size=128", "model.hidden_size"),
])
def test_a_model_or_routing_change_on_resume_is_refused_unless_allowed(override, field, caplog):
    stored, current = _config_dict(), _config_dict(override)
    with pytest.raises(ConfigChangedOnResume, match=rf"{field}: .* \(checkpoint\) -> .* \(now\)"):
        check_resume_config(stored, current, checkpoint="ckpt/step_00000002", step=2, allow_change=False)
    with caplog.at_level(logging.WARNING):
        check_resume_config(stored, current, checkpoint="ckpt/step_00000002", step=2, allow_change=True)
    assert field in caplog.text


def test_harmless_changes_on_resume_are_allowed():
    stored = _config_dict()
    current = _config_dict("train.train_steps=900", "train.eval_interval=7", "checkpoint.save_interval=3",
                           "optim.warmup_steps=9", "tracking.enabled=false", "output_dir=elsewhere",
                           "model.transformer_impl=local", "recursion.aux_loss_coeff=0.01")
    check_resume_config(stored, current, checkpoint="ckpt/step_00000002", step=2, allow_change=False)


@pytest.mark.parametrize("schedule,step,refused", [
    ("wsd", 80, False),  # 100 steps, decay 0.2: the LR is at its peak until step 80
    ("wsd", 100, True),  # a finished run: extending it would jump back to the peak
    ("cosine", 80, True),  # cosine decays from the end of warmup on
    ("constant", 100, False),
])
def test_a_new_length_for_a_decaying_schedule_is_refused_unless_allowed(schedule, step, refused):
    stored = _config_dict("train.train_steps=100", f"optim.schedule={schedule}", "optim.decay_fraction=0.2")
    current = _config_dict("train.train_steps=200", f"optim.schedule={schedule}", "optim.decay_fraction=0.2")
    if refused:
        with pytest.raises(ConfigChangedOnResume, match=r"train\.train_steps: 100 \(checkpoint\) -> 200"):
            check_resume_config(stored, current, checkpoint="ckpt", step=step, allow_change=False)
    else:
        check_resume_config(stored, current, checkpoint="ckpt", step=step, allow_change=False)
    check_resume_config(stored, current, checkpoint="ckpt", step=step, allow_change=True)


# -- save_dir lock ---------------------------------------------------------------------------------------------
def test_a_second_holder_is_refused_with_the_holders_identity(tmp_path):
    first = SaveDirLock(tmp_path)
    first.acquire()
    with pytest.raises(SaveDirLocked) as error:
        SaveDirLock(tmp_path).acquire()
    message = str(error.value)
    assert f"host {socket.gethostname()}, pid {os.getpid()}, started " in message
    assert f"delete {tmp_path / LOCK_FILE}" in message
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_stale_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    (tmp_path / LOCK_FILE).write_text(json.dumps({
        "host": socket.gethostname(), "pid": dead.pid, "started": "2026-01-01T00:00:00+00:00",
        "process_start_time": 1.0, "slurm_job_id": None}))
    lock = SaveDirLock(tmp_path)
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    assert f"pid {dead.pid}" in caplog.text and "stale lock" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_held_on_another_host_is_not_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({
        "host": "node-elsewhere", "pid": 1, "started": "2026-01-01T00:00:00+00:00", "process_start_time": 1.0,
        "slurm_job_id": None}))
    with pytest.raises(SaveDirLocked, match="host node-elsewhere, pid 1"):
        SaveDirLock(tmp_path).acquire()


# -- writer processes die with their parent --------------------------------------------------------------------
_FORKING_PARENT = textwrap.dedent("""
    import importlib.util, multiprocessing, os, signal, sys, time

    # The module alone (standard library only): importing the runtime package would cost seconds of torch.
    spec = importlib.util.spec_from_file_location("child_processes", sys.argv[1])
    child_processes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(child_processes)
    child_processes.arm_forked_children()

    def write_forever(started):  # stands in for a checkpoint writer
        started.set()
        time.sleep(120)

    context = multiprocessing.get_context("fork")
    started = context.Event()
    child = context.Process(target=write_forever, args=(started,))
    child.start()
    started.wait(30)  # the fork hooks have run in the child
    os.kill(child.pid, signal.SIGSTOP)  # a stopped child can never exit by itself
    with open(sys.argv[2], "w") as pid_file:
        pid_file.write(str(child.pid))
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_forked_child_dies_when_its_parent_is_killed(tmp_path):
    module = REPO / "mor_megatron" / "runtime" / "child_processes.py"
    parent = subprocess.run([sys.executable, "-c", _FORKING_PARENT, str(module), str(tmp_path / "pid")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    assert parent.returncode == -9
    child_pid = int((tmp_path / "pid").read_text())
    try:
        deadline = time.monotonic() + 10
        while _alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child_pid), "the forked child outlived its killed parent"
    finally:
        if _alive(child_pid):
            os.kill(child_pid, 9)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- RNG state -------------------------------------------------------------------------------------------------
def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np
    import torch

    from mor_megatron.checkpoint.rng_state import restore_rng_state, rng_state_tensors

    torch.save(rng_state_tensors(), tmp_path / "rng.pt")
    expected = [random.random(), random.gauss(0, 1), float(np.random.rand()), float(torch.rand(1))]
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert [random.random(), random.gauss(0, 1), float(np.random.rand()), float(torch.rand(1))] == expected


# -- conversion never touches its input ------------------------------------------------------------------------
def _run_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A training run folder (config.yaml, metrics) with a save_dir holding one (fake) step."""
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    (run / "config.yaml").write_text("preset: tiny-mor-e-r3\n")
    (run / "metrics.jsonl").write_text("{}\n")
    return run, _step(run / "ckpt", 3)


@pytest.mark.parametrize("output", ["run", "run/ckpt", "run/ckpt/step_00000003", "run/ckpt/hf", "."])
def test_to_hf_refuses_an_output_overlapping_the_checkpoint_before_reading_it(tmp_path, output, capsys):
    from mor_megatron.cli.convert import main

    run, step_dir = _run_folder(tmp_path)
    before = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*"))
    code = main(["to-hf", str(step_dir), str(tmp_path / output), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "which this conversion reads; choose an output folder outside it" in err
    assert sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*")) == before


def test_to_hf_may_write_inside_the_run_folder_beside_the_checkpoints(tmp_path):
    from mor_megatron.convert.output_guard import refuse_output_overlapping_checkpoint

    run, step_dir = _run_folder(tmp_path)
    refuse_output_overlapping_checkpoint(run / "hf", step_dir)  # what tools/demo.sh does


def test_from_hf_refuses_an_output_inside_the_model_folder(tmp_path, capsys):
    from mor_megatron.cli.convert import main

    (tmp_path / "llama").mkdir()
    code = main(["from-hf", str(tmp_path / "llama"), str(tmp_path / "llama" / "mor"), "--preset", "tiny-mor-e-r2"])
    err = capsys.readouterr().err
    assert code == 2 and "lies inside the Hugging Face model folder" in err, err


def test_deepspeed_conversion_refuses_writing_into_its_own_save_dir(tmp_path, capsys):
    from mor_megatron.cli.convert import main

    step_dir = tmp_path / "ds" / "step_00000002"
    step_dir.mkdir(parents=True)
    (step_dir / "meta.json").write_text(json.dumps({"step": 2, "layout": {"tp": 1}}))
    assert main(["from-deepspeed", str(step_dir), str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err
    assert f"output folder {str(tmp_path / 'ds')!r} contains the checkpoint {str(step_dir)!r}" in err, err
    assert len(err.strip().splitlines()) == 1
