"""``mor-data``: make training data: the embedded corpus, a SentencePiece tokenizer, Megatron .bin/.idx files.

    mor-data corpus --output data/demo/corpus.jsonl --max-mb 8
    mor-data tokenizer --input data/demo/corpus.jsonl --output-dir data/demo/tokenizer --vocab-size 2048
    mor-data preprocess --input data/demo/corpus.jsonl --tokenizer data/demo/tokenizer \\
        --output-prefix data/demo/stdlib --workers 4

Then train with ``data.tokenizer=data/demo/tokenizer/tokenizer.model data.blend=[data/demo/stdlib]``.
Each subcommand prints one JSON summary line on stdout; progress goes to stderr. Exit status 2 on bad
input (missing files, unsupported formats, impossible vocabulary sizes), before any worker starts.
Subcommands import their libraries lazily, so ``--help`` loads neither torch nor megatron-core.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mor_megatron.cli.quiet import silence_known_warnings
from mor_megatron.cli.summary import print_summary


def _corpus(args: argparse.Namespace) -> dict[str, Any]:
    from mor_megatron.data.corpus import write_stdlib_corpus

    stats = write_stdlib_corpus(args.output, max_mb=args.max_mb, max_file_kb=args.max_file_kb)
    return {"output": str(stats.path), "documents": stats.num_documents, "text_mb": stats.num_bytes / 2**20}


def _tokenizer(args: argparse.Namespace) -> dict[str, Any]:
    from mor_megatron.data.tokenizer import tokenizer_vocab_size, train_tokenizer

    model = train_tokenizer(args.input, args.output_dir, vocab_size=args.vocab_size, json_key=args.json_key,
                            text_unit=args.text_unit, input_sentence_size=args.input_sentence_size,
                            num_threads=args.threads, byte_fallback=args.byte_fallback,
                            character_coverage=args.character_coverage, overwrite=args.overwrite,
                            progress=not args.quiet)
    return {"tokenizer": str(model), "vocab_size": tokenizer_vocab_size(model)}


def _preprocess(args: argparse.Namespace) -> dict[str, Any]:
    from mor_megatron.data.preprocess import preprocess

    stats = preprocess(args.input, args.output_prefix, tokenizer=args.tokenizer, workers=args.workers,
                       json_key=args.json_key, text_unit=args.text_unit, progress=not args.quiet,
                       overwrite=args.overwrite, cache_dir=args.cache_dir)
    return dataclasses.asdict(stats)


def _add_input_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="jsonl (also .gz/.zst) / parquet / .txt files, directories (searched "
                        "recursively) or a Hugging Face save_to_disk folder")
    parser.add_argument("--json-key", default="text", help="jsonl field / parquet column holding the text")
    parser.add_argument("--text-unit", choices=("file", "line"), default="file",
                        help="plain-text files: one document per file, or per non-empty line")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mor-data", description="Prepare pretraining data: corpus -> "
                                     "tokenizer -> Megatron .bin/.idx.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    corpus = commands.add_parser("corpus", help="write the embedded corpus (this Python's standard library) "
                                 "as jsonl", description="Write this interpreter's standard library as a "
                                 "jsonl corpus (one document per .py file; deterministic).")
    corpus.add_argument("--output", required=True, help="jsonl file to write")
    corpus.add_argument("--max-mb", type=float, default=8.0, help="cap on the text size in MiB (default 8)")
    corpus.add_argument("--max-file-kb", type=float, default=256.0,
                        help="skip source files larger than this (default 256 KiB)")
    corpus.set_defaults(run=_corpus)

    tokenizer = commands.add_parser("tokenizer", help="train a SentencePiece BPE tokenizer",
                                    description="Train a SentencePiece BPE model; writes DIR/tokenizer.model "
                                    "and megatron-core's DIR/tokenizer_metadata.json.")
    _add_input_args(tokenizer)
    tokenizer.add_argument("--output-dir", required=True, metavar="DIR", help="where the tokenizer goes")
    tokenizer.add_argument("--vocab-size", type=int, required=True,
                           help="number of pieces; must be <= the model's model.vocab_size")
    tokenizer.add_argument("--input-sentence-size", type=int, default=200_000,
                           help="cap on ~2 KB text chunks sampled for training (time and memory grow "
                           "with it)")
    tokenizer.add_argument("--threads", type=int, default=None, help="training threads (default: all cores)")
    tokenizer.add_argument("--character-coverage", type=float, default=0.9999,
                           help="fraction of characters covered by pieces; the rest use byte fallback")
    tokenizer.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false",
                           help="map uncovered characters to <unk> instead of 256 byte pieces")
    tokenizer.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer.model")
    tokenizer.add_argument("--quiet", action="store_true", help="no progress output")
    tokenizer.set_defaults(run=_tokenizer)

    preprocess = commands.add_parser("preprocess", help="tokenize files into Megatron .bin/.idx",
                                     description="Tokenize documents (EOD appended to each) into "
                                     "PREFIX.bin/.idx with megatron-core's IndexedDatasetBuilder.")
    _add_input_args(preprocess)
    preprocess.add_argument("--tokenizer", required=True,
                            help="SentencePiece tokenizer.model (or its directory) or a Hugging Face tokenizer folder")
    preprocess.add_argument("--output-prefix", required=True, metavar="PREFIX",
                            help="writes PREFIX.bin, PREFIX.idx and PREFIX.meta.json; use it in data.blend")
    preprocess.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                            help="tokenizer processes (default: cores, at most 8)")
    preprocess.add_argument("--quiet", action="store_true", help="no progress bar")
    preprocess.add_argument("--overwrite", action="store_true",
                            help="replace an existing PREFIX.bin/.idx and delete megatron's index caches of it")
    preprocess.add_argument("--cache-dir", metavar="DIR",
                            help="the training config's data.cache_dir: its cached indices of PREFIX are "
                            "deleted too (those in PREFIX/cache/ always are)")
    preprocess.set_defaults(run=_preprocess)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mor-data``; returns the exit status (0, or 2 on bad input)."""
    silence_known_warnings()
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], dict[str, Any]] = args.run
    return print_summary(f"mor-data {args.command}", lambda: run(args),
                         bad_input=(ValueError, FileNotFoundError, FileExistsError))


if __name__ == "__main__":
    sys.exit(main())
