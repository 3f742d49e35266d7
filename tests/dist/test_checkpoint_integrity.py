"""Checkpoint integrity on 2 gloo ranks: checksums, fallback to the previous step, config changes on resume.

One spawn saves steps 1 and 2 of a tiny MoR-E model with the trainer's ``Checkpointer`` (DP=2), then loads them
back under each fault: 16 flipped bytes in a shard of step 2 (refused, naming the folder and the file; with
``fallback_to_previous`` step 1 is loaded and the fallback logged), a step whose metadata is gone, a damaged
shard in a checkpoint without checksums (torch's ``CheckpointException``, a ``BaseException``, still becomes
the project's error), and a changed router alpha on resume (refused unless ``allow_config_change``).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from tests.dist.launch import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(180)]


def _config(train_steps: int = 100, **recursion):
    from mor_megatron.config import config_from_dict

    return config_from_dict({"preset": "tiny-mor-e-r3", "model": {"vocab_size": 512, "max_seq_length": 32},
                             "recursion": recursion, "train": {"seq_length": 32, "train_steps": train_steps}})


class _Recorder(logging.Handler):
    """Keeps the messages of the checkpoint loggers, so that a rank can return them."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _model(config, ctx):
    from mor_megatron.model.builder import build_model, transformer_config

    mcore = transformer_config(config.model, config.recursion, config.parallel)
    return build_model(config.model, config.recursion, mcore, pg_collection=ctx.pg_collection, provider="local")


def _flip_bytes(path: Path, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


def _draw() -> list[float]:
    """One number from each RNG that a checkpoint restores."""
    import random

    import numpy as np
    import torch

    return [random.random(), float(np.random.rand()), float(torch.rand(1))]


def _outcome(action) -> str:
    """``"ok: <result>"`` or ``"<ExceptionType>: <message>"`` (BaseException too: a CheckpointException must
    not get past the project's own error types)."""
    try:
        return f"ok: {action()}"
    except BaseException as err:  # noqa: BLE001 - the test reports whatever escaped
        return f"{type(err).__name__}: {err}"


def _scenario(rank: int, world_size: int, *, root: str) -> dict:
    import torch.distributed as dist

    from mor_megatron.config import ParallelConfig, config_to_dict
    from mor_megatron.runtime import destroy_distributed, init_distributed
    from mor_megatron.checkpoint.loop_state import LoopState
    from mor_megatron.checkpoint.megatron import Checkpointer

    recorder = _Recorder()
    logging.getLogger("mor_megatron.checkpoint").addHandler(recorder)
    ctx = init_distributed(ParallelConfig(), seed=3)
    config = _config()
    model = _model(config, ctx)
    save_dir = Path(root) / "ckpt"
    saver = Checkpointer(save_dir=str(save_dir), load_dir=None, keep_last=2, ctx=ctx)
    for step in (1, 2):
        saver.save(step, model_chunks=[model], optimizer=None, scheduler=None, loop=LoopState(step=step),
                   config_dict=config_to_dict(config))
    expected_draw = _draw()  # what the RNGs give right after a load restores step 2's state

    def load(*, fallback=False, allow_change=False, current=None):
        checkpointer = Checkpointer(save_dir=None, load_dir=str(save_dir), keep_last=2, ctx=ctx,
                                    fallback_to_previous=fallback, allow_config_change=allow_change)
        loop = checkpointer.load(model_chunks=[model], optimizer=None, scheduler=None,
                                 current_config=config_to_dict(current or config))
        return loop.step

    results = {"intact": _outcome(load)}
    _draw()
    load()
    results["rng_draw_matches"] = _draw() == expected_draw
    results["router_alpha_changed"] = _outcome(lambda: load(current=_config(router_alpha=0.5)))
    results["router_alpha_allowed"] = _outcome(lambda: load(current=_config(router_alpha=0.5), allow_change=True))
    results["train_steps_changed"] = _outcome(lambda: load(current=_config(train_steps=7)))

    step2 = save_dir / "step_00000002"
    shard = sorted(step2.glob("*.distcp"))[0]
    backup = Path(root) / "step2_backup"
    if rank == 0:
        shutil.copytree(step2, backup)
        _flip_bytes(shard)
    dist.barrier()
    results["flipped_shard"] = str(shard)
    results["flipped"] = _outcome(load)
    recorder.messages.clear()
    results["flipped_with_fallback"] = _outcome(lambda: load(fallback=True))
    results["fallback_warnings"] = list(recorder.messages)

    if rank == 0:  # a checkpoint saved before checksums: torch itself must fail, and that must be our error
        (step2 / "checksums.json").unlink()
        shard.write_bytes(shard.read_bytes()[:64])
    dist.barrier()
    results["truncated_without_checksums"] = _outcome(load)

    if rank == 0:
        shutil.rmtree(step2)
        shutil.copytree(backup, step2)
        (step2 / "metadata.json").unlink()
    dist.barrier()
    results["incomplete"] = _outcome(load)
    destroy_distributed(keep_process_group=True)
    return results


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("integrity")
    return root, run_ranks(_scenario, 2, root / "ranks", timeout_s=150, root=str(root))


def test_an_intact_checkpoint_loads_with_its_rng_state(outcomes):
    _, results = outcomes
    for result in results:
        assert result["intact"] == "ok: 2"
        assert result["rng_draw_matches"]


def test_a_flipped_shard_is_refused_naming_the_step_and_the_file(outcomes):
    root, results = outcomes
    for result in results:
        outcome = result["flipped"]
        assert outcome.startswith("CheckpointDamaged: "), outcome
        assert f"checkpoint {root / 'ckpt' / 'step_00000002'} is damaged" in outcome
        assert f"{result['flipped_shard']}: contents differ from the recorded checksum" in outcome
        assert "checkpoint.fallback_to_previous=true" in outcome


def test_the_previous_step_is_loaded_only_when_fallback_is_allowed(outcomes):
    root, results = outcomes
    for result in results:
        assert result["flipped_with_fallback"] == "ok: 1"
        damaged = [m for m in result["fallback_warnings"] if "fallback_to_previous=true: trying the previous" in m]
        assert len(damaged) == 1 and str(root / "ckpt" / "step_00000002") in damaged[0], result["fallback_warnings"]


def test_an_incomplete_step_is_refused(outcomes):
    root, results = outcomes
    for result in results:
        outcome = result["incomplete"]
        assert outcome.startswith("CheckpointDamaged: "), outcome
        assert f"{root / 'ckpt' / 'step_00000002' / 'metadata.json'}: missing" in outcome


def test_torch_checkpoint_exceptions_become_checkpoint_errors(outcomes):
    root, results = outcomes
    for result in results:
        # megatron-core 0.16 fails on the shard's tensors, 0.19 already on the common state it keeps in shards
        outcome = result["truncated_without_checksums"]
        assert outcome.startswith("CheckpointError: "), outcome
        assert f"checkpoint {root / 'ckpt' / 'step_00000002'}" in outcome, outcome


def test_a_model_config_change_on_resume_is_refused_unless_allowed(outcomes):
    _, results = outcomes
    for result in results:
        outcome = result["router_alpha_changed"]
        assert outcome.startswith("ConfigChangedOnResume: "), outcome
        assert "recursion.router_alpha: None (checkpoint) -> 0.5 (now)" in outcome
        assert "checkpoint.allow_config_change=true" in outcome
        assert result["router_alpha_allowed"] == "ok: 2"
        assert result["train_steps_changed"] == "ok: 2"
