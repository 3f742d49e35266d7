"""``mor-convert from-hf``: a Llama-architecture Hugging Face model -> a MoR checkpoint to up-train from.

The model shape (width, heads, FFN, vocabulary, RoPE base, norm epsilon, tied embeddings) comes from the HF
``config.json``; the preset supplies the recursion section (sharing, N_r, routing, KV mode, router settings).
The unrolled depth stays the source depth ``L``: with ``E`` unique edge layers on each side (1 for middle-*
sharing) the shared block gets ``B = (L - 2E) // N_r`` layers. When ``L - 2E`` is not a multiple of N_r the
middle source layers are first subsampled to ``B * N_r`` with ``round(linspace)``, as the official MoR code
does.

Relaxed Recursive Transformers initialisation of shared layer ``j`` (over that list ``V`` of source layers,
``P = E`` prefix layers, ``L' = 2E + B * N_r``), following the official ``sharing_strategy/llama.py``:

* ``stepwise``: ``V[round(linspace(P, L' - 1 - E, B))[j]]`` (every k-th layer across the middle);
* ``average``: the mean of the source layers the shared layer replaces (``V[P + j + r * B]`` for cycle
  sharing, ``V[P + j * N_r + r]`` for sequence sharing, over recursions r), norms included;
* ``lower``: ``V[P + j]`` (the first middle layers); ``upper``: ``V[L' - E - B + j]`` (the last ones).

Edge layers, embeddings, final norm and LM head are copied; routers start from their normal initialisation.
The result is a weights-only checkpoint at step 0 (``step_00000000`` + ``latest``, written by the trainer's
:class:`~mor_megatron.checkpoint.megatron.Checkpointer`) plus ``config.yaml``, the job config to train it with;
its ``data.tokenizer`` is the model's own tokenizer when the folder has one (ids need no mapping).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from mor_megatron.checkpoint.loop_state import LoopState
from mor_megatron.checkpoint.megatron import Checkpointer
from mor_megatron.config import (ConfigError, JobConfig, config_from_dict, config_to_dict, dump_config,
                                  layer_layout, parse_overrides, validate)
from mor_megatron.config import preset as preset_sections
from mor_megatron.convert import ConversionError
from mor_megatron.convert.hf_keys import hf_to_megatron
from mor_megatron.convert.megatron_ckpt import lone_process_group
from mor_megatron.convert.output_guard import refuse_output_overlapping
from mor_megatron.convert.to_hf import attention_shape, check_tensors

InitMethod = Literal["stepwise", "average", "lower", "upper"]
INIT_METHODS: tuple[str, ...] = get_args(InitMethod)

# model.* fields that come from the HF config; an override of one would contradict the weights.
_ARCH_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                "vocab_size", "rotary_base", "norm_epsilon", "tie_embeddings")
_LAYER_PARAMS = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                 "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


@dataclass
class ImportSummary:
    """What :func:`from_hf` wrote and how the shared block was initialised."""

    output_dir: str
    checkpoint: str
    preset: str
    init: str
    num_source_layers: int
    num_layers: int
    source_layers: dict[str, list[int]]
    """Unique layer (as 'prefix0', 'shared0', ..., 'suffix0') -> the source layers it was made from."""


def read_llama_config(llama_dir: Path) -> dict[str, Any]:
    """The ``config.json`` of a Llama-architecture model; :class:`ConversionError` for anything else."""
    path = llama_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{str(llama_dir)!r} has no config.json; pass a Hugging Face model folder")
    cfg = json.loads(path.read_text())
    architectures = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" or (architectures and "LlamaForCausalLM" not in architectures):
        raise ConversionError(f"{str(llama_dir)!r} is not a Llama-architecture model (model_type="
                              f"{cfg.get('model_type')!r}, architectures={architectures}); from-hf converts "
                              "LlamaForCausalLM checkpoints (RMSNorm, SwiGLU, RoPE, grouped-query attention)")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    unsupported = {
        "hidden_act": cfg.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(cfg.get("attention_bias", False)),
        "mlp_bias": bool(cfg.get("mlp_bias", False)),
        "rope type": rope.get("rope_type", rope.get("type", "default")) != "default",
        "head_dim": cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
        != cfg["hidden_size"] // cfg["num_attention_heads"],
    }
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ConversionError(f"{str(llama_dir)!r}: unsupported Llama variant ({', '.join(bad)} differ from "
                              "a plain Llama: silu, no biases, default RoPE, head_dim = hidden_size / heads)")
    return cfg


def read_llama_weights(llama_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``."""
    from safetensors.torch import load_file

    index = llama_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (llama_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConversionError(f"{str(llama_dir)!r} has no model.safetensors(.index.json); re-save the model "
                              "with save_pretrained(..., safe_serialization=True)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        if not (llama_dir / name).is_file():
            raise ConversionError(f"{str(llama_dir)!r} is missing weight shard {name!r} listed in its index")
        tensors.update(load_file(str(llama_dir / name)))
    return tensors


def job_config(hf_cfg: dict[str, Any], preset: str, overrides: list[str],
               tokenizer: Path | None = None) -> JobConfig:
    """Preset recursion + HF model shape + ``overrides`` -> a validated job config (unrolled depth fitted).

    ``tokenizer``: the model's own tokenizer, ``data.tokenizer`` unless an override names another.
    """
    tree = parse_overrides(overrides)
    if tokenizer is not None:
        tree["data"] = {"tokenizer": str(tokenizer), **tree.get("data", {})}
    clashes = sorted(set(tree.get("model", {})) & set(_ARCH_FIELDS))
    if clashes or "preset" in tree:
        raise ConversionError(f"overrides may not set {['model.' + c for c in clashes] or ['preset']}: the "
                              "model shape comes from the Hugging Face config and the preset from --preset")
    _, recursion = preset_sections(preset)
    preset_values = {k: v for k, v in recursion.__dict__.items() if v is not None}
    rec_values = {**preset_values, **tree.get("recursion", {})}
    edge = 1 if str(rec_values["sharing"]).startswith("middle") else 0
    source_layers = hf_cfg["num_hidden_layers"]
    shared = (source_layers - 2 * edge) // int(rec_values["num_recursions"])
    if shared < 1:
        raise ConversionError(f"a {source_layers}-layer model cannot hold {2 * edge} unique edge layers plus "
                              f"{rec_values['num_recursions']} recursions of at least one shared layer")
    rope = hf_cfg.get("rope_parameters") or {}
    model = {"num_layers": 2 * edge + shared * int(rec_values["num_recursions"]),
             "hidden_size": hf_cfg["hidden_size"], "num_attention_heads": hf_cfg["num_attention_heads"],
             "num_query_groups": hf_cfg.get("num_key_value_heads") or hf_cfg["num_attention_heads"],
             "ffn_hidden_size": hf_cfg["intermediate_size"], "vocab_size": hf_cfg["vocab_size"],
             "max_seq_length": hf_cfg.get("max_position_embeddings", 2048),
             "rotary_base": float(rope.get("rope_theta", hf_cfg.get("rope_theta", 10000.0))),
             "norm_epsilon": float(hf_cfg.get("rms_norm_eps", 1e-6)),
             "tie_embeddings": bool(hf_cfg.get("tie_word_embeddings", False)),
             "init_method_std": float(hf_cfg.get("initializer_range", 0.02))}
    values = {**tree, "model": {**model, **tree.get("model", {})}, "recursion": rec_values}
    try:
        config = config_from_dict(values)
        validate(config)
        return config
    except ConfigError as err:
        raise ConversionError(f"the converted model's config is invalid: {err}") from err


def virtual_source_layers(num_source_layers: int, num_target_layers: int, edge: int) -> list[int]:
    """Source layer behind each unrolled target position (the middle subsampled when it does not divide)."""
    if num_source_layers == num_target_layers:
        return list(range(num_source_layers))
    middle = [round(x) for x in np.linspace(edge, num_source_layers - 1 - edge, num_target_layers - 2 * edge)]
    return list(range(edge)) + middle + list(range(num_source_layers - edge, num_source_layers))


def unique_layer_sources(config: JobConfig, num_source_layers: int, init: InitMethod) -> dict[str, list[int]]:
    """Unique layer name -> source layers it is made from (several: averaged), per the module docstring."""
    layout = layer_layout(config.model, config.recursion)
    prefix, width, rec = layout.num_prefix, layout.num_shared, layout.num_recursions
    sources = virtual_source_layers(num_source_layers, layout.num_unrolled_layers, prefix)
    total = len(sources)
    plan = {f"prefix{i}": [sources[i]] for i in range(prefix)}
    steps = [round(x) for x in np.linspace(prefix, total - 1 - layout.num_suffix, width)]
    for j in range(width):
        if init == "stepwise":
            positions = [steps[j]]
        elif init == "lower":
            positions = [prefix + j]
        elif init == "upper":
            positions = [total - layout.num_suffix - width + j]
        elif layout.sharing in ("cycle", "middle_cycle"):
            positions = [prefix + j + r * width for r in range(rec)]
        else:
            positions = [prefix + j * rec + r for r in range(rec)]
        plan[f"shared{j}"] = [sources[p] for p in positions]
    plan.update({f"suffix{i}": [sources[total - layout.num_suffix + i]] for i in range(layout.num_suffix)})
    return plan


def unique_layer_tensors(hf_tensors: dict[str, torch.Tensor],
                         plan: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """HF-named tensors of the MoR model: ``model.layers.<u>`` is unique layer ``u`` in plan order."""
    out = {name: t for name, t in hf_tensors.items() if not name.startswith("model.layers.")}
    for unique_idx, layers in enumerate(plan.values()):
        for param in _LAYER_PARAMS:
            parts = [f"model.layers.{src}.{param}" for src in layers]
            missing = [p for p in parts if p not in hf_tensors]
            if missing:
                raise ConversionError(f"Hugging Face tensor {missing[0]!r} is missing")
            stacked = torch.stack([hf_tensors[p].float() for p in parts])
            out[f"model.layers.{unique_idx}.{param}"] = stacked.mean(dim=0).to(hf_tensors[parts[0]].dtype)
    return out


def _drop_derived(hf_tensors: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    # Old checkpoints store RoPE inverse frequencies (recomputed from rope_theta); a tied lm_head repeats the
    # embedding.
    return {name: t for name, t in hf_tensors.items()
            if not name.endswith("rotary_emb.inv_freq") and not (tied and name == "lm_head.weight")}


def from_hf(llama_dir: str | Path, output_dir: str | Path, *, preset: str, init: InitMethod = "stepwise",
            overrides: list[str] | None = None, seed: int = 0) -> ImportSummary:
    """Convert the Llama model in ``llama_dir`` into a MoR checkpoint in ``output_dir`` (module docstring).

    Args:
        preset: a ``mor_megatron.config`` preset name; its recursion section is used.
        init: shared-block initialisation (stepwise, average, lower, upper).
        overrides: dotted config overrides (``recursion.kv_mode=shared``, ``data.tokenizer=...``); the model
            shape fields are taken from the HF config and cannot be overridden. ``data.tokenizer`` defaults to
            the model's own tokenizer when its folder has one, so data preprocessed with it up-trains as is.
        seed: seed of the router initialisation.

    Raises:
        ConversionError: not a Llama model, missing weights, an unknown tensor, an impossible layout, a
            non-empty output folder, or one that is, contains or lies inside ``llama_dir``.
    """
    llama_dir, output_dir = Path(llama_dir), Path(output_dir)
    if init not in INIT_METHODS:
        raise ConversionError(f"init={init!r} is not one of {list(INIT_METHODS)}")
    refuse_output_overlapping(output_dir, {"Hugging Face model folder": llama_dir})
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ConversionError(f"output folder {str(output_dir)!r} is not empty; choose a new folder")
    hf_cfg = read_llama_config(llama_dir)
    config = job_config(hf_cfg, preset, list(overrides or []), _own_tokenizer(llama_dir))
    hf_tensors = _drop_derived(read_llama_weights(llama_dir), config.model.tie_embeddings)
    plan = unique_layer_sources(config, hf_cfg["num_hidden_layers"], init)
    megatron = hf_to_megatron(unique_layer_tensors(hf_tensors, plan), attention_shape(config))
    with lone_process_group() as ctx:
        model = _build_model(config, ctx.pg_collection, seed)
        _load_into(model, megatron, config, llama_dir)
        source = {"hf_model": str(llama_dir.resolve()), "preset": preset, "init": init,
                  "source_layers": {name: layers for name, layers in plan.items()}}
        step_dir = Checkpointer(save_dir=str(output_dir), load_dir=None, keep_last=1, ctx=ctx).save(
            0, model_chunks=[model], optimizer=None, scheduler=None, loop=LoopState(),
            config_dict=config_to_dict(config), source=source)
    (output_dir / "config.yaml").write_text(dump_config(config))
    return ImportSummary(output_dir=str(output_dir), checkpoint=str(step_dir), preset=preset, init=init,
                         num_source_layers=hf_cfg["num_hidden_layers"], num_layers=config.model.num_layers,
                         source_layers=plan)


def _own_tokenizer(llama_dir: Path) -> Path | None:
    """The tokenizer folder that came with the model (its ids are the embedding rows), if it has one."""
    from mor_megatron.data.tokenizer import resolve_tokenizer

    try:
        return resolve_tokenizer(llama_dir).path.resolve()
    except FileNotFoundError:
        return None


def _build_model(config: JobConfig, pg_collection, seed: int):
    from mor_megatron.model.builder import build_model, transformer_config

    torch.manual_seed(seed)
    mcore = transformer_config(config.model, config.recursion, config.parallel)
    return build_model(config.model, config.recursion, mcore, pg_collection=pg_collection)


def _load_into(model, tensors: dict[str, torch.Tensor], config: JobConfig, llama_dir: Path) -> None:
    """Copy converted tensors into the model through its checkpoint keys; routers keep their init."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    targets = {sh.key: sh.data for sh in nested_values(model.sharded_state_dict())
               if not sh.key.endswith("_extra_state")}
    given = {**tensors, **{k: v for k, v in targets.items() if k.startswith("decoder.router.")}}
    check_tensors(given, config, f"the Hugging Face model {str(llama_dir)!r}")
    if set(targets) != set(given):
        raise ConversionError(f"the MoR model has tensors the name map does not fill: "
                              f"{sorted(set(targets) - set(given))}; extend mor_megatron.convert.hf_keys")
    with torch.no_grad():
        for key, tensor in tensors.items():
            targets[key].copy_(tensor)
