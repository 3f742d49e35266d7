"""The DeepSpeed JSON of a job: the user's file (``deepspeed.config``) merged with what the project decides.

Pure standard library, like :mod:`mor_megatron.config`, so that a DeepSpeed job is checked before torch,
megatron-core or DeepSpeed are imported.

Who owns what. The project's config tree decides everything that must agree between the two training
backends, and writes it into the DeepSpeed config:

========================================  =====================================================================
DeepSpeed key                             project value
========================================  =====================================================================
``train_batch_size``                      ``train.global_batch_size``
``train_micro_batch_size_per_gpu``        ``train.micro_batch_size``
``gradient_accumulation_steps``           ``global_batch_size / (micro_batch_size x data-parallel size)``
``gradient_clipping``                     ``optim.clip_grad``
``bf16.enabled``                          ``train.precision`` (`auto`: bf16 on GPU, fp32 on CPU)
``optimizer``                             AdamW with ``optim.lr``, ``adam_beta1/2``, ``adam_eps``, ``weight_decay``
``zero_optimization.stage``               ``deepspeed.zero_stage`` when set (an explicit override)
``zero_optimization.offload_*``           ``deepspeed.offload`` when true
========================================  =====================================================================

A project-owned key that the JSON leaves out or sets to ``"auto"`` is filled in; one that the JSON sets to the
same value is accepted; one that the JSON sets to a *different* value is a :class:`~mor_megatron.config.ConfigError`
naming both values. The two configs can therefore never disagree silently, and a JSON written for another job
fails loudly instead of training with the wrong batch size. A ``scheduler`` section is refused: the LR schedule
is the project's (``optim.schedule``), stepped by the engine. ``fp16`` is refused (neither backend trains in
fp16). Every other key (bucket sizes, prefetch, ``overlap_comm``, ...) passes through untouched.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from mor_megatron.config import ConfigError, JobConfig

AUTO = "auto"
# DeepSpeed's default prints a line every 10 steps; the project logs its own metrics.
_DEFAULT_STEPS_PER_PRINT = 1_000_000


def check_deepspeed_job(config: JobConfig, *, world_size: int, device_type: str) -> dict[str, Any]:
    """Rules of the DeepSpeed path on top of :func:`mor_megatron.config.validate`; returns the resolved JSON.

    Raises:
        ConfigError: pipeline or sequence parallelism is requested (the DeepSpeed path runs tensor x data
            parallel only), ``deepspeed.config`` names a missing or malformed JSON, or the JSON conflicts with
            the config.
    """
    pp = config.parallel.pipeline_parallel_size
    if pp != 1:
        raise ConfigError(
            f"parallel.pipeline_parallel_size={pp}: the DeepSpeed path (mor-pretrain-deepspeed) runs tensor x data "
            "parallel only; set parallel.pipeline_parallel_size=1, or use the Megatron path (mor-pretrain) for "
            "pipeline parallelism")
    if config.parallel.sequence_parallel:
        # Each TP rank's norm gradients are partial sums; megatron's finalize_model_grads adds them up, DeepSpeed
        # does not.
        raise ConfigError("parallel.sequence_parallel is not supported on the DeepSpeed path (its norm gradients "
                          "would not be summed over the TP ranks); use the Megatron path (mor-pretrain)")
    tp = config.parallel.tensor_parallel_size
    if world_size % tp:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor_parallel_size={tp}")
    return build_deepspeed_config(config, data_parallel_size=world_size // tp, device_type=device_type)


def load_deepspeed_json(path: str | None) -> dict[str, Any]:
    """The user's DeepSpeed JSON as a dict (``{}`` for None).

    Raises:
        ConfigError: the file is missing, is not JSON, or does not hold an object.
    """
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"deepspeed.config={path!r} does not exist; point it at a DeepSpeed JSON such as "
                          "configs/deepspeed/zero2.json")
    try:
        values = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed.config={path!r} is not valid JSON: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"deepspeed.config={path!r} must hold a JSON object at the top level")
    return values


def resolve_bf16(precision: str, device_type: str) -> bool:
    """``train.precision`` -> bf16 or not; `auto` is bf16 on GPU and fp32 on CPU (as on the Megatron path)."""
    if precision == "auto":
        return device_type == "cuda"
    return precision == "bf16"


def _claim(section: dict[str, Any], key: str, value: Any, path: str, owner: str, context: str = "") -> None:
    """Write a project-owned ``value`` at ``section[key]`` unless the JSON already holds a different one."""
    current = section.get(key, AUTO)
    if current != AUTO and current != value:
        raise ConfigError(f"the DeepSpeed JSON sets {path}={current!r}, but the project's {owner}{context} gives "
                          f"{value!r}; remove {path} from the JSON (or set it to \"auto\") and set {owner} instead")
    section[key] = value


def _section(parent: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    value = parent.setdefault(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"the DeepSpeed JSON's {path} must be an object, got {value!r}")
    return value


def build_deepspeed_config(config: JobConfig, *, data_parallel_size: int, device_type: str) -> dict[str, Any]:
    """The DeepSpeed config dict for ``deepspeed.initialize`` (see the module docstring for the rules).

    Args:
        config: the job's config.
        data_parallel_size: world size / tensor-parallel size.
        device_type: ``"cuda"`` or ``"cpu"``; decides `auto` precision and the default Adam implementation.

    Raises:
        ConfigError: a conflict between the JSON and the project's config, a refused section, or a batch layout
            that does not divide.
    """
    ds = copy.deepcopy(load_deepspeed_json(config.deepspeed.config))
    train, optim = config.train, config.optim
    per_step = train.micro_batch_size * data_parallel_size
    if train.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size={train.global_batch_size} is not divisible by "
                          f"train.micro_batch_size={train.micro_batch_size} x data-parallel size {data_parallel_size}")
    _claim(ds, "train_batch_size", train.global_batch_size, "train_batch_size", "train.global_batch_size")
    _claim(ds, "train_micro_batch_size_per_gpu", train.micro_batch_size, "train_micro_batch_size_per_gpu",
           "train.micro_batch_size")
    _claim(ds, "gradient_accumulation_steps", train.global_batch_size // per_step, "gradient_accumulation_steps",
           "train.global_batch_size / (train.micro_batch_size x data-parallel size)")
    _claim(ds, "gradient_clipping", float(optim.clip_grad), "gradient_clipping", "optim.clip_grad")

    for refused, fix in (("scheduler", "the LR schedule is the project's: set optim.schedule, optim.warmup_steps, "
                                       "optim.min_lr"),
                         ("fp16", "use bf16 (train.precision=bf16) or fp32")):
        section = ds.get(refused)
        if section and (refused != "fp16" or section.get("enabled") not in (False, AUTO)):
            raise ConfigError(f"the DeepSpeed JSON has a {refused!r} section, which this project does not use; "
                              f"remove it ({fix})")
    ds.pop("fp16", None)
    bf16 = resolve_bf16(train.precision, device_type)
    _claim(_section(ds, "bf16", "bf16"), "enabled", bf16, "bf16.enabled", "train.precision",
           f"={train.precision!r} on {device_type}")

    zero = _section(ds, "zero_optimization", "zero_optimization")
    if config.deepspeed.zero_stage is not None:
        zero["stage"] = config.deepspeed.zero_stage
    zero.setdefault("stage", 1)
    stage = zero["stage"]
    if stage not in (1, 2, 3):
        raise ConfigError(f"the DeepSpeed JSON's zero_optimization.stage must be 1, 2 or 3, got {stage!r} (set "
                          "deepspeed.zero_stage to override it); for plain data parallelism use the Megatron path")
    if config.deepspeed.offload:
        _section(zero, "offload_optimizer", "zero_optimization.offload_optimizer")["device"] = "cpu"
        if stage == 3:
            _section(zero, "offload_param", "zero_optimization.offload_param")["device"] = "cpu"
    offload = zero.get("offload_optimizer")
    offloaded = isinstance(offload, dict) and offload.get("device") in ("cpu", "nvme")

    _write_optimizer(ds, config, offloaded=offloaded)
    ds.setdefault("steps_per_print", _DEFAULT_STEPS_PER_PRINT)
    return ds


def _write_optimizer(ds: dict[str, Any], config: JobConfig, *, offloaded: bool) -> None:
    """The ``optimizer`` section: AdamW with the project's hyper-parameters (see the module docstring).

    Implementation: torch's AdamW (``torch_adam``) unless the optimizer is offloaded, so that no C++ op is built;
    with offload DeepSpeedCPUAdam (DeepSpeed refuses a torch optimizer there). A JSON may set ``torch_adam``
    itself, e.g. false for DeepSpeed's FusedAdam on GPU.
    """
    optim = config.optim
    section = _section(ds, "optimizer", "optimizer")
    kind = section.setdefault("type", "AdamW")
    if not isinstance(kind, str) or kind.lower() not in ("adamw", "adam"):
        raise ConfigError(f"the DeepSpeed JSON's optimizer.type={kind!r}: this project trains with AdamW; remove "
                          "the optimizer section or set its type to \"AdamW\"")
    section["type"] = "AdamW"
    params = _section(section, "params", "optimizer.params")
    _claim(params, "lr", float(optim.lr), "optimizer.params.lr", "optim.lr")
    _claim(params, "betas", [float(optim.adam_beta1), float(optim.adam_beta2)], "optimizer.params.betas",
           "[optim.adam_beta1, optim.adam_beta2]")
    _claim(params, "eps", float(optim.adam_eps), "optimizer.params.eps", "optim.adam_eps")
    _claim(params, "weight_decay", float(optim.weight_decay), "optimizer.params.weight_decay",
           "optim.weight_decay")
    if params.get("adam_w_mode", True) is not True:
        raise ConfigError("the DeepSpeed JSON sets optimizer.params.adam_w_mode=false (Adam with L2); this project "
                          "trains with decoupled weight decay (AdamW): remove adam_w_mode")
    params.setdefault("torch_adam", not offloaded)
    if offloaded and params["torch_adam"]:
        raise ConfigError("the optimizer is offloaded to CPU (deepspeed.offload or the JSON's offload_optimizer), "
                          "which needs DeepSpeedCPUAdam: remove optimizer.params.torch_adam from the JSON")


def write_deepspeed_config(ds_config: dict[str, Any], path: str | Path) -> Path:
    """Write the resolved DeepSpeed config (what the job really ran with) as JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ds_config, indent=2, sort_keys=True) + "\n")
    return path
