"""``mor-convert to-hf``: a mor_megatron ``torch_dist`` checkpoint (any TP/PP layout) -> Hugging Face folder.

The folder holds ``model.safetensors`` (or shards plus ``model.safetensors.index.json``), ``config.json``,
``generation_config.json`` and the tokenizer (``tokenizer.model``, ``tokenizer.json``,
``tokenizer_config.json``). A vanilla model (one recursion, routing `none`) becomes a plain
``LlamaForCausalLM``; any other MoR model ships its modeling code (``configuration_mor.py``,
``modeling_mor.py``) and loads with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.

The checkpoint's tensors are checked against the job config stored with it (every tensor present, none
extra, every shape as the config implies) before anything is written.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mor_megatron.config import JobConfig, layer_layout
from mor_megatron.convert import ConversionError
from mor_megatron.convert.hf_keys import AttentionShape, megatron_to_hf
from mor_megatron.convert.megatron_ckpt import MegatronCheckpoint, read_checkpoint, resolve_step_dir
from mor_megatron.convert.output_guard import refuse_output_overlapping_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportSummary:
    """What :func:`to_hf` wrote."""

    output_dir: str
    checkpoint: str
    step: int
    architecture: str
    num_tensors: int
    num_parameters: int
    safetensors_files: list[str]
    tokenizer_vocab_size: int | None
    mlflow_run_id: str | None = None
    """The MLflow run that trained the checkpoint (from its loop state), None when it was not tracked."""
    mlflow_linked: bool = False
    """Whether that run now names this export (tag ``mor.hf_export``, artifact ``exports/<folder>.json``)."""
    mlflow_link_error: str | None = None
    """Why a tracked run was not linked (tracking off, store gone, server unreachable)."""


def attention_shape(config: JobConfig) -> AttentionShape:
    model = config.model
    return AttentionShape(num_heads=model.num_attention_heads, num_query_groups=model.num_query_groups,
                          head_dim=model.head_dim)


def is_vanilla(config: JobConfig) -> bool:
    """One recursion and no routing: the model is a plain Llama stack."""
    return config.recursion.num_recursions == 1 and config.recursion.routing == "none"


def expected_shapes(config: JobConfig) -> dict[str, tuple[int, ...]]:
    """Megatron checkpoint key -> global shape, for every model tensor ``config`` implies."""
    model, rec = config.model, config.recursion
    h, heads, groups, dim, ffn = (model.hidden_size, model.num_attention_heads, model.num_query_groups,
                                  model.head_dim, model.ffn_hidden_size)
    shapes: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (model.vocab_size, h),
                                          "decoder.final_layernorm.weight": (h,)}
    if not model.tie_embeddings:
        shapes["output_layer.weight"] = (model.vocab_size, h)
    for i in range(layer_layout(model, rec).num_unique_layers):
        base = f"decoder.layers.{i}."
        shapes.update({base + "self_attention.linear_qkv.layer_norm_weight": (h,),
                       base + "self_attention.linear_qkv.weight": ((heads + 2 * groups) * dim, h),
                       base + "self_attention.linear_proj.weight": (h, heads * dim),
                       base + "mlp.linear_fc1.layer_norm_weight": (h,),
                       base + "mlp.linear_fc1.weight": (2 * ffn, h),
                       base + "mlp.linear_fc2.weight": (h, ffn)})
    if rec.routing != "none":
        shapes["decoder.router.weight"] = (rec.num_recursions, h)
    if rec.routing == "token_choice":
        shapes["decoder.router.depth_bias"] = (rec.num_recursions,)
    return shapes


def check_tensors(tensors: dict[str, torch.Tensor], config: JobConfig, source: str) -> None:
    """Raise :class:`ConversionError` unless ``tensors`` are exactly what ``config`` implies."""
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    layout = layer_layout(config.model, config.recursion)
    summary = (f"model.num_layers={config.model.num_layers}, recursion.num_recursions="
               f"{config.recursion.num_recursions}, recursion.sharing={config.recursion.sharing!r} -> "
               f"{layout.num_unique_layers} unique layers; recursion.routing={config.recursion.routing!r}; "
               f"model.tie_embeddings={config.model.tie_embeddings}")
    if missing or unexpected:
        raise ConversionError(f"{source} does not match its config ({summary}): missing tensors {missing[:6]}"
                              f"{' ...' if len(missing) > 6 else ''}, unexpected tensors {unexpected[:6]}"
                              f"{' ...' if len(unexpected) > 6 else ''}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ConversionError(f"{source}: tensor {key!r} has shape {tuple(tensors[key].shape)} but the "
                                  f"config implies {shape} (model.hidden_size={config.model.hidden_size}, "
                                  f"model.num_attention_heads={config.model.num_attention_heads}, "
                                  f"model.num_query_groups={config.model.num_query_groups}, "
                                  f"model.ffn_hidden_size={config.model.ffn_hidden_size}, "
                                  f"model.vocab_size={config.model.vocab_size})")


def special_ids(tokenizer: Path | None) -> dict[str, int | None]:
    """``bos/eos/pad_token_id`` of ``tokenizer``; without one, those of the SentencePiece layout that
    ``mor-data tokenizer`` writes."""
    from mor_megatron.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, special_token_ids

    if tokenizer is None:
        return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    try:
        return special_token_ids(tokenizer)
    except (FileNotFoundError, ValueError) as err:
        raise ConversionError(f"tokenizer {str(tokenizer)!r}: {err}; pass --tokenizer PATH or --no-tokenizer") \
            from err


def hf_config(config: JobConfig, dtype: torch.dtype, special: dict[str, int | None]):
    """``LlamaConfig`` for a vanilla model, else ``MoRConfig`` with ``auto_map`` (transformers objects).

    ``special``: the tokenizer's ``bos/eos/pad_token_id`` (:func:`special_ids`)."""
    from transformers import LlamaConfig

    from mor_megatron.inference.hf import AUTO_MAP
    from mor_megatron.inference.hf.configuration_mor import MoRConfig

    model, rec = config.model, config.recursion
    common = dict(vocab_size=model.vocab_size, hidden_size=model.hidden_size,
                  intermediate_size=model.ffn_hidden_size, num_attention_heads=model.num_attention_heads,
                  num_key_value_heads=model.num_query_groups, head_dim=model.head_dim, hidden_act="silu",
                  rms_norm_eps=model.norm_epsilon, max_position_embeddings=model.max_seq_length,
                  initializer_range=model.init_method_std, tie_word_embeddings=model.tie_embeddings,
                  dtype=str(dtype).removeprefix("torch."), **special)
    if is_vanilla(config):
        hf = LlamaConfig(num_hidden_layers=model.num_layers, attention_bias=False, mlp_bias=False,
                         rope_parameters={"rope_type": "default", "rope_theta": model.rotary_base}, **common)
        hf.architectures = ["LlamaForCausalLM"]
        return hf
    layout = layer_layout(model, rec)
    hf = MoRConfig(rope_theta=model.rotary_base, num_prefix_layers=layout.num_prefix,
                   num_shared_layers=layout.num_shared, num_suffix_layers=layout.num_suffix,
                   num_recursions=rec.num_recursions, sharing=rec.sharing, routing=rec.routing,
                   kv_mode=rec.kv_mode,
                   capacities=list(rec.effective_capacities) if rec.routing == "expert_choice" else None,
                   router_alpha=rec.effective_alpha, router_temperature=rec.router_temperature,
                   token_balancing=rec.token_balancing, **common)
    hf.architectures = ["MoRForCausalLM"]
    hf.auto_map = dict(AUTO_MAP)
    return hf


def write_safetensors(tensors: dict[str, torch.Tensor], output_dir: Path,
                      max_shard_size: int | str) -> list[str]:
    """``model.safetensors``, or numbered shards plus ``model.safetensors.index.json``; returns file names."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: tensors[name].contiguous() for name in names}, str(output_dir / filename),
                  metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
        (output_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return sorted(split.filename_to_tensors)


def _resolve_tokenizer(checkpoint: MegatronCheckpoint, tokenizer: str | Path | None,
                       include_tokenizer: bool) -> Path | None:
    """The tokenizer to export (and take the special ids from); None when there is none to read.

    With ``--no-tokenizer`` the run's ``data.tokenizer`` still gives the special ids when it is on this machine.
    """
    if tokenizer is not None:
        return Path(tokenizer)
    configured = checkpoint.config.data.tokenizer
    if not include_tokenizer:
        return Path(configured) if configured is not None and Path(configured).exists() else None
    if configured is None:
        raise ConversionError(f"the config of {str(checkpoint.path)!r} names no data.tokenizer; pass "
                              "--tokenizer PATH or --no-tokenizer")
    return Path(configured)


def to_hf(checkpoint: str | Path, output_dir: str | Path, *, tokenizer: str | Path | None = None,
          include_tokenizer: bool = True, dtype: str | None = None, max_shard_size: int | str = "5GB",
          overwrite: bool = False, link_run: bool = True) -> ExportSummary:
    """Export ``checkpoint`` (a step folder, or a save_dir whose ``latest`` is used) to ``output_dir``.

    Args:
        tokenizer: SentencePiece model (file or folder) or Hugging Face tokenizer folder (exported unchanged);
            default: the ``data.tokenizer`` the run used. Its special ids go into config.json and
            generation_config.json.
        include_tokenizer: False writes no tokenizer files.
        dtype: `float32`, `bfloat16` or `float16`; default: the checkpoint's own dtype.
        max_shard_size: largest safetensors file (bytes or e.g. ``"5GB"``); larger models are sharded.
        overwrite: replace a non-empty ``output_dir``.
        link_run: when the checkpoint names its MLflow run, tag that run with the export folder and store the
            summary with it (best effort, a few seconds at most; see :func:`_link_run`).

    Raises:
        ConversionError: missing or partial shards, tensors that do not match the stored config, a
            tokenizer that does not fit, a non-empty output folder (without ``overwrite``), or an output
            folder that is, contains or lies inside the checkpoint or its save_dir, or is or contains its
            run folder.
    """
    output_dir = Path(output_dir)
    step_dir = resolve_step_dir(checkpoint)
    # Before anything is read: the output is outside the checkpoint's folders, and empty or replaceable.
    refuse_output_overlapping_checkpoint(output_dir, step_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise ConversionError(f"output folder {str(output_dir)!r} is not empty; choose a new folder or "
                              "pass --overwrite")
    ckpt = read_checkpoint(step_dir)
    check_tensors(ckpt.tensors, ckpt.config, f"checkpoint {str(ckpt.path)!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype={dtype!r} is not one of {list(DTYPES)}")
    target_dtype = DTYPES[dtype] if dtype else ckpt.tensors["embedding.word_embeddings.weight"].dtype
    tokenizer_path = _resolve_tokenizer(ckpt, tokenizer, include_tokenizer)
    special = special_ids(tokenizer_path)
    hf_tensors = megatron_to_hf(ckpt.tensors, attention_shape(ckpt.config))
    # depth_bias stays fp32 (as trained): its small loss-free steps would round away in bf16.
    hf_tensors = {name: t if name.endswith("depth_bias") else t.to(target_dtype)
                  for name, t in hf_tensors.items()}
    if output_dir.exists():  # replaced only now, after the checkpoint was read and checked
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
    config = hf_config(ckpt.config, target_dtype, special)
    config.save_pretrained(str(output_dir))
    if not is_vanilla(ckpt.config):
        from mor_megatron.inference.hf import copy_modeling_files

        copy_modeling_files(output_dir)
    files = write_safetensors(hf_tensors, output_dir, max_shard_size)
    from transformers import GenerationConfig

    GenerationConfig(do_sample=False, **special).save_pretrained(str(output_dir))
    vocab = None
    if include_tokenizer:
        from mor_megatron.convert.hf_tokenizer import export_tokenizer

        vocab = export_tokenizer(tokenizer_path, output_dir, vocab_size=ckpt.config.model.vocab_size,
                                 model_max_length=ckpt.config.model.max_seq_length)
    summary = ExportSummary(output_dir=str(output_dir), checkpoint=str(ckpt.path), step=ckpt.step,
                            architecture=config.architectures[0], num_tensors=len(hf_tensors),
                            num_parameters=sum(t.numel() for t in hf_tensors.values()),
                            safetensors_files=files, tokenizer_vocab_size=vocab)
    if link_run:
        _link_run(summary, ckpt)
    return summary


def _link_run(summary: ExportSummary, ckpt: MegatronCheckpoint) -> None:
    """Record the export on the MLflow run of the checkpoint's loop state, filling the summary's ``mlflow_*``.

    The store is the one training used: ``tracking.tracking_uri`` of the stored config, else
    ``$MLFLOW_TRACKING_URI``, else the run folder's ``mlflow.db`` (only if it exists: no new store is made).
    """
    from mor_megatron.convert.megatron_ckpt import _read_common_state
    from mor_megatron.tracking.mlflow import link_export
    from mor_megatron.tracking.start import resolve_tracking_uri

    summary.mlflow_run_id = (_read_common_state(ckpt.path).get("loop") or {}).get("mlflow_run_id")
    if summary.mlflow_run_id is None:
        return
    tracking = ckpt.config.tracking
    uri = resolve_tracking_uri(tracking, ckpt.config.output_dir)
    if uri is None:
        summary.mlflow_link_error = "tracking.enabled is false in the checkpoint's config"
    elif uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        summary.mlflow_link_error = f"the run's store {uri} does not exist here"
    else:
        record = {key: value for key, value in asdict(summary).items() if not key.startswith("mlflow_")}
        summary.mlflow_link_error = link_export(uri, summary.mlflow_run_id,
                                                export_dir=Path(summary.output_dir).resolve(), record=record,
                                                timeout_s=tracking.timeout_s)
        summary.mlflow_linked = summary.mlflow_link_error is None
