"""Tokenizers: train a SentencePiece BPE, or use any Hugging Face tokenizer folder; load either as megatron-core's
tokenizer object.

``data.tokenizer`` (and ``--tokenizer``) names one of:

* a SentencePiece model: ``DIR/tokenizer.model`` (or the file), as ``mor-data tokenizer`` writes it with
  megatron-core's ``DIR/tokenizer_metadata.json``. Its special ids are unk 0, bos 1, eos 2 (the end-of-document
  token ``tokenizer.eod`` that preprocessing appends), pad 3;
* a Hugging Face tokenizer folder: ``tokenizer.json`` and/or ``tokenizer_config.json`` (any ``AutoTokenizer``
  folder, loaded offline), e.g. SmolLM's GPT-2-style BPE with ``<|endoftext|>`` at id 0 or a Llama model's own
  tokenizer. Ids, EOD (its EOS token) and pad come from the tokenizer itself.

A folder holding both (e.g. a Hugging Face export with ``tokenizer.model``) is read as the Hugging Face tokenizer.

Training keeps whitespace and newlines verbatim (identity normalization, no whitespace folding), so code
indentation survives a tokenize/detokenize round trip, and uses byte fallback, so no text maps to unk.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from mor_megatron.data.readers import TextUnit, count_records, iter_documents, resolve_inputs

if TYPE_CHECKING:
    from megatron.core.tokenizers import MegatronTokenizerBase

TOKENIZER_MODEL_NAME = "tokenizer.model"
METADATA_NAME = "tokenizer_metadata.json"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                      "merges.txt", "added_tokens.json", "tokenizer.model")
"""The files of a Hugging Face tokenizer folder that define its ids (fingerprinted, exported unchanged)."""
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
NUM_BYTE_PIECES = 256


@dataclass(frozen=True)
class TokenizerSource:
    """Where a tokenizer lives: a SentencePiece model file, or a Hugging Face tokenizer folder."""

    library: Literal["sentencepiece", "huggingface"]
    path: Path

    @property
    def files(self) -> list[Path]:
        """The files whose bytes define the token ids."""
        if self.library == "sentencepiece":
            return [self.path]
        return [self.path / name for name in HF_TOKENIZER_FILES if (self.path / name).is_file()]

    def sha256(self) -> str:
        """Hex SHA-256 identifying the tokenizer (of the model file; for a folder, of its id-defining files)."""
        if self.library == "sentencepiece":
            return file_sha256(self.path)
        digest = hashlib.sha256()
        for path in self.files:
            digest.update(path.name.encode() + b"\0" + file_sha256(path).encode())
        return digest.hexdigest()


def resolve_tokenizer(path: str | Path) -> TokenizerSource:
    """The tokenizer at ``path`` (see the module docstring); ``FileNotFoundError`` naming what is missing."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent if path.name in HF_TOKENIZER_FILES[:2] else None
    if folder is not None and any((folder / name).is_file() for name in HF_TOKENIZER_FILES[:2]):
        return TokenizerSource("huggingface", folder)
    model = path / TOKENIZER_MODEL_NAME if path.is_dir() else path
    if not model.is_file():
        raise FileNotFoundError(f"tokenizer {str(path)!r} does not exist or holds neither tokenizer.model "
                                "(SentencePiece) nor tokenizer.json / tokenizer_config.json (Hugging Face); "
                                f"train one with `mor-data tokenizer --input CORPUS --output-dir {model.parent}`")
    return TokenizerSource("sentencepiece", model)


def tokenizer_vocab_size(path: str | Path) -> int:
    """Number of token ids (added tokens included) of the tokenizer at ``path``, without megatron-core or torch."""
    source = resolve_tokenizer(path)
    if source.library == "huggingface":
        return len(_hf_tokenizer(source.path))
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(source.path))
    except (OSError, RuntimeError) as err:
        raise ValueError(f"{str(source.path)!r} is not a SentencePiece model: {err}") from err
    return processor.get_piece_size()


def special_token_ids(path: str | Path) -> dict[str, int | None]:
    """``bos_token_id``, ``eos_token_id`` and ``pad_token_id`` of the tokenizer at ``path`` (None: it has none).

    A Hugging Face tokenizer without a pad token pads with its EOS (what generation does anyway).
    """
    source = resolve_tokenizer(path)
    if source.library == "sentencepiece":
        return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    tokenizer = _hf_tokenizer(source.path)
    eos = tokenizer.eos_token_id
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos,
            "pad_token_id": eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id}


def _hf_tokenizer(folder: Path):
    """``AutoTokenizer`` of a local folder, offline; ``ValueError`` when transformers cannot load it."""
    from transformers import AutoTokenizer

    try:
        # No remote code: an export's config.json names its modeling code, which a tokenizer never needs (and
        # transformers would stop to ask on a terminal).
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"{str(folder)!r} is not a Hugging Face tokenizer folder transformers can load "
                         f"offline: {err}") from err


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (identifies the tokenizer a dataset was built with)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _training_sentences(documents: Iterable[str], chunk_chars: int) -> Iterator[str]:
    """Cut documents into line-aligned chunks of about ``chunk_chars`` characters.

    SentencePiece trains on "sentences" and samples ``input_sentence_size`` of them; whole files would be
    too coarse to sample and could exceed its sentence length limit. Lines keep their newline, so
    newline-bearing pieces are learned; a single over-long line is hard-split.
    """
    for text in documents:
        buffer: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            while len(line) > chunk_chars:
                yield line[:chunk_chars]
                line = line[chunk_chars:]
            buffer.append(line)
            size += len(line)
            if size >= chunk_chars:
                yield "".join(buffer)
                buffer, size = [], 0
        tail = "".join(buffer)
        if tail.strip():
            yield tail


def train_tokenizer(inputs: Sequence[str | Path], output_dir: str | Path, *, vocab_size: int,
                    json_key: str = "text", text_unit: TextUnit = "file", input_sentence_size: int = 200_000,
                    num_threads: int | None = None, byte_fallback: bool = True,
                    character_coverage: float = 0.9999, chunk_chars: int = 2048,
                    overwrite: bool = False, progress: bool = False) -> Path:
    """Train a SentencePiece BPE model on jsonl/parquet/text ``inputs`` and write it with its metadata.

    ``input_sentence_size`` caps how many ~``chunk_chars`` chunks SentencePiece samples (its training time
    and memory grow with it); ``num_threads`` defaults to all cores. Training is deterministic for the
    same inputs and arguments. Returns the path of ``output_dir/tokenizer.model``. With ``progress``, a bar on
    stderr counts the documents read, then one line each when the BPE merges start and end (SentencePiece
    itself stays silent).

    Raises ``FileExistsError`` when the model exists and ``overwrite`` is false, and ``ValueError`` for a
    vocabulary size SentencePiece cannot meet on this corpus (its message says which bound applies).
    """
    import sentencepiece

    reserved = 4 + (NUM_BYTE_PIECES if byte_fallback else 0)
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size={vocab_size} is too small: it must exceed the {reserved} reserved "
                         f"pieces (4 special{' + 256 byte-fallback' if byte_fallback else ''})")
    files = resolve_inputs(inputs, json_key=json_key)
    output_dir = Path(output_dir)
    model_path = output_dir / TOKENIZER_MODEL_NAME
    if model_path.exists() and not overwrite:
        raise FileExistsError(f"{str(model_path)!r} already exists; pass --overwrite (overwrite=True) to "
                              "replace it, and re-run preprocessing afterwards: old .bin/.idx files hold the "
                              "old ids")
    from tqdm import tqdm

    writer = io.BytesIO()
    start = time.perf_counter()
    documents = tqdm(iter_documents(files, json_key=json_key, text_unit=text_unit), unit="doc", file=sys.stderr,
                     total=count_records(files, text_unit=text_unit) if progress else None,
                     disable=not progress, desc="tokenizer: reading", dynamic_ncols=True)
    sentences = _training_sentences(documents, chunk_chars)
    if progress:
        sentences = _announce_end(sentences, vocab_size, input_sentence_size)
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=sentences, model_writer=writer, vocab_size=vocab_size, model_type="bpe",
            character_coverage=character_coverage, byte_fallback=byte_fallback,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, split_digits=True,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            # Bytes: a chunk holds < 2 * chunk_chars characters of <= 4 UTF-8 bytes, so none is dropped.
            max_sentence_length=8 * chunk_chars,
            num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as err:
        raise ValueError(f"SentencePiece training failed for vocab_size={vocab_size}: {err}") from err
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_path.with_name(model_path.name + ".tmp")
    tmp.write_bytes(writer.getvalue())
    os.replace(tmp, model_path)
    _write_metadata(model_path)
    if progress:
        print(f"tokenizer: {model_path} written in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return model_path


def _announce_end(sentences: Iterator[str], vocab_size: int, sample_cap: int) -> Iterator[str]:
    """Pass ``sentences`` through; when they run out (the reading bar has closed), say that training starts."""
    count = 0
    for count, sentence in enumerate(sentences, start=1):
        yield sentence
    print(f"tokenizer: learning {vocab_size} BPE pieces from {min(count, sample_cap)} of {count} text chunks "
          "(SentencePiece reports no progress; minutes on large corpora)", file=sys.stderr, flush=True)


def _write_metadata(model_path: Path) -> None:
    from megatron.core.tokenizers import MegatronTokenizer

    MegatronTokenizer.write_metadata(tokenizer_path=str(model_path), tokenizer_library="sentencepiece",
                                     model_type="gpt", overwrite=True)


def load_tokenizer(path: str | Path) -> MegatronTokenizerBase:
    """megatron-core's tokenizer (a ``GPTTokenizer``) for the tokenizer at ``path``.

    SentencePiece: writes ``tokenizer_metadata.json`` beside the model when it is missing, so a model trained
    elsewhere loads too. Hugging Face: nothing is written into the folder (it may be a read-only cache). The
    object has ``tokenize`` (no BOS added), ``detokenize``, ``vocab_size``, ``eod`` (the EOS id), ``pad``.
    """
    from megatron.core.tokenizers import MegatronTokenizer

    source = resolve_tokenizer(path)
    if source.library == "huggingface":
        hf = _hf_tokenizer(source.path)  # a clear error for a folder transformers cannot load
        if hf.eos_token is None:
            raise ValueError(f"Hugging Face tokenizer {str(source.path)!r} has no EOS token, which ends every "
                             "document in preprocessing; set eos_token in its tokenizer_config.json")
        # Without a pad token megatron's datasets would pad with None; padding with EOS makes them see the
        # collision and pad with -1 (never a real id, so no EOD loses its loss).
        extra = {} if hf.pad_token is not None else {"pad_token": hf.eos_token}
        return MegatronTokenizer.from_pretrained(tokenizer_path=str(source.path),
                                                 metadata_path={"library": "huggingface", "model_type": "gpt"},
                                                 **extra)
    if not (source.path.parent / METADATA_NAME).is_file():
        _write_metadata(source.path)
    return MegatronTokenizer.from_pretrained(tokenizer_path=str(source.path))
