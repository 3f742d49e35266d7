"""Compare the config stored in a checkpoint with the one a resuming job runs.

A resume that changes the model or its routing (a shape, the rotary base, the sharing scheme, capacities, the
router's alpha, the KV mode, the vocabulary, ...) either fails to load with a shape error deep inside
dist_checkpointing or, worse, loads and trains a different model than the one that was saved. Such changes are
refused unless ``checkpoint.allow_config_change=true``. Everything else (train steps, intervals, the LR
schedule, batch sizes, data, tracking, output paths) may change between runs and is only logged, with one
exception: a run whose LR had already begun its decay (WSD's final phase, cosine after warmup) and is resumed
with another ``train.train_steps``. The scheduler follows the job's config (``override_opt_param_scheduler``),
so the LR would jump, for an extended WSD run back to its peak; that too needs ``allow_config_change``.
"""

from __future__ import annotations

import logging
from typing import Any

from mor_megatron.config import wsd_decay_steps

logger = logging.getLogger(__name__)

_GUARDED_SECTIONS = ("model", "recursion")
"""Sections whose fields define the model and its routing: every field is guarded unless listed below."""
_HARMLESS_GUARDED_FIELDS = frozenset({
    "model.transformer_impl",  # local and Transformer Engine layers share checkpoint keys
    "model.core_attention",  # two kernels of the same attention
    "model.hidden_dropout", "model.attention_dropout",  # regularisation, no weights
    "model.init_method_std",  # used only to initialise, never after a load
    "recursion.aux_loss_coeff", "recursion.z_loss_coeff",  # loss weights, no weights
    "recursion.bias_update_rate",  # step size of the loss-free bias, not the bias itself
})


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = list(value) if isinstance(value, tuple) else value
    return flat


def config_differences(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted field -> (stored value, current value) for every field that differs (missing: None)."""
    old, new = _flatten(stored), _flatten(current)
    return {key: (old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key)}


def is_guarded(field: str) -> bool:
    """True when changing ``field`` on resume changes the model or its routing."""
    # `preset` itself is not guarded: it only names the starting values, which the model/recursion fields hold.
    return field.split(".")[0] in _GUARDED_SECTIONS and field not in _HARMLESS_GUARDED_FIELDS


class ConfigChangedOnResume(ValueError):
    """The resuming job's model or routing config differs from the checkpoint's; the message lists the fields."""


def decay_start(config: dict[str, Any]) -> int | None:
    """First step at which the LR schedule of a stored config dict falls below its peak (None: constant)."""
    optim, steps = config.get("optim") or {}, (config.get("train") or {}).get("train_steps")
    schedule = optim.get("schedule")
    if steps is None or schedule not in ("wsd", "cosine"):
        return None
    if schedule == "cosine":
        return optim.get("warmup_steps", 0)
    return steps - wsd_decay_steps(optim.get("decay_fraction", 0.0), steps)


def check_resume_config(stored: dict[str, Any], current: dict[str, Any], *, checkpoint: str, step: int,
                        allow_change: bool) -> None:
    """Refuse (or, with ``allow_change``, log) model and routing changes, and a new length for a schedule
    that had begun to decay at ``step``; log the harmless changes.

    Raises:
        ConfigChangedOnResume: a guarded field differs and ``allow_change`` is False.
    """
    differences = config_differences(stored, current)
    guarded = {field: values for field, values in differences.items() if is_guarded(field)}
    decaying_from = decay_start(stored)
    if "train.train_steps" in differences and decaying_from is not None and step > decaying_from:
        guarded["train.train_steps"] = differences["train.train_steps"]
        logger.error("checkpoint %s is at step %d, after its LR began to decay at step %d: a new train.train_steps "
                     "restarts the schedule there (a WSD run goes back to its peak LR). To extend such a run, "
                     "resume from a checkpoint saved before step %d, or allow the re-warm explicitly.",
                     checkpoint, step, decaying_from, decaying_from)
    harmless = {field: values for field, values in differences.items() if field not in guarded}
    if harmless:
        logger.info("resuming %s with changed settings: %s", checkpoint, _describe(harmless))
    if not guarded:
        return
    if not allow_change:
        raise ConfigChangedOnResume(
            f"checkpoint {checkpoint} was saved with another model or routing config: {_describe(guarded)}. "
            "Resume with the stored values, start a new checkpoint.save_dir, or set "
            "checkpoint.allow_config_change=true if the change is intended")
    logger.warning("checkpoint.allow_config_change=true: resuming %s with a changed model or routing config: %s",
                   checkpoint, _describe(guarded))


def _describe(differences: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{field}: {old!r} (checkpoint) -> {new!r} (now)" for field, (old, new) in differences.items())
