"""Corpus inputs in the formats they come in, read as documents in bounded memory.

Plain text and markdown (one document per file, read in pieces), JSONL (one document per
line, also compressed with gzip, zstd or xz), parquet (FineWeb, Dolma, RedPajama exports:
one document per row of the text column, read batch by batch) and Arrow files (Hugging
Face `datasets` `save_to_disk` folders). Files, folders and globs mix in one list; folders
are searched recursively in sorted order so every run reads the same documents in the
same order.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import lzma
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from gptkit.errors import GptkitError
from gptkit.tokenizer import decode_utf8, read_text_chunks

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.xz")
TABLE_SUFFIXES = (".parquet", ".arrow")
SUFFIXES = (*TEXT_SUFFIXES, *JSONL_SUFFIXES, *TABLE_SUFFIXES)
_KINDS = ".txt, .md, .jsonl (.gz, .zst, .xz), .parquet or .arrow"
# A text file is read in pieces of this size: big enough that per-piece costs vanish,
# small enough that memory stays bounded whatever the file size.
PIECE_BYTES = 1 << 18
# Rows read at once from a parquet or Arrow table.
_TABLE_BATCH = 1024


def is_corpus_file(path: Path) -> bool:
    """Whether `path` names a format `prepare` reads (by its suffix)."""
    return path.name.endswith(SUFFIXES)


def find_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """The corpus files named by `inputs` (files, folders searched recursively, globs),
    in a fixed order: the order given, each folder or glob sorted."""
    if not inputs:
        raise GptkitError("no corpus given; pass at least one file or directory.")
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists() and glob.has_magic(str(item)):
            matched = sorted(Path(p) for p in glob.glob(str(item), recursive=True))
            found = [p for p in matched if p.is_file() and is_corpus_file(p)]
            if not found:
                raise GptkitError(f"the pattern {item} matches no {_KINDS} files.")
            files += found
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_corpus_file(p))
            if not found:
                raise GptkitError(f"{path} contains no {_KINDS} files.")
            files += found
        elif path.is_file():
            if not is_corpus_file(path):
                raise GptkitError(f"{path} is not a {_KINDS} file.")
            files.append(path)
        else:
            raise GptkitError(f"corpus path {path} does not exist.")
    return files


def iter_documents(files: Sequence[Path], field: str = "text") -> Iterator[tuple[str, int, bool]]:
    """Yield `(text, bytes_read, ends_document)` pieces of every document of `files`.

    A text file is one document, read in pieces cut where pre-tokenization does not
    change; a JSONL line or a table row is one document, its `field` the text. Invalid
    UTF-8 becomes U+FFFD with a warning per file.
    """
    for path in files:
        yield from file_documents(path, field)


def file_documents(path: Path, field: str = "text") -> Iterator[tuple[str, int, bool]]:
    """The `(text, bytes_read, ends_document)` pieces of one corpus file."""
    name = path.name
    if name.endswith(TEXT_SUFFIXES):
        yield from _text_documents(path)
    elif name.endswith(".parquet"):
        yield from _parquet_documents(path, field)
    elif name.endswith(".arrow"):
        yield from _arrow_documents(path, field)
    else:
        yield from _jsonl_documents(path, field)


def _text_documents(path: Path) -> Iterator[tuple[str, int, bool]]:
    pending: tuple[str, int] | None = None
    started = False
    for text, nbytes in read_text_chunks(path, chunk_bytes=PIECE_BYTES):
        if pending is not None:
            yield pending[0], pending[1], False
        started = started or bool(text)
        pending = (text, nbytes)
    if pending is not None:
        yield pending[0], pending[1], started


def _open_stream(path: Path, raw: IO[bytes]) -> IO[bytes]:
    """The decompressed bytes of `raw`, by the file's suffix."""
    if path.name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if path.name.endswith(".xz"):
        return lzma.LZMAFile(raw)
    if path.name.endswith(".zst"):
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return io.BufferedReader(reader)
    return raw


def _decompress_errors() -> tuple[type[BaseException], ...]:
    import zstandard

    return (EOFError, OSError, zlib.error, lzma.LZMAError, zstandard.ZstdError)


def _jsonl_documents(path: Path, field: str) -> Iterator[tuple[str, int, bool]]:
    replaced = 0
    documents = 0
    with path.open("rb") as raw, _open_stream(path, raw) as stream:
        lines = iter(stream)
        n = 0
        last = 0
        while True:
            try:
                line_bytes = next(lines)
            except StopIteration:
                break
            except _decompress_errors() as exc:
                # a damaged archive: keep what came before, name where it broke
                warnings.warn(
                    f"{path} is damaged near compressed byte {raw.tell():,} ({exc}); kept the "
                    f"{documents} documents before it and skipped the rest of the file.",
                    stacklevel=2,
                )
                return
            n += 1
            position = raw.tell()
            nbytes, last = position - last, position
            line, bad = decode_utf8(line_bytes)
            replaced += bad
            if not line.strip():
                yield "", nbytes, False
                continue
            text = _field_text(_parse_line(path, n, line, field), path, f"line {n}", field)
            documents += bool(text)
            yield text, nbytes, bool(text)
    if replaced:
        warnings.warn(
            f"{path}: {replaced} bytes that are not valid UTF-8 were replaced with U+FFFD.",
            stacklevel=2,
        )


def _parse_line(path: Path, n: int, line: str, field: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise GptkitError(f"{path} line {n} is not valid JSON ({e.msg}).") from None
    if not isinstance(record, dict):
        raise GptkitError(
            f"{path} line {n} is a JSON {type(record).__name__}; expected an object "
            f"with a '{field}' field."
        )
    if field not in record:
        raise GptkitError(
            f"{path} line {n} has no field '{field}' (it has {', '.join(record)}); "
            "choose the text field with --field."
        )
    return record


def _field_text(record: dict[str, Any], path: Path, where: str, field: str) -> str:
    text = record[field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise GptkitError(
            f"{path} {where}: field '{field}' is a {type(text).__name__}; expected a string."
        )
    return text


def _check_column(path: Path, names: list[str], field: str) -> None:
    if field not in names:
        raise GptkitError(
            f"{path} has no column '{field}' (it has {', '.join(names)}); choose the text "
            "column with --field."
        )


def _rows(path: Path, batches: Iterator[tuple[Any, int]], field: str
          ) -> Iterator[tuple[str, int, bool]]:
    """Documents of (record batch of one column, bytes of the file it stands for)."""
    for batch, nbytes in batches:
        column = batch.column(0).to_pylist()
        for text in column:
            if text is not None and not isinstance(text, str):
                raise GptkitError(
                    f"{path}: column '{field}' holds {type(text).__name__} values; "
                    "expected strings."
                )
            yield text or "", 0, bool(text)
        yield "", nbytes, False


def _parquet_documents(path: Path, field: str) -> Iterator[tuple[str, int, bool]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:
        raise GptkitError(f"{path} is not a readable parquet file ({exc}).") from None
    with table:
        _check_column(path, table.schema_arrow.names, field)
        # a parquet row has no byte offset: each batch stands for its share of the file
        share = path.stat().st_size / max(table.metadata.num_rows, 1)
        batches = table.iter_batches(batch_size=_TABLE_BATCH, columns=[field])
        yield from _rows(path, ((b, round(len(b) * share)) for b in batches), field)


def _arrow_documents(path: Path, field: str) -> Iterator[tuple[str, int, bool]]:
    import pyarrow as pa

    # `datasets` writes the IPC stream format; the file format is read as well
    with pa.memory_map(str(path)) as source:
        try:
            reader: Any = pa.ipc.open_stream(source)
            batches = iter(reader)
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                reader = pa.ipc.open_file(source)
            except pa.ArrowInvalid as exc:
                raise GptkitError(f"{path} is not a readable Arrow file ({exc}).") from None
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        _check_column(path, reader.schema.names, field)
        index = reader.schema.names.index(field)
        selected = (batch.select([index]) for batch in batches)
        yield from _rows(path, _with_offsets(selected, source), field)


def _with_offsets(batches: Iterator[Any], source: Any) -> Iterator[tuple[Any, int]]:
    """Each batch with the bytes of the memory-mapped file read for it."""
    last = 0
    for batch in batches:
        position = source.tell()
        yield batch, position - last
        last = position
