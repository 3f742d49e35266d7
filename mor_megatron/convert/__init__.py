"""Checkpoint conversion between Megatron ``torch_dist`` checkpoints and Hugging Face folders.

* :func:`mor_megatron.convert.to_hf.to_hf`: a training checkpoint (any TP/PP layout) -> a Hugging Face folder
  (safetensors, ``config.json``, the MoR modeling code or a plain Llama config, tokenizer).
* :func:`mor_megatron.convert.from_hf.from_hf`: a Llama-architecture Hugging Face model -> a MoR checkpoint
  to up-train from, with Relaxed Recursive Transformers initialisation of the shared block.
* :mod:`mor_megatron.convert.hf_keys`: the declarative parameter-name map both directions use.

Command line: ``mor-convert`` (:mod:`mor_megatron.cli.convert`). Importing this package imports nothing heavy.
"""


class ConversionError(ValueError):
    """A checkpoint or model cannot be converted; the message names the file, tensor or field and the fix."""
