"""Read documents from jsonl, parquet and plain-text files, in a fixed order.

One reader serves both tokenizer training and preprocessing, so both see exactly the same documents.
Inputs are checked up front (:func:`resolve_inputs`), so a typo fails before any worker or trainer starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

TextUnit = Literal["file", "line"]
"""How a plain-text file is cut into documents: the whole file, or every non-empty line."""

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".text", ".md")
_ALL_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES


@dataclass(frozen=True)
class InputFile:
    """One input file and its format (``jsonl``, ``parquet`` or ``text``)."""

    path: Path
    kind: Literal["jsonl", "parquet", "text"]


def _kind(path: Path) -> Literal["jsonl", "parquet", "text"]:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in TEXT_SUFFIXES:
        return "text"
    raise ValueError(f"input {str(path)!r} has an unsupported extension {suffix!r}; "
                     f"use one of {', '.join(_ALL_SUFFIXES)}")


def resolve_inputs(paths: Sequence[str | Path], *, json_key: str = "text") -> list[InputFile]:
    """Expand files and directories (recursively, sorted) into typed inputs, checking they can be read.

    Raises ``FileNotFoundError`` for a missing path or an empty directory and ``ValueError`` for an
    unsupported extension or a parquet file without the ``json_key`` column.
    """
    if not paths:
        raise ValueError("no input files given")
    files: list[InputFile] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _ALL_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"input directory {str(path)!r} holds no "
                                        f"{', '.join(_ALL_SUFFIXES)} files")
            files.extend(InputFile(p, _kind(p)) for p in found)
        elif path.is_file():
            files.append(InputFile(path, _kind(path)))
        else:
            raise FileNotFoundError(f"input {str(path)!r} does not exist")
    for item in files:
        if item.kind == "parquet":
            _check_parquet_column(item.path, json_key)
    return files


def _check_parquet_column(path: Path, column: str) -> None:
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    if column not in names:
        raise ValueError(f"parquet file {str(path)!r} has no column {column!r} (columns: {names}); "
                         "pass the text column with --json-key")


def iter_documents(inputs: Sequence[InputFile], *, json_key: str = "text",
                   text_unit: TextUnit = "file") -> Iterator[str]:
    """Yield every document's text, file by file, in input order.

    jsonl: one JSON object per line, text under ``json_key`` (blank lines skipped). parquet: the
    ``json_key`` column, row by row. Plain text: per ``text_unit``. Empty documents are yielded too,
    so callers count records faithfully; they decide whether to drop them.
    """
    for item in inputs:
        if item.kind == "jsonl":
            yield from _iter_jsonl(item.path, json_key)
        elif item.kind == "parquet":
            yield from _iter_parquet(item.path, json_key)
        else:
            yield from _iter_text(item.path, text_unit)


def _iter_jsonl(path: Path, key: str) -> Iterator[str]:
    try:
        with path.open(encoding="utf-8") as stream:
            yield from _jsonl_records(path, stream, key)
    except UnicodeDecodeError as err:
        raise _not_utf8(path) from err


def _jsonl_records(path: Path, lines: Iterable[str], key: str) -> Iterator[str]:
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_number}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get(key), str):
            raise ValueError(f"{path}:{line_number}: expected an object with a string field {key!r}; "
                             "pass the text field with --json-key")
        yield record[key]


def _not_utf8(path: Path) -> ValueError:
    """An error naming the line and byte offset of the first byte of ``path`` that is not UTF-8.

    Found by a second pass over whole lines: the text reader decodes ahead in blocks, so its error carries
    neither. A line is a safe unit because no multi-byte UTF-8 sequence contains a newline byte.
    """
    offset = 0
    with path.open("rb") as stream:
        for line_number, raw in enumerate(stream, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return ValueError(f"{path}:{line_number}: not UTF-8 text (byte {raw[err.start]:#04x} at byte "
                                  f"offset {offset + err.start}); re-encode the file as UTF-8, e.g. "
                                  "`iconv -f latin1 -t utf-8`")
            offset += len(raw)
    return ValueError(f"{path}: not UTF-8 text; re-encode the file as UTF-8")


def _iter_parquet(path: Path, column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield value or ""


def _iter_text(path: Path, text_unit: TextUnit) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path) from err
    if text_unit == "file":
        yield text
    else:
        yield from (line for line in text.splitlines() if line.strip())


def count_records(inputs: Sequence[InputFile], *, text_unit: TextUnit = "file") -> int:
    """Cheap upper bound on the number of documents (for a progress bar's total): newlines, rows, files."""
    total = 0
    for item in inputs:
        if item.kind == "parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(item.path).metadata.num_rows
        elif item.kind == "text" and text_unit == "file":
            total += 1
        else:
            total += _count_lines(item.path)
    return total


def _count_lines(path: Path) -> int:
    count = 0
    last = b"\n"
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 22):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")
