"""Megatron pretraining on 2 CPU ranks: exact resume, one MLflow run across it, TP=2 -> TP=1, bad launches.

* Resume: a job killed two steps after its step-N checkpoint and resumed by re-running ``mor_megatron.pretrain``
  gives the loss, learning rate, grad norm, router statistics and validation loss of a 2N-step run that never
  stopped, bit for bit (fp32, same seed). The model is MoR-T with loss-free balancing, whose router bias is
  state outside the optimizer; the schedule is WSD with warmup, so the scheduler state matters.
* The resumed job logs into the MLflow run whose id it found in the checkpoint: one run, steps 1..2N, once,
  although the killed attempt had already logged steps N+1 and N+2, which the resumed job reruns (JSONL and
  MLflow).
* A checkpoint saved at TP=2 evaluates at TP=1 to the validation loss the TP=2 job logged, and resumes there.
* A bad launch fails in seconds, before any worker joins a process group.

The two ranks run every job one after another in one spawn (``destroy_distributed(keep_process_group=True)``
in between), which saves the seconds each fresh process spends importing megatron-core. A job that fails
errors every test of the module at once, with the failing rank's traceback (run_ranks stops the other rank in
seconds; catching per job would leave it waiting in a collective instead).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from tests.dist.launch import run_ranks
from tests.dist.preemption import Preempted, PreemptedAfter
from tests.dist.mlflow_server import free_port
from tests.dist.pretrain_job import pretrain_command, torchrun_agents, wait_all

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]

STEPS = 3
"""N: the first job stops after N steps, the resumed one runs steps N+1..2N."""
_TP_STEPS = 2
"""Steps of the TP=2 job whose last checkpoint is evaluated at TP=1."""
# Logged values that must not depend on the resume; perf/, mem/ and time/ keys measure the machine.
_EXACT_PREFIXES = ("train/", "optim/", "router/", "val/")


def _job_overrides(tiny_data, output_dir: Path, *extra: str) -> list[str]:
    """A seconds-long fp32 job: 2 micro-batches of 2 per rank at DP=2, every step logged, WSD with warmup."""
    return [*tiny_data.overrides(), "preset=tiny-mor-t-r3", "recursion.token_balancing=loss_free",
            "recursion.bias_update_rate=0.003", "train.seq_length=64", "train.global_batch_size=8",
            "train.micro_batch_size=2", "train.precision=fp32", f"train.train_steps={2 * STEPS}",
            "train.log_interval=1", f"train.eval_interval={STEPS}", "train.eval_steps=1",
            "optim.schedule=wsd", "optim.warmup_steps=2", "optim.decay_fraction=0.5",
            "parallel.use_distributed_optimizer=true", "tracking.system_metrics=false",
            f"output_dir={output_dir}", *extra]


def _train(overrides: list[str], *, stop_after: int | None = None):
    """One job as ``mor_megatron.pretrain`` runs it, on the ranks' process group; returns its Trainer."""
    from mor_megatron.config import load_config
    from mor_megatron.runtime import destroy_distributed, init_distributed
    from mor_megatron.training.megatron_engine import MegatronEngine
    from mor_megatron.training.trainer import Trainer

    config = load_config(None, overrides)
    ctx = init_distributed(config.parallel, seed=config.train.seed)
    factory = MegatronEngine
    if stop_after is not None:
        factory = lambda cfg, ctx: PreemptedAfter(MegatronEngine(cfg, ctx), stop_after)  # noqa: E731
    trainer = Trainer(config, ctx, factory)
    try:
        trainer.build()
        trainer.train()
    except BaseException as err:
        trainer.close(failure=err)
        if not isinstance(err, Preempted):
            raise
    else:
        trainer.close()
    finally:
        destroy_distributed(keep_process_group=True)
    return trainer


def _stopped_after_straight(straight: list[str], stopped: list[str]) -> dict:
    """2N steps straight, then N+2 steps of the same job, killed (after logging two steps past its step-N
    checkpoint); its router bias then and the run id of the step-N checkpoint."""
    from megatron.core import dist_checkpointing

    from mor_megatron.checkpoint.layout import step_dir_name

    _train(straight)
    # An odd number of sign updates cannot bring the router bias back to exactly 0 (an even one can).
    trainer = _train(stopped, stop_after=STEPS + 2)
    checkpoint = Path(trainer.config.checkpoint.save_dir) / step_dir_name(STEPS)
    return {"depth_bias": trainer.engine.model.decoder.router.depth_bias.tolist(),
            "run_id": dist_checkpointing.load_common_state_dict(str(checkpoint))["loop"]["mlflow_run_id"]}


def _tp2_then_tp1(tp2: list[str], tp1: list[str]) -> dict:
    """Train at TP=2 (DP=1), then evaluate and resume its checkpoint at TP=1 (DP=2) on the same ranks."""
    from mor_megatron.config import load_config
    from mor_megatron.runtime import destroy_distributed, init_distributed
    from mor_megatron.training.evaluate import evaluate_checkpoint
    from mor_megatron.training.megatron_engine import MegatronEngine

    _train(tp2)
    config = load_config(None, tp1)
    ctx = init_distributed(config.parallel, seed=config.train.seed)
    try:
        layout = (ctx.dims.tp, ctx.dims.dp)
        val = evaluate_checkpoint(config, ctx)
        loop = MegatronEngine(config, ctx).resume()  # model, optimizer and schedule resharded to TP=1 x DP=2
    finally:
        destroy_distributed(keep_process_group=True)
    return {"layout": layout, "val": val, "resumed_step": loop.step}


def _mlflow_runs(run_dir: Path) -> list[dict]:
    """Every run in the job's default tracking store (sqlite in its run directory), read with MlflowClient."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            run_id = run.info.run_id
            history = {key: [(point.step, point.value) for point in client.get_metric_history(run_id, key)]
                       for key in ("train/lm_loss", "val/loss")}
            runs.append({"run_id": run_id, "status": run.info.status, "history": history,
                         "artifacts": [artifact.path for artifact in client.list_artifacts(run_id)]})
    return runs


def _all_jobs(rank: int, world_size: int, *, straight: list[str], stopped: list[str], tp2: list[str],
              tp1: list[str], run_dir: Path) -> dict:
    """Every job of this module on the same two ranks, then (rank 0) the MLflow run read back.

    The resume through ``pretrain.main`` comes last: it ends the process group.
    """
    from mor_megatron.pretrain import main

    results = {"stopped": _stopped_after_straight(straight, stopped), "tp": _tp2_then_tp1(tp2, tp1),
               "resume_exit_code": main(stopped)}
    if rank == 0:
        results["mlflow_runs"] = _mlflow_runs(run_dir)
    return results


def _metrics_by_step(jsonl: Path) -> dict[int, dict[str, float]]:
    """Metric lines of a run's JSONL merged per step; a step logged twice fails the test."""
    merged: dict[int, dict[str, float]] = {}
    for line in jsonl.read_text().splitlines():
        record = json.loads(line)
        if record["kind"] != "metrics":
            continue
        step_metrics = merged.setdefault(record["step"], {})
        assert not step_metrics.keys() & record["metrics"].keys(), f"step {record['step']} logged twice"
        step_metrics.update(record["metrics"])
    return merged


@pytest.fixture(scope="module")
def jobs(tiny_data, tmp_path_factory) -> tuple[Path, dict]:
    """Run the jobs of this module once, in one spawn of two ranks."""
    root = tmp_path_factory.mktemp("pretrain")
    straight = _job_overrides(tiny_data, root / "straight", "tracking.enabled=false")
    stopped = _job_overrides(tiny_data, root / "resumed", f"checkpoint.save_dir={root / 'resumed' / 'ckpt'}",
                             f"checkpoint.save_interval={STEPS}")
    tp_common = [*tiny_data.overrides(), "preset=tiny-mor-e-r3", "train.seq_length=64",
                 "train.global_batch_size=8", "train.micro_batch_size=2", "train.precision=fp32",
                 f"train.train_steps={_TP_STEPS}", f"train.eval_interval={_TP_STEPS}", "train.eval_steps=1",
                 "optim.warmup_steps=1", "parallel.use_distributed_optimizer=true", "tracking.enabled=false",
                 f"checkpoint.save_dir={root / 'tp2' / 'ckpt'}"]
    tp2 = [*tp_common, "parallel.tensor_parallel_size=2", f"output_dir={root / 'tp2'}"]
    tp1 = [*tp_common, "parallel.tensor_parallel_size=1"]
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: sqlite in the run directory
        results = run_ranks(_all_jobs, 2, root / "ranks", timeout_s=270, straight=straight, stopped=stopped,
                            tp2=tp2, tp1=tp1, run_dir=root / "resumed")
    return root, results


def test_resume_gives_the_losses_of_an_uninterrupted_run(jobs):
    from mor_megatron.tracking import metrics as m

    root, results = jobs
    stopped = results[0]["stopped"]
    assert [result["resume_exit_code"] for result in results] == [0, 0]
    straight = _metrics_by_step(root / "straight" / "metrics.jsonl")
    resumed = _metrics_by_step(root / "resumed" / "metrics.jsonl")
    every = list(range(1, 2 * STEPS + 1))
    assert sorted(straight) == every and sorted(resumed) == every
    # The router bias moved off its initial 0, so a resume that dropped the checkpoint's would route differently.
    assert any(abs(bias) > 0 for bias in stopped["depth_bias"]), stopped["depth_bias"]
    for step in every:
        expected = {k: v for k, v in straight[step].items() if k.startswith(_EXACT_PREFIXES)}
        got = {k: v for k, v in resumed[step].items() if k.startswith(_EXACT_PREFIXES)}
        assert got == expected, f"step {step}"
    assert {m.VAL_LOSS, m.TRAIN_LM_LOSS, m.OPTIM_LR, "router/max_violation"} <= resumed[2 * STEPS].keys()
    lrs = [straight[step][m.OPTIM_LR] for step in every]
    assert lrs[0] < lrs[1] == lrs[STEPS - 1] > lrs[-1], lrs  # warmup, stable, decay: all three crossed
    # Training time carries over the resume instead of restarting from 0.
    train_time = [resumed[step][m.TIME_TRAIN_S] for step in every]
    assert train_time == sorted(train_time) and train_time[STEPS] > train_time[STEPS - 1]


def test_resumed_job_continues_the_same_mlflow_run(jobs):
    from mor_megatron.tracking import metrics as m

    root, results = jobs
    runs = results[0]["mlflow_runs"]
    assert [run["run_id"] for run in runs] == [results[0]["stopped"]["run_id"]]
    run = runs[0]
    assert run["status"] == "FINISHED"
    written = _metrics_by_step(root / "resumed" / "metrics.jsonl")
    for key, steps in ((m.TRAIN_LM_LOSS, range(1, 2 * STEPS + 1)), (m.VAL_LOSS, (STEPS, 2 * STEPS))):
        history = sorted(run["history"][key])
        assert [step for step, _ in history] == list(steps), key
        assert history == [(step, written[step][key]) for step in steps], key
    assert "config.yaml" in run["artifacts"], run["artifacts"]
    assert any(path.startswith("config_resume_") for path in run["artifacts"]), run["artifacts"]


def test_checkpoint_saved_at_tp2_loads_at_tp1(jobs):
    from mor_megatron.tracking import metrics as m

    root, results = jobs
    logged = _metrics_by_step(root / "tp2" / "metrics.jsonl")[_TP_STEPS]
    for result in results:
        tp = result["tp"]
        assert tp["layout"] == (1, 2) and tp["resumed_step"] == _TP_STEPS
        for key in (m.VAL_LOSS, m.VAL_LOSS_CAUSAL):
            assert tp["val"][key] == pytest.approx(logged[key], abs=1e-5), key
    # The TP=2 job trained: its validation loss left the untrained ln(vocab_size).
    assert logged[m.VAL_LOSS] < math.log(2048) - 0.05


def test_bad_launch_fails_in_seconds_before_any_worker_starts(tiny_data, tmp_path):
    # demo.yaml: global batch 16; at DP=2, micro-batches of 3 do not divide it. Only torchrun's WORLD_SIZE
    # says DP=2, so this is the check that must read the launcher's environment.
    overrides = [*tiny_data.overrides(), "train.micro_batch_size=3", f"output_dir={tmp_path / 'run'}"]
    command = pretrain_command(master_port=free_port(), nproc_per_node=2, overrides=overrides)
    start = time.monotonic()
    with torchrun_agents([command], tmp_path / "logs") as agents:
        exit_codes = wait_all(agents, timeout_s=60)
    elapsed = time.monotonic() - start
    stderr = agents[0].stderr.read_text()
    assert exit_codes == [1], agents[0].report()  # torchrun's own code when a worker fails
    assert "exitcode  : 2" in stderr, agents[0].report()  # the workers' code for a config error
    assert ("mor-pretrain: config error: train.global_batch_size=16 is not divisible by "
            "train.micro_batch_size=3 x data-parallel size 2") in stderr, agents[0].report()
    assert elapsed < 30, f"{elapsed:.1f} s"
    assert not (tmp_path / "run").exists()

