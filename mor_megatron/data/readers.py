"""Read documents from jsonl (plain, gzip or zstd), parquet, plain-text files and Hugging Face ``save_to_disk``
folders, in a fixed order, streamed with bounded memory.

One reader serves both tokenizer training and preprocessing, so both see exactly the same documents.
Inputs are checked up front (:func:`resolve_inputs`), so a typo fails before any worker or trainer starts.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

TextUnit = Literal["file", "line"]
"""How a plain-text file is cut into documents: the whole file, or every non-empty line."""

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".text", ".md")
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd"}
"""Compressed jsonl/text, as FineWeb- and Dolma-style corpora ship (``.jsonl.gz``, ``.json.zst``)."""
_ALL_SUFFIXES = (JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES
                 + tuple(s + c for s in JSONL_SUFFIXES + TEXT_SUFFIXES for c in COMPRESSION_SUFFIXES))
HF_STATE_NAME = "state.json"
"""Marks a folder written by ``datasets.Dataset.save_to_disk`` (with ``dataset_info.json`` and ``*.arrow``)."""

Kind = Literal["jsonl", "parquet", "text", "arrow"]


@dataclass(frozen=True)
class InputFile:
    """One input file, its format and its compression (``gzip``, ``zstd`` or None).

    ``arrow``: one Arrow stream file of a Hugging Face ``save_to_disk`` folder.
    """

    path: Path
    kind: Kind
    compression: Literal["gzip", "zstd"] | None = None


def _input_file(path: Path) -> InputFile:
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    compression = COMPRESSION_SUFFIXES.get(suffixes[-1]) if suffixes else None
    suffix = (suffixes[0] if len(suffixes) == 2 else "") if compression else path.suffix.lower()
    kind: Kind | None = ("jsonl" if suffix in JSONL_SUFFIXES else "text" if suffix in TEXT_SUFFIXES
                         else "parquet" if suffix in PARQUET_SUFFIXES and not compression else None)
    if kind is None:
        raise ValueError(f"input {str(path)!r} has an unsupported extension {''.join(path.suffixes)!r}; "
                         f"use one of {', '.join(_ALL_SUFFIXES)}, or a folder (a Hugging Face save_to_disk "
                         "folder included)")
    return InputFile(path, kind, compression)


def resolve_inputs(paths: Sequence[str | Path], *, json_key: str = "text") -> list[InputFile]:
    """Expand files and directories (recursively, sorted) into typed inputs, checking they can be read.

    A Hugging Face ``save_to_disk`` folder (one split: ``state.json`` beside its ``*.arrow`` files) is read in
    its own file order; any other folder is searched recursively for the supported extensions.

    Raises ``FileNotFoundError`` for a missing path or an empty directory, ``ValueError`` for an unsupported
    extension, a ``DatasetDict`` folder, or a parquet/arrow input without the ``json_key`` column.
    """
    if not paths:
        raise ValueError("no input files given")
    files: list[InputFile] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and (path / HF_STATE_NAME).is_file():
            files.extend(_saved_dataset_files(path))
        elif path.is_dir():
            if (path / "dataset_dict.json").is_file():
                splits = sorted(p.name for p in path.iterdir() if (p / HF_STATE_NAME).is_file())
                raise ValueError(f"input {str(path)!r} is a Hugging Face DatasetDict; pass one split's folder, "
                                 f"e.g. {str(path / splits[0]) if splits else str(path) + '/train'!r} "
                                 f"(splits: {splits})")
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(_ALL_SUFFIXES))
            if not found:
                raise FileNotFoundError(f"input directory {str(path)!r} holds no "
                                        f"{', '.join(_ALL_SUFFIXES)} files")
            files.extend(_input_file(p) for p in found)
        elif path.is_file():
            files.append(_input_file(path))
        else:
            raise FileNotFoundError(f"input {str(path)!r} does not exist")
    for item in files:
        if item.kind in ("parquet", "arrow"):
            _check_column(item, json_key)
    return files


def _saved_dataset_files(folder: Path) -> list[InputFile]:
    """The Arrow files of a ``save_to_disk`` folder, in the order its ``state.json`` lists them."""
    try:
        names = [entry["filename"] for entry in json.loads((folder / HF_STATE_NAME).read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{str(folder / HF_STATE_NAME)!r} is not a datasets save_to_disk state file "
                         f"(no readable '_data_files' list): {err}") from err
    missing = [name for name in names if not (folder / name).is_file()]
    if missing or not names:
        raise FileNotFoundError(f"save_to_disk folder {str(folder)!r} lacks its data files {missing or names}")
    return [InputFile(folder / name, "arrow") for name in names]


def _check_column(item: InputFile, column: str) -> None:
    names = _arrow_schema(item).names
    if column not in names:
        raise ValueError(f"{item.kind} file {str(item.path)!r} has no column {column!r} (columns: {names}); "
                         "pass the text column with --json-key")


def _arrow_schema(item: InputFile):
    import pyarrow.ipc
    import pyarrow.parquet as pq

    if item.kind == "parquet":
        return pq.read_schema(item.path)
    with pyarrow.memory_map(str(item.path)) as source:
        return pyarrow.ipc.open_stream(source).schema


def iter_documents(inputs: Sequence[InputFile], *, json_key: str = "text",
                   text_unit: TextUnit = "file") -> Iterator[str]:
    """Yield every document's text, file by file, in input order.

    jsonl: one JSON object per line, text under ``json_key`` (blank lines skipped). parquet and arrow: the
    ``json_key`` column, row by row. Plain text: per ``text_unit``. Empty documents are yielded too,
    so callers count records faithfully; they decide whether to drop them.
    """
    for item in inputs:
        if item.kind == "jsonl":
            yield from _iter_jsonl(item, json_key)
        elif item.kind in ("parquet", "arrow"):
            yield from _iter_columnar(item, json_key)
        else:
            yield from _iter_text(item, text_unit)


@contextmanager
def _open_binary(item: InputFile) -> Iterator[IO[bytes]]:
    """The decompressed bytes of ``item``, streamed."""
    with item.path.open("rb") as raw:
        if item.compression == "gzip":
            with gzip.GzipFile(fileobj=raw) as stream:
                yield stream
        elif item.compression == "zstd":
            import zstandard

            with zstandard.ZstdDecompressor().stream_reader(raw) as stream:
                yield stream
        else:
            yield raw


def _iter_jsonl(item: InputFile, key: str) -> Iterator[str]:
    try:
        with _open_binary(item) as raw:
            yield from _jsonl_records(item.path, io.TextIOWrapper(raw, encoding="utf-8"), key)
    except UnicodeDecodeError as err:
        raise _not_utf8(item) from err


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


def _not_utf8(item: InputFile) -> ValueError:
    """An error naming the line and (decompressed) byte offset of the first byte of ``item`` that is not UTF-8.

    Found by a second pass over whole lines: the text reader decodes ahead in blocks, so its error carries
    neither. A line is a safe unit because no multi-byte UTF-8 sequence contains a newline byte.
    """
    path = item.path
    offset = 0
    with _open_binary(item) as stream:
        for line_number, raw in enumerate(stream, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return ValueError(f"{path}:{line_number}: not UTF-8 text (byte {raw[err.start]:#04x} at byte "
                                  f"offset {offset + err.start}); re-encode the file as UTF-8, e.g. "
                                  "`iconv -f latin1 -t utf-8`")
            offset += len(raw)
    return ValueError(f"{path}: not UTF-8 text; re-encode the file as UTF-8")


def _iter_columnar(item: InputFile, column: str) -> Iterator[str]:
    import pyarrow
    import pyarrow.ipc
    import pyarrow.parquet as pq

    if item.kind == "parquet":
        yield from _column_values(pq.ParquetFile(item.path).iter_batches(columns=[column], batch_size=1024), column)
        return
    with pyarrow.memory_map(str(item.path)) as source:  # mapped, so a large shard is not read into memory
        yield from _column_values(pyarrow.ipc.open_stream(source), column)


def _column_values(batches: Iterable, column: str) -> Iterator[str]:
    for batch in batches:
        for value in batch.column(column).to_pylist():
            yield value or ""


def _iter_text(item: InputFile, text_unit: TextUnit) -> Iterator[str]:
    try:
        with _open_binary(item) as raw:
            text = raw.read().decode("utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(item) from err
    if text_unit == "file":
        yield text
    else:
        yield from (line for line in text.splitlines() if line.strip())


def count_records(inputs: Sequence[InputFile], *, text_unit: TextUnit = "file") -> int | None:
    """Cheap upper bound on the number of documents (for a progress bar's total): newlines, rows, files.

    None when a compressed line-based input would have to be decompressed just to count its lines.
    """
    total = 0
    for item in inputs:
        if item.kind == "parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(item.path).metadata.num_rows
        elif item.kind == "arrow":
            total += _arrow_rows(item.path)
        elif item.kind == "text" and text_unit == "file":
            total += 1
        elif item.compression is not None:
            return None
        else:
            total += _count_lines(item.path)
    return total


def _arrow_rows(path: Path) -> int:
    import pyarrow
    import pyarrow.ipc

    with pyarrow.memory_map(str(path)) as source:
        return sum(batch.num_rows for batch in pyarrow.ipc.open_stream(source))


def _count_lines(path: Path) -> int:
    count = 0
    last = b"\n"
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 22):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")
