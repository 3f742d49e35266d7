"""Run names, one point per step after a resume, system metrics in the JSONL copy, ``mor-track replay`` on a
local sqlite store, parameter totals with a tied embedding, and the console banner/summary."""

from __future__ import annotations

import json
import random
import time

import pytest
import torch

from mor_megatron.config import TrackingConfig, config_from_dict
from mor_megatron.tracking import metrics as m
from mor_megatron.tracking.mlflow import FAILURE_TAG, LoggedSteps
from mor_megatron.tracking.replay import read_run_copies, replay
from mor_megatron.tracking.run_info import default_run_name
from mor_megatron.tracking.sinks import JsonlSink, read_jsonl
from mor_megatron.tracking.start import start_tracking
from mor_megatron.training.console import (
    RunFacts,
    RunOutcome,
    eta_seconds,
    format_duration,
    mlflow_run_url,
    run_summary,
    startup_banner,
)

_CONFIG = {"preset": "tiny-mor-e-r3", "model": {"hidden_size": 64}, "output_dir": "runs/x"}


@pytest.fixture(autouse=True)
def _isolated_mlflow_env(monkeypatch):
    """The sinks set MLflow's HTTP variables in os.environ; monkeypatch restores the originals afterwards."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
                 "MLFLOW_SYSTEM_METRICS_NODE_ID", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "MOR_STDOUT_LOG",
                 "LOCAL_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory):
    """One sqlite store for the module: creating its tables takes a second or two."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _steps(path, key=m.TRAIN_LM_LOSS) -> list[int]:
    return [r["step"] for r in read_jsonl(path) if r.get("kind") == "metrics" and key in r["metrics"]]


def _history(client, run_id, key=m.TRAIN_LM_LOSS) -> list[tuple[int, float]]:
    return sorted((h.step, h.value) for h in client.get_metric_history(run_id, key))


# ------------------------------------------------------------------------------------------------------------
# Names.

def test_run_names_differ_although_random_is_seeded():
    random.seed(1234)
    first = default_run_name(_CONFIG)
    random.seed(1234)
    second = default_run_name(_CONFIG)
    assert first != second and first.startswith("tiny-mor-e-r3-") and second.startswith("tiny-mor-e-r3-")
    assert default_run_name({"output_dir": "runs/ablation_a"}).startswith("ablation_a-")


def test_each_job_gets_its_own_explicit_run_name(tmp_path, sqlite_uri):
    from mlflow.tracking import MlflowClient

    cfg = TrackingConfig(tracking_uri=sqlite_uri, experiment="names", system_metrics=False)
    names = []
    for job in ("a", "b"):
        random.seed(1234)  # what training does before tracking starts
        sink, run_id = start_tracking(cfg, run_dir=tmp_path / job, config_dict=_CONFIG, resume_run_id=None,
                                      is_logging_rank=True)
        sink.close()
        names.append(MlflowClient(sqlite_uri).get_run(run_id).info.run_name)
        record = read_jsonl(tmp_path / job / "metrics.jsonl")[0]
        assert record["kind"] == "run" and record["run_id"] == run_id and record["run_name"] == names[-1]
    assert names[0] != names[1] and all(name.startswith("tiny-mor-e-r3-") for name in names)


# ------------------------------------------------------------------------------------------------------------
# One point per step after a resume.

def test_resumed_jsonl_drops_what_the_interrupted_attempt_logged_past_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    earlier = JsonlSink(path)  # an older run in the same output_dir: never touched
    earlier.log_run(run_id="old", run_name=None, experiment=None, tracking_uri=None, start_step=0)
    earlier.log_metrics({m.TRAIN_LM_LOSS: 9.0}, 20)
    earlier.close()
    crashed = JsonlSink(path)
    crashed.log_run(run_id="r", run_name=None, experiment=None, tracking_uri=None, start_step=0)
    for step in range(1, 9):
        crashed.log_metrics({m.TRAIN_LM_LOSS: 10.0 - step}, step)
    crashed._file.write('{"kind": "metrics", "step": 9, "metr')  # killed mid-write
    crashed._file.flush()

    resumed = JsonlSink(path, resume_step=5)  # the checkpoint is from step 5
    assert resumed.superseded_step == 8
    resumed.log_run(run_id="r", run_name=None, experiment=None, tracking_uri=None, start_step=5)
    for step in range(6, 11):
        resumed.log_metrics({m.TRAIN_LM_LOSS: 0.5}, step)
    resumed.close()
    assert _steps(path) == [20, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert [r["step"] for r in read_jsonl(path.with_name("metrics.jsonl.superseded"))] == [6, 7, 8]
    assert all(line.startswith("{") for line in path.read_text().splitlines())  # the cut-off line is gone


def test_logged_steps_skip_what_the_run_holds():
    known = LoggedSteps({"a": 8}, None)
    assert not known.is_new("a", 8) and known.is_new("a", 9) and known.is_new("b", 1)
    unknown = LoggedSteps({}, 8)  # the server was down at resume: the JSONL says up to step 8 may be there
    assert not unknown.is_new("a", 8) and unknown.is_new("b", 9)


def test_resumed_run_holds_each_step_once_in_jsonl_and_mlflow(tmp_path, sqlite_uri):
    from mlflow.tracking import MlflowClient

    cfg = TrackingConfig(tracking_uri=sqlite_uri, experiment="resume-dedupe", system_metrics=False)
    sink, run_id = start_tracking(cfg, run_dir=tmp_path, config_dict=_CONFIG, resume_run_id=None,
                                  is_logging_rank=True)
    for step in range(1, 9):  # checkpoint at 5, crash after 8
        sink.log_metrics({m.TRAIN_LM_LOSS: 10.0 - step}, step)
    sink.close(status="FAILED")
    sink, resumed_id = start_tracking(cfg, run_dir=tmp_path, config_dict=_CONFIG, resume_run_id=run_id,
                                      resume_step=5, is_logging_rank=True)
    for step in range(6, 11):
        sink.log_metrics({m.TRAIN_LM_LOSS: 0.5, m.VAL_LOSS: 0.25}, step)
    sink.close()
    client = MlflowClient(sqlite_uri)
    assert resumed_id == run_id and client.get_run(run_id).info.status == "FINISHED"
    # MLflow cannot delete a point: steps 6-8 keep the first attempt's values; the JSONL has the resumed ones.
    assert _history(client, run_id) == [(s, 10.0 - s) for s in range(1, 9)] + [(9, 0.5), (10, 0.5)]
    assert [s for s, _ in _history(client, run_id, m.VAL_LOSS)] == [6, 7, 8, 9, 10]
    assert _steps(tmp_path / "metrics.jsonl") == list(range(1, 11))
    summary = replay(tmp_path / "metrics.jsonl")
    assert summary["runs"][0]["points_uploaded"] == 0  # nothing missing, nothing duplicated


# ------------------------------------------------------------------------------------------------------------
# System metrics in the JSONL copy.

def test_system_metrics_reach_a_per_node_jsonl_at_their_mlflow_steps(tmp_path, sqlite_uri):
    from mlflow.tracking import MlflowClient

    cfg = TrackingConfig(tracking_uri=sqlite_uri, experiment="system-copy", system_metrics_interval_s=0.2)
    sink, run_id = start_tracking(cfg, run_dir=tmp_path, config_dict=_CONFIG, resume_run_id=None,
                                  is_logging_rank=True, node_id="node3", local_rank=0)
    time.sleep(0.7)
    sink.close()
    key = "system/node3/cpu_utilization_percentage"
    copy = tmp_path / "system_metrics" / "node3.jsonl"
    assert read_jsonl(copy)[0] == {**read_jsonl(copy)[0], "kind": "run", "run_id": run_id}
    on_server = sorted(h.step for h in MlflowClient(sqlite_uri).get_metric_history(run_id, key))
    assert on_server and _steps(copy, key) == on_server


# ------------------------------------------------------------------------------------------------------------
# Replay.

def _job_with_outage(tmp_path, sqlite_uri, experiment):
    """A run whose server 'missed' steps 3-6 (logged to the JSONL only) and the job's end status."""
    from mlflow.tracking import MlflowClient

    cfg = TrackingConfig(tracking_uri=sqlite_uri, experiment=experiment, system_metrics=False)
    sink, run_id = start_tracking(cfg, run_dir=tmp_path, config_dict=_CONFIG, resume_run_id=None,
                                  is_logging_rank=True)
    mlflow_sink, jsonl = sink.sinks
    for step in range(1, 9):
        metrics = {m.TRAIN_LM_LOSS: 4.0 / step, m.TRAIN_TOKENS_CONSUMED: 512.0 * step}
        jsonl.log_metrics(metrics, step)
        if not 3 <= step <= 6:
            mlflow_sink.log_metrics(metrics, step)
    mlflow_sink.close(status="RUNNING")  # the server died before the end: the run stays RUNNING
    jsonl.close(status="FAILED", reason="RuntimeError: Connection reset by peer")
    return MlflowClient(sqlite_uri), run_id


def test_replay_uploads_only_missing_points_sets_status_and_is_idempotent(tmp_path, sqlite_uri):
    client, run_id = _job_with_outage(tmp_path, sqlite_uri, "replay-unit")
    assert [s for s, _ in _history(client, run_id)] == [1, 2, 7, 8]
    first = replay(tmp_path / "metrics.jsonl")["runs"][0]
    assert first == {**first, "run_id": run_id, "points_in_copy": 16, "points_uploaded": 8,
                     "status_set": "FAILED"}
    assert _history(client, run_id) == [(s, 4.0 / s) for s in range(1, 9)]
    assert [s for s, _ in _history(client, run_id, m.TRAIN_TOKENS_CONSUMED)] == list(range(1, 9))
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags[FAILURE_TAG] == "RuntimeError: Connection reset by peer"
    second = replay(tmp_path / "metrics.jsonl")["runs"][0]
    assert second["points_uploaded"] == 0 and second["params_uploaded"] == 0 and second["status_set"] is None
    assert len(client.get_metric_history(run_id, m.TRAIN_LM_LOSS)) == 8


def test_replay_cli_reports_json_and_refuses_bad_input(tmp_path, sqlite_uri, capsys):
    from mor_megatron.cli.track import main

    _job_with_outage(tmp_path, sqlite_uri, "replay-cli")
    assert main(["replay", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["runs"][0]["points_uploaded"] == 8 and summary["records_without_run"] == 0
    assert main(["replay", str(tmp_path / "missing")]) == 2
    assert "no metrics JSONL" in capsys.readouterr().err
    JsonlSink(tmp_path / "off" / "metrics.jsonl").close()  # tracking off: no run to replay into
    assert main(["replay", str(tmp_path / "off")]) == 2


def test_read_run_copies_splits_records_by_run_and_takes_the_last_attempts_status(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.log_metrics({"x": 1.0}, 1)  # before any run record (an old file): counted, not uploaded
    for run_id, status in (("a", "FAILED"), ("b", "FINISHED"), ("a", None)):
        sink.log_run(run_id=run_id, run_name=None, experiment=None, tracking_uri="sqlite:///x", start_step=0)
        sink.log_metrics({"x": 2.0}, 2)
        if status:
            sink._write({"kind": "end", "time": 1.0, "status": status})
    runs, orphans = read_run_copies(path)
    assert orphans == 1 and set(runs) == {"a", "b"}
    assert runs["a"].status is None and runs["b"].status == "FINISHED"  # a's resumed attempt left no end


# ------------------------------------------------------------------------------------------------------------
# Parameter totals and console output.

def test_tied_embedding_copy_on_the_last_stage_is_counted_once():
    first = torch.nn.Embedding(10, 4)
    first.weight.shared_embedding = True
    last = torch.nn.Linear(4, 10, bias=False)
    last.weight.shared, last.weight.shared_embedding = True, True
    block = torch.nn.Linear(4, 4)
    stages = [m.held_parameters([first.weight, block.weight, block.bias]),
              m.held_parameters([block.weight, block.bias, last.weight])]
    assert stages == [(60, 0), (60, 40)]
    counts = m.parameter_count_metrics(stages)
    assert counts[m.MODEL_PARAMS_TOTAL] == 80.0 and counts[f"{m.MODEL_PARAMS_STAGE_PREFIX}1"] == 60.0


def test_eta_duration_and_run_url():
    assert format_duration(3725.2) == "1:02:05" and format_duration(-1) == "0:00:00"
    assert eta_seconds(train_time_s=10.0, steps_done=5, train_steps=20) == pytest.approx(30.0)
    assert eta_seconds(train_time_s=0.0, steps_done=0, train_steps=20) is None
    assert mlflow_run_url("http://10.0.0.1:5000/", "abc") == "http://10.0.0.1:5000/#/runs/abc"
    assert mlflow_run_url("sqlite:///x.db", "abc") is None


def test_banner_and_summary_say_what_ran_and_where_things_are(tmp_path):
    cfg = config_from_dict({"preset": "tiny-mor-e-r3", "output_dir": str(tmp_path / "run"),
                            "checkpoint": {"save_dir": str(tmp_path / "ckpt")}, "train": {"train_steps": 100}})
    facts = RunFacts(total_params=1234567, params_per_stage=[700000, 600000], flops_per_token=3.2e7,
                     world_size=4, tp=1, pp=2, dp=2, tracking_uri="http://127.0.0.1:5000", run_id="r1",
                     resumed_step=40)
    banner = startup_banner(cfg, facts)
    for text in ("tiny-mor-e-r3", "1,234,567", "700,000 + 600,000", "recursions", "TP 1 x PP 2 x DP 2",
                 "resuming after step 40", str(tmp_path / "run"), "http://127.0.0.1:5000/#/runs/r1"):
        assert text in banner, text
    outcome = RunOutcome(steps_done=100, train_steps=100, tokens_consumed=204800, wall_time_s=65.0,
                         train_time_s=3700.0, val_losses=[(50, 2.5), (100, 2.7)], stop_reason=None)
    summary = run_summary(cfg, outcome, tmp_path / "run" / "metrics.jsonl")
    for text in ("finished: step 100/100", "204,800 tokens", "0:01:05 wall", "1:01:40 training",
                 "last 2.7000 (step 100)", "best 2.5000 (step 50)", str(tmp_path / "ckpt"), "metrics.jsonl",
                 "config.yaml"):
        assert text in summary, text
