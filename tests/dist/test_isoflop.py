"""``mor-bench isoflop`` end to end at a toy budget: every model and control trains as a tracked run, at the step
count its FLOPs per token buys, and the table, the plot and the MLflow summary come out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.dist.pretrain_job import REPO

pytestmark = [pytest.mark.dist, pytest.mark.timeout(600)]


def test_isoflop_trains_every_model_to_its_budget_and_reports(tiny_data, tmp_path):
    from mlflow.tracking import MlflowClient

    from mor_megatron.bench.isoflop import MODELS

    out = tmp_path / "isoflop"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mor_megatron.cli.bench", "isoflop", "--budgets", "3e10", "--seeds", "1",
               "--seq-length", "64", "--global-batch-size", "4", "--evaluations", "2", "--eval-steps", "1",
               "--data-prefix", str(tiny_data.prefix), "--tokenizer", str(tiny_data.tokenizer),
               "--output-dir", str(out), "--parallel-runs", "2"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "isoFLOP table (FLOPs scope: paper" in done.stdout
    results = json.loads((out / "isoflop_results.json").read_text())
    runs = {run["run"]: run for run in results["runs"]}
    assert len(runs) == len(MODELS) + 3  # every model, and the three MoR models at vanilla's steps
    vanilla = runs["vanilla-3e+10-s1"]
    for run in runs.values():
        # Each run spends (nearly) the budget: steps x tokens x FLOPs per token, short of one step.
        spent = run["steps"] * 4 * 64 * run["flops_per_token"]
        if run["equal_tokens"]:
            assert run["tokens"] == vanilla["tokens"]
        else:
            assert 3e10 - 4 * 64 * run["flops_per_token"] < spent <= 3e10, run["run"]
        assert len(run["curve"]) >= 2 and run["val_loss"] > 0 and run["val_loss_causal"] > 0
    # MoR routes away FLOPs, so the budget buys it more tokens than vanilla; recursion alone does not.
    assert runs["mor-e-r3-3e+10-s1"]["tokens"] > vanilla["tokens"] == runs["recursive-r3-3e+10-s1"]["tokens"]
    assert runs["recursive-r3-3e+10-s1"]["unique_params"] < vanilla["unique_params"]
    assert (out / "isoflop_val_loss.png").read_bytes()[:4] == b"\x89PNG"

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    experiment = client.get_experiment_by_name("mor_isoflop")
    tracked = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) | {"isoflop-summary"} == set(tracked)
    history = client.get_metric_history(tracked["mor-e-r3-3e+10-s1"].info.run_id, "val/loss")
    assert len(history) == len(runs["mor-e-r3-3e+10-s1"]["curve"])
    summary = tracked["isoflop-summary"].info.run_id
    assert {a.path for a in client.list_artifacts(summary, "isoflop")} == {
        "isoflop/table.txt", "isoflop/table.json", "isoflop/isoflop_val_loss.png"}
