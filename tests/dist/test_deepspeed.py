"""The DeepSpeed ZeRO path on CPU ranks (gloo): equality with the Megatron path, TP, resume, conversion, launchers.

* From the same seed (hence the same initial weights) and the shared data loader, 5 steps of ZeRO-1, ZeRO-2 and
  ZeRO-3 at DP=2 give the Megatron path's losses within 1e-5 (fp32), for the vanilla model and for MoR-E R=3
  (MoR-E also under ZeRO-3 at TP=2 x DP=1, through the mpu adapter).
  ZeRO-3 runs with every parameter partitioned and released after each use (persistence threshold 0, reuse
  distance 0), so the shared block is gathered once per recursion; its parameter trace must never be
  invalidated, through training and evaluation with both routings.
* A preempted ZeRO-3 job resumed by ``mor_megatron.pretrain_deepspeed`` continues the uninterrupted job's loss
  sequence exactly; its final checkpoint converts to the Megatron format and evaluates there to the same loss.
* A ZeRO-1 job with dropout stopped by ``train.exit_interval`` saves that step and ends KILLED; rerun, it logs
  the uninterrupted job's values bit for bit.
* Two nodes on loopback (torchrun agents; the ``deepspeed --no_ssh`` launcher in the slow test) log one MLflow
  run. Slow: TP=2 x DP=2 on 4 ranks under ZeRO-2 and ZeRO-3 (with a TP=2 checkpoint conversion), CPU offload.

Ranks run several jobs one after another in one spawn, which saves the seconds each fresh process spends
importing megatron-core and DeepSpeed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dist.launch import run_ranks
from tests.dist.pretrain_job import jsonl_metrics
from tests.dist.preemption import Preempted, PreemptedAfter

pytestmark = [pytest.mark.dist, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"
ZERO3_JSON = REPO / "configs" / "deepspeed" / "zero3.json"
STEPS = 5
TOLERANCE = 1e-5


def _base(tiny_data, output_dir: Path, *extra: str) -> list[str]:
    """A seconds-long fp32 job: 2 micro-batches of 2 per rank at DP=2, evaluated at steps 2, 4 and 5."""
    return [*tiny_data.overrides(), "train.seq_length=64", f"train.train_steps={STEPS}", "train.micro_batch_size=2",
            "train.global_batch_size=8", "train.precision=fp32", "train.log_interval=1", "train.eval_interval=2",
            "train.eval_steps=1", "optim.warmup_steps=2", "tracking.enabled=false", "checkpoint.save_dir=null",
            f"output_dir={output_dir}", *extra]


def _strict_zero3_json(path: Path) -> Path:
    """configs/deepspeed/zero3.json with every parameter partitioned and released right after each use."""
    values = json.loads(ZERO3_JSON.read_text())
    values["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))
    return path


def _params(output_dir: Path) -> dict[str, str]:
    """The JSONL run parameters of a run merged (the config and what the trainer adds)."""
    merged: dict[str, str] = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "params":
            merged.update(record["params"])
    return merged


def _losses(output_dir: Path, key: str = "train/lm_loss") -> dict[int, float]:
    return {step: values[key] for step, values in jsonl_metrics(output_dir).items() if key in values}


def _assert_close(actual: dict[int, float], expected: dict[int, float], what: str, tol: float = TOLERANCE) -> None:
    assert actual.keys() == expected.keys(), (what, actual, expected)
    worst = max(abs(actual[s] - expected[s]) for s in expected)
    assert worst <= tol, f"{what}: max |difference| {worst:.3g} > {tol:g}\n{actual}\n{expected}"


# -- rank-side helpers (run in the spawned ranks) -----------------------------------------------------------------
class _Zero3Probe:
    """Counts ZeRO-3 parameter-trace invalidations of an engine and checks that parameters are partitioned."""

    def __init__(self, engine):
        self.engine = engine
        self.coordinator = engine.ds.optimizer.parameter_offload.get_param_coordinator()
        self.invalidations = 0
        original = self.coordinator._invalidate_trace

        def counting() -> None:
            self.invalidations += 1
            original()

        self.coordinator._invalidate_trace = counting

    def report(self) -> dict:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        shared = self.engine.model.decoder.layers[1]  # the first layer of the shared block (middle-cycle)
        params = list(shared.parameters())
        return {"invalidations": self.invalidations, "trace_complete": self.coordinator.is_complete_trace(),
                "partitioned": all(p.ds_tensor.numel() < p.ds_numel for p in params),
                "released": all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in params)}


def _train(overrides: list[str], *, engine: str, stop_after: int | None = None) -> dict:
    """One job as the entry points run it, on the ranks' existing process group; returns probe results."""
    from mor_megatron.config import load_config
    from mor_megatron.runtime import destroy_distributed, init_distributed
    from mor_megatron.training.deepspeed_engine import DeepSpeedEngine
    from mor_megatron.training.megatron_engine import MegatronEngine
    from mor_megatron.training.trainer import Trainer

    config = load_config(DEMO, overrides)
    ctx = init_distributed(config.parallel, seed=config.train.seed)
    probes: list[_Zero3Probe] = []

    def factory(cfg, context):
        built = (DeepSpeedEngine if engine == "deepspeed" else MegatronEngine)(cfg, context)
        if engine == "deepspeed" and built.zero_stage == 3:
            probes.append(_Zero3Probe(built))
        return built if stop_after is None else PreemptedAfter(built, stop_after)

    trainer = Trainer(config, ctx, factory)
    failure = None
    try:
        trainer.build()
        trainer.train()
    except BaseException as err:
        failure = err
        if not isinstance(err, Preempted):
            raise
    finally:
        result = probes[0].report() if probes else {}  # before close() destroys the DeepSpeed engine
        trainer.close(failure=failure)
        destroy_distributed(keep_process_group=True)
    return result


def _run_jobs(rank: int, world_size: int, jobs: list[tuple[str, list[str]]]) -> list[dict]:
    """Run ``(engine, overrides)`` jobs one after another on these ranks."""
    return [_train(overrides, engine=engine) for engine, overrides in jobs]


# -- equality with the Megatron path ------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny-vanilla", "tiny-mor-e-r3"])
def test_zero_stages_give_the_megatron_losses(tiny_data, tmp_path, preset):
    strict_zero3 = _strict_zero3_json(tmp_path / "zero3_strict.json")
    runs = {
        "megatron": ("megatron", []),
        "zero1": ("deepspeed", ["deepspeed.zero_stage=1"]),
        "zero2": ("deepspeed", [f"deepspeed.config={REPO / 'configs' / 'deepspeed' / 'zero2.json'}"]),
        "zero3": ("deepspeed", [f"deepspeed.config={strict_zero3}"]),
    }
    if preset != "tiny-vanilla":  # tensor parallelism through the mpu adapter: TP=2 x DP=1 on the same 2 ranks
        runs["zero3_tp2"] = ("deepspeed", [f"deepspeed.config={strict_zero3}", "parallel.tensor_parallel_size=2"])
    jobs = [(engine, _base(tiny_data, tmp_path / name, f"preset={preset}", *extra))
            for name, (engine, extra) in runs.items()]
    results = run_ranks(_run_jobs, 2, tmp_path / "ranks", timeout_s=400, jobs=jobs)

    reference = _losses(tmp_path / "megatron")
    reference_val = _losses(tmp_path / "megatron", "val/loss")
    assert len(reference) == STEPS and reference_val.keys() == {2, 4, 5}
    for name in [name for name in runs if name != "megatron"]:
        _assert_close(_losses(tmp_path / name), reference, f"{preset} {name} train loss")
        _assert_close(_losses(tmp_path / name, "val/loss"), reference_val, f"{preset} {name} validation loss")
    params = {name: int(_params(tmp_path / name)["model/params_per_tp_rank/total"]) for name in ("megatron", "zero3")}
    assert params["zero3"] == params["megatron"] > 0, params  # ZeRO-3 counts full parameters, not partitions
    zero3 = results[0][3]
    assert zero3 == {"invalidations": 0, "trace_complete": True, "partitioned": True, "released": True}, zero3
    assert all(result.get("invalidations", 0) == 0 for result in results[0]), results[0]
    resolved = json.loads((tmp_path / "zero3" / "deepspeed_config.json").read_text())
    assert (resolved["train_batch_size"], resolved["gradient_accumulation_steps"]) == (8, 2)


# -- resume and conversion ----------------------------------------------------------------------------------------
def _straight_stopped_resumed(rank: int, world_size: int, straight: list[str], stopped: list[str],
                              resume_argv: list[str]) -> int:
    """5 steps straight; 3 steps then preempted; resumed by ``pretrain_deepspeed.main`` (last: it ends the group)."""
    from mor_megatron.pretrain_deepspeed import main

    _train(straight, engine="deepspeed")
    _train(stopped, engine="deepspeed", stop_after=3)
    return main(resume_argv)


@pytest.fixture(scope="module")
def zero3_jobs(tiny_data, tmp_path_factory):
    """MoR-E ZeRO-3 jobs run once for this module: straight (checkpoint at step 5), stopped at 3 and resumed."""
    root = tmp_path_factory.mktemp("zero3")
    config = f"deepspeed.config={_strict_zero3_json(root / 'zero3_strict.json')}"
    straight = _base(tiny_data, root / "straight", config, f"checkpoint.save_dir={root / 'straight' / 'ckpt'}")
    stopped = _base(tiny_data, root / "resumed", config, f"checkpoint.save_dir={root / 'resumed' / 'ckpt'}",
                    "checkpoint.save_interval=3")
    codes = run_ranks(_straight_stopped_resumed, 2, root / "ranks", timeout_s=400, straight=straight,
                      stopped=stopped, resume_argv=["--config", str(DEMO), *stopped, "--local_rank=0"])
    assert codes == [0, 0]
    return root


def test_zero3_resume_continues_the_exact_loss_sequence(zero3_jobs):
    straight = jsonl_metrics(zero3_jobs / "straight")
    resumed = jsonl_metrics(zero3_jobs / "resumed")
    assert sorted(resumed) == list(range(1, STEPS + 1))  # steps 1-3 before the stop, 4-5 after the resume
    for step in range(1, STEPS + 1):
        for key in ("train/lm_loss", "optim/grad_norm", "optim/lr", "val/loss"):
            if key in straight[step]:
                assert resumed[step][key] == pytest.approx(straight[step][key], rel=0, abs=1e-6), (step, key)
    published = sorted(p.name for p in (zero3_jobs / "resumed" / "ckpt").iterdir() if p.name.startswith("step_"))
    assert published == ["step_00000003", "step_00000005"]
    assert (zero3_jobs / "resumed" / "ckpt" / "latest").read_text() == "step_00000005"


def _evaluate_converted(rank: int, world_size: int, overrides: list[str], converted: str) -> dict:
    """Validation losses of the Megatron path with the converted weights (no DeepSpeed in this process)."""
    from mor_megatron.checkpoint.megatron import Checkpointer
    from mor_megatron.config import load_config
    from mor_megatron.runtime import destroy_distributed, init_distributed
    from mor_megatron.training.megatron_engine import MegatronEngine
    from mor_megatron.training.trainer import Trainer

    config = load_config(DEMO, overrides)
    ctx = init_distributed(config.parallel, seed=config.train.seed + 1)  # other init: the load must matter
    trainer = Trainer(config, ctx, MegatronEngine)
    try:
        trainer.build()
        loop = Checkpointer(save_dir=None, load_dir=converted, keep_last=1, ctx=ctx).load(
            model_chunks=trainer.engine.model_chunks, optimizer=None, scheduler=None)
        return {"step": loop.step, **trainer.evaluate()}
    finally:
        trainer.close()
        destroy_distributed(keep_process_group=True)


def _convert(checkpoint: Path, output: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "mor_megatron.convert.deepspeed_to_megatron", str(checkpoint),
                           str(output)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout.strip().splitlines()[-1]


def test_zero3_checkpoint_converts_and_evaluates_identically_on_the_megatron_path(tiny_data, zero3_jobs, tmp_path):
    converted = _convert(zero3_jobs / "straight" / "ckpt", tmp_path / "megatron")
    assert converted == str(tmp_path / "megatron" / "step_00000005")
    result = run_ranks(_evaluate_converted, 2, tmp_path / "ranks", timeout_s=300,
                       overrides=_base(tiny_data, tmp_path / "eval"), converted=str(tmp_path / "megatron"))[0]
    logged = jsonl_metrics(zero3_jobs / "straight")[STEPS]
    assert result["step"] == STEPS
    assert result["val/loss"] == pytest.approx(logged["val/loss"], rel=0, abs=1e-6)
    assert result["val/loss_causal"] == pytest.approx(logged["val/loss_causal"], rel=0, abs=1e-6)


def test_training_from_a_converted_checkpoint_continues_the_lr_schedule(tiny_data, zero3_jobs, tmp_path):
    # The preempted job's step-3 checkpoint, trained on to step 5 on the Megatron path (fresh optimizer): the LR
    # schedule goes on from step 3, as in the uninterrupted job, instead of restarting its warmup.
    converted = _convert(zero3_jobs / "resumed" / "ckpt" / "step_00000003", tmp_path / "megatron")
    overrides = _base(tiny_data, tmp_path / "continued", f"checkpoint.load_dir={Path(converted).parent}")
    run_ranks(_run_jobs, 2, tmp_path / "ranks", timeout_s=300, jobs=[("megatron", overrides)])
    straight = _losses(zero3_jobs / "straight", "optim/lr")
    expected = {step: straight[step] for step in (4, 5)}
    assert _losses(tmp_path / "continued", "optim/lr") == pytest.approx(expected, rel=1e-9, abs=0)


def _straight_exited_resumed(rank: int, world_size: int, straight: list[str], stopped: list[str]) -> None:
    """5 steps straight; the same job with train.exit_interval=2 (stops after step 2), then rerun without it."""
    _train(straight, engine="deepspeed")
    _train([*stopped, "train.exit_interval=2"], engine="deepspeed")
    _train(stopped, engine="deepspeed")


def test_exit_interval_saves_ends_killed_and_resumes_exactly_with_dropout(tiny_data, tmp_path):
    extra = ["deepspeed.zero_stage=1", "model.hidden_dropout=0.1", "model.attention_dropout=0.1"]
    straight = _base(tiny_data, tmp_path / "straight", *extra)
    stopped = _base(tiny_data, tmp_path / "stopped", *extra, f"checkpoint.save_dir={tmp_path / 'stopped' / 'ckpt'}")
    run_ranks(_straight_exited_resumed, 2, tmp_path / "ranks", timeout_s=400, straight=straight, stopped=stopped)

    records = [json.loads(line) for line in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert [record["status"] for record in records if record["kind"] == "end"] == ["KILLED", "FINISHED"]
    published = sorted(p.name for p in (tmp_path / "stopped" / "ckpt").iterdir() if p.name.startswith("step_"))
    assert published == ["step_00000002", "step_00000005"]
    expected, resumed = jsonl_metrics(tmp_path / "straight"), jsonl_metrics(tmp_path / "stopped")
    assert sorted(resumed) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:  # bit for bit: the dropout masks after the resume are the uninterrupted job's
        for key in ("train/lm_loss", "optim/grad_norm", "optim/lr", "val/loss"):
            assert resumed[step].get(key) == expected[step].get(key), (step, key)


# -- launchers: two nodes on loopback, one MLflow run -------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(commands: list[list[str]], log_dir: Path, timeout_s: float) -> list[int]:
    """Run one process group per command (cwd = repo) until all exit; kill all at the deadline."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    procs = []
    try:
        for index, command in enumerate(commands):
            with (log_dir / f"node{index}.log").open("wb") as log:
                procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return [proc.returncode for proc in procs]


def _two_node_job(tiny_data, root: Path) -> list[str]:
    return ["--config", str(DEMO), *_base(tiny_data, root / "run"), "train.train_steps=3", "train.eval_interval=3",
            "deepspeed.zero_stage=3", "tracking.enabled=true", f"tracking.tracking_uri=sqlite:///{root}/mlflow.db",
            "tracking.experiment=deepspeed-two-nodes", "tracking.system_metrics_interval_s=1"]


def _assert_one_run_from_both_nodes(root: Path, log_dir: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("deepspeed-two-nodes").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/lm_loss")] == [1, 2, 3]
    # Rank 0 logs every node's peak memory: node 1 trained in this run.
    assert {"mem/node0/peak_rss_gib", "mem/node1/peak_rss_gib"} <= run.data.metrics.keys(), (
        sorted(run.data.metrics), (log_dir / "node1.log").read_text()[-3000:])
    # The JSON DeepSpeed ran with, and the JSONL copy, are artifacts; each node copied its system metrics.
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"deepspeed_config.json", "metrics.jsonl"} <= artifacts, artifacts
    copies = sorted(path.name for path in (root / "run" / "system_metrics").glob("*.jsonl"))
    assert copies == ["node0.jsonl", "node1.jsonl"], copies


def test_two_torchrun_nodes_on_loopback_log_one_mlflow_run(tiny_data, tmp_path):
    port = _free_port()
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    commands = [[torchrun, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", "--master-addr",
                 "127.0.0.1", "--master-port", str(port), "-m", "mor_megatron.pretrain_deepspeed",
                 *_two_node_job(tiny_data, tmp_path)] for node in (0, 1)]
    codes = _launch(commands, tmp_path / "logs", timeout_s=300)
    assert codes == [0, 0], (tmp_path / "logs" / "node0.log").read_text()[-6000:]
    _assert_one_run_from_both_nodes(tmp_path, tmp_path / "logs")


@pytest.mark.slow
def test_two_deepspeed_launcher_nodes_without_ssh_log_one_mlflow_run(tiny_data, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = _free_port()
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    commands = [[deepspeed, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--num_nodes", "2",
                 "--num_gpus", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), "--module",
                 "mor_megatron.pretrain_deepspeed", *_two_node_job(tiny_data, tmp_path)] for node in (0, 1)]
    codes = _launch(commands, tmp_path / "logs", timeout_s=400)
    assert codes == [0, 0], (tmp_path / "logs" / "node0.log").read_text()[-6000:]
    _assert_one_run_from_both_nodes(tmp_path, tmp_path / "logs")


# -- slow: 4 ranks (TP=2 x DP=2), CPU offload ---------------------------------------------------------------------
@pytest.mark.slow
def test_tp2_dp2_trains_under_zero2_and_zero3_and_converts(tiny_data, tmp_path):
    tp2 = ["preset=tiny-mor-e-r3", "parallel.tensor_parallel_size=2"]
    zero3_ckpt = tmp_path / "zero3" / "ckpt"
    jobs = [("megatron", _base(tiny_data, tmp_path / "megatron", *tp2)),
            ("deepspeed", _base(tiny_data, tmp_path / "zero2", *tp2, "deepspeed.zero_stage=2")),
            ("deepspeed", _base(tiny_data, tmp_path / "zero3", *tp2,
                                f"deepspeed.config={_strict_zero3_json(tmp_path / 'zero3_strict.json')}",
                                f"checkpoint.save_dir={zero3_ckpt}"))]
    results = run_ranks(_run_jobs, 4, tmp_path / "ranks", timeout_s=600, jobs=jobs)
    reference = _losses(tmp_path / "megatron")
    for name in ("zero2", "zero3"):
        _assert_close(_losses(tmp_path / name), reference, f"TP=2 x DP=2 {name}")
    assert results[0][2]["invalidations"] == 0
    names = {p.name for p in (zero3_ckpt / "step_00000005").iterdir()}
    assert {f"zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt" for d in (0, 1) for t in (0, 1)} <= names

    converted = _convert(zero3_ckpt, tmp_path / "converted")  # one process per TP rank
    result = run_ranks(_evaluate_converted, 2, tmp_path / "eval_ranks", timeout_s=300,
                       overrides=_base(tiny_data, tmp_path / "eval", "preset=tiny-mor-e-r3"),
                       converted=str(Path(converted).parent))[0]
    assert result["val/loss"] == pytest.approx(jsonl_metrics(tmp_path / "zero3")[STEPS]["val/loss"], rel=0, abs=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_zero2_cpu_offload_gives_the_megatron_losses(tiny_data, tmp_path, monkeypatch):
    # DeepSpeedCPUAdam is a C++ op built on first use (minutes); the repository's ignored .cache/ keeps it.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR")
                       or str(REPO / ".cache" / "torch_extensions"))
    offload = REPO / "configs" / "deepspeed" / "zero2_offload.json"
    jobs = [("megatron", _base(tiny_data, tmp_path / "megatron", "preset=tiny-mor-e-r3")),
            ("deepspeed", _base(tiny_data, tmp_path / "offload", "preset=tiny-mor-e-r3",
                                f"deepspeed.config={offload}"))]
    run_ranks(_run_jobs, 2, tmp_path / "ranks", timeout_s=840, jobs=jobs)
    _assert_close(_losses(tmp_path / "offload"), _losses(tmp_path / "megatron"), "ZeRO-2 offload")
