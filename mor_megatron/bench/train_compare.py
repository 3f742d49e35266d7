"""Training benchmark: a MoR preset and the vanilla model of the same unrolled depth, trained side by side.

Both models are built in one process, get their own AdamW and train on the *same* batches, one
optimizer step each in turn (the order alternates every step), so machine noise and cache state hit both.
Printed figures are medians and ratios (MoR / vanilla) measured in that one run, with the FLOPs ratio of
:mod:`mor_megatron.model.flops` beside them. It is a benchmark, not a test: it asserts nothing.

Tokens. Byte-level token ids (0-255) of the running interpreter's standard-library sources, in the corpus
order of :mod:`mor_megatron.data.corpus`: real text that needs no tokenizer, identical on every run, so the
LM losses of the two models at equal tokens mean something (random ids would leave both at ``log V``).

Precision: `float32`, or `bfloat16` (``--dtype``; :mod:`mor_megatron.bench.model_step`), where AdamW updates
the bf16 parameters directly: the kernels are timed as in training, the optimizer without megatron's fp32 main
copies. MFU (on a GPU with a known bf16 peak, bf16 only) = training FLOPs per token (the accounting model of
:mod:`mor_megatron.model.flops`, LM head included) x tokens/s / peak.

Step. ``zero_grad(set_to_none=True)``, forward with labels (MoR: expert/token-choice top-k routing; router
losses enter backward through the activations), backward of the mean LM loss, ``clip_grad_norm_`` and
``AdamW.step()``. Timed steps come after ``warmup_steps`` untimed ones (AdamW creates its state lazily) and
two untimed memory steps; on GPU the clock is read after ``torch.cuda.synchronize``. Each timed step records
wall time and this process's CPU time (``time.process_time``, all threads): on a CPU machine shared with other
jobs, wall time grows with their load and CPU time less, so both medians and ratios are reported.

Peak memory of one model = its *resident* tensors at the start of a step (parameters, buffers, AdamW state,
the batch; grads are None then) + the highest level of tensor memory allocated *during* the step above that
start (activations, grads, optimizer temporaries). Both models live in the same process, so process-wide
figures (RSS, ``max_memory_allocated`` itself) would include the other model; this split counts each model's
own bytes. The in-step part comes from

* GPU: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` around the step, after
  ``reset_peak_memory_stats``.
* CPU: torch has no CPU allocator statistics (``torch.accelerator`` memory calls need an accelerator), so
  two steps run under ``torch.profiler`` with ``profile_memory=True`` and the second is measured: c10's CPU
  allocator reports every allocation and free made while profiling, and the running sum of those events, in
  time order, peaks at the step's high-water mark. Unlike process RSS (``ru_maxrss``) it is not blurred by
  glibc keeping freed pages, by the interpreter and its libraries, or by the other model. The allocator does
  not report frees of blocks allocated before profiling started (it logs "Memory block of unknown size was
  allocated before the profiling started" to stderr); the first profiled step is there so that tensors
  replaced every step (router statistics) are profiled allocations by the time of the measured step, whose
  frees are then all counted. Resident tensors are updated in place (AdamW), never freed. Cross-checked
  against torch's dispatch-mode tracker (``torch.distributed._tools.mem_tracker.MemTracker``) at hidden 128:
  the two peaks agree within 1%.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from mor_megatron.bench.model_step import bench_model_config, build_bench_model, synchronize, vanilla_of_same_depth
from mor_megatron.config import CoreAttention
from mor_megatron.model.flops import flops_per_token
from mor_megatron.tracking.metrics import peak_flops_per_device

MIB = 2**20
MEMORY_METHOD = {
    "cpu": "resident tensors + torch.profiler(profile_memory=True) in-step peak",
    "cuda": "resident tensors + torch.cuda.max_memory_allocated in-step peak",
}


@dataclass(frozen=True)
class ModelResult:
    """What one model did in the comparison.

    Attributes:
        step_s: median wall-clock seconds of a timed optimizer step (forward, backward, clip, AdamW).
        step_cpu_s: median CPU seconds this process (all its threads) spent in a timed step. It grows less
            than wall time when other processes share the cores (waiting OpenMP threads still count), so on a
            busy CPU machine its ratio is usually the steadier one; on GPU it counts only the host's work.
        tokens_per_s: tokens of one batch / ``step_s``.
        resident_bytes: parameters, buffers, AdamW state and batch at the start of a step.
        step_peak_bytes: highest tensor memory allocated during a step above its start.
        final_loss: mean LM loss over the last quarter of the timed steps (at least one step).
        num_parameters: unique parameters (each shared weight counted once).
        mfu: model FLOPs utilisation (module doc); None on CPU, in fp32 or on a GPU of unknown peak.
    """

    step_s: float
    step_cpu_s: float
    tokens_per_s: float
    resident_bytes: int
    step_peak_bytes: int
    final_loss: float
    num_parameters: int
    mfu: float | None

    @property
    def peak_bytes(self) -> int:
        """Peak tensor memory of a training step of this model."""
        return self.resident_bytes + self.step_peak_bytes


@dataclass(frozen=True)
class TrainComparison:
    """Results of :func:`compare_training` for the MoR preset and its vanilla baseline."""

    preset: str
    device: str
    dtype: str
    steps: int
    batch_size: int
    seq_length: int
    hidden_size: int
    num_layers: int
    """Unrolled depth, the same for both models."""
    mor: ModelResult
    vanilla: ModelResult
    flops_ratio: float
    """Training FLOPs per token (LM head included), MoR / vanilla."""

    @property
    def time_ratio(self) -> float:
        """Median wall-clock step time, MoR / vanilla."""
        return self.mor.step_s / self.vanilla.step_s

    @property
    def cpu_time_ratio(self) -> float:
        """Median CPU time per step, MoR / vanilla."""
        return self.mor.step_cpu_s / self.vanilla.step_cpu_s

    @property
    def memory_ratio(self) -> float:
        """Peak tensor memory of a training step, MoR / vanilla."""
        return self.mor.peak_bytes / self.vanilla.peak_bytes


def text_batches(num_batches: int, *, batch_size: int, seq_length: int) -> list[Tensor]:
    """``num_batches`` int64 tensors ``[batch_size, seq_length + 1]`` of stdlib source bytes (module doc)."""
    from mor_megatron.data.corpus import stdlib_root, stdlib_source_files

    needed = num_batches * batch_size * (seq_length + 1)
    root = stdlib_root()
    chunks: list[bytes] = []
    total = 0
    for rel in stdlib_source_files(root):
        data = (root / rel).read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= needed:
            break
    if total < needed:
        raise ValueError(f"the standard library has {total} bytes of source, fewer than the {needed} tokens "
                         "asked for; lower --steps, --batch-size or --seq-length")
    stream = torch.frombuffer(bytearray(b"".join(chunks)[:needed]), dtype=torch.uint8).to(torch.int64)
    return list(stream.view(num_batches, batch_size, seq_length + 1).unbind(0))


class BenchModel:
    """One benchmarked model with its own AdamW; :meth:`step` trains it on one batch."""

    def __init__(self, model: torch.nn.Module, *, lr: float):
        self.model = model
        # Paper recipe (AdamW, betas 0.9/0.95, weight decay 0.1, clip 1.0), same for both models.
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)

    def step(self, batch: Tensor) -> float:
        """One optimizer step on ``batch`` ``[b, s + 1]`` (inputs = ``[:, :-1]``, labels = ``[:, 1:]``)."""
        tokens, labels = batch[:, :-1], batch[:, 1:]
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(tokens, positions, None, labels=labels).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return loss.item()

    def resident_bytes(self, batch: Tensor) -> int:
        """Bytes of the distinct storages of parameters, buffers, grads, AdamW state and ``batch``."""
        tensors = [*self.model.parameters(), *self.model.buffers(), batch]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, Tensor)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())


_MEASURED_STEP = "mor_bench/measured_step"


def measure_step_memory(trainee: BenchModel, batches: tuple[Tensor, Tensor],
                        device: torch.device) -> tuple[int, int]:
    """Train on ``batches[0]``, then measure a step on ``batches[1]``: (resident bytes, in-step peak bytes).

    The first step makes every per-step tensor (router statistics, AdamW state, RoPE caches) exist once, so
    that on CPU its replacement in the measured step is a profiled allocation and free (see module doc).
    """
    first, second = batches
    if device.type == "cuda":
        trainee.step(first)
        trainee.optimizer.zero_grad(set_to_none=True)
        resident = trainee.resident_bytes(second)
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        trainee.step(second)
        synchronize(device)
        return resident, torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainee.step(first)
        trainee.optimizer.zero_grad(set_to_none=True)
        resident = trainee.resident_bytes(second)
        with record_function(_MEASURED_STEP):
            trainee.step(second)
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        raise RuntimeError(f"torch {torch.__version__} gives no profiler memory events (kineto_results); "
                           "CPU peak memory cannot be measured with this build")
    events = results.events()
    (measured,) = [e for e in events if e.name() == _MEASURED_STEP]
    live = 0
    peak_in_step = start_level = None
    for event in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        if event.start_ns() >= measured.start_ns() and start_level is None:
            start_level = peak_in_step = live
        live += event.nbytes()
        if start_level is not None and event.start_ns() <= measured.end_ns():
            peak_in_step = max(peak_in_step, live)
    if start_level is None:
        return resident, 0
    return resident, peak_in_step - start_level


def compare_training(preset_name: str, *, pg_collection, device: torch.device, hidden_size: int | None,
                     seq_length: int, batch_size: int, steps: int, warmup_steps: int = 2,
                     lr: float = 3e-3, core_attention: CoreAttention = "sdpa",
                     dtype: torch.dtype = torch.float32) -> TrainComparison:
    """Train ``preset_name`` and its vanilla baseline on the same batches; see the module docstring.

    Args:
        pg_collection: megatron-core process groups of a 1-rank job (``init_distributed(ParallelConfig())``).
        device: where the models train (``ctx.device``).
        hidden_size: width override (None: the preset's).
        core_attention: the attention kernel of both models (``model.core_attention``).
        dtype: ``torch.float32`` or ``torch.bfloat16`` (:func:`~mor_megatron.bench.model_step.build_bench_model`).
        steps: timed optimizer steps per model (>= 1), after ``warmup_steps`` untimed ones and two memory
            steps.
    """
    for name, value, low in (("steps", steps, 1), ("warmup_steps", warmup_steps, 0),
                             ("batch_size", batch_size, 1), ("seq_length", seq_length, 2)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    model_cfg, recursion = bench_model_config(preset_name, hidden_size=hidden_size, seq_length=seq_length,
                                              core_attention=core_attention)
    base_cfg, base_recursion = vanilla_of_same_depth(model_cfg, recursion)
    configs = {"mor": (model_cfg, recursion), "vanilla": (base_cfg, base_recursion)}
    trainees = {name: BenchModel(build_bench_model(m, r, pg_collection=pg_collection, device=device, dtype=dtype),
                                 lr=lr)
                for name, (m, r) in configs.items()}
    batches = [b.to(device) for b in text_batches(warmup_steps + 2 + steps, batch_size=batch_size,
                                                  seq_length=seq_length)]
    order = list(trainees)
    for batch in batches[:warmup_steps]:
        for name in order:
            trainees[name].step(batch)
    memory = {name: measure_step_memory(trainee, (batches[warmup_steps], batches[warmup_steps + 1]), device)
              for name, trainee in trainees.items()}
    times: dict[str, list[float]] = {name: [] for name in order}
    cpu_times: dict[str, list[float]] = {name: [] for name in order}
    losses: dict[str, list[float]] = {name: [] for name in order}
    for i, batch in enumerate(batches[warmup_steps + 2:]):
        for name in order if i % 2 == 0 else order[::-1]:
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = trainees[name].step(batch)  # .item() inside waits for the device
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
            losses[name].append(loss)
    tail = max(1, steps // 4)
    flops = {name: flops_per_token(m, r, seq_length).training_flops_per_token_with_lm_head
             for name, (m, r) in configs.items()}
    peak = peak_flops_per_device(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    tokens_per_s = {name: batch_size * seq_length / statistics.median(times[name]) for name in order}
    results = {
        name: ModelResult(step_s=statistics.median(times[name]),
                          step_cpu_s=statistics.median(cpu_times[name]),
                          tokens_per_s=tokens_per_s[name],
                          resident_bytes=memory[name][0], step_peak_bytes=memory[name][1],
                          final_loss=statistics.fmean(losses[name][-tail:]),
                          num_parameters=sum(p.numel() for p in trainees[name].model.parameters()),
                          mfu=(flops[name] * tokens_per_s[name] / peak
                               if peak is not None and dtype == torch.bfloat16 else None))
        for name in order}
    return TrainComparison(preset=preset_name, device=device.type, dtype=str(dtype).removeprefix("torch."),
                           steps=steps, batch_size=batch_size,
                           seq_length=seq_length, hidden_size=model_cfg.hidden_size,
                           num_layers=base_cfg.num_layers, mor=results["mor"], vanilla=results["vanilla"],
                           flops_ratio=flops["mor"] / flops["vanilla"])


def report(comparison: TrainComparison, *, as_json: bool) -> str:
    """Human-readable table or one JSON object (flat keys, bytes as MiB) of a comparison."""
    c = comparison
    values: dict[str, object] = {
        "preset": c.preset, "device": c.device, "dtype": c.dtype, "steps": c.steps, "batch_size": c.batch_size,
        "seq_length": c.seq_length, "hidden_size": c.hidden_size, "num_layers": c.num_layers,
        "tokens_per_step": c.batch_size * c.seq_length, "memory_method": MEMORY_METHOD[c.device]}
    for name, result in (("mor", c.mor), ("vanilla", c.vanilla)):
        values.update({
            f"{name}_step_s": result.step_s, f"{name}_step_cpu_s": result.step_cpu_s,
            f"{name}_tokens_per_s": result.tokens_per_s,
            f"{name}_peak_mib": result.peak_bytes / MIB, f"{name}_resident_mib": result.resident_bytes / MIB,
            f"{name}_step_peak_mib": result.step_peak_bytes / MIB, f"{name}_final_loss": result.final_loss,
            f"{name}_parameters": result.num_parameters, f"{name}_mfu": result.mfu})
    values.update(time_ratio=c.time_ratio, cpu_time_ratio=c.cpu_time_ratio, memory_ratio=c.memory_ratio,
                  flops_ratio=c.flops_ratio)
    if as_json:
        return json.dumps(values)
    rows = [f"{'model':<24}{'step (ms)':>11}{'CPU (ms)':>10}{'tokens/s':>10}{'peak MiB':>10}{'resident':>10}"
            f"{'in-step':>9}{'loss':>8}{'params':>12}"]
    for label, r in ((c.preset, c.mor), ("vanilla (same depth)", c.vanilla)):
        rows.append(f"{label:<24}{r.step_s * 1e3:>11.1f}{r.step_cpu_s * 1e3:>10.1f}{r.tokens_per_s:>10.0f}"
                    f"{r.peak_bytes / MIB:>10.1f}"
                    f"{r.resident_bytes / MIB:>10.1f}{r.step_peak_bytes / MIB:>9.1f}{r.final_loss:>8.3f}"
                    f"{r.num_parameters:>12,}")
    return "\n".join([
        f"training steps on {c.device} in {c.dtype}: {c.steps} timed AdamW steps per model, same {c.batch_size} x "
        f"{c.seq_length} token batches, hidden {c.hidden_size}, {c.num_layers} unrolled layers",
        *rows,
        f"ratio MoR/vanilla: time {c.time_ratio:.3f} (CPU time {c.cpu_time_ratio:.3f})   peak memory "
        f"{c.memory_ratio:.3f}   training FLOPs {c.flops_ratio:.3f}",
        f"peak memory = {MEMORY_METHOD[c.device]}",
        *([f"MFU: MoR {c.mor.mfu:.3f}   vanilla {c.vanilla.mfu:.3f}"] if c.mor.mfu is not None else [])])
