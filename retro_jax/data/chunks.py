"""Chunking token streams into memory-mapped arrays, and reading neighbours back.

A chunk store is a folder with four .npy arrays (C chunks of m tokens) and a manifest:

  tokens.npy     int32 [C, m]  token ids; pad_id past the document end
  doc_ids.npy    int64 [C]     the document each chunk comes from
  lengths.npy    int16 [C]     real (non-pad) tokens in the chunk, 1..m
  num_bytes.npy  int32 [C]     UTF-8 bytes of the real tokens
  chunks.json    chunk_size, pad_id, num_chunks, counts; written LAST

A document's chunks are contiguous and in order, and documents are added with strictly
increasing doc_ids, so the continuation of chunk i is chunk i+1 exactly when
doc_ids[i+1] == doc_ids[i]. `ChunkWriter` streams to raw part files, so memory stays
bounded; `close()` turns them into .npy files under temporary names, renames them into
place, and only then writes chunks.json. A folder without chunks.json is incomplete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MANIFEST = "chunks.json"
FORMAT_VERSION = 1
ARRAYS = {  # name -> dtype; tokens is [C, m], the others [C]
    "tokens": np.dtype(np.int32),
    "doc_ids": np.dtype(np.int64),
    "lengths": np.dtype(np.int16),
    "num_bytes": np.dtype(np.int32),
}
_FLUSH_CHUNKS = 1 << 16


class ChunkStoreError(ValueError):
    """Bad chunk input or a chunk folder that is missing, incomplete or inconsistent."""


class IncompleteChunkStoreError(ChunkStoreError, FileNotFoundError):
    """The folder has no chunks.json: never written, or interrupted before close()."""


@dataclasses.dataclass
class ChunkStats:
    """documents / chunks / tokens stored; skipped_empty: zero-token documents;
    skipped_short: documents with fewer than min_tokens tokens."""

    documents: int = 0
    chunks: int = 0
    tokens: int = 0
    skipped_empty: int = 0
    skipped_short: int = 0


class ChunkWriter:
    """Appends documents as chunks to a folder, streaming; `close()` commits atomically."""

    def __init__(
        self,
        out_dir: str,
        chunk_size: int = 64,
        *,
        token_num_bytes: np.ndarray,
        pad_id: int = 0,
        min_tokens: int = 1,
        overwrite: bool = False,
    ) -> None:
        if not 1 <= chunk_size <= np.iinfo(np.int16).max:
            raise ChunkStoreError(f"chunk_size must be in [1, 32767], got {chunk_size}")
        self.out_dir = out_dir
        self.chunk_size = int(chunk_size)
        self.pad_id = int(pad_id)
        self.min_tokens = max(1, int(min_tokens))
        self.stats = ChunkStats()
        self._num_bytes_table = np.asarray(token_num_bytes, dtype=np.int32)
        if self._num_bytes_table.ndim != 1:
            raise ChunkStoreError("token_num_bytes must be a 1-D array indexed by token id")
        os.makedirs(out_dir, exist_ok=True)
        manifest = os.path.join(out_dir, MANIFEST)
        if os.path.exists(manifest):
            if not overwrite:
                raise FileExistsError(
                    f"{out_dir!r} already holds a complete chunk store; pass overwrite=True"
                )
            os.remove(manifest)  # from now on the folder reads as incomplete
        self._parts = {name: open(self._path(name, ".part"), "wb") for name in ARRAYS}
        self._buffers: dict[str, list[np.ndarray]] = {name: [] for name in ARRAYS}
        self._buffered = 0
        self._last_doc_id: int | None = None
        self._closed = False

    def _path(self, name: str, suffix: str) -> str:
        return os.path.join(self.out_dir, name + suffix)

    def add(self, doc_id: int, token_ids: np.ndarray | list[int]) -> int:
        """Append one document's tokens; returns the number of chunks written (0 if skipped).

        doc_ids must be strictly increasing within one writer.
        """
        if self._closed:
            raise ChunkStoreError("add() after close()")
        doc_id = int(doc_id)
        if self._last_doc_id is not None and doc_id <= self._last_doc_id:
            raise ChunkStoreError(
                f"doc_ids must be strictly increasing: got {doc_id} after {self._last_doc_id}"
            )
        self._last_doc_id = doc_id
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ChunkStoreError(f"document {doc_id}: token_ids must be a 1-D integer array")
        if ids.size and (ids.min() < 0 or ids.max() >= len(self._num_bytes_table)):
            raise ChunkStoreError(
                f"document {doc_id}: token ids must be in [0, {len(self._num_bytes_table)})"
            )
        if ids.size == 0:
            self.stats.skipped_empty += 1
            return 0
        if ids.size < self.min_tokens:
            self.stats.skipped_short += 1
            return 0
        m = self.chunk_size
        n = -(-ids.size // m)
        tokens_NxM = np.full((n, m), self.pad_id, dtype=np.int32)
        tokens_NxM.reshape(-1)[: ids.size] = ids
        lengths_N = np.full(n, m, dtype=np.int16)
        lengths_N[-1] = ids.size - (n - 1) * m
        real_NxM = np.arange(m)[None, :] < lengths_N[:, None]
        bytes_N = np.where(real_NxM, self._num_bytes_table[tokens_NxM], 0).sum(axis=1)
        self._buffers["tokens"].append(tokens_NxM)
        self._buffers["doc_ids"].append(np.full(n, doc_id, dtype=np.int64))
        self._buffers["lengths"].append(lengths_N)
        self._buffers["num_bytes"].append(bytes_N.astype(np.int32))
        self._buffered += n
        self.stats.documents += 1
        self.stats.chunks += n
        self.stats.tokens += int(ids.size)
        if self._buffered >= _FLUSH_CHUNKS:
            self._flush()
        return n

    def _flush(self) -> None:
        for name, parts in self._buffers.items():
            for array in parts:
                self._parts[name].write(np.ascontiguousarray(array, dtype=ARRAYS[name]).tobytes())
            parts.clear()
        self._buffered = 0

    def close(self) -> dict[str, Any]:
        """Write the .npy files and the manifest atomically; returns the manifest."""
        if self._closed:
            raise ChunkStoreError("close() called twice")
        self._flush()
        for f in self._parts.values():
            f.close()
        self._closed = True
        c, m = self.stats.chunks, self.chunk_size
        for name, dtype in ARRAYS.items():
            shape = (c, m) if name == "tokens" else (c,)
            part, tmp = self._path(name, ".part"), self._path(name, ".npy.tmp")
            with open(part, "rb") as src, open(tmp, "wb") as dst:
                header = {"descr": np.lib.format.dtype_to_descr(dtype),
                          "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_1_0(dst, header)
                shutil.copyfileobj(src, dst, length=1 << 24)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, self._path(name, ".npy"))
            os.remove(part)
        manifest = {"format_version": FORMAT_VERSION, "chunk_size": m, "pad_id": self.pad_id,
                    "num_chunks": c, **{k: v for k, v in dataclasses.asdict(self.stats).items()}}
        tmp = self._path(MANIFEST, ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.out_dir, MANIFEST))
        log.info("wrote %d chunks of %d tokens from %d documents to %s",
                 c, m, self.stats.documents, self.out_dir)
        return manifest

    def __enter__(self) -> "ChunkWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._closed:
            self.close()
        elif not self._closed:  # leave the folder incomplete (no manifest)
            for f in self._parts.values():
                f.close()
            self._closed = True


class ChunkStore:
    """Read-only view of a chunk folder: memory-mapped arrays and neighbour lookup."""

    def __init__(self, directory: str, manifest: dict[str, Any], arrays: dict[str, np.ndarray]):
        self.directory = directory
        self.manifest = manifest
        self.tokens: np.ndarray = arrays["tokens"]
        self.doc_ids: np.ndarray = arrays["doc_ids"]
        self.lengths: np.ndarray = arrays["lengths"]
        self.num_bytes: np.ndarray = arrays["num_bytes"]
        self.num_chunks = int(manifest["num_chunks"])
        self.chunk_size = int(manifest["chunk_size"])
        self.pad_id = int(manifest["pad_id"])

    @staticmethod
    def is_complete(directory: str) -> bool:
        """True if `directory` holds a chunk store whose writer closed successfully."""
        return os.path.isfile(os.path.join(directory, MANIFEST))

    @classmethod
    def open(cls, directory: str) -> "ChunkStore":
        """Memory-map a chunk folder written by `ChunkWriter.close()`."""
        path = os.path.join(directory, MANIFEST)
        if not os.path.isfile(path):
            raise IncompleteChunkStoreError(
                f"{directory!r} is not a complete chunk store (no {MANIFEST}); "
                "the writer never closed it, rebuild it"
            )
        with open(path) as f:
            manifest = json.load(f)
        c, m = int(manifest["num_chunks"]), int(manifest["chunk_size"])
        arrays = {}
        for name, dtype in ARRAYS.items():
            array = np.load(os.path.join(directory, name + ".npy"), mmap_mode="r",
                            allow_pickle=False)
            shape = (c, m) if name == "tokens" else (c,)
            if array.shape != shape or array.dtype != dtype:
                raise ChunkStoreError(
                    f"{directory}/{name}.npy is {array.dtype}{list(array.shape)}, "
                    f"expected {dtype}{list(shape)}"
                )
            arrays[name] = array
        return cls(directory, manifest, arrays)

    def __len__(self) -> int:
        return self.num_chunks

    def _masked_rows(self, ids_N: np.ndarray) -> np.ndarray:
        """int32 [N, m]: tokens of chunks ids_N (all valid), -1 past each chunk's length."""
        if ids_N.size == 0:
            return np.empty((0, self.chunk_size), dtype=np.int32)
        unique, inverse = np.unique(ids_N, return_inverse=True)  # sorted reads: locality
        rows_UxM = np.asarray(self.tokens[unique], dtype=np.int32)
        real_UxM = np.arange(self.chunk_size)[None, :] < self.lengths[unique][:, None]
        return np.where(real_UxM, rows_UxM, -1)[inverse.reshape(-1)]

    def neighbour_tokens(self, chunk_ids: np.ndarray) -> np.ndarray:
        """int32 [..., 2m]: each chunk followed by its continuation in the same document.

        Positions past the document end, and every position of chunk_id == -1, are -1.
        """
        ids = np.asarray(chunk_ids)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ChunkStoreError(f"chunk_ids must be integers, got {ids.dtype}")
        flat = ids.astype(np.int64).reshape(-1)
        bad = (flat < -1) | (flat >= self.num_chunks)
        if bad.any():
            raise ChunkStoreError(
                f"chunk id {int(flat[bad][0])} out of range [-1, {self.num_chunks})"
            )
        m = self.chunk_size
        out_Nx2M = np.full((flat.size, 2 * m), -1, dtype=np.int32)
        valid = np.flatnonzero(flat >= 0)
        first = flat[valid]
        out_Nx2M[valid, :m] = self._masked_rows(first)
        nxt = first + 1
        in_range = nxt < self.num_chunks
        has_next = np.zeros(first.size, dtype=bool)
        has_next[in_range] = (self.doc_ids[nxt[in_range]] == self.doc_ids[first[in_range]])
        out_Nx2M[valid[has_next], m:] = self._masked_rows(nxt[has_next])
        return out_Nx2M.reshape(ids.shape + (2 * m,))

    def chunk_tokens(self, i: int) -> np.ndarray:
        """int32 [length]: the real tokens of chunk i."""
        return np.asarray(self.tokens[i, : int(self.lengths[i])], dtype=np.int32)

    def chunk_text(self, i: int, tokenizer: Any) -> str:
        """The text of chunk i (a character split across chunks shows as U+FFFD)."""
        return tokenizer.decode(self.chunk_tokens(i))
