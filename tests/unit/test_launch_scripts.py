"""Launch scripts in tools/: they parse, print their help, refuse bad variables, and hand torchrun / srun the
right command and environment. ``python`` and Slurm's commands are replaced by recording fakes, so nothing
here starts a training process (tests/dist covers real multi-process runs).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
SCRIPTS = sorted(p for p in TOOLS.iterdir() if p.suffix in (".sh", ".sbatch"))

# Records each call (argv and the environment variables the scripts set) as one JSON line in $CALLS_LOG; as
# mor_megatron.cli.rendezvous it answers as on a host whose interface eth7 (10.9.0.1) routes to MASTER_ADDR.
_RECORDER = """#!/usr/bin/env python3
import json, os, sys
keys = ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI", "OMP_NUM_THREADS", "RANK",
        "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
with open(os.environ["CALLS_LOG"], "a") as log:
    log.write(json.dumps({"tool": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
                          "env": {k: os.environ.get(k) for k in keys}}) + "\\n")
if sys.argv[1:3] == ["-m", "mor_megatron.cli.rendezvous"]:
    if "--address-towards" in sys.argv:
        print("10.9.0.1")
    elif "--wait" not in sys.argv:
        print("export GLOO_SOCKET_IFNAME=eth7\\nexport NCCL_SOCKET_IFNAME=eth7")
"""
_SCONTROL = """#!/usr/bin/env bash
if [[ "$1 $2" == "show hostnames" ]]; then tr ',' '\\n' <<< "$3"; exit; fi
printf '{"tool": "scontrol", "argv": ["%s", "%s"]}\\n' "$1" "$2" >> "$CALLS_LOG"
"""
# An srun that trains until a signal arrives, then exits 0 as the tasks do after saving (handlers first, so a
# signal sent once the call is recorded is never fatal).
_SRUN_UNTIL_SIGNAL = """#!/usr/bin/env python3
import json, os, signal, sys, time
received = []
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda signum, frame: received.append(signal.Signals(signum).name))
with open(os.environ["CALLS_LOG"], "a") as log:
    log.write(json.dumps({"tool": "srun", "argv": sys.argv[1:]}) + "\\n")
deadline = time.monotonic() + 30
while not received and time.monotonic() < deadline:
    time.sleep(0.01)
with open(os.environ["CALLS_LOG"], "a") as log:
    log.write(json.dumps({"tool": "srun", "signal": received[0] if received else None}) + "\\n")
"""


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


_SCRIPT_VARIABLES = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE",
                     "MLFLOW_TRACKING_URI", "WORLD_SIZE", "RANK", "PYTHON", "SKIP_CHECK", "OMP_NUM_THREADS",
                     "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "MASTER_WAIT_S")
"""Variables the scripts read: the test's own environment must not leak into them."""


def _script_env(env: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in _SCRIPT_VARIABLES and not k.startswith("SLURM_")}
    return {**base, **env}


def _run(args: list[str], env: dict[str, str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=_script_env(env), cwd=cwd, capture_output=True, text=True, timeout=60,
                          check=False)


def _calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode == 0, result.stderr


def test_launcher_help_documents_its_variables():
    result = _run([str(TOOLS / "launch_torchrun.sh"), "--help"], {})
    assert result.returncode == 0, result.stderr
    for name in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "MLFLOW_TRACKING_URI"):
        assert name in result.stdout


@pytest.mark.parametrize("env,message", [
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "10.0.0.1"},
     "NODE_RANK=2 must be an integer in [0, 2)"),
    ({"NNODES": "2", "NODE_RANK": "0"}, "NNODES=2 needs MASTER_ADDR"),
    ({"NNODES": "zero"}, "NNODES=zero must be an integer >= 1"),
    ({"GPUS_PER_NODE": "0"}, "GPUS_PER_NODE=0 must be an integer >= 1"),
])
def test_launcher_refuses_bad_variables(env, message, tmp_path):
    log = tmp_path / "calls.jsonl"
    python = _executable(tmp_path / "python", _RECORDER)
    result = _run([str(TOOLS / "launch_torchrun.sh"), "--config", "c.yaml"],
                  {**env, "PYTHON": str(python), "CALLS_LOG": str(log)})
    assert result.returncode == 2
    assert message in result.stderr
    assert _calls(log) == []


def test_launcher_checks_then_starts_torchrun(tmp_path):
    log = tmp_path / "calls.jsonl"
    python = _executable(tmp_path / "python", _RECORDER)
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29555",
           "GPUS_PER_NODE": "4", "MLFLOW_TRACKING_URI": "http://10.0.0.1:5000", "PYTHON": str(python),
           "CALLS_LOG": str(log)}
    result = _run([str(TOOLS / "launch_torchrun.sh"), "--config", "c.yaml", "train.train_steps=5"], env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("launch_torchrun.sh: node 1: sockets over GLOO_SOCKET_IFNAME=eth7 "
                                    "NCCL_SOCKET_IFNAME=eth7 towards MASTER_ADDR=10.0.0.1\n"), result.stderr
    route, check, wait, launch = _calls(log)
    rendezvous = ["-m", "mor_megatron.cli.rendezvous", "--prog", "launch_torchrun.sh", "--master-addr",
                  "10.0.0.1", "--master-port", "29555", "--node-rank", "1", "--num-nodes", "2"]
    # The route and address are checked first; node 1 waits for node 0's port just before torchrun starts.
    assert route["argv"] == rendezvous and wait["argv"] == [*rendezvous, "--wait"]
    assert check["argv"] == ["-m", "mor_megatron.pretrain", "--check", "--config", "c.yaml",
                             "train.train_steps=5"]
    assert check["env"]["WORLD_SIZE"] == "8"
    assert launch["argv"] == ["-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", "1",
                              "--nproc-per-node", "4", "--master-addr", "10.0.0.1", "--master-port", "29555",
                              "-m", "mor_megatron.pretrain", "--config", "c.yaml", "train.train_steps=5"]
    assert launch["env"]["MLFLOW_TRACKING_URI"] == "http://10.0.0.1:5000"
    assert launch["env"]["GLOO_SOCKET_IFNAME"] == launch["env"]["NCCL_SOCKET_IFNAME"] == "eth7"


def test_launcher_stops_on_a_config_error_before_torchrun():
    result = _run([str(TOOLS / "launch_torchrun.sh"), "--config", "configs/demo.yaml",
                   "model.hidden_size=65"], {"GPUS_PER_NODE": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert "model.hidden_size=65" in result.stderr
    assert "launch_torchrun.sh: node 0 of 1" not in result.stderr


def _slurm_env(tmp_path: Path, log: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "srun", _RECORDER)
    _executable(bin_dir / "scontrol", _SCONTROL)
    python = _executable(tmp_path / "python", _RECORDER)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(python), "CALLS_LOG": str(log),
            "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu-a,gpu-b", "SLURM_NNODES": "2",
            "SLURM_NTASKS": "16", "SLURM_CPUS_PER_TASK": "6", "SLURM_SUBMIT_DIR": str(REPO),
            "RANK": "3"}


def test_slurm_script_checks_then_runs_one_task_per_gpu(tmp_path):
    log = tmp_path / "calls.jsonl"
    env = {**_slurm_env(tmp_path, log), "MLFLOW_TRACKING_URI": "http://10.0.0.1:5000"}
    result = _run(["bash", str(TOOLS / "slurm_pretrain.sbatch"), "configs/360m-mor-e-r3.yaml",
                   "train.train_steps=5"], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    route, check, srun = _calls(log)
    # The first host's own name may resolve to 127.0.0.1 there: the address it reaches the second from is used.
    assert route["argv"] == ["-m", "mor_megatron.cli.rendezvous", "--prog", "slurm_pretrain",
                             "--address-towards", "gpu-b"]
    assert check["tool"] == "python"
    assert check["argv"] == ["-m", "mor_megatron.pretrain", "--check", "--config",
                             "configs/360m-mor-e-r3.yaml", "train.train_steps=5"]
    assert srun["tool"] == "srun"
    assert srun["argv"] == ["--kill-on-bad-exit=1", env["PYTHON"], "-m", "mor_megatron.pretrain", "--config",
                            "configs/360m-mor-e-r3.yaml", "train.train_steps=5"]
    assert srun["env"] == {"WORLD_SIZE": None, "MASTER_ADDR": "10.9.0.1", "MASTER_PORT": str(20000 + 1234),
                           "MLFLOW_TRACKING_URI": "http://10.0.0.1:5000", "OMP_NUM_THREADS": "6",
                           "RANK": None, "GLOO_SOCKET_IFNAME": None, "NCCL_SOCKET_IFNAME": None}


def test_slurm_script_needs_a_config(tmp_path):
    log = tmp_path / "calls.jsonl"
    result = _run(["bash", str(TOOLS / "slurm_pretrain.sbatch")], _slurm_env(tmp_path, log), cwd=tmp_path)
    assert result.returncode == 2
    assert "usage: sbatch tools/slurm_pretrain.sbatch CONFIG.yaml" in result.stderr
    assert _calls(log) == []


def test_slurm_script_refuses_to_run_outside_a_job(tmp_path):
    log = tmp_path / "calls.jsonl"
    env = {k: v for k, v in _slurm_env(tmp_path, log).items() if not k.startswith("SLURM_")}
    result = _run(["bash", str(TOOLS / "slurm_pretrain.sbatch"), "configs/demo.yaml"], env, cwd=tmp_path)
    assert result.returncode == 2
    assert "not inside a Slurm job" in result.stderr
    assert _calls(log) == []


@pytest.mark.parametrize("sig,requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)],
                         ids=["time_limit_warning", "preemption"])
def test_slurm_script_forwards_stop_signals_and_requeues_after_the_time_limit_warning(sig, requeued, tmp_path):
    log = tmp_path / "calls.jsonl"
    env = _slurm_env(tmp_path, log)
    _executable(tmp_path / "bin" / "srun", _SRUN_UNTIL_SIGNAL)
    script = subprocess.Popen(["bash", str(TOOLS / "slurm_pretrain.sbatch"), "configs/demo.yaml"],
                              env=_script_env(env), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not any(call["tool"] == "srun" for call in _calls(log)):
            assert script.poll() is None and time.monotonic() < deadline, "srun was never started"
            time.sleep(0.02)
        script.send_signal(sig)  # what Slurm sends the batch shell (--signal=B:USR1@300, or SIGTERM)
        _, stderr = script.communicate(timeout=30)
    finally:
        script.kill()
    assert script.returncode == 0, stderr
    calls = _calls(log)
    assert {"tool": "srun", "signal": sig.name} in calls  # passed on to the tasks, which save and exit 0
    assert ({"tool": "scontrol", "argv": ["requeue", "1234"]} in calls) == requeued, calls
