"""Real Megatron pretraining on 2 CPU processes (``torchrun -m mor_megatron.pretrain``), real MLflow server.

The first test reads the job's one MLflow run back through ``MlflowClient``: training time, step time, peak
memory, losses, router statistics, validation with both routings, system metrics tagged by node, the
resolved config as params, a depth map at each evaluation, the training data as a dataset input, and the link
that ``mor-convert to-hf`` puts on the run.

The second kills the server once metrics arrive (then leaves its port hanging, so
every later request waits out its timeout) and checks that training still exits 0 without waiting on it, with
every metric in ``<output_dir>/metrics.jsonl`` and one warning naming the tracking URI.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from tests.dist.mlflow_server import free_port, mlflow_server, silent_port
from tests.dist.pretrain_job import (
    DEMO_CONFIG,
    Agent,
    pretrain_command,
    tiny_job_overrides,
    torchrun_agents,
    wait_all,
)

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]

_EXPERIMENT = "pretrain-tracking"
# Startup (imports, data, model) dominates: ~10 s idle, a few times that on a loaded machine.
_JOB_TIMEOUT_S = 180


@pytest.fixture(autouse=True)
def _bounded_client_http(monkeypatch):
    """The test's own MlflowClient: 5 s per request and one retry (MLflow's defaults add up to minutes)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _metrics_by_step(records: list[dict]) -> dict[int, dict[str, float]]:
    """Merge the JSONL ``metrics`` lines per step (a step's training and validation metrics are two lines)."""
    out: dict[int, dict[str, float]] = {}
    for record in records:
        if record["kind"] == "metrics":
            out.setdefault(record["step"], {}).update(record["metrics"])
    return out


def test_two_process_training_logs_one_complete_run(tiny_data, tmp_path):
    from mlflow.tracking import MlflowClient

    from mor_megatron.config import config_to_dict, load_config
    from mor_megatron.tracking import metrics as m
    from mor_megatron.tracking.run_info import flatten_params

    steps, eval_interval = 6, 3
    output_dir = tmp_path / "run"
    with mlflow_server(tmp_path / "server") as server:
        overrides = tiny_job_overrides(tiny_data.overrides(), output_dir=output_dir, tracking_uri=server.uri,
                                       train_steps=steps, eval_interval=eval_interval, experiment=_EXPERIMENT)
        command = pretrain_command(master_port=free_port(), nproc_per_node=2, overrides=overrides)
        with torchrun_agents([command], tmp_path / "logs") as agents:
            assert wait_all(agents, _JOB_TIMEOUT_S) == [0], agents[0].report()
        stderr = agents[0].stderr.read_text()
        assert "MLflow tracking at" not in stderr, agents[0].report()

        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name(_EXPERIMENT)
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 1, [r.info.run_id for r in runs]
        run = runs[0]
        run_id = run.info.run_id
        assert run.info.status == "FINISHED"

        def history(key: str) -> dict[int, float]:
            return {metric.step: metric.value for metric in client.get_metric_history(run_id, key)}

        every = list(range(1, steps + 1))
        per_step = (m.TIME_TRAIN_S, m.PERF_STEP_TIME_S, m.PERF_TOKENS_PER_S, m.PERF_TFLOPS_PER_DEVICE,
                    m.MEM_PEAK_RSS_GIB, m.job_max_key(m.MEM_PEAK_RSS_GIB), m.node_key(m.MEM_PEAK_RSS_GIB, 0),
                    m.TRAIN_LM_LOSS, "router/active_frac/r2", m.OPTIM_LR, m.OPTIM_GRAD_NORM)
        series = {key: history(key) for key in per_step}
        for key, values in series.items():
            assert sorted(values) == every, key
            assert all(math.isfinite(v) for v in values.values()), (key, values)
        for key in (m.VAL_LOSS, m.VAL_LOSS_CAUSAL, m.VAL_PPL, m.VAL_PPL_CAUSAL):
            assert sorted(history(key)) == [3, 6], key
        # Training time is the running sum of the job's step times (evaluation and checkpointing excluded).
        step_times = series[m.PERF_STEP_TIME_S]
        for step in every:
            elapsed = sum(step_times[s] for s in range(1, step + 1))
            assert series[m.TIME_TRAIN_S][step] == pytest.approx(elapsed)
        rss, job_max = series[m.MEM_PEAK_RSS_GIB], series[m.job_max_key(m.MEM_PEAK_RSS_GIB)]
        assert all(0.05 < rss[s] <= job_max[s] < 64 for s in every), (rss, job_max)
        assert all(0.0 < series["router/active_frac/r2"][s] < 1.0 for s in every)  # capacity below 1 at r2
        # The server holds exactly what the JSONL copy holds.
        written = _metrics_by_step(_jsonl(output_dir / "metrics.jsonl"))
        assert {s: written[s][m.TRAIN_LM_LOSS] for s in every} == series[m.TRAIN_LM_LOSS]

        # System metrics: one node, sampled by its local rank 0 only.
        system_keys = [key for key in run.data.metrics if key.startswith("system/")]
        assert {key.split("/")[1] for key in system_keys} == {"node0"}, system_keys
        assert history("system/node0/cpu_utilization_percentage")
        assert "system/node0/system_memory_usage_megabytes" in run.data.metrics

        # Params: the resolved config (preset expanded, overrides applied) plus runtime facts.
        resolved = flatten_params(config_to_dict(load_config(DEMO_CONFIG, overrides)))
        params = run.data.params
        assert {key: params.get(key) for key in resolved} == resolved
        assert params["train.train_steps"] == str(steps) and params["model.hidden_size"] != "null"
        assert params["runtime.world_size"] == "2" and params["runtime.num_nodes"] == "1"
        assert {"config.yaml", "metrics.jsonl"} <= {artifact.path for artifact in client.list_artifacts(run_id)}
        assert run.data.tags["mlflow.source.git.commit"] == params["runtime.git_commit"]
        assert run.info.run_name.startswith(params["preset"] + "-")  # <preset>-<UTC time>-<random hex>

        # Tokens and FLOPs consumed: the x-axis for comparing MoR with vanilla.
        tokens = history(m.TRAIN_TOKENS_CONSUMED)
        assert tokens == {s: float(s * 8 * 64) for s in every}  # global batch 8 x 64 tokens per step
        flops = history(m.TRAIN_FLOPS_CONSUMED)
        assert flops[steps] / tokens[steps] == pytest.approx(flops[1] / tokens[1]) and flops[1] > 0
        # Rank 0's console: banner (with the run), an ETA per iteration, the end summary.
        stdout = agents[0].stdout.read_text()
        assert f"run {run_id} at {server.uri}" in stdout and "ETA: " in stdout, stdout[-3000:]
        assert f"run finished: step {steps}/{steps}" in stdout and "best " in stdout, stdout[-3000:]

        # A depth map of the fixed text at each evaluation (expert-choice: training and causal routing).
        depth_files = {artifact.path for artifact in client.list_artifacts(run_id, "depth")}
        assert depth_files == {f"depth/step_{step:06d}{routing}.{ext}" for step in (3, 6)
                               for routing in ("", "_causal") for ext in ("html", "png", "json")}, depth_files
        for key in (*m.DEPTH_KEYS, *m.DEPTH_CAUSAL_KEYS):
            if key.endswith(("/mean", "/word", "/space_punct")):  # the default text has words and spaces
                assert sorted(history(key)) == [3, 6], key
                assert all(0.0 <= v <= 3.0 for v in history(key).values()), key
        # The training data as a dataset input: the run list's Dataset column.
        (dataset_input,) = run.inputs.dataset_inputs
        assert {(tag.key, tag.value) for tag in dataset_input.tags} == {("mlflow.data.context", "training")}
        assert json.loads(dataset_input.dataset.profile)["prefixes"] and dataset_input.dataset.digest

        # The HF export names its run, and the run names the export.
        from mor_megatron.convert.to_hf import to_hf
        from mor_megatron.tracking.mlflow import EXPORT_TAG

        summary = to_hf(output_dir / "ckpt", tmp_path / "hf", include_tokenizer=False)
        assert summary.mlflow_run_id == run_id and summary.mlflow_linked, summary
        assert client.get_run(run_id).data.tags[EXPORT_TAG] == str((tmp_path / "hf").resolve())
        assert [a.path for a in client.list_artifacts(run_id, "exports")] == ["exports/hf.json"]


def test_server_killed_mid_run_training_finishes(tiny_data, tmp_path):
    from mlflow.tracking import MlflowClient

    from mor_megatron.tracking import metrics as m

    # Steps take ~50 ms; under load the server can receive the first loss seconds after it was logged, so the
    # job must last long enough for the kill to land mid-run.
    steps, eval_interval = 30, 10
    timeout_s, retry_after_s, close_timeout_s = 2, 120, 60
    output_dir = tmp_path / "run"
    jsonl = output_dir / "metrics.jsonl"
    with mlflow_server(tmp_path / "server") as server:
        overrides = tiny_job_overrides(tiny_data.overrides(), output_dir=output_dir, tracking_uri=server.uri,
                                       train_steps=steps, eval_interval=eval_interval, experiment=_EXPERIMENT)
        overrides += [f"tracking.timeout_s={timeout_s}", f"tracking.retry_after_s={retry_after_s}",
                      f"tracking.close_timeout_s={close_timeout_s}"]
        command = pretrain_command(master_port=free_port(), nproc_per_node=2, overrides=overrides)
        with torchrun_agents([command], tmp_path / "logs") as agents:
            agent = agents[0]
            _wait_for_first_loss(MlflowClient(server.uri), agent, deadline=time.monotonic() + _JOB_TIMEOUT_S)
            server.kill()
            killed_at = time.time()
            steps_before_kill = len(_metrics_by_step(_jsonl(jsonl)))
            # From now on every request waits out its timeout: the costly way for a server to be gone.
            with silent_port(server.uri):
                assert wait_all(agents, _JOB_TIMEOUT_S) == [0], agent.report()
        assert steps_before_kill < steps, "the server was killed after training ended; nothing was tested"

        records = _jsonl(jsonl)
        written = _metrics_by_step(records)
        every = list(range(1, steps + 1))
        assert sorted(written) == every
        for step in every:
            for key in (m.TRAIN_LM_LOSS, m.TIME_TRAIN_S, m.PERF_STEP_TIME_S, m.MEM_PEAK_RSS_GIB, m.OPTIM_LR):
                assert key in written[step], (step, key)
        val_steps = [s for s in every if m.VAL_LOSS in written[s] and m.VAL_LOSS_CAUSAL in written[s]]
        assert val_steps == list(range(eval_interval, steps + 1, eval_interval))
        end = records[-1]
        assert end["kind"] == "end" and end["status"] == "FINISHED"

        # One warning, naming the tracking URI and where the metrics still are.
        stderr = agent.stderr.read_text()
        warnings = [line for line in stderr.splitlines() if "MLflow tracking at" in line]
        assert len(warnings) == 1, agent.report()
        assert server.uri in warnings[0] and str(jsonl) in warnings[0]
        assert "Traceback" not in stderr, agent.report()

        # The outage cost no training time: no step waited on the hanging server (a blocking MLflow call costs
        # at least timeout_s).
        for step in every[1:]:
            if _line_times(records, step - 1)[-1] > killed_at:
                gap = _line_times(records, step)[0] - _line_times(records, step - 1)[-1]
                assert gap - written[step][m.PERF_STEP_TIME_S] < timeout_s, (step, gap)
        # After the kill, the wall time outside training steps is evaluation and checkpointing (~2 s idle,
        # allow 15 s) plus closing: the run's final status call (2 attempts of timeout_s) and the
        # system-metrics thread (joined for at most 10 s). Far below close_timeout_s, which a close waiting
        # on the queue of dropped calls would use up.
        train_s = {s: written[s][m.TIME_TRAIN_S] for s in every}
        last_before_kill = max([s for s in every if _line_times(records, s)[0] <= killed_at], default=0)
        training_after_kill = train_s[steps] - train_s.get(last_before_kill, 0.0)
        other_after_kill = end["time"] - killed_at - training_after_kill
        assert other_after_kill < 15 + (2 * timeout_s + 1) + 10 < close_timeout_s, (other_after_kill,
                                                                                   training_after_kill)


def _wait_for_first_loss(client, agent: Agent, deadline: float) -> None:
    """Return once the server holds the job's first training loss; fail if the job ends or time runs out.

    A step takes ~50 ms on an idle machine, so once the run exists only its loss history is polled, quickly.
    """
    run_id = None
    while run_id is None or not client.get_metric_history(run_id, "train/lm_loss"):
        assert agent.proc.poll() is None, f"the job ended before a loss reached the server\n{agent.report()}"
        assert time.monotonic() < deadline, f"no loss on the server in {_JOB_TIMEOUT_S} s\n{agent.report()}"
        if run_id is None:
            experiment = client.get_experiment_by_name(_EXPERIMENT)
            runs = client.search_runs([experiment.experiment_id]) if experiment is not None else []
            run_id = runs[0].info.run_id if runs else None
        time.sleep(0.2 if run_id is None else 0.02)


def _line_times(records: list[dict], step: int) -> list[float]:
    """When the metrics lines of ``step`` were written (unix seconds): training first, then validation."""
    return [r["time"] for r in records if r["kind"] == "metrics" and r["step"] == step]
