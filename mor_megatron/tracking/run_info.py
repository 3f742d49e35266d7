"""What a run records about itself: its name, source tags and params (the flattened config, job facts)."""

from __future__ import annotations

import importlib.metadata
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mor_megatron.runtime import LaunchEnv
from mor_megatron.tracking.sinks import MAX_PARAM_VALUE_LENGTH, check_metric_key


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config mapping -> ``{"model.hidden_size": "512", ...}``; non-string values JSON-encoded.

    Values longer than MLflow's 6000-character limit are cut (the YAML artifact keeps the full config).
    """
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, prefix=f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[check_metric_key(name)] = text[:MAX_PARAM_VALUE_LENGTH]
    return out


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_state() -> tuple[str, str]:
    """(commit, dirty) of the checkout this package runs from; dirty is "true", "false" or "unknown".

    Dirty means tracked files differ from the commit (untracked files are ignored: run folders, data)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return "unknown", "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, "unknown" if status is None else str(bool(status)).lower()


def default_run_name(config_dict: Mapping[str, Any]) -> str:
    """``<preset or output folder>-<UTC time>-<6 hex digits>``, e.g. ``360m-mor-e-r3-20260107-101500-3fa2c1``.

    The suffix comes from ``secrets`` (the OS), not from ``random``: the trainer seeds ``random`` with
    ``train.seed``, which made every run draw the same name from MLflow's generator.
    """
    stem = config_dict.get("preset") or Path(str(config_dict.get("output_dir") or "run")).name or "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def source_tags(commit: str, dirty: str) -> dict[str, str]:
    """MLflow's source tags (shown in the UI's run header) plus whether the checkout had local changes."""
    return {"mlflow.source.name": sys.argv[0] or "python", "mlflow.source.type": "JOB",
            "mlflow.source.git.commit": commit, "mor.git_dirty": dirty}


def runtime_params(commit: str, dirty: str) -> dict[str, str]:
    """Job facts that are not in the config: world size, nodes, library versions, git commit and state."""
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    try:
        num_nodes = str(LaunchEnv.from_environ().num_nodes)
    except RuntimeError:  # a launcher variable that is not an integer; not worth failing the job over
        num_nodes = "unknown"
    return {
        "runtime.world_size": str(world_size),
        "runtime.num_nodes": num_nodes,
        "runtime.git_commit": commit,
        "runtime.git_dirty": dirty,
        "runtime.python": sys.version.split()[0],
        "runtime.torch": _version("torch"),
        "runtime.megatron_core": _version("megatron-core"),
        "runtime.deepspeed": _version("deepspeed"),
        "runtime.mlflow": _version("mlflow"),
    }
