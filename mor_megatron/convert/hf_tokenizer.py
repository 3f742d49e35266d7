"""Export the run's tokenizer as Hugging Face files that stock transformers loads offline.

A Hugging Face tokenizer folder (``tokenizer.json`` / ``tokenizer_config.json``, e.g. SmolLM's or an imported
Llama's) is copied unchanged. A SentencePiece BPE model is converted:

The folder gets the original ``tokenizer.model`` plus a ``tokenizer.json`` (the ``tokenizers`` library's
format, built from the SentencePiece vocabulary and merges) and a ``tokenizer_config.json`` naming
``PreTrainedTokenizerFast``, so ``AutoTokenizer.from_pretrained(folder)`` works without remote code.

Why not ``LlamaTokenizer`` on ``tokenizer.model``: transformers 5 converts it with a ``Metaspace``
pre-tokenizer that adds the dummy prefix only when the text does not already start with a space, while
SentencePiece always adds it, so texts with leading spaces tokenize differently (e.g. code indentation).
The ``tokenizer.json`` written here normalizes like SentencePiece (prepend "▁", spaces -> "▁", no
pre-tokenizer) and :func:`export_tokenizer` checks the result against SentencePiece before returning.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mor_megatron.convert import ConversionError

# Texts the exported tokenizer must split exactly like SentencePiece (leading/trailing/multiple spaces,
# indentation, newlines, tabs, non-ASCII that needs byte fallback).
_CHECK_TEXTS = (
    "def main(argv):\n    return run(argv)  # two spaces\n",
    "  leading spaces and trailing  ",
    "\n\n\tTabbed\tline\n",
    "ünïcødé 漢字 🙂 naïve café",
    "x",
    "",
)


def _special_pieces(processor) -> dict[str, str]:
    pieces = {}
    for name, piece_id in (("unk_token", processor.unk_id()), ("bos_token", processor.bos_id()),
                           ("eos_token", processor.eos_id()), ("pad_token", processor.pad_id())):
        if piece_id >= 0:
            pieces[name] = processor.id_to_piece(piece_id)
    return pieces


def build_tokenizer_json(model_path: Path):
    """A ``tokenizers.Tokenizer`` equivalent to the SentencePiece BPE model at ``model_path``.

    Raises:
        ConversionError: the model is not BPE, or normalizes text in a way this export does not reproduce.
    """
    import sentencepiece
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import import_protobuf
    from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise ConversionError(f"tokenizer {str(model_path)!r} is not a SentencePiece BPE model; export it "
                              "yourself and pass --no-tokenizer")
    spec = proto.normalizer_spec
    if spec.name not in ("identity", "") or spec.remove_extra_whitespaces:
        raise ConversionError(f"tokenizer {str(model_path)!r} normalizes text ({spec.name!r}, "
                              f"remove_extra_whitespaces={spec.remove_extra_whitespaces}), which "
                              "tokenizer.json would not reproduce; pass --no-tokenizer and export it "
                              "yourself")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    vocab, _, merges = SentencePieceExtractor(str(model_path)).extract()
    specials = _special_pieces(processor)
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=specials.get("unk_token"), fuse_unk=True,
                              byte_fallback=proto.trainer_spec.byte_fallback))
    steps = [normalizers.Replace(" ", "▁")]
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
        decode.append(decoders.Strip(" ", 1, 0))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Sequence(decode)
    tokenizer.add_special_tokens([AddedToken(piece, special=True, normalized=False)
                                  for piece in specials.values()])
    return tokenizer, processor, specials


def export_tokenizer(path: str | Path, output_dir: Path, *, model_max_length: int,
                     vocab_size: int) -> int:
    """Write the tokenizer into ``output_dir``: a Hugging Face folder's files as they are, or for SentencePiece
    ``tokenizer.model``, ``tokenizer.json`` and ``tokenizer_config.json``.

    Returns the tokenizer's vocabulary size. Raises :class:`ConversionError` when the tokenizer does not fit
    the model (more ids than ``vocab_size`` rows) or the exported tokenizer disagrees with SentencePiece.
    """
    from transformers import PreTrainedTokenizerFast

    from mor_megatron.data.tokenizer import resolve_tokenizer, tokenizer_vocab_size

    try:
        source = resolve_tokenizer(path)
        pieces = tokenizer_vocab_size(source.path)
    except (FileNotFoundError, ValueError) as err:
        raise ConversionError(f"{err}; pass --tokenizer PATH (the tokenizer the run trained with) or "
                              "--no-tokenizer") from err
    if pieces > vocab_size:
        raise ConversionError(f"tokenizer {str(source.path)!r} has {pieces} ids but the model has only "
                              f"{vocab_size} embedding rows (model.vocab_size): not this model's tokenizer")
    if source.library == "huggingface":
        for path in source.files:
            shutil.copyfile(path, output_dir / path.name)
        return pieces
    model_path = source.path
    tokenizer, processor, specials = build_tokenizer_json(model_path)
    shutil.copyfile(model_path, output_dir / "tokenizer.model")
    tokenizer.save(str(output_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "padding_side": "left", "clean_up_tokenization_spaces": False, **specials}
    (output_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    exported = PreTrainedTokenizerFast(tokenizer_file=str(output_dir / "tokenizer.json"))
    for text in _CHECK_TEXTS:
        expected, got = processor.encode(text), exported(text, add_special_tokens=False)["input_ids"]
        if expected != got:
            raise ConversionError(f"the exported tokenizer.json splits {text!r} as {got[:12]}..., "
                                  f"SentencePiece as {expected[:12]}...; pass --no-tokenizer and export the "
                                  "tokenizer yourself")
    return pieces
