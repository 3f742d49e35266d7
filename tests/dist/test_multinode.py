"""Two-node pretraining on loopback: two torchrun agents (``--nnodes 2``, static rendezvous on 127.0.0.1).

Each agent is one "node" with one process, so the job is 2 data-parallel ranks on 2 nodes sharing the output
and checkpoint folders, as on a cluster with a shared filesystem. The job must train, write one complete
checkpoint with both ranks' shards, and log one MLflow run (on a real server) with per-node memory and
system metrics of both nodes.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.dist.mlflow_server import free_port, mlflow_server
from tests.dist.pretrain_job import pretrain_command, tiny_job_overrides, torchrun_agents, wait_all

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]

_JOB_TIMEOUT_S = 180


@pytest.fixture(autouse=True)
def _bounded_client_http(monkeypatch):
    """The test's own MlflowClient: 5 s per request and one retry (MLflow's defaults add up to minutes)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")


def test_two_nodes_train_checkpoint_and_log_one_run(tiny_data, tmp_path):
    from mlflow.tracking import MlflowClient

    from mor_megatron.tracking import metrics as m
    from mor_megatron.checkpoint.layout import find_latest_step
    from mor_megatron.checkpoint.megatron import COMPLETE_MARKER

    steps, eval_interval, experiment = 4, 2, "multinode"
    output_dir = tmp_path / "run"
    save_dir = output_dir / "ckpt"
    with mlflow_server(tmp_path / "server") as server:
        overrides = tiny_job_overrides(tiny_data.overrides(), output_dir=output_dir, tracking_uri=server.uri,
                                       train_steps=steps, eval_interval=eval_interval, experiment=experiment)
        port = free_port()
        commands = [pretrain_command(master_port=port, nnodes=2, node_rank=node, nproc_per_node=1,
                                     overrides=overrides) for node in (0, 1)]
        with torchrun_agents(commands, tmp_path / "logs") as agents:
            exit_codes = wait_all(agents, _JOB_TIMEOUT_S)
            assert exit_codes == [0, 0], "\n".join(agent.report() for agent in agents)
        for agent in agents:
            assert "MLflow tracking at" not in agent.stderr.read_text(), agent.report()

        # One complete checkpoint at the last step, with shards written by the ranks of both nodes.
        assert (save_dir / "latest").read_text().strip() == str(steps)
        assert find_latest_step(save_dir, COMPLETE_MARKER) == steps
        step_dir = save_dir / f"step_{steps:08d}"
        assert (step_dir / "metadata.json").is_file()
        # torch.distributed.checkpoint names shard files __<rank>_<n>.distcp.
        shards = [re.fullmatch(r"__(\d+)_\d+\.distcp", path.name) for path in step_dir.iterdir()]
        writers = {shard.group(1) for shard in shards if shard}
        assert writers == {"0", "1"}, sorted(path.name for path in step_dir.iterdir())

        # Only the logging rank (node 0) writes the JSONL copy: one line per step, not one per node.
        records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
        train_lines = [r["step"] for r in records
                       if r["kind"] == "metrics" and m.TRAIN_LM_LOSS in r["metrics"]]
        assert train_lines == list(range(1, steps + 1))

        client = MlflowClient(server.uri)
        runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert len(runs) == 1, [r.info.run_id for r in runs]
        run = runs[0]
        assert run.info.status == "FINISHED"
        assert run.data.params["runtime.num_nodes"] == "2" and run.data.params["runtime.world_size"] == "2"

        def steps_of(key: str) -> list[int]:
            return sorted(metric.step for metric in client.get_metric_history(run.info.run_id, key))

        every = list(range(1, steps + 1))
        for key in (m.TRAIN_LM_LOSS, m.TIME_TRAIN_S, m.node_key(m.MEM_PEAK_RSS_GIB, 0),
                    m.node_key(m.MEM_PEAK_RSS_GIB, 1), m.job_max_key(m.MEM_PEAK_RSS_GIB)):
            assert steps_of(key) == every, key
        assert steps_of(m.VAL_LOSS) == steps_of(m.VAL_LOSS_CAUSAL) == [2, 4]
        # Each node's local rank 0 samples its own node into the same run.
        system_nodes = {key.split("/")[1] for key in run.data.metrics if key.startswith("system/")}
        assert system_nodes == {"node0", "node1"}, sorted(run.data.metrics)
        for node in ("node0", "node1"):
            assert steps_of(f"system/{node}/cpu_utilization_percentage"), node
