"""The training loop shared by every backend: data position, logging, evaluation, checkpoints, tracking.

Backends (:class:`~mor_megatron.training.megatron_engine.MegatronEngine`, the DeepSpeed engine) implement the
small :class:`~mor_megatron.training.engine.Engine` protocol; this module never looks inside them. Loop state
that a resume needs is :class:`~mor_megatron.checkpoint.loop_state.LoopState` (step, consumed samples, training
time, MLflow run id).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist

from mor_megatron.config import JobConfig, config_to_dict, dump_config
from mor_megatron.data.datasets import build_data_loader, build_gpt_datasets, num_samples_for
from mor_megatron.data.tokenizer import load_tokenizer
from mor_megatron.model.flops import flops_per_token
from mor_megatron.runtime import DistributedContext
from mor_megatron.tracking import metrics as M
from mor_megatron.tracking.sinks import MetricSink, metrics_jsonl_path
from mor_megatron.tracking.start import resolve_tracking_uri, start_tracking
from mor_megatron.checkpoint.loop_state import LoopState
from mor_megatron.training.console import (
    RunFacts,
    RunOutcome,
    eta_seconds,
    format_duration,
    run_summary,
    startup_banner,
)
from mor_megatron.training.engine import Batches, Engine
from mor_megatron.training.evaluate import eval_depth_maps, validation_metrics
from mor_megatron.checkpoint.save_dir_lock import SaveDirLock, lock_save_dir
from mor_megatron.training.stopping import ExitSignals, LauncherWatch, StopConditions, world_max
from mor_megatron.viz.depth import DepthMap, depth_table, render_html, render_png, token_pieces

if TYPE_CHECKING:
    from megatron.core.tokenizers import MegatronTokenizerBase

EngineFactory = Callable[[JobConfig, DistributedContext], Engine]


class Trainer:
    """One pretraining job on this rank. Build with :meth:`build`, run with :meth:`train`, end with :meth:`close`."""

    def __init__(self, config: JobConfig, ctx: DistributedContext, engine_factory: EngineFactory):
        self.config = config
        self.ctx = ctx
        self.engine_factory = engine_factory
        self.run_dir = Path(config.output_dir)
        self.loop = LoopState()
        self.sink: MetricSink | None = None
        self.engine: Engine | None = None
        self.save_dir_lock: SaveDirLock | None = None
        self.started_s = time.monotonic()  # train.exit_duration_mins counts from here
        self.launcher = LauncherWatch()  # now: a launcher that dies while the job builds is noticed too
        self.exit_signals: ExitSignals | None = None
        self.stop_reason: str | None = None
        """Why :meth:`train` stopped before ``train.train_steps`` (then the run ends as KILLED), else None."""
        self.val_losses: list[tuple[int, float]] = []
        """(step, val/loss) of each evaluation of this job, for the end-of-run summary."""
        self.depth_map_input: tuple[list[int], list[str]] | None = None
        """(token ids, text pieces) of ``tracking.depth_map_text``, mapped at each evaluation; None: off."""

    def build(self) -> None:
        """Save-dir lock, data, engine (model, optimizer, schedule), checkpoint resume, tracking: in that order."""
        cfg = self.config
        # First, so that a second job on the same save_dir stops before it loads anything.
        self.save_dir_lock = lock_save_dir(cfg.checkpoint.save_dir)
        # From here on SIGTERM/SIGUSR1 stop training after a step with a checkpoint instead of killing it.
        self.exit_signals = ExitSignals()
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        # megatron builds (or loads its cached) sample indices here: minutes on a large corpus, said so.
        self._log_rank0(" building the dataset indices (megatron caches them beside each prefix or in "
                        "data.cache_dir)")
        started = time.perf_counter()
        self.train_ds, self.valid_ds, self.test_ds = build_gpt_datasets(
            cfg.data, seq_length=cfg.seq_length, num_samples=num_samples_for(cfg.train), tokenizer=tokenizer)
        self._log_rank0(f" dataset indices ready in {time.perf_counter() - started:.1f} s")
        self.engine = self.engine_factory(cfg, self.ctx)
        self.depth_map_input = self._depth_map_input(tokenizer)
        resumed = self.engine.resume()
        if resumed is not None:
            self.loop = resumed
            self._log_rank0(f"resumed from step {self.loop.step} ({self.loop.consumed_samples} samples consumed)")
        self.sink, self.loop.mlflow_run_id = start_tracking(
            cfg.tracking, run_dir=self.run_dir, config_dict=config_to_dict(cfg),
            resume_run_id=self.loop.mlflow_run_id, is_logging_rank=self.engine.is_logging_rank,
            resume_step=self.loop.step, local_rank=self.ctx.local_rank, node_id=f"node{self.ctx.node_rank}")
        self.flops_per_token = flops_per_token(cfg.model, cfg.recursion,
                                               cfg.seq_length).training_flops_per_token_with_lm_head
        counts = self._parameter_counts()
        self.sink.log_params({key: str(int(value)) for key, value in counts.items()})
        for name, text in self.engine.run_artifacts().items():
            self.sink.log_artifact_text(name, text)
        if self.engine.is_logging_rank:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        self._log_rank0(startup_banner(cfg, self._run_facts(counts)))

    def _depth_map_input(self, tokenizer: MegatronTokenizerBase) -> tuple[list[int], list[str]] | None:
        """The depth-map text's ids (cut to ``tracking.depth_map_tokens`` and the sequence length) and
        pieces, or None when depth maps are off or this layout cannot map depths (said once)."""
        tracking = self.config.tracking
        if not (tracking.depth_maps and self.config.train.eval_steps):
            return None
        if self.ctx.dims.pp > 1:  # the routing lives on the first stage only; token_depths needs it all
            self._log_rank0(" depth maps skipped: pipeline parallelism (mor-viz depth maps a checkpoint)")
            return None
        if not self.engine.model_runs_alone:
            self._log_rank0(" depth maps skipped: DeepSpeed ZeRO-3 (mor-viz depth maps a checkpoint)")
            return None
        ids = list(tokenizer.tokenize(tracking.depth_map_text))[:min(tracking.depth_map_tokens,
                                                                     self.config.seq_length)]
        if not ids:
            return None
        return ids, token_pieces(tokenizer.detokenize, ids)

    def _log_depth_maps(self) -> None:
        """Depth maps of this evaluation: ``depth/*`` metrics, and on the logging rank the artifacts
        ``depth/step_XXXXXX.{html,png,json}`` (``_causal`` before the suffix: expert-choice's causal map)."""
        ids, pieces = self.depth_map_input
        step = self.loop.step
        maps = eval_depth_maps(self.engine.model, ids, pieces, config=self.config, step=step,
                               device=self.ctx.device, name=str(self.run_dir))
        values: dict[str, float] = {}
        for depth_map in maps:
            table = depth_table(depth_map)
            causal = depth_map.routing_mode == "causal"
            values.update(M.depth_metrics(table, causal=causal))
            if len(maps) == 1:  # routing causal by construction: the training routing's keys are the same
                values.update(M.depth_metrics(table, causal=False))
            if self.engine.is_logging_rank:
                suffix = "_causal" if causal and len(maps) > 1 else ""
                self._log_depth_artifacts(depth_map, table, f"depth/step_{step:06d}{suffix}")
        self._emit(values)

    def _log_depth_artifacts(self, depth_map: DepthMap, table: dict[str, Any], stem: str) -> None:
        self.sink.log_artifact_text(f"{stem}.json", json.dumps(table, indent=1, ensure_ascii=False) + "\n")
        self.sink.log_artifact_text(f"{stem}.html", render_html(depth_map, table))
        with tempfile.TemporaryDirectory(prefix="mor-depth-") as scratch:
            png = Path(scratch) / "depth.png"
            render_png(depth_map, png)
            self.sink.log_artifact_bytes(f"{stem}.png", png.read_bytes())

    def _run_facts(self, counts: dict[str, float]) -> RunFacts:
        dims, tracking = self.ctx.dims, self.config.tracking
        stages = [int(counts[f"{M.MODEL_PARAMS_STAGE_PREFIX}{stage}"]) for stage in range(dims.pp)]
        tracking_uri = resolve_tracking_uri(tracking, self.run_dir)
        return RunFacts(total_params=int(counts[M.MODEL_PARAMS_TOTAL]), params_per_stage=stages,
                        flops_per_token=self.flops_per_token, world_size=dims.world_size, tp=dims.tp,
                        pp=dims.pp, dp=dims.dp, tracking_uri=tracking_uri, run_id=self.loop.mlflow_run_id,
                        resumed_step=self.loop.step)

    def _batches(self, dataset, consumed_samples: int) -> Batches:
        return iter(build_data_loader(dataset, micro_batch_size=self.config.train.micro_batch_size,
                                      data_parallel_rank=self.ctx.dp_rank, data_parallel_size=self.ctx.dims.dp,
                                      consumed_samples=consumed_samples, num_workers=self.config.data.num_workers))

    def evaluate(self) -> dict[str, float]:
        """Validation loss and perplexity with training (top-k) and causal routing (see ``evaluate``)."""
        return validation_metrics(self.engine, self.valid_ds, self.config, self.ctx)

    def train(self) -> LoopState:
        """Run until ``train.train_steps``; evaluates, logs and checkpoints on their intervals."""
        cfg, tcfg = self.config, self.config.train
        agree_max = world_max(self.ctx.device)
        stop = StopConditions(tcfg, agree_max=agree_max, signals=self.exit_signals,
                              launcher=self.launcher, started_s=self.started_s)
        batches = self._batches(self.train_ds, self.loop.consumed_samples)
        while self.loop.step < tcfg.train_steps:
            start = time.perf_counter()
            step_metrics = self.engine.train_step(batches)
            (elapsed,) = agree_max([time.perf_counter() - start])  # one step time for the whole job
            self.loop.step += 1
            self.loop.consumed_samples += tcfg.global_batch_size
            self.loop.train_time_s += elapsed
            step, last = self.loop.step, self.loop.step == tcfg.train_steps
            if step % tcfg.log_interval == 0 or last:
                self._log_step(step_metrics, elapsed)
            if tcfg.eval_steps and (step % tcfg.eval_interval == 0 or last):
                val = self.evaluate()
                self._emit(val)
                if self.depth_map_input is not None:
                    self._log_depth_maps()
                self._log_rank0(f" validation at step {step} | lm loss {val[M.VAL_LOSS]:.4f} | causal-routing "
                                f"loss {val[M.VAL_LOSS_CAUSAL]:.4f} | ppl {val[M.VAL_PPL]:.2f}")
            self.stop_reason = None if last else stop.check(step)
            interval = cfg.checkpoint.save_interval
            if cfg.checkpoint.save_dir and ((interval and step % interval == 0) or last or self.stop_reason):
                path = self.engine.save(step, self.loop, config_to_dict(cfg))
                self._log_rank0(f" saved checkpoint {path}")
            if self.stop_reason:
                then = ("rerun the command to resume" if cfg.checkpoint.save_dir
                        else "not saved (no checkpoint.save_dir)")
                self._log_rank0(f" stopping after step {step} of {tcfg.train_steps}: {self.stop_reason}; {then}")
                break
        if self.loop.step == tcfg.train_steps and self.test_ds is not None and tcfg.eval_steps:
            test = validation_metrics(self.engine, self.test_ds, cfg, self.ctx, split="test")
            self._emit(test)
            self._log_rank0(f" test split after step {self.loop.step} | lm loss {test['test/loss']:.4f} | "
                            f"causal-routing loss {test['test/loss_causal']:.4f}")
        self._log_rank0(self._summary())
        return self.loop

    def _summary(self) -> str:
        cfg = self.config
        outcome = RunOutcome(steps_done=self.loop.step, train_steps=cfg.train.train_steps,
                             tokens_consumed=self._tokens_consumed(),
                             wall_time_s=time.monotonic() - self.started_s,
                             train_time_s=self.loop.train_time_s, val_losses=self.val_losses,
                             stop_reason=self.stop_reason)
        return run_summary(cfg, outcome, metrics_jsonl_path(cfg.tracking, self.run_dir))

    def _tokens_consumed(self) -> int:
        return self.loop.consumed_samples * self.config.seq_length

    def _log_step(self, step_metrics: dict[str, float], elapsed: float) -> None:
        cfg = self.config
        values = dict(step_metrics)
        values.update(M.throughput_metrics(
            step_time_s=elapsed, tokens_per_step=cfg.train.global_batch_size * cfg.seq_length,
            num_devices=dist.get_world_size(), training_flops_per_token=self.flops_per_token,
            peak_flops=self._peak_flops()))
        values.update(M.memory_metrics(M.peak_memory_gib(self.ctx.device), node_rank=self.ctx.node_rank,
                                       num_nodes=self.ctx.num_nodes))
        values.update(self._router_stats())
        values[M.TIME_TRAIN_S] = self.loop.train_time_s
        values[M.TRAIN_TOKENS_CONSUMED] = float(self._tokens_consumed())
        values[M.TRAIN_FLOPS_CONSUMED] = self._tokens_consumed() * self.flops_per_token
        self._emit(values)
        eta = eta_seconds(train_time_s=self.loop.train_time_s, steps_done=self.loop.step,
                          train_steps=cfg.train.train_steps)
        self._log_rank0(
            f" iteration {self.loop.step:8d}/{cfg.train.train_steps:8d} | consumed samples: "
            f"{self.loop.consumed_samples:10d} | elapsed time per iteration (ms): {elapsed * 1e3:.1f} | "
            f"learning rate: {values[M.OPTIM_LR]:.3E} | global batch size: {cfg.train.global_batch_size:5d} | "
            f"lm loss: {values[M.TRAIN_LM_LOSS]:.6E} | grad norm: {values[M.OPTIM_GRAD_NORM]:.3f} | "
            f"tokens/s: {values[M.PERF_TOKENS_PER_S]:.0f} | ETA: {format_duration(eta or 0.0)}")

    def _parameter_counts(self) -> dict[str, float]:
        """Parameters held by each pipeline stage (this TP rank's shard) and the model's total, a tied embedding
        counted once (collective over the pipeline group). Logged once as run parameters."""
        stages = [self.engine.held_parameters()] * self.ctx.dims.pp
        if self.ctx.dims.pp > 1:
            dist.all_gather_object(stages, stages[self.ctx.pp_rank], group=self.ctx.pg_collection.pp)
        return M.parameter_count_metrics(stages)

    def _peak_flops(self) -> float | None:
        configured = self.config.tracking.peak_tflops
        if configured:
            return configured * 1e12
        device = self.ctx.device
        return M.peak_flops_per_device(torch.cuda.get_device_name(device) if device.type == "cuda" else None)

    def _router_stats(self) -> dict[str, float]:
        """Router statistics averaged over data-parallel ranks (collective over the DP group)."""
        stats = self.engine.model.pop_router_stats()
        if self.ctx.dims.pp > 1:  # routers live on the first stage; every stage must reduce the same keys
            gathered = [None] * self.ctx.dims.pp
            dist.all_gather_object(gathered, stats, group=self.ctx.pg_collection.pp)
            stats = {key: value for part in gathered for key, value in part.items()}
        if not stats:
            return {}
        keys = sorted(stats)
        tensor = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=self.ctx.device)
        dist.all_reduce(tensor, group=self.ctx.pg_collection.dp)
        tensor /= self.ctx.dims.dp
        return dict(zip(keys, tensor.tolist()))

    def _emit(self, values: dict[str, float]) -> None:
        if M.VAL_LOSS in values:  # every evaluation passes through here; the summary reports best and last
            self.val_losses.append((self.loop.step, values[M.VAL_LOSS]))
        if self.sink is not None:
            self.sink.log_metrics(values, self.loop.step)

    def _log_rank0(self, message: str) -> None:
        if dist.get_rank() == 0:
            print(message, flush=True)

    def close(self, *, failure: BaseException | None = None) -> None:
        """Flush and close tracking (bounded wait): FAILED with the error when ``failure`` is given, KILLED after
        an early stop, else FINISHED; close the engine; release the save_dir lock. Call once."""
        if self.sink is not None:
            status = "FAILED" if failure is not None else "KILLED" if self.stop_reason else "FINISHED"
            reason = None if failure is None else f"{type(failure).__name__}: {failure}".strip()
            self.sink.close(status=status, reason=reason)
            self.sink = None
        if self.exit_signals is not None:
            self.exit_signals.restore()
            self.exit_signals = None
        if self.engine is not None:  # before the lock; the closed engine's weights stay readable
            self.engine.close()
        if self.save_dir_lock is not None:
            self.save_dir_lock.release()
            self.save_dir_lock = None
