"""What rank 0 prints around training: the startup banner, the ETA of the iteration line and the end summary.

Pure formatting of values the trainer already has, so it is tested without a process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mor_megatron.config import JobConfig, layer_layout


def format_duration(seconds: float) -> str:
    """``3725.2`` -> ``"1:02:05"``; days are counted in hours (``"49:00:00"``)."""
    total = max(0, round(seconds))
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def eta_seconds(*, train_time_s: float, steps_done: int, train_steps: int) -> float | None:
    """Remaining training time from the mean step time so far (evaluation and checkpoints excluded).

    None before the first step. ``train_time_s`` and ``steps_done`` include earlier attempts of a resumed job.
    """
    if steps_done <= 0:
        return None
    return train_time_s / steps_done * max(0, train_steps - steps_done)


def mlflow_run_url(tracking_uri: str | None, run_id: str | None) -> str | None:
    """The MLflow UI page of a run on an HTTP server (its ``#/runs/<id>`` route); None for local stores."""
    if not tracking_uri or not run_id or not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/runs/{run_id}"


@dataclass(frozen=True)
class RunFacts:
    """Facts the banner shows that only the running job knows."""

    total_params: int
    params_per_stage: list[int]
    flops_per_token: float
    world_size: int
    tp: int
    pp: int
    dp: int
    tracking_uri: str | None
    run_id: str | None
    resumed_step: int


def startup_banner(cfg: JobConfig, facts: RunFacts) -> str:
    """Multi-line banner: model, layer layout, parameters, FLOPs, parallel layout, where things go."""
    layout = layer_layout(cfg.model, cfg.recursion)
    rec = cfg.recursion
    routing = rec.routing
    if rec.routing == "expert_choice":  # training top-k keeps these fractions of the sequence per recursion
        routing += ", capacities " + ", ".join(f"{c:.3g}" for c in rec.effective_capacities)
    stages = " + ".join(f"{n:,}" for n in facts.params_per_stage)
    lines = [
        f"model: {cfg.preset or 'custom (no preset)'} | hidden {cfg.model.hidden_size} | heads "
        f"{cfg.model.num_attention_heads} | vocab {cfg.model.vocab_size} | seq {cfg.seq_length}",
        f"layers: {layout.num_unrolled_layers} unrolled = {layout.num_prefix} prefix + {layout.num_shared} "
        f"shared x {layout.num_recursions} recursions ({layout.sharing}) + {layout.num_suffix} suffix; routing "
        f"{routing}, kv {rec.kv_mode}",
        f"parameters: {facts.total_params:,} (per TP rank; pipeline stages {stages}; a tied embedding counted "
        "once)",
        f"training FLOPs per token: {facts.flops_per_token:.4g} (with LM head)",
        f"parallel: world {facts.world_size} = TP {facts.tp} x PP {facts.pp} x DP {facts.dp} | global batch "
        f"{cfg.train.global_batch_size} x {cfg.seq_length} tokens | steps {cfg.train.train_steps}"
        + (f" (resuming after step {facts.resumed_step})" if facts.resumed_step else ""),
        f"run dir: {Path(cfg.output_dir).resolve()}",
        f"mlflow: {_tracking_line(facts.tracking_uri, facts.run_id)}",
    ]
    return "\n".join(f" {line}" for line in lines)


def _checkpoints(cfg: JobConfig) -> str:
    if not cfg.checkpoint.save_dir:
        return "none (no checkpoint.save_dir)"
    return str(Path(cfg.checkpoint.save_dir).resolve())


def _tracking_line(tracking_uri: str | None, run_id: str | None) -> str:
    if tracking_uri is None:
        return "off (metrics.jsonl only)"
    if run_id is None:
        return f"no run ({tracking_uri} unreachable at start; metrics.jsonl has everything)"
    url = mlflow_run_url(tracking_uri, run_id)
    return f"run {run_id} at {tracking_uri}" + (f" | {url}" if url else "")


@dataclass(frozen=True)
class RunOutcome:
    """What the end-of-run summary reports."""

    steps_done: int
    train_steps: int
    tokens_consumed: int
    wall_time_s: float
    train_time_s: float
    val_losses: list[tuple[int, float]]
    """(step, val/loss) of every evaluation of this job, in order."""
    stop_reason: str | None


def run_summary(cfg: JobConfig, outcome: RunOutcome, metrics_jsonl: Path) -> str:
    """Multi-line summary: steps, tokens, time, best and last validation loss, where the outputs are."""
    if outcome.val_losses:
        best_step, best = min(outcome.val_losses, key=lambda item: item[1])
        last_step, last = outcome.val_losses[-1]
        val = f"val loss: last {last:.4f} (step {last_step}), best {best:.4f} (step {best_step})"
    else:
        val = "val loss: not evaluated in this job"
    ended = f"stopped early: {outcome.stop_reason}" if outcome.stop_reason else "finished"
    lines = [
        f"run {ended}: step {outcome.steps_done}/{outcome.train_steps}, {outcome.tokens_consumed:,} tokens",
        f"time: {format_duration(outcome.wall_time_s)} wall this job, "
        f"{format_duration(outcome.train_time_s)} training in all attempts",
        val,
        f"checkpoints: {_checkpoints(cfg)}",
        f"metrics: {metrics_jsonl.resolve()} | config: {(Path(cfg.output_dir) / 'config.yaml').resolve()}",
    ]
    return "\n".join(f" {line}" for line in lines)
