"""The one config tree of mor_megatron: typed sections, paper presets, YAML + dotted overrides, validation.

Imports only the standard library and PyYAML, so it can validate a job before torch, megatron-core or any
worker is started. Sections check only themselves in ``__post_init__``; rules that span sections (heads vs
tensor parallel size, batch sizes vs data-parallel size, ...) live in :func:`validate`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

Sharing = Literal["cycle", "sequence", "middle_cycle", "middle_sequence"]
Routing = Literal["none", "expert_choice", "token_choice"]
KVMode = Literal["recursion_wise", "shared"]
TokenBalancing = Literal["loss", "loss_free"]
TransformerImpl = Literal["auto", "local", "transformer_engine"]
CoreAttention = Literal["sdpa", "megatron"]
LRSchedule = Literal["cosine", "wsd", "constant"]
Precision = Literal["auto", "fp32", "bf16"]

DEFAULT_OUTPUT_DIR = "runs/default"
DEFAULT_DEPTH_MAP_TEXT = (
    "The committee met on 14 March 2024 and approved a budget of $3.2 million, up 12% from last year. "
    "Its chair said: \"We expect the new library to open in 2026.\" Residents asked why the old one, built "
    "in 1911, could not simply be repaired.\n\n"
    "def mean(values):\n    return sum(values) / len(values)\n")
"""Default text of the depth maps logged at evaluation: prose with numbers, punctuation, a quote and a little
code, so that every token class of the table (words, digits, spaces and punctuation) is represented."""


class ConfigError(ValueError):
    """A config value is invalid; the message names the dotted field, the value and what is allowed."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(kw_only=True)
class ModelConfig:
    """Llama-style decoder shape. ``num_layers`` is the unrolled depth of the model (vanilla: its layer count)."""

    num_layers: int
    """Unrolled depth: unique first/last layers + shared block x recursions (for R = 1, the vanilla depth)."""
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    """Key/value heads (GQA); equals num_attention_heads for plain multi-head attention."""
    ffn_hidden_size: int
    vocab_size: int = 49152
    max_seq_length: int = 2048
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    tie_embeddings: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    transformer_impl: TransformerImpl = "auto"
    """`auto`: Transformer Engine layers when TE is installed and CUDA is present, else megatron-core's local ones."""
    core_attention: CoreAttention = "sdpa"
    """Attention kernel of the local layers: `sdpa` (torch's scaled_dot_product_attention: flash/memory-efficient
    kernels on GPU, no dense mask for causal compacted tokens) or `megatron` (megatron-core's DotProductAttention,
    dense scores and masks; the reference). The Transformer Engine layers use TE's attention either way."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size", "vocab_size", "max_seq_length"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, f"model.{name} must be a positive integer, got {value!r}")
        for whole, part in (("hidden_size", "num_attention_heads"),
                            ("num_attention_heads", "num_query_groups")):
            whole_value, part_value = getattr(self, whole), getattr(self, part)
            _require(whole_value % part_value == 0,
                     f"model.{whole}={whole_value} must be divisible by model.{part}={part_value}")
        for name in ("hidden_dropout", "attention_dropout"):
            _require(0.0 <= getattr(self, name) < 1.0, f"model.{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(kw_only=True)
class RecursionConfig:
    """How the layer stack is shared and routed (Mixture-of-Recursions, Bae et al. 2025)."""

    num_recursions: int = 1
    """N_r: how many times the shared block is applied. 1 with routing `none` is the vanilla model."""
    sharing: Sharing = "middle_cycle"
    routing: Routing = "none"
    kv_mode: KVMode = "recursion_wise"
    capacities: tuple[float, ...] | None = None
    """Expert-choice: fraction of the sequence selected at each recursion; default (R - r + 1) / R."""
    router_alpha: float | None = None
    """Gate scale; default 0.1 for expert-choice (alpha * sigmoid), 1.0 for token-choice (alpha * softmax)."""
    router_temperature: float = 1.0
    aux_loss_coeff: float | None = None
    """Expert-choice BCE (default 0.001) or token-choice balancing loss (default 0.1)."""
    z_loss_coeff: float = 0.0
    token_balancing: TokenBalancing = "loss"
    """Token-choice: Switch-style balancing loss, or DeepSeek-style loss-free bias."""
    bias_update_rate: float = 0.001
    """Token-choice loss-free balancing: bias step u per optimizer step."""

    def __post_init__(self) -> None:
        if isinstance(self.capacities, list):
            self.capacities = tuple(self.capacities)
        _require(isinstance(self.num_recursions, int) and self.num_recursions >= 1,
                 f"recursion.num_recursions must be an integer >= 1, got {self.num_recursions!r}")
        if self.routing != "none":
            _require(self.sharing in ("cycle", "middle_cycle"),
                     f"recursion.sharing={self.sharing!r} cannot be routed: routing {self.routing!r} needs the "
                     "shared block applied whole per recursion; use 'cycle' or 'middle_cycle'")
        if self.kv_mode == "shared":
            _require(self.sharing in ("cycle", "middle_cycle"),
                     f"recursion.kv_mode='shared' needs sharing 'cycle' or 'middle_cycle', got {self.sharing!r}")
            _require(self.num_recursions > 1, "recursion.kv_mode='shared' needs recursion.num_recursions > 1")
            _require(not self.capacities or self.capacities[0] == 1.0,
                     "recursion.kv_mode='shared' records K/V of every token at the first recursion, so "
                     f"recursion.capacities[0] must be 1.0, got {self.capacities[0] if self.capacities else None}")
        if self.capacities is not None:
            _require(self.routing == "expert_choice",
                     f"recursion.capacities is only used by expert_choice routing, not {self.routing!r}")
            caps = self.capacities
            _require(len(caps) == self.num_recursions,
                     f"recursion.capacities has {len(caps)} entries but recursion.num_recursions="
                     f"{self.num_recursions}")
            _require(all(0.0 < c <= 1.0 for c in caps), f"recursion.capacities must lie in (0, 1], got {list(caps)}")
            _require(all(a >= b for a, b in zip(caps, caps[1:])),
                     f"recursion.capacities must be non-increasing (hierarchical routing), got {list(caps)}")
        _require(self.router_temperature > 0, f"recursion.router_temperature must be > 0, got {self.router_temperature}")
        _require(self.z_loss_coeff >= 0, f"recursion.z_loss_coeff must be >= 0, got {self.z_loss_coeff}")

    @property
    def effective_capacities(self) -> tuple[float, ...]:
        """Per-recursion selected fraction of the full sequence: (R - r + 1) / R by default (paper eq. 1)."""
        if self.capacities is not None:
            return self.capacities
        r_total = self.num_recursions
        return tuple((r_total - r) / r_total for r in range(r_total))

    @property
    def effective_alpha(self) -> float:
        if self.router_alpha is not None:
            return self.router_alpha
        return 1.0 if self.routing == "token_choice" else 0.1

    @property
    def effective_aux_loss_coeff(self) -> float:
        if self.aux_loss_coeff is not None:
            return self.aux_loss_coeff
        return 0.1 if self.routing == "token_choice" else 0.001

    @property
    def num_unique_edge_layers(self) -> int:
        """Unique layers before and after the shared block (1 each for middle-* sharing)."""
        return 1 if self.sharing.startswith("middle") else 0


@dataclass(kw_only=True)
class ParallelConfig:
    """Parallel layout; data-parallel size is derived: world_size / (tensor * pipeline)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    sequence_parallel: bool = False
    """Megatron's sequence parallelism with TP: norms, dropout and residuals on 1/tp of the sequence per rank.
    Routing sees whole sequences: each recursion gathers the stream, routes and compacts, and splits its active
    tokens (padded to a multiple of tp) across the TP ranks again."""
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    collective_timeout_s: float = 600.0
    """How long a rank waits in one collective (every process group: gloo, NCCL, the distributed optimizer's,
    checkpointing's, DeepSpeed's) before the job fails; Megatron-LM's --distributed-timeout-minutes (10 min).
    A cut link or a hung peer costs this long; the run is then marked FAILED with the reason."""

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"parallel.{name} must be an integer >= 1, got {value!r}")
        _require(isinstance(self.collective_timeout_s, (int, float)) and self.collective_timeout_s > 0,
                 f"parallel.collective_timeout_s must be a number of seconds > 0, got {self.collective_timeout_s!r}")
        _require(not self.sequence_parallel or self.tensor_parallel_size > 1,
                 "parallel.sequence_parallel needs parallel.tensor_parallel_size > 1")
        _require(not self.overlap_param_gather or self.use_distributed_optimizer,
                 "parallel.overlap_param_gather needs parallel.use_distributed_optimizer=true")


@dataclass(kw_only=True)
class DataConfig:
    """Training data: Megatron .bin/.idx prefixes blended by weight, or the embedded demo corpus."""

    blend: tuple[str, ...] = ()
    """Dataset prefixes, optionally weighted: ["0.7", "path/a", "0.3", "path/b"] or ["path/a", "path/b"]."""
    valid_blend: tuple[str, ...] = ()
    """Validation data of its own (Megatron-LM's --valid-data-path). With it or ``test_blend`` set, ``blend`` is
    all training data and ``split`` is not used."""
    test_blend: tuple[str, ...] = ()
    """Test data of its own (--test-data-path), evaluated once at the end of training."""
    split: str = "969,30,1"
    tokenizer: str | None = None
    """A SentencePiece model (file or folder) or a Hugging Face tokenizer folder (data/tokenizer.py)."""
    cache_dir: str | None = None
    num_workers: int = 0
    seed: int = 1234
    reset_attention_mask: bool = False
    """Document masking (Megatron-LM's name): a token attends only within its own document of a packed sample."""
    reset_position_ids: bool = False
    """Positions (RoPE) restart at 0 after each end-of-document token."""
    eod_mask_loss: bool = False
    """No loss on predicting the token after an end-of-document token (the next document's first token)."""

    def __post_init__(self) -> None:
        for name in ("blend", "valid_blend", "test_blend"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(str(b) for b in getattr(self, name)))
        _require(len(self.split.split(",")) == 3 and all(p.strip().replace(".", "", 1).isdigit()
                                                          for p in self.split.split(",")),
                 f"data.split must be three comma-separated weights like '969,30,1', got {self.split!r}")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    schedule: LRSchedule = "wsd"
    warmup_steps: int = 0
    decay_fraction: float = 0.2
    """WSD: fraction of the steps spent in the final linear decay."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(0 <= self.min_lr <= self.lr, f"optim.min_lr must be in [0, optim.lr], got {self.min_lr}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(0 <= self.decay_fraction <= 1, f"optim.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        _require(self.clip_grad >= 0, f"optim.clip_grad must be >= 0 (0 disables), got {self.clip_grad}")


def wsd_decay_steps(decay_fraction: float, train_steps: int) -> int:
    """Steps of WSD's final linear decay: ``decay_fraction`` of the run, at least one."""
    return max(1, int(round(decay_fraction * train_steps)))


@dataclass(kw_only=True)
class TrainConfig:
    train_steps: int = 100
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seq_length: int | None = None
    """Training sequence length; defaults to model.max_seq_length."""
    eval_interval: int = 50
    eval_steps: int = 4
    eval_mode: Literal["megatron", "fixed"] = "megatron"
    """Which validation samples exist. `megatron` (Megatron-LM's sizing): ``eval_steps`` global batches for each of
    the ``train_steps // eval_interval + 1`` evaluations, so the shuffled validation set, and what an evaluation
    reads, change with ``train_steps``. `fixed`: exactly ``eval_steps`` global batches, the same sequences for
    every evaluation and for every run of the same data, whatever its length (compare runs with this)."""
    log_interval: int = 10
    seed: int = 1234
    precision: Precision = "auto"
    """`auto`: bf16 on GPU, fp32 on CPU."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation (Megatron-LM's --recompute-granularity): `selective` keeps no attention
    internals and recomputes the core attention in backward; `full` keeps only each layer's input and recomputes
    the whole layer."""
    recompute_recursions: tuple[int, ...] = ()
    """The recursions of the shared block that recompute, counted from 1 (recursion 1 runs the most tokens, so
    its activations are the largest); empty: all. Prefix and suffix layers recompute whenever train.recompute
    is set."""
    exit_interval: int | None = None
    """Stop after a step that is a multiple of this, saving a checkpoint there (when checkpoint.save_dir is set),
    and exit 0 so that rerunning the command resumes (Megatron-LM's --exit-interval); None: never."""
    exit_duration_mins: float | None = None
    """Stop like exit_interval after the first step that ends more than this many minutes after the job started,
    agreed across ranks (Megatron-LM's --exit-duration-in-mins). Leave a step plus a save before the scheduler's
    time limit; None: never."""

    def __post_init__(self) -> None:
        for name in ("train_steps", "micro_batch_size", "global_batch_size", "eval_interval", "log_interval"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"train.{name} must be an integer >= 1, got {value!r}")
        _require(self.exit_interval is None or self.exit_interval >= 1,
                 f"train.exit_interval must be an integer >= 1 (or null: never), got {self.exit_interval!r}")
        _require(self.exit_duration_mins is None or self.exit_duration_mins > 0,
                 f"train.exit_duration_mins must be > 0 (or null: no time limit), got {self.exit_duration_mins!r}")
        _require(self.eval_steps >= 0, f"train.eval_steps must be >= 0, got {self.eval_steps}")
        _require(self.seq_length is None or self.seq_length >= 2,
                 f"train.seq_length must be >= 2, got {self.seq_length}")
        if isinstance(self.recompute_recursions, list):
            self.recompute_recursions = tuple(self.recompute_recursions)
        _require(not self.recompute_recursions or self.recompute != "none",
                 "train.recompute_recursions needs train.recompute 'selective' or 'full'")


@dataclass(kw_only=True)
class CheckpointConfig:
    save_dir: str | None = None
    """Where checkpoints go. A config loaded from YAML or overrides that leaves this key out gets
    ``<output_dir>/checkpoints`` (filled in by :func:`config_from_dict`, so each run resumes only from its own
    output folder); ``null`` disables saving."""
    save_interval: int | None = None
    keep_last: int = 2
    load_dir: str | None = None
    """Defaults to save_dir: rerunning the same command resumes."""
    fallback_to_previous: bool = False
    """When the newest checkpoint is damaged or incomplete, resume from the newest intact earlier one (logged)
    instead of stopping. Off by default: falling back silently repeats finished steps; an operator should
    decide, or set it for unattended requeue loops."""
    allow_config_change: bool = False
    """Resume even when model or routing fields (shapes, rotary base, sharing, capacities, ...) differ from the
    config stored in the checkpoint, or when train.train_steps changes after the LR began to decay (the
    schedule restarts there: a re-warm); the differences are logged."""

    def __post_init__(self) -> None:
        _require(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
        _require(self.save_interval is None or self.save_interval >= 1,
                 f"checkpoint.save_interval must be >= 1, got {self.save_interval}")


@dataclass(kw_only=True)
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str | None = None
    """MLflow tracking URI; default MLFLOW_TRACKING_URI or sqlite:///mlflow.db in the run directory."""
    experiment: str = "mor_megatron"
    run_name: str | None = None
    """MLflow run name; default ``<preset or output folder>-<UTC time>-<6 hex digits>``, unique per job."""
    jsonl_path: str | None = None
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0
    timeout_s: float = 5.0
    """HTTP timeout of one MLflow call; a dead server costs at most this per retry window."""
    retry_after_s: float = 60.0
    """After an MLflow failure, calls are dropped (the JSONL copy keeps them) for this long, then retried."""
    close_timeout_s: float = 30.0
    peak_tflops: float | None = None
    """Device peak TFLOP/s for MFU when the device is not in the built-in table."""
    depth_maps: bool = True
    """At each evaluation, log a depth map of ``depth_map_text`` (artifacts ``depth/step_XXXXXX.*``) and the
    mean recursion depth per token class (``depth/*`` metrics). Skipped with pipeline parallelism."""
    depth_map_text: str = DEFAULT_DEPTH_MAP_TEXT
    """The fixed text of those depth maps: the same at every evaluation and in every run, so maps compare."""
    depth_map_tokens: int = 256
    """At most this many tokens of ``depth_map_text`` (and at most the sequence length): one short forward."""

    def __post_init__(self) -> None:
        _require(self.depth_map_tokens >= 1,
                 f"tracking.depth_map_tokens must be >= 1, got {self.depth_map_tokens}")


@dataclass(kw_only=True)
class DeepSpeedConfig:
    """DeepSpeed ZeRO backend (``mor-pretrain-deepspeed`` only; the Megatron path ignores this section).

    Batch sizes, gradient clipping, precision and the AdamW hyper-parameters always come from this config tree
    and are written into the DeepSpeed JSON; the LR schedule is the project's (``optim``).
    """

    config: str | None = None
    """DeepSpeed JSON, e.g. configs/deepspeed/zero2.json; None: ZeRO with DeepSpeed's defaults."""
    zero_stage: int | None = None
    """Overrides zero_optimization.stage of the JSON (1-3); None: the JSON's stage, else 1."""
    offload: bool = False
    """Optimizer states (stage 3: also parameters) in CPU memory, updated by DeepSpeedCPUAdam (C++ build)."""

    def __post_init__(self) -> None:
        _require(self.zero_stage is None or self.zero_stage in (1, 2, 3),
                 f"deepspeed.zero_stage must be 1, 2 or 3 (or null for the JSON's stage), got {self.zero_stage!r}; "
                 "for plain data parallelism use the Megatron path (mor-pretrain)")


@dataclass(kw_only=True)
class JobConfig:
    """The whole job. ``preset`` names a model shape; the ``model`` and ``recursion`` sections start from it."""

    preset: str | None = None
    model: ModelConfig
    recursion: RecursionConfig = field(default_factory=RecursionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    output_dir: str = DEFAULT_OUTPUT_DIR

    @property
    def seq_length(self) -> int:
        return self.train.seq_length or self.model.max_seq_length


# --------------------------------------------------------------------------------------------------------------
# Layer layout derived from model + recursion (pure arithmetic, shared by the model, FLOPs and conversion).
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerLayout:
    """Which unique layer runs at each unrolled position. Indices are 0-based into the unique-layer list."""

    num_prefix: int
    """Unique layers before the shared block (1 for middle-* sharing)."""
    num_shared: int
    """Unique layers in the shared block (the base depth)."""
    num_suffix: int
    num_recursions: int
    sharing: Sharing

    @property
    def num_unique_layers(self) -> int:
        return self.num_prefix + self.num_shared + self.num_suffix

    @property
    def num_unrolled_layers(self) -> int:
        return self.num_prefix + self.num_shared * self.num_recursions + self.num_suffix

    def stage_layers(self, pp_rank: int, pp_size: int) -> list[int]:
        """Unique layers held by pipeline rank ``pp_rank``: its 1/pp_size slice of the shared block, plus the
        prefix on the first rank and the suffix on the last (each shared layer lives on exactly one rank)."""
        per_rank = self.num_shared // pp_size
        first = self.num_prefix + pp_rank * per_rank
        layers = list(range(first, first + per_rank))
        if pp_rank == 0:
            layers = list(range(self.num_prefix)) + layers
        if pp_rank == pp_size - 1:
            layers += list(range(self.num_prefix + self.num_shared, self.num_unique_layers))
        return layers

    def recursion_layers(self, recursion_idx: int) -> list[int]:
        """Unique-layer indices applied, in order, at 0-based recursion ``recursion_idx``.

        Cycle: the whole block per recursion. Sequence: recursion r runs layers r*B/R ... in the unrolled
        order (each shared layer repeated R times in a row), so a "recursion" is a contiguous run of unrolled
        positions, not a pass through the block.
        """
        base = self.num_prefix
        if self.sharing in ("cycle", "middle_cycle"):
            return list(range(base, base + self.num_shared))
        unrolled = [base + i // self.num_recursions for i in range(self.num_shared * self.num_recursions)]
        return unrolled[recursion_idx * self.num_shared:(recursion_idx + 1) * self.num_shared]


def layer_layout(model: ModelConfig, recursion: RecursionConfig) -> LayerLayout:
    """Split ``model.num_layers`` unrolled layers into unique prefix / shared block / suffix."""
    edge = recursion.num_unique_edge_layers
    middle = model.num_layers - 2 * edge
    r_total = recursion.num_recursions
    if middle < r_total or middle % r_total != 0:
        fix = _next_divisible_depth(model.num_layers, r_total, edge)
        raise ConfigError(
            f"model.num_layers={model.num_layers} does not fit recursion.sharing={recursion.sharing!r} with "
            f"recursion.num_recursions={r_total}: the {middle} layers outside the {2 * edge} unique edge layers "
            f"must be a positive multiple of {r_total}; use model.num_layers={fix}")
    return LayerLayout(num_prefix=edge, num_shared=middle // r_total, num_suffix=edge,
                       num_recursions=r_total, sharing=recursion.sharing)


def _next_divisible_depth(num_layers: int, num_recursions: int, edge: int) -> int:
    depth = max(num_layers, 2 * edge + num_recursions)
    while (depth - 2 * edge) % num_recursions:
        depth += 1
    return depth


# --------------------------------------------------------------------------------------------------------------
# Paper presets: {135m,360m,730m,1.7b} x {vanilla, recursive-rN, mor-e-rN, mor-t-r3, mor-e-r3-kvshare} + tiny-*.
# --------------------------------------------------------------------------------------------------------------

_BASES: dict[str, dict[str, int]] = {
    # SmolLM shapes (paper App. Tab. model_arch); head_dim 64 everywhere.
    "135m": dict(num_layers=30, hidden_size=576, num_attention_heads=9, num_query_groups=3, ffn_hidden_size=1536),
    "360m": dict(num_layers=32, hidden_size=960, num_attention_heads=15, num_query_groups=5, ffn_hidden_size=2560),
    "730m": dict(num_layers=26, hidden_size=1536, num_attention_heads=24, num_query_groups=8, ffn_hidden_size=4096),
    "1.7b": dict(num_layers=24, hidden_size=2048, num_attention_heads=32, num_query_groups=32, ffn_hidden_size=8192),
    # CPU-sized shape for tests and the demo.
    "tiny": dict(num_layers=8, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=176,
                 vocab_size=2048, max_seq_length=256),
}


def _variants() -> dict[str, dict[str, Any]]:
    variants: dict[str, dict[str, Any]] = {"vanilla": dict(num_recursions=1, routing="none")}
    for r in (2, 3, 4):
        variants[f"recursive-r{r}"] = dict(num_recursions=r, routing="none")
        variants[f"mor-e-r{r}"] = dict(num_recursions=r, routing="expert_choice")
    variants["mor-t-r3"] = dict(num_recursions=3, routing="token_choice")
    variants["mor-e-r3-kvshare"] = dict(num_recursions=3, routing="expert_choice", kv_mode="shared")
    return variants


PRESET_NAMES: tuple[str, ...] = tuple(f"{base}-{variant}" for base in _BASES for variant in _variants())


def preset(name: str) -> tuple[ModelConfig, RecursionConfig]:
    """Model and recursion sections of a named preset.

    Recursive variants use middle-cycle sharing; like the paper, layers are *added* until the middle of the
    stack divides by N_r (360M, N_r=4 -> 34 layers; 135M, N_r=3 -> 32 layers; 1.7B, N_r=3 -> 26 layers).
    """
    base_name, _, variant_name = name.partition("-")
    if base_name not in _BASES or variant_name not in _variants():
        close = difflib.get_close_matches(name, PRESET_NAMES, n=3)
        raise ConfigError(f"unknown preset {name!r}; did you mean {close or 'one of ' + ', '.join(PRESET_NAMES)}?")
    model_kwargs = dict(_BASES[base_name])
    recursion = RecursionConfig(sharing="middle_cycle", **_variants()[variant_name])
    if recursion.num_recursions > 1:
        model_kwargs["num_layers"] = _next_divisible_depth(model_kwargs["num_layers"], recursion.num_recursions,
                                                           recursion.num_unique_edge_layers)
    return ModelConfig(**model_kwargs), recursion


# --------------------------------------------------------------------------------------------------------------
# Loading: YAML mapping -> typed dataclasses, dotted overrides, strict unknown-key errors.
# --------------------------------------------------------------------------------------------------------------

def _coerce(value: Any, annotation: Any, path: str) -> Any:
    origin = get_origin(annotation)
    if origin is Literal:
        allowed = get_args(annotation)
        _require(value in allowed, f"{path}={value!r} is not one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(annotation)
        if value is None:
            _require(type(None) in options, f"{path} may not be null")
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if origin in (tuple, list):
        _require(isinstance(value, (list, tuple)), f"{path} must be a list, got {value!r}")
        (item_type, *_) = get_args(annotation)
        return tuple(_coerce(v, item_type, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(annotation):
        _require(isinstance(value, dict), f"{path} must be a mapping, got {value!r}")
        return _build(annotation, value, path)
    if annotation is bool:
        _require(isinstance(value, bool), f"{path} must be true or false, got {value!r}")
        return value
    if annotation is int:
        _require(isinstance(value, int) and not isinstance(value, bool), f"{path} must be an integer, got {value!r}")
        return value
    if annotation is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool),
                 f"{path} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        _require(isinstance(value, (str, int, float)) and not isinstance(value, bool),
                 f"{path} must be a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, values: dict[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{path}." if path else ""
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {prefix + key!r}{hint}")
    kwargs = {key: _coerce(value, hints[key], prefix + key) for key, value in values.items()}
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    _require(not missing, f"missing required config keys: {', '.join(prefix + m for m in missing)}")
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        _require(isinstance(child, dict), f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["model.hidden_size=128", "recursion.capacities=[1,0.5]"]`` -> nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        _require(bool(sep) and bool(key.strip()), f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)}); "
                              "quote strings with special characters (key='\"a: b\"') and close every "
                              "bracket") from err
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_from_dict(values: dict[str, Any]) -> JobConfig:
    """Build a JobConfig from a plain mapping; a ``preset`` key seeds the model and recursion sections."""
    values = dict(values)
    preset_name = values.get("preset")
    if preset_name is not None:
        model, recursion = preset(str(preset_name))
        values["model"] = _merge(dataclasses.asdict(model), values.get("model") or {})
        values["recursion"] = _merge(_plain(dataclasses.asdict(recursion)), values.get("recursion") or {})
    _require("model" in values, "the config needs either a 'preset' or a 'model' section")
    return _build(JobConfig, _with_default_save_dir(values), "")


def _with_default_save_dir(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with ``checkpoint.save_dir`` set to ``<output_dir>/checkpoints`` when the key is absent.

    Filled in on the raw mapping because the default depends on another section: a shipped config that
    hard-coded its own folder made runs with another ``output_dir`` resume from that folder's checkpoints.
    An explicit ``null`` stays (no checkpoints); ill-typed sections are left for :func:`_build` to report.
    """
    checkpoint = values.get("checkpoint", {})
    output_dir = values.get("output_dir", DEFAULT_OUTPUT_DIR)
    if not isinstance(checkpoint, dict) or "save_dir" in checkpoint or not isinstance(output_dir, str):
        return values
    return {**values, "checkpoint": {**checkpoint, "save_dir": str(Path(output_dir) / "checkpoints")}}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load a YAML config (or start empty), apply dotted overrides, and return the typed tree."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        _require(path.is_file(), f"config file {str(path)!r} does not exist")
        values = _read_yaml_file(path) or {}
        _require(isinstance(values, dict), f"config file {str(path)!r} must hold a mapping at the top level")
    return config_from_dict(_merge(values, parse_overrides(overrides or [])))


def _read_yaml_file(path: Path) -> Any:
    """The parsed YAML of ``path``; a ``ConfigError`` naming the file, line and column if it cannot be."""
    try:
        raw = path.read_bytes()
        return yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {raw[err.start]:#04x} at line "
                          f"{line}, byte offset {err.start}); save it as UTF-8") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(err)}; fix the "
                          "syntax there (indentation, an unclosed quote or bracket, ': ' in an unquoted "
                          "value)") from err
    except OSError as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err.strerror}") from err


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line from a PyYAML error: what went wrong and where (1-based line and column)."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{err.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(err).split())


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_to_dict(config: JobConfig) -> dict[str, Any]:
    """Plain, YAML-safe mapping that :func:`config_from_dict` reads back to an equal config."""
    return _plain(dataclasses.asdict(config))


def dump_config(config: JobConfig) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


# --------------------------------------------------------------------------------------------------------------
# Cross-section validation, run before any worker starts.
# --------------------------------------------------------------------------------------------------------------

def validate(config: JobConfig, world_size: int | None = None) -> None:
    """Check rules that span sections. ``world_size`` (when known) checks the parallel layout too."""
    model, rec, par, train = config.model, config.recursion, config.parallel, config.train
    layout = layer_layout(model, rec)
    tp, pp = par.tensor_parallel_size, par.pipeline_parallel_size
    for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        value = getattr(model, name)
        _require(value % tp == 0,
                 f"model.{name}={value} is not divisible by parallel.tensor_parallel_size={tp}")
    if pp > 1:
        _require(layout.num_shared % pp == 0,
                 f"the shared block has {layout.num_shared} layers, which parallel.pipeline_parallel_size={pp} "
                 "cannot split evenly (each pipeline rank holds one slice of it); change model.num_layers or the "
                 "pipeline size")
        # Stages between the first and the last get no batch, so they would have neither mask nor positions.
        _require(not (config.data.reset_attention_mask or config.data.reset_position_ids),
                 "data.reset_attention_mask / data.reset_position_ids are not supported with pipeline parallelism "
                 "yet (middle stages receive no batch); set them false or parallel.pipeline_parallel_size=1")
    _require(not par.sequence_parallel or config.seq_length % tp == 0,
             f"train.seq_length={config.seq_length} is not divisible by parallel.tensor_parallel_size={tp}, which "
             "parallel.sequence_parallel splits it by")
    _require(config.seq_length <= model.max_seq_length,
             f"train.seq_length={config.seq_length} exceeds model.max_seq_length={model.max_seq_length}")
    _require(config.optim.warmup_steps < train.train_steps,
             f"optim.warmup_steps={config.optim.warmup_steps} must be smaller than train.train_steps="
             f"{train.train_steps}")
    bad = [r for r in train.recompute_recursions if not 1 <= r <= rec.num_recursions]
    _require(not bad, f"train.recompute_recursions={list(train.recompute_recursions)}: recursions are counted "
             f"1..{rec.num_recursions} (recursion.num_recursions)")
    # The recomputed forward would run outside the KV-share session that spreads the reused queries.
    _require(train.recompute == "none" or rec.kv_mode != "shared",
             "train.recompute is not supported with recursion.kv_mode='shared' yet; set train.recompute=none")
    if rec.routing == "expert_choice":
        _require(int(min(rec.effective_capacities) * config.seq_length) >= 1,
                 f"recursion.capacities select no token at the last recursion for seq_length={config.seq_length}")
    if world_size is not None:
        _require(world_size % (tp * pp) == 0, f"world size {world_size} is not divisible by "
                 f"parallel.tensor_parallel_size={tp} x parallel.pipeline_parallel_size={pp}")
        dp = world_size // (tp * pp)
        num_microbatches = train.global_batch_size // max(1, train.micro_batch_size * dp)
        _require(pp == 1 or rec.num_recursions == 1 or num_microbatches % pp == 0,
                 f"the interleaved pipeline schedule (one virtual stage per recursion) needs the number of "
                 f"micro-batches ({num_microbatches} = train.global_batch_size / (micro_batch_size x dp)) to be a "
                 f"multiple of parallel.pipeline_parallel_size={pp}")
        _require(train.global_batch_size % (train.micro_batch_size * dp) == 0,
                 f"train.global_batch_size={train.global_batch_size} is not divisible by train.micro_batch_size="
                 f"{train.micro_batch_size} x data-parallel size {dp} (world {world_size} / tp {tp} / "
                 f"pp {pp})")
