"""Document readers: .txt folders, JSONL (.gz/.zst), Parquet, and the stdlib default corpus.

`iter_documents` streams `Document`s in a deterministic order: the paths in the order
given, each folder expanded recursively into its files in sorted order, each file read
front to back. `doc_id` is the position in that order, so it is stable across runs
for the same inputs. Nothing holds more than one file's text (.txt) or one record
batch (JSONL line / Parquet batch) in memory.

Sources name where a document came from: "path" for a .txt file, "path:LINE" (1-based)
for a JSONL record, "path:ROW" (0-based) for a Parquet row. The default corpus (no
paths) is the running interpreter's standard-library .py sources, one document per
file, with sources "<stdlib>/relative/path.py" so they are the same on every machine
that runs the same Python version.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import logging
import os
import sysconfig
from typing import IO, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
STDLIB_PREFIX = "<stdlib>"
# Folder names never read in the default stdlib corpus (test suites, installed packages).
STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
PARQUET_BATCH_ROWS = 1024
_MAX_WARNINGS = 5


class CorpusError(ValueError):
    """Bad corpus input: missing path, unsupported file, unreadable data, no documents."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: its position in the corpus order, where it came from, its text."""

    doc_id: int
    source: str
    text: str


@dataclasses.dataclass
class CorpusStats:
    """Counts filled in by `iter_documents` while it streams.

    documents: documents yielded; skipped_empty: empty files or empty/whitespace-only
    texts (and JSON nulls); skipped_malformed: JSONL lines that are not JSON objects or
    whose text field is not a string; decode_errors: documents (or JSONL lines) with
    invalid UTF-8, decoded with errors="replace"; bytes: UTF-8 bytes of yielded texts.
    """

    documents: int = 0
    skipped_empty: int = 0
    skipped_malformed: int = 0
    decode_errors: int = 0
    bytes: int = 0
    files: int = 0


def stdlib_root() -> str:
    """The running interpreter's standard-library folder."""
    return sysconfig.get_paths()["stdlib"]


def _walk_sorted(root: str, suffixes: tuple[str, ...], excluded: frozenset[str]) -> list[str]:
    """All files under root ending with one of suffixes, in sorted path order."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in excluded]
        found.extend(os.path.join(folder, f) for f in files if f.endswith(suffixes))
    return sorted(found)


def _expand(paths: list[str]) -> list[str]:
    """Turn the user's paths into the ordered list of files to read."""
    files: list[str] = []
    for path in paths:
        if not os.path.exists(path):
            raise CorpusError(f"corpus path does not exist: {path!r}")
        if os.path.isdir(path):
            found = _walk_sorted(path, SUPPORTED_SUFFIXES, frozenset({"__pycache__"}))
            if not found:
                raise CorpusError(
                    f"corpus folder {path!r} holds no files ending in "
                    f"{', '.join(SUPPORTED_SUFFIXES)}"
                )
            files.extend(found)
        elif path.endswith(SUPPORTED_SUFFIXES):
            files.append(path)
        else:
            raise CorpusError(
                f"unsupported corpus file {path!r}: expected a folder or a file ending in "
                f"{', '.join(SUPPORTED_SUFFIXES)}"
            )
    return files


def _decode(raw: bytes, stats: CorpusStats, where: str) -> str:
    """UTF-8 decode; invalid bytes become U+FFFD and are counted."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        if stats.decode_errors < _MAX_WARNINGS:
            log.warning("invalid UTF-8 in %s; replaced with U+FFFD", where)
        stats.decode_errors += 1
        return raw.decode("utf-8", errors="replace")


def _open_binary(path: str) -> IO[bytes]:
    """Open a possibly compressed file for reading bytes line by line."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        raw = open(path, "rb")
        return io.BufferedReader(
            zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        )
    return open(path, "rb")


def _read_text_file(path: str, source: str, stats: CorpusStats) -> Iterator[tuple[str, str]]:
    with open(path, "rb") as f:
        raw = f.read()
    yield source, _decode(raw, stats, source)


def _read_jsonl(path: str, text_field: str, stats: CorpusStats) -> Iterator[tuple[str, str]]:
    try:
        with _open_binary(path) as f:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    record = json.loads(_decode(raw, stats, where))
                except json.JSONDecodeError as e:
                    _malformed(stats, f"{where} is not valid JSON ({e.msg})")
                    continue
                if not isinstance(record, dict):
                    _malformed(stats, f"{where} is not a JSON object")
                    continue
                if text_field not in record:
                    raise CorpusError(
                        f"{where} has no field {text_field!r} (fields: {sorted(record)}); "
                        "pass text_field= to choose the text field"
                    )
                text = record[text_field]
                if text is None:
                    text = ""
                if not isinstance(text, str):
                    _malformed(stats, f"{where}: field {text_field!r} is {type(text).__name__}")
                    continue
                yield where, text
    except (OSError, EOFError, zstandard.ZstdError) as e:
        raise CorpusError(f"cannot read {path!r}: {e}") from e


def _malformed(stats: CorpusStats, message: str) -> None:
    if stats.skipped_malformed < _MAX_WARNINGS:
        log.warning("skipping %s", message)
    stats.skipped_malformed += 1


def _read_parquet(path: str, text_field: str, stats: CorpusStats) -> Iterator[tuple[str, str]]:
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for non-Parquet input
        raise CorpusError(f"cannot read Parquet file {path!r}: {e}") from e
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise CorpusError(
            f"Parquet file {path!r} has no column {text_field!r} (columns: {names}); "
            "pass text_field= to choose the text column"
        )
    row = 0
    batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field])
    while True:
        try:
            batch = next(batches, None)
        except pa.ArrowException as e:
            raise CorpusError(f"cannot read Parquet file {path!r} near row {row}: {e}") from e
        if batch is None:
            return
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise CorpusError(f"column {text_field!r} of {path!r} holds {type(text).__name__}")
            yield f"{path}:{row}", text or ""
            row += 1


def _read_file(path: str, text_field: str, stats: CorpusStats) -> Iterator[tuple[str, str]]:
    if path.endswith(JSONL_SUFFIXES):
        return _read_jsonl(path, text_field, stats)
    if path.endswith(PARQUET_SUFFIXES):
        return _read_parquet(path, text_field, stats)
    return _read_text_file(path, path, stats)


def _stdlib_documents(stats: CorpusStats) -> Iterator[tuple[str, str]]:
    root = stdlib_root()
    files = _walk_sorted(root, (".py",), STDLIB_EXCLUDED_DIRS)
    if not files:
        raise CorpusError(f"no .py files found under the standard library folder {root!r}")
    for path in files:
        stats.files += 1
        source = STDLIB_PREFIX + "/" + os.path.relpath(path, root).replace(os.sep, "/")
        yield from _read_text_file(path, source, stats)


def _raw_documents(
    paths: list[str] | None, text_field: str, stats: CorpusStats
) -> Iterator[tuple[str, str]]:
    if paths is None:
        yield from _stdlib_documents(stats)
        return
    files = _expand(paths)
    for path in files:
        stats.files += 1
        yield from _read_file(path, text_field, stats)


def iter_documents(
    paths: list[str] | None,
    max_documents: int | None = None,
    *,
    text_field: str = "text",
    stats: CorpusStats | None = None,
) -> Iterator[Document]:
    """Stream the corpus's usable documents in a deterministic order.

    Args:
      paths: files or folders (.txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet); a folder
        is searched recursively. None reads the stdlib default corpus.
      max_documents: stop after this many documents (None: all).
      text_field: the JSON field / Parquet column that holds the text.
      stats: filled in while iterating (documents, skipped_empty, decode_errors, ...).

    Raises:
      CorpusError: a path is missing or unsupported, a file cannot be read, the text
        field is absent, or the corpus has no usable document.
    """
    if max_documents is not None and max_documents <= 0:
        raise CorpusError(f"max_documents must be positive, got {max_documents}")
    stats = stats if stats is not None else CorpusStats()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if paths is not None:
        paths = [os.fspath(p) for p in paths]
        if not paths:
            raise CorpusError("no corpus paths given (pass None for the stdlib default corpus)")
    for source, text in _raw_documents(paths, text_field, stats):
        if not text.strip():
            stats.skipped_empty += 1
            continue
        doc = Document(doc_id=stats.documents, source=source, text=text)
        stats.documents += 1
        stats.bytes += len(text.encode("utf-8"))
        yield doc
        if max_documents is not None and stats.documents >= max_documents:
            return
    if stats.documents == 0:
        where = "the standard library" if paths is None else repr(paths)
        raise CorpusError(
            f"no usable documents in {where}: {stats.skipped_empty} empty, "
            f"{stats.skipped_malformed} malformed"
        )
