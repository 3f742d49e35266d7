"""Per-token recursion depths of a text, from a Megatron training checkpoint or a Hugging Face export.

Both paths ask the model itself (:meth:`MoRGPTModel.token_depths`, :meth:`MoRForCausalLM.token_depths`), which
sum the routing's own per-recursion masks: nothing here re-implements routing. Tokenization is the training
tokenizer's (``mor_megatron.data.tokenizer.load_tokenizer``, no BOS added) or, for an export without
``--tokenizer``, the one the export carries (no special tokens added either).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from mor_megatron.viz.depth import DepthMap, token_pieces

Encode = Callable[[str], list[int]]
Decode = Callable[[list[int]], str]


class DepthInputError(ValueError):
    """Bad input for a depth map (model folder, tokenizer, text); the CLI reports it and exits with 2."""


def is_hf_export(path: Path) -> bool:
    """A Hugging Face model folder (``config.json``) rather than a Megatron checkpoint."""
    return (path / "config.json").is_file()


def depth_map(model_path: str | Path, text: str, *, routing_mode: str = "causal",
              tokenizer: str | Path | None = None) -> DepthMap:
    """Depths of ``text``'s tokens under ``model_path`` (checkpoint step folder, save_dir, or HF export).

    ``tokenizer`` defaults to the export folder itself, or the checkpoint's ``data.tokenizer``. A text longer
    than the model's context is cut to its first ``max_seq_length`` tokens.

    Raises:
        DepthInputError: no such model, no usable tokenizer, an empty text, or an unknown routing mode.
    """
    if routing_mode not in ("topk", "causal"):
        raise DepthInputError(f"routing mode {routing_mode!r} is not one of ['topk', 'causal']")
    path = Path(model_path)
    if not path.exists():
        raise DepthInputError(f"model {str(path)!r} does not exist")
    if is_hf_export(path):
        return _hf_depths(path, text, routing_mode, tokenizer)
    return _megatron_depths(path, text, routing_mode, tokenizer)


def _training_tokenizer(path: str | Path | None, what: str) -> tuple[Encode, Decode]:
    """``(encode, decode)`` of the training tokenizer at ``path`` (SentencePiece or Hugging Face folder)."""
    from mor_megatron.data.tokenizer import load_tokenizer

    if path is None:
        raise DepthInputError(f"{what} names no tokenizer; pass --tokenizer PATH")
    try:
        tok = load_tokenizer(path)
    except (OSError, ValueError) as err:
        raise DepthInputError(f"cannot load tokenizer {str(path)!r}: {err}") from err
    return (lambda text: list(tok.tokenize(text))), tok.detokenize


def _export_tokenizer(path: Path) -> tuple[Encode, Decode]:
    """``(encode, decode)`` of the tokenizer an export folder carries, without special tokens as in training.

    Loaded with the trust the model itself needs: the folder's config.json maps custom code, and without
    ``trust_remote_code`` transformers stops to ask on the terminal.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise DepthInputError(f"cannot load the tokenizer of {str(path)!r} ({err}); pass --tokenizer PATH") \
            from err
    return (lambda text: tok.encode(text, add_special_tokens=False)), tok.decode


def _token_ids(encode: Encode, text: str, max_length: int) -> list[int]:
    """``text``'s token ids, cut to the model's context ``max_length``."""
    ids = encode(text)[:max_length]
    if not ids:
        raise DepthInputError("the text is empty (no tokens)")
    return ids


def _megatron_depths(path: Path, text: str, routing_mode: str, tokenizer: str | Path | None) -> DepthMap:
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    from mor_megatron.config import ParallelConfig
    from mor_megatron.convert import ConversionError
    from mor_megatron.convert.megatron_ckpt import lone_process_group, read_checkpoint
    from mor_megatron.convert.to_hf import check_tensors
    from mor_megatron.model.builder import build_model, transformer_config

    try:
        ckpt = read_checkpoint(path)
        check_tensors(ckpt.tensors, ckpt.config, f"checkpoint {str(ckpt.path)!r}")
    except ConversionError as err:
        raise DepthInputError(str(err)) from err
    config = ckpt.config
    encode, decode = _training_tokenizer(tokenizer or config.data.tokenizer, f"the config of {str(ckpt.path)!r}")
    ids = _token_ids(encode, text, config.model.max_seq_length)
    with lone_process_group() as ctx:
        model = build_model(config.model, config.recursion,
                            transformer_config(config.model, config.recursion, ParallelConfig()),
                            pg_collection=ctx.pg_collection)
        # The checkpoint's keys are the model's sharded-state keys (global unique-layer indices).
        targets = {sh.key: sh.data for sh in nested_values(model.sharded_state_dict())
                   if not sh.key.endswith("_extra_state")}
        with torch.no_grad():
            for key, target in targets.items():
                target.copy_(ckpt.tensors[key])
        model.eval()
        tokens = torch.tensor([ids])
        depths = model.token_depths(tokens, torch.arange(len(ids))[None], routing_mode=routing_mode)[0]
    return DepthMap(pieces=token_pieces(decode, ids), depths=depths.tolist(),
                    num_recursions=config.recursion.num_recursions, routing=config.recursion.routing,
                    routing_mode=routing_mode, model=str(ckpt.path), step=ckpt.step)


def _hf_depths(path: Path, text: str, routing_mode: str, tokenizer: str | Path | None) -> DepthMap:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).eval()
    except (OSError, ValueError) as err:
        raise DepthInputError(f"cannot load the Hugging Face model {str(path)!r}: {err}") from err
    if not hasattr(model, "token_depths"):
        raise DepthInputError(f"{str(path)!r} holds a {type(model).__name__}, not a MoR export: a model "
                              "without recursions has no depth map")
    config = model.config
    encode, decode = (_training_tokenizer(tokenizer, "--tokenizer") if tokenizer is not None
                      else _export_tokenizer(path))
    ids = _token_ids(encode, text, config.max_position_embeddings)
    depths = model.token_depths(torch.tensor([ids]), routing_mode=routing_mode)[0]
    return DepthMap(pieces=token_pieces(decode, ids), depths=depths.tolist(),
                    num_recursions=config.num_recursions, routing=config.routing, routing_mode=routing_mode,
                    model=str(path), step=None)
