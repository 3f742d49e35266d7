"""Training metrics: the one table of metric keys, and pure helpers that compute values for them.

Nothing here sends anything anywhere; sinks live in :mod:`mor_megatron.tracking.sinks`, which checks every
key against MLflow's key rules. Keys are slash namespaces with the unit as a suffix (``perf/step_time_s``,
``mem/peak_reserved_gib``) because MLflow refuses characters such as ``(`` or ``:``.

Router statistics are not listed here: the model's ``RouterStats`` already emits ``router/<name>`` and
``router/<name>/r<n>`` keys (``n`` 1-based), which the trainer passes through unchanged.

Only :func:`reduce_max_over` and :func:`memory_metrics` communicate (one all-reduce each); call them on every
rank of ``group`` at the same step.
"""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------------------------------------
# Metric keys. Units are suffixes: _s seconds, _gib 2**30 bytes; perf/mfu is a fraction in [0, 1].
# ----------------------------------------------------------------------------------------------------------
TRAIN_LM_LOSS = "train/lm_loss"
TRAIN_TOKENS_CONSUMED = "train/tokens_consumed"
"""Tokens trained on so far (global batch x sequence length x steps; continues across resumes): the x-axis
on which MoR and vanilla runs compare."""
TRAIN_FLOPS_CONSUMED = "train/flops_consumed"
"""Training FLOPs spent so far: tokens consumed x the MoR FLOPs model's training FLOPs per token."""
OPTIM_LR = "optim/lr"
OPTIM_GRAD_NORM = "optim/grad_norm"

PERF_STEP_TIME_S = "perf/step_time_s"
PERF_TOKENS_PER_S = "perf/tokens_per_s"
"""Tokens of the global batch per second, whole job."""
PERF_TOKENS_PER_S_PER_DEVICE = "perf/tokens_per_s_per_device"
PERF_TFLOPS_PER_DEVICE = "perf/tflops_per_device"
"""Achieved model TFLOP/s per device (10**12 FLOP/s), from the MoR FLOPs model, not from a profiler."""
PERF_MFU = "perf/mfu"
"""Model FLOPs utilisation (fraction): achieved / peak dense bf16 FLOP/s; omitted if the peak is unknown."""

MEM_PEAK_ALLOCATED_GIB = "mem/peak_allocated_gib"
"""``torch.cuda.max_memory_allocated`` of this rank (CUDA only)."""
MEM_PEAK_RESERVED_GIB = "mem/peak_reserved_gib"
"""``torch.cuda.max_memory_reserved`` of this rank (CUDA only)."""
MEM_PEAK_RSS_GIB = "mem/peak_rss_gib"
"""Peak resident set size of this process (host memory, ``getrusage``); the CPU stand-in for device memory."""

VAL_LOSS = "val/loss"
"""Validation LM loss with the training routing (expert-choice top-k sees the whole sequence)."""
VAL_PPL = "val/ppl"
VAL_LOSS_CAUSAL = "val/loss_causal"
"""Validation LM loss with causal routing, as used for autoregressive inference."""
VAL_PPL_CAUSAL = "val/ppl_causal"
TEST_KEYS = tuple(key.replace("val/", "test/", 1) for key in (VAL_LOSS, VAL_PPL, VAL_LOSS_CAUSAL, VAL_PPL_CAUSAL))
"""The same four on the test split, evaluated once when training reaches its last step."""

DEPTH_CLASS_KEYS = {"space/punct": "space_punct", "word": "word", "digits": "digits"}
"""Depth-map token class (``mor_megatron.viz.depth.TOKEN_CLASSES``) -> the last part of its metric key."""
DEPTH_KEYS = tuple(f"depth/{name}" for name in ("mean", *DEPTH_CLASS_KEYS.values()))
"""Mean recursions per token of the depth-map text (``tracking.depth_map_text``) at each evaluation, with the
training routing: over all its tokens, then by token class."""
DEPTH_CAUSAL_KEYS = tuple(key.replace("depth/", "depth/causal/", 1) for key in DEPTH_KEYS)
"""The same with causal routing, what serving runs (repeats the training routing's values except under
expert-choice, as ``val/loss_causal`` does)."""

TIME_TRAIN_S = "time/train_s"
"""Cumulative training wall time in seconds (continues across resumes; evaluation excluded)."""
MODEL_PARAMS_STAGE_PREFIX = "model/params_per_tp_rank/stage"
"""+ pipeline stage index: parameters one TP rank of that stage holds (logged once, as a run parameter)."""
MODEL_PARAMS_TOTAL = "model/params_per_tp_rank/total"
"""Parameters of one TP rank's slice of the model, each counted once (a tied embedding that the first and the
last pipeline stage both hold counts once; logged once, as a run parameter)."""

MEMORY_KEYS = (MEM_PEAK_ALLOCATED_GIB, MEM_PEAK_RESERVED_GIB, MEM_PEAK_RSS_GIB)
STATIC_KEYS = (
    TRAIN_LM_LOSS, TRAIN_TOKENS_CONSUMED, TRAIN_FLOPS_CONSUMED, OPTIM_LR, OPTIM_GRAD_NORM,
    PERF_STEP_TIME_S, PERF_TOKENS_PER_S, PERF_TOKENS_PER_S_PER_DEVICE, PERF_TFLOPS_PER_DEVICE, PERF_MFU,
    *MEMORY_KEYS,
    VAL_LOSS, VAL_PPL, VAL_LOSS_CAUSAL, VAL_PPL_CAUSAL, *TEST_KEYS, *DEPTH_KEYS, *DEPTH_CAUSAL_KEYS,
    TIME_TRAIN_S,
)
"""Every fixed key; per-node and job-wide memory keys come from :func:`node_key` and :func:`job_max_key`."""


def held_parameters(parameters: Iterable[torch.nn.Parameter],
                    numel: Callable[[torch.nn.Parameter], int] = torch.nn.Parameter.numel) -> tuple[int, int]:
    """(elements this rank holds, how many of them are a pipeline copy of the tied word embedding).

    With pipeline parallelism and tied embeddings, the last stage keeps its own copy of the first stage's
    word embedding as the output layer; megatron marks that copy ``shared`` and ``shared_embedding`` (the
    first stage's original only ``shared_embedding``). ``numel`` gives a parameter's full size where the
    engine partitions parameters (the engine's ``held_parameters`` passes it).
    """
    held = copies = 0
    for param in parameters:
        size = numel(param)
        held += size
        if getattr(param, "shared", False) and getattr(param, "shared_embedding", False):
            copies += size
    return held, copies


def parameter_count_metrics(per_stage: Sequence[tuple[int, int]]) -> dict[str, float]:
    """Per-stage held counts and the model total, each parameter counted once, from :func:`held_parameters`
    of one TP rank per pipeline stage (in stage order)."""
    out = {f"{MODEL_PARAMS_STAGE_PREFIX}{stage}": float(held) for stage, (held, _) in enumerate(per_stage)}
    out[MODEL_PARAMS_TOTAL] = float(sum(held - copies for held, copies in per_stage))
    return out


def node_key(key: str, node_rank: int) -> str:
    """Per-node variant of a ``mem/...`` key: ``mem/peak_rss_gib`` -> ``mem/node1/peak_rss_gib``."""
    namespace, _, name = key.partition("/")
    return f"{namespace}/node{node_rank}/{name}"


def job_max_key(key: str) -> str:
    """Job-wide maximum of a ``mem/...`` key: ``mem/peak_rss_gib`` -> ``mem/job_max_peak_rss_gib``."""
    namespace, _, name = key.partition("/")
    return f"{namespace}/job_max_{name}"


# ----------------------------------------------------------------------------------------------------------
# Throughput and MFU.
# ----------------------------------------------------------------------------------------------------------

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, per GPU. Matched in order against
# torch.cuda.get_device_name(), so the more specific names come first. A CPU, or a device not listed,
# has no entry: MFU is then omitted rather than guessed.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4e12),       # also GH200, whose GPU is the H100-class Hopper part
    ("H100 PCIe", 756.0e12),
    ("H100 NVL", 835.0e12),
    ("H100", 989.4e12),       # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0e12),       # SXM4 and PCIe
)


def peak_flops_per_device(device_name: str | None) -> float | None:
    """Peak dense bf16 FLOP/s for a device name like ``"NVIDIA H100 80GB HBM3"``; None if unknown or CPU."""
    matches = (flops for pattern, flops in PEAK_BF16_FLOPS if pattern in (device_name or ""))
    return next(matches, None)


def tokens_per_second(num_tokens: float, seconds: float) -> float:
    """Throughput; ``seconds`` must be > 0."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0 to compute a throughput, got {seconds}")
    return num_tokens / seconds


def throughput_metrics(*, step_time_s: float, tokens_per_step: int, num_devices: int,
                       training_flops_per_token: float | None = None,
                       peak_flops: float | None = None) -> dict[str, float]:
    """Step time, tokens/s (job and per device), TFLOP/s per device and MFU for one optimizer step.

    ``tokens_per_step`` is the global batch in tokens (all data-parallel replicas). ``num_devices`` is the
    world size. ``training_flops_per_token`` is forward + backward model FLOPs per token from the MoR FLOPs
    model (``mor_megatron.model.flops``); without it the FLOP/s keys are left out. ``peak_flops`` is the
    device peak (:func:`peak_flops_per_device`); without it MFU is left out.
    """
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    tokens_per_s = tokens_per_second(tokens_per_step, step_time_s)
    out = {
        PERF_STEP_TIME_S: float(step_time_s),
        PERF_TOKENS_PER_S: tokens_per_s,
        PERF_TOKENS_PER_S_PER_DEVICE: tokens_per_s / num_devices,
    }
    if training_flops_per_token is not None:
        flops_per_device = training_flops_per_token * tokens_per_s / num_devices
        out[PERF_TFLOPS_PER_DEVICE] = flops_per_device / 1e12
        if peak_flops is not None:
            out[PERF_MFU] = flops_per_device / peak_flops
    return out


def perplexity(loss: float) -> float:
    """``exp(loss)``; inf instead of an OverflowError for a diverged loss."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def validation_metrics(*, loss: float, loss_causal: float | None = None, split: str = "val") -> dict[str, float]:
    """Loss and perplexity on ``split`` (`val` or `test`) for the training routing and, when given, the causal
    routing."""
    out = {f"{split}/loss": float(loss), f"{split}/ppl": perplexity(loss)}
    if loss_causal is not None:
        out[f"{split}/loss_causal"] = float(loss_causal)
        out[f"{split}/ppl_causal"] = perplexity(loss_causal)
    return out


def depth_metrics(table: Mapping[str, Any], *, causal: bool) -> dict[str, float]:
    """:data:`DEPTH_KEYS` (``causal``: :data:`DEPTH_CAUSAL_KEYS`) from a depth map's table
    (``mor_megatron.viz.depth.depth_table``); a token class the text does not have is left out."""
    keys = DEPTH_CAUSAL_KEYS if causal else DEPTH_KEYS
    means = [table["mean_depth"], *(table["by_class"][name]["mean_depth"] for name in DEPTH_CLASS_KEYS)]
    return {key: float(mean) for key, mean in zip(keys, means, strict=True) if mean is not None}


# ----------------------------------------------------------------------------------------------------------
# Peak memory.
# ----------------------------------------------------------------------------------------------------------

_GIB = float(2**30)


def peak_rss_gib() -> float:
    """Peak resident set size of this process in GiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bytes_used = max_rss if sys.platform == "darwin" else max_rss * 1024
    return bytes_used / _GIB


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    """This rank's peak memory: host RSS always, plus CUDA allocated/reserved when ``device`` is a GPU."""
    out = {MEM_PEAK_RSS_GIB: peak_rss_gib()}
    if device.type == "cuda":
        out[MEM_PEAK_ALLOCATED_GIB] = torch.cuda.max_memory_allocated(device) / _GIB
        out[MEM_PEAK_RESERVED_GIB] = torch.cuda.max_memory_reserved(device) / _GIB
    return out


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    # NCCL reduces only CUDA tensors; gloo only CPU ones.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_max_over(values: Mapping[str, float], group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """Max of each value over the ranks of ``group`` (one all-reduce). Identity without a process group.

    Collective: every rank of ``group`` must call it with the same keys.
    """
    if not dist.is_available() or not dist.is_initialized():
        return {key: float(value) for key, value in values.items()}
    keys = sorted(values)
    device = _collective_device(group)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return dict(zip(keys, tensor.tolist(), strict=True))


def memory_metrics(local: Mapping[str, float], *, node_rank: int, num_nodes: int,
                   group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """This rank's peaks, the max over each node and the max over the job, from one all-reduce.

    ``local`` is :func:`peak_memory_gib` of this rank; ``node_rank`` is this rank's node (0-based) out of
    ``num_nodes``. Returns ``local`` plus ``mem/node<k>/...`` for every node and ``mem/job_max_...``.
    Collective: every rank of ``group`` must call it with the same keys.
    """
    if not 0 <= node_rank < num_nodes:
        raise ValueError(f"node_rank must be in [0, num_nodes={num_nodes}), got {node_rank}")
    keys = sorted(local)
    distributed = dist.is_available() and dist.is_initialized()
    device = _collective_device(group) if distributed else torch.device("cpu")
    # One row per node, -inf except this rank's row: a MAX all-reduce yields every node's max at once.
    table = torch.full((num_nodes, len(keys)), -math.inf, dtype=torch.float64, device=device)
    table[node_rank] = torch.tensor([float(local[k]) for k in keys], dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(table, op=dist.ReduceOp.MAX, group=group)
    rows = table.tolist()
    out = {key: float(local[key]) for key in keys}
    for node, row in enumerate(rows):
        for key, value in zip(keys, row, strict=True):
            if value != -math.inf:  # a node with no rank in ``group`` has no reading
                out[node_key(key, node)] = value
    for column, key in enumerate(keys):
        out[job_max_key(key)] = max(row[column] for row in rows)
    return out
