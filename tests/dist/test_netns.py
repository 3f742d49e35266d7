"""Multi-node training between two real network hosts: namespaces joined by a veth pair (tests/dist/netns.py).

The launch is the documented one (``NNODES=2 NODE_RANK=k MASTER_ADDR=<node 0's address>
tools/launch_torchrun.sh ...`` on each host, and the DeepSpeed launcher's per-node form), with no extra
environment. The hostname resolves to 127.0.0.1 here, so the jobs train only if the launch picks the
interface that routes to MASTER_ADDR. Then the failures that clusters see:

* a dead peer (every process of the second host killed with SIGKILL) and a cut link (the veth pair taken down
  mid-run, with ``parallel.collective_timeout_s=60``): every process on both hosts is gone within the bound,
  the run is marked FAILED with the reason, and relaunching both hosts resumes from the newest complete
  checkpoint with the losses of a run that was never interrupted;
* a wrong MASTER_ADDR: both hosts stop within 60 s with a line that names it.

Skipped with the reason where namespaces cannot be made (not root, no iproute2).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from mor_megatron.checkpoint.layout import find_latest_step
from mor_megatron.checkpoint.megatron import COMPLETE_MARKER
from mor_megatron.tracking.mlflow import FAILURE_TAG
from tests.dist.netns import Host, netns_unavailable, two_hosts, wait_until_empty
from tests.dist.pretrain_job import DEMO_CONFIG, REPO, jsonl_metrics, torchrun_agents, wait_all

_UNAVAILABLE = netns_unavailable()
pytestmark = [pytest.mark.dist, pytest.mark.timeout(600),
              pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"two-host tests: {_UNAVAILABLE}")]

STEPS = 16
SAVE_INTERVAL = 4
COLLECTIVE_TIMEOUT_S = 60
_JOB_TIMEOUT_S = 240
_EXACT_PREFIXES = ("train/", "optim/", "val/")
_ZERO2 = REPO / "configs" / "deepspeed" / "zero2.json"


def _overrides(tiny_data, output_dir: Path, *extra: str) -> list[str]:
    """A tiny fp32 MoR-E job on 2 data-parallel ranks, checkpointing every SAVE_INTERVAL steps."""
    return [*tiny_data.overrides(), "train.seq_length=64", "train.global_batch_size=8", "train.micro_batch_size=2",
            "train.precision=fp32", f"train.train_steps={STEPS}", "train.log_interval=1",
            f"train.eval_interval={STEPS // 2}", "train.eval_steps=1", "optim.warmup_steps=2",
            f"checkpoint.save_interval={SAVE_INTERVAL}", f"checkpoint.save_dir={output_dir / 'ckpt'}",
            "tracking.system_metrics=false", f"tracking.tracking_uri=sqlite:///{output_dir / 'mlflow.db'}",
            f"output_dir={output_dir}", *extra]


def _launch(script: str, host: Host | None, env: dict[str, str], args: list[str]) -> list[str]:
    """The documented command line: ``VAR=... tools/<script> --config configs/demo.yaml args`` on ``host``."""
    command = ["env", f"PYTHON={sys.executable}", *(f"{k}={v}" for k, v in env.items()),
               "bash", str(REPO / "tools" / script), "--config", str(DEMO_CONFIG), *args]
    return host.command(command) if host is not None else command


def _torchrun_node(host: Host, node_rank: int, master_addr: str, args: list[str]) -> list[str]:
    env = {"NNODES": "2", "NODE_RANK": str(node_rank), "MASTER_ADDR": master_addr, "GPUS_PER_NODE": "1",
           "MASTER_PORT": "29510"}
    return _launch("launch_torchrun.sh", host, env, args)


def _exact_values(output_dir: Path) -> dict[int, dict[str, float]]:
    return {step: {k: v for k, v in values.items() if k.startswith(_EXACT_PREFIXES)}
            for step, values in jsonl_metrics(output_dir).items()}


def _end_records(output_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [record for record in records if record["kind"] == "end"]


def _last_step(output_dir: Path) -> int:
    path = output_dir / "metrics.jsonl"
    return max(jsonl_metrics(output_dir), default=0) if path.exists() else 0


def _wait_for_step(output_dir: Path, agents, step: int) -> None:
    deadline = time.monotonic() + _JOB_TIMEOUT_S
    while _last_step(output_dir) < step:
        assert all(agent.proc.poll() is None for agent in agents), "\n".join(a.report() for a in agents)
        assert time.monotonic() < deadline, "\n".join(a.report() for a in agents)
        time.sleep(0.1)


def _mlflow_run(output_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{output_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [run.info.run_id for run in runs]
    return runs[0]


@pytest.fixture(scope="module")
def hosts():
    with two_hosts() as made:
        yield made


@pytest.fixture(scope="module")
def one_host_run(tiny_data, tmp_path_factory) -> Path:
    """The reference: the same job as 2 processes on one host."""
    output_dir = tmp_path_factory.mktemp("one_host")
    command = _launch("launch_torchrun.sh", None, {"GPUS_PER_NODE": "2", "MASTER_PORT": "29511"},
                      _overrides(tiny_data, output_dir))
    with torchrun_agents([command], output_dir / "logs") as agents:
        assert wait_all(agents, _JOB_TIMEOUT_S) == [0], agents[0].report()
    return output_dir


def test_documented_launch_trains_across_two_hosts(hosts, one_host_run, tiny_data, tmp_path):
    first, second = hosts
    args = _overrides(tiny_data, tmp_path)
    commands = [_torchrun_node(host, rank, first.address, args) for rank, host in enumerate(hosts)]
    with torchrun_agents(commands, tmp_path / "logs") as agents:
        assert wait_all(agents, _JOB_TIMEOUT_S) == [0, 0], "\n".join(a.report() for a in agents)
    for rank, (agent, host) in enumerate(zip(agents, hosts, strict=True)):
        first_line = agent.stderr.read_text().splitlines()[0]
        assert first_line == (f"launch_torchrun.sh: node {rank}: sockets over GLOO_SOCKET_IFNAME={host.interface} "
                              f"NCCL_SOCKET_IFNAME={host.interface} towards MASTER_ADDR={first.address}")
    assert _exact_values(tmp_path) == _exact_values(one_host_run)
    assert len(_exact_values(tmp_path)) == STEPS


def test_deepspeed_per_node_launch_trains_across_two_hosts(hosts, tiny_data, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{host.address} slots=1\n" for host in hosts))
    zero2 = [f"deepspeed.config={_ZERO2}"]
    one_host = _launch("launch_deepspeed.sh", None, {"GPUS_PER_NODE": "2", "MASTER_PORT": "29512"},
                       _overrides(tiny_data, tmp_path / "one_host", *zero2))
    with torchrun_agents([one_host], tmp_path / "logs_one_host") as agents:
        assert wait_all(agents, _JOB_TIMEOUT_S) == [0], agents[0].report()
    env = {"HOSTFILE": str(hostfile), "NO_SSH": "1", "MASTER_ADDR": hosts[0].address, "MASTER_PORT": "29513"}
    args = _overrides(tiny_data, tmp_path / "two_hosts", *zero2)
    commands = [_launch("launch_deepspeed.sh", host, {**env, "NODE_RANK": str(rank)}, args)
                for rank, host in enumerate(hosts)]
    with torchrun_agents(commands, tmp_path / "logs_two_hosts") as agents:
        assert wait_all(agents, _JOB_TIMEOUT_S) == [0, 0], "\n".join(a.report() for a in agents)
    assert _exact_values(tmp_path / "two_hosts") == _exact_values(tmp_path / "one_host")
    assert len(_exact_values(tmp_path / "one_host")) == STEPS


@pytest.mark.parametrize("fault", ["dead_peer", "cut_link"])
def test_a_fault_ends_both_hosts_in_bounded_time_and_the_job_resumes(fault, hosts, one_host_run, tiny_data,
                                                                     tmp_path):
    first, second = hosts
    args = _overrides(tiny_data, tmp_path, f"parallel.collective_timeout_s={COLLECTIVE_TIMEOUT_S}")
    commands = [_torchrun_node(host, rank, first.address, args) for rank, host in enumerate(hosts)]
    with torchrun_agents(commands, tmp_path / "logs") as agents:
        _wait_for_step(tmp_path, agents, SAVE_INTERVAL + 2)
        if fault == "dead_peer":
            second.kill_all()
        else:
            first.set_link(up=False)
        try:
            gone_s = wait_until_empty(hosts, 2 * COLLECTIVE_TIMEOUT_S)
        finally:
            first.set_link(up=True)
        reports = "\n".join(agent.report() for agent in agents)
    bound_s = 30 if fault == "dead_peer" else 2 * COLLECTIVE_TIMEOUT_S
    assert gone_s < bound_s, reports
    assert agents[0].proc.returncode != 0, reports
    reason = "Timed out" if fault == "cut_link" else ""
    end = _end_records(tmp_path)
    assert [record["status"] for record in end] == ["FAILED"], end
    assert reason in end[0]["reason"], end
    run = _mlflow_run(tmp_path)
    assert run.info.status == "FAILED" and reason in run.data.tags[FAILURE_TAG], run.data.tags
    print(f"{fault}: every process on both hosts gone {gone_s:.1f} s after the fault; reason: {end[0]['reason']}")

    # Relaunching both hosts resumes from the newest complete checkpoint, into the same MLflow run.
    newest = find_latest_step(tmp_path / "ckpt", COMPLETE_MARKER)
    assert newest is not None and newest >= SAVE_INTERVAL
    with torchrun_agents(commands, tmp_path / "logs_resumed") as agents:
        assert wait_all(agents, _JOB_TIMEOUT_S) == [0, 0], "\n".join(a.report() for a in agents)
    assert f"resumed from step {newest} " in agents[0].stdout.read_text(), agents[0].report()
    assert _exact_values(tmp_path) == _exact_values(one_host_run)
    assert _mlflow_run(tmp_path).info.status == "FINISHED"


def test_a_wrong_master_addr_stops_every_host_within_a_minute(hosts, tiny_data, tmp_path):
    wrong = hosts[0].address.rsplit(".", 1)[0] + ".9"  # in the link's subnet, held by nobody
    commands = [_torchrun_node(host, rank, wrong, _overrides(tiny_data, tmp_path)) for rank, host in enumerate(hosts)]
    started = time.monotonic()
    with torchrun_agents(commands, tmp_path / "logs") as agents:
        assert wait_all(agents, 60) == [2, 2], "\n".join(a.report() for a in agents)
    assert time.monotonic() - started < 60
    for agent in agents:
        assert f"launch_torchrun.sh: error: MASTER_ADDR={wrong}" in agent.stderr.read_text(), agent.report()
