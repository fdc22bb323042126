"""A built retrieval database (DB_DIR): layout, manifest, opening, checking, and a Retriever.

Layout of DB_DIR (written by `retro_jax.retrieval.build.build_database`):

  manifest.json              written LAST: its presence means the database is complete
  tokenizer.model            the SentencePiece model every chunk was tokenized with
  train/chunks/              ChunkStore of the database chunks, in corpus (doc_id) order
  train/embeddings.npy       float32 [C, D] frozen-BERT key of every train chunk
  train/neighbours.npy       int64 [C, k] nearest train chunks from OTHER documents, -1 missing
                             (batches also drop those from any document of the model's window:
                             retrieval/window_rule.py)
  train/neighbours.dists.npy float32 [C, k] their squared L2 distances
  validation/...             the same for validation chunks (queries only, never in the index)
  index/                     ShardedIndex over train/embeddings.npy
  stages/*.json              per-stage settings and results (how to resume)

Neighbour ids always index the train split. Train chunks are stored in corpus order, so the
first N train chunks are the database built from a prefix of the corpus. For database-size
ablations, `retro-jax db-subset` (retrieval/subset.py) makes a database whose index covers
a subset of the train chunks, with its own index and recomputed neighbours, without
re-embedding; every train chunk is still training data. (`Database.neighbours(split,
prefix=N)` only masks stored ids >= N: fewer than k may survive.)
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from retro_jax.data.chunks import ChunkStore
from retro_jax.data.tokenizer import Tokenizer
from retro_jax.retrieval.digest import sha256_file  # noqa: F401  (dbl.sha256_file for its users)
from retro_jax.retrieval.exact import exact_search
from retro_jax.retrieval.index import ShardedIndex
from retro_jax.retrieval.window_rule import check_training_windows

MANIFEST = "manifest.json"
FORMAT = "retro-jax-database"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")
TOKENIZER_FILE = "tokenizer.model"


class DatabaseError(ValueError):
    """The folder is not a complete database, or one of its files is damaged."""


class DatabaseMismatchError(ValueError):
    """A model (or its config) and a database disagree on tokenizer or chunk size."""


# ----------------------------------------------------------------------------- layout


def chunks_dir(root: str | os.PathLike[str], split: str) -> Path:
    """Folder of the ChunkStore of one split."""
    return Path(root) / split / "chunks"


def embeddings_path(root: str | os.PathLike[str], split: str) -> Path:
    """float32 [C, D] embeddings of one split."""
    return Path(root) / split / "embeddings.npy"


def neighbours_path(root: str | os.PathLike[str], split: str) -> Path:
    """int64 [C, k] neighbour ids of one split (distances next to it, `.dists.npy`)."""
    return Path(root) / split / "neighbours.npy"


def data_files(root: str | os.PathLike[str]) -> list[str]:
    """Every file the manifest checksums: tokenizer, split folders, index (sorted, relative)."""
    root = Path(root)
    found = [TOKENIZER_FILE] if (root / TOKENIZER_FILE).is_file() else []
    for top in (*SPLITS, "index"):
        for folder, _, files in os.walk(root / top):
            found += [os.path.relpath(os.path.join(folder, f), root) for f in files]
    return sorted(p.replace(os.sep, "/") for p in found)


def checksums(root: str | os.PathLike[str]) -> dict[str, str]:
    """{relative path: sha256} of every data file of the database."""
    return {rel: sha256_file(Path(root) / rel) for rel in data_files(root)}


# ----------------------------------------------------------------------------- database


class Database:
    """Read-only view of a complete DB_DIR. Arrays are memory-mapped and opened lazily."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self.chunk_size = int(manifest["chunk_size"])
        self.neighbours_stored = int(manifest["neighbours_stored"])

    @classmethod
    def open(cls, db_dir: str | os.PathLike[str], verify: bool = False) -> Database:
        """Open DB_DIR; `verify=True` also recomputes every checksum (slow for big ones)."""
        root = Path(db_dir)
        if not root.is_dir():
            raise DatabaseError(f"database folder {str(root)!r} does not exist")
        path = root / MANIFEST
        if not path.is_file():
            hint = " (build-db has not finished; rerun it to resume)" if (root / "stages").is_dir() else ""
            raise DatabaseError(f"{str(root)!r} is not a complete retro-jax database: no {MANIFEST}{hint}")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DatabaseError(f"{path} is not valid JSON: {e}") from e
        if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
            raise DatabaseError(f"{path} is not a version-{FORMAT_VERSION} {FORMAT} manifest")
        missing = [rel for rel in manifest["checksums"] if not (root / rel).is_file()]
        if missing:
            raise DatabaseError(f"database {str(root)!r} lacks {len(missing)} file(s), e.g. {missing[:3]}")
        db = cls(root, manifest)
        if verify:
            bad = db.verify_checksums()
            if bad:
                raise DatabaseError(f"checksum mismatch in {str(root)!r}: {bad[:5]}")
        return db

    def verify_checksums(self) -> list[str]:
        """Relative paths whose sha256 differs from the manifest (empty list: all good)."""
        want = self.manifest["checksums"]
        have = checksums(self.root)
        return sorted(p for p in set(want) | set(have) if want.get(p) != have.get(p))

    # ---- accessors
    def _split(self, split: str) -> str:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return split

    @cached_property
    def train(self) -> ChunkStore:
        """The database chunks (what neighbour ids index)."""
        return ChunkStore.open(str(chunks_dir(self.root, "train")))

    @cached_property
    def validation(self) -> ChunkStore:
        """Validation chunks: queries for evaluation, never in the index."""
        return ChunkStore.open(str(chunks_dir(self.root, "validation")))

    def chunks(self, split: str) -> ChunkStore:
        return self.train if self._split(split) == "train" else self.validation

    def embeddings(self, split: str) -> np.ndarray:
        """float32 [C, D] memmap."""
        return np.load(embeddings_path(self.root, self._split(split)), mmap_mode="r", allow_pickle=False)

    def neighbours(self, split: str, prefix: int | None = None) -> np.ndarray:
        """int64 [C, k_stored] ids into the train split, -1 where missing.

        `prefix=N` masks ids >= N to -1 (the database as its first N chunks; the remaining
        neighbours are still ordered but fewer than k may survive)."""
        ids = np.load(neighbours_path(self.root, self._split(split)), mmap_mode="r", allow_pickle=False)
        return ids if prefix is None else np.where(ids < prefix, ids, -1)

    def neighbour_distances(self, split: str) -> np.ndarray:
        """float32 [C, k_stored] squared L2 distances (inf where missing)."""
        path = neighbours_path(self.root, self._split(split)).with_suffix(".dists.npy")
        return np.load(path, mmap_mode="r", allow_pickle=False)

    def neighbour_tokens(self, split: str, chunk_ids: np.ndarray, k: int) -> np.ndarray:
        """int32 [..., k, 2m]: the first k stored neighbours of chunks `chunk_ids` of `split`,
        each its chunk and continuation ([N, F]); -1 for padding and missing neighbours."""
        if not 1 <= k <= self.neighbours_stored:
            raise ValueError(f"k must be in [1, {self.neighbours_stored}] (neighbours stored), got {k}")
        ids = np.asarray(chunk_ids, dtype=np.int64)
        nb = self.neighbours(split)
        flat = ids.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= nb.shape[0]):
            raise ValueError(f"{split} chunk ids must be in [0, {nb.shape[0]})")
        nb_ids = np.asarray(nb[flat, :k]).reshape(ids.shape + (k,))
        return self.train.neighbour_tokens(nb_ids)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(str(self.root / TOKENIZER_FILE))

    @cached_property
    def index(self) -> ShardedIndex:
        return ShardedIndex.load(self.root / "index")

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    # ---- integrity
    def check_model(self, model_cfg: Any, tokenizer_sha256: str | None = None) -> None:
        """Refuse (DatabaseMismatchError) a model that cannot use this database: another chunk size,
        a smaller vocabulary, another tokenizer (when `tokenizer_sha256`, the model's, is given), or
        more neighbours per chunk than are stored. `model_cfg`: a ModelConfig."""
        if tokenizer_sha256 and tokenizer_sha256 != self.tokenizer_sha256:
            raise DatabaseMismatchError(
                f"tokenizer mismatch: the model was trained with tokenizer sha256 {tokenizer_sha256[:16]}, "
                f"but database {str(self.root)!r} was built with tokenizer sha256 {self.tokenizer_sha256[:16]}; "
                "use the database the model was trained with, or rebuild it with --tokenizer")
        if int(model_cfg.chunk_size) != self.chunk_size:
            raise DatabaseMismatchError(
                f"chunk size mismatch: the model uses chunks of {model_cfg.chunk_size} tokens, but database "
                f"{str(self.root)!r} has chunks of {self.chunk_size} tokens")
        vocab = int(self.manifest["tokenizer"]["vocab_size"])
        if vocab > model_cfg.vocab_size:
            raise DatabaseMismatchError(
                f"vocabulary mismatch: database {str(self.root)!r} has a tokenizer of {vocab} tokens, "
                f"more than the model's vocab_size {model_cfg.vocab_size}")
        if model_cfg.is_retro and model_cfg.num_neighbours > self.neighbours_stored:
            raise DatabaseMismatchError(
                f"the model retrieves {model_cfg.num_neighbours} neighbours per chunk, but database "
                f"{str(self.root)!r} stores only {self.neighbours_stored}")

    def info(self) -> dict[str, Any]:
        """Counts, settings and provenance (no array reads)."""
        m = self.manifest
        return {
            "db_dir": str(self.root),
            "splits": m["counts"],
            "neighbours_stored": self.neighbours_stored,
            "chunk_size": self.chunk_size,
            "shards": m["index"]["shards"],
            "index": m["index"],
            "tokenizer": m["tokenizer"],
            "embedder": m["embedder"],
            "near_duplicates_removed": m["corpus"]["near_duplicates_removed"],
            "skipped_documents": {k: m["corpus"][k] for k in
                                  ("skipped_empty", "skipped_malformed", "skipped_short")},
            "decode_errors": m["corpus"]["decode_errors"],
            "settings": m["settings"],
            "versions": m["versions"],
            "subset": m.get("subset"),
        }

    def check(self, sample: int = 1000, seed: int = 0, k: int = 10, verify: bool = True,
              seq_len: int = 2048, num_neighbours: int = 2) -> dict[str, Any]:
        """Recompute integrity figures.

        recall_at_10: mean fraction of the exact top-k (brute force over train embeddings)
          that the index returns, over `sample` query chunks (validation first, then train);
        same_document_neighbours: stored neighbours from the query's own document (must be 0),
          over ALL stored neighbours of both splits;
        missing_neighbours: stored -1 ids (both splits); checksums_ok: every file's sha256;
        window_rule: over the train split's training windows of `seq_len` tokens, the stored first
          `num_neighbours` slots from a document of their window (before), and after the loader's
          window rule (must be 0); see window_rule.check_training_windows.
        """
        window = check_training_windows(self, seq_len, min(num_neighbours, self.neighbours_stored))
        train_emb = self.embeddings("train")
        rows = self.index.row_ids  # a database-size subset indexes only these train chunks
        if rows is not None:
            rows = np.asarray(rows)
            train_emb = train_emb[rows]
        k = min(k, train_emb.shape[0])
        rng = np.random.default_rng(seed)
        queries, drawn = [], {}
        for split in ("validation", "train"):  # validation chunks first, topped up with train chunks
            emb = self.embeddings(split)
            n = min(sample - sum(drawn.values()), emb.shape[0])
            drawn[split] = n
            queries.append(np.asarray(emb[np.sort(rng.choice(emb.shape[0], size=n, replace=False))], np.float32))
        q = np.concatenate(queries)
        got, _ = self.index.search(q, k)
        want, _ = exact_search(train_emb, q, k)
        if rows is not None:
            want = np.where(want >= 0, rows[np.maximum(want, 0)], -1)
        hits = [len(set(g[g >= 0]) & set(w[w >= 0])) / max(1, int((w >= 0).sum())) for g, w in zip(got, want)]
        same, missing = {}, {}
        db_docs = self.train.doc_ids
        for split in SPLITS:
            nb, docs = self.neighbours(split), self.chunks(split).doc_ids
            same[split] = missing[split] = 0
            for r0 in range(0, nb.shape[0], 65_536):
                ids = np.asarray(nb[r0:r0 + 65_536])
                valid = ids >= 0
                nd = np.asarray(db_docs[np.where(valid, ids, 0).ravel()]).reshape(ids.shape)
                same[split] += int((valid & (nd == np.asarray(docs[r0:r0 + 65_536])[:, None])).sum())
                missing[split] += int((~valid).sum())
        out = {
            "recall_at_10": float(np.mean(hits)) if hits else float("nan"),
            "recall_queries": drawn,
            "same_document_neighbours": sum(same.values()),
            "missing_neighbours": sum(missing.values()),
            "missing_neighbours_per_split": missing,
            "index_modes": sorted({s["mode"] for s in self.manifest["index"]["shards"]}),
            "window_rule": window,
        }
        if verify:
            bad = self.verify_checksums()
            out["checksums_ok"], out["checksum_mismatches"] = not bad, bad[:10]
        return out


class Retriever:
    """Neighbours (as tokens) for arbitrary chunk tokens: decode, embed, search, gather.

    For generation: `neighbours_for_chunks(tokens [Q, m], k) -> int32 [Q, k, 2m]`.
    """

    def __init__(self, db: Database, embedder: Any = None, batch_size: int = 64) -> None:
        from retro_jax.retrieval.bert import Embedder

        info = db.manifest["embedder"]
        if embedder is None:
            embedder = Embedder.load(info["path"], max_length=info["max_length"], batch_size=batch_size)
        if embedder.name != info["name"]:
            raise DatabaseMismatchError(
                f"embedder mismatch: database {str(db.root)!r} was keyed with {info['name']}, "
                f"the retriever would embed queries with {embedder.name}")
        self.db = db
        self.embedder = embedder

    def neighbours_for_chunks(self, chunk_tokens: np.ndarray, k: int,
                              exclude_doc_ids: np.ndarray | None = None) -> np.ndarray:
        """int32 [Q, k, 2m] neighbour tokens ([N, F], -1 padded) of Q query chunks.

        chunk_tokens: int [Q, m]; pad and negative ids are ignored when decoding.
        exclude_doc_ids: optional int [Q]; database chunks of that document are skipped.
        """
        from retro_jax.retrieval.neighbours import neighbours_for_block

        toks = np.asarray(chunk_tokens)
        if toks.ndim != 2:
            raise ValueError(f"chunk_tokens must be [Q, m], got shape {toks.shape}")
        if len(toks) == 0:
            return np.zeros((0, k, 2 * self.db.chunk_size), np.int32)
        q = self.embedder.embed([self.db.tokenizer.decode(row) for row in toks])
        if exclude_doc_ids is None:
            ids, _ = self.db.index.search(q, k)
        else:
            docs = np.asarray(exclude_doc_ids, dtype=np.int64)
            if docs.shape != (len(toks),):
                raise ValueError(f"exclude_doc_ids must have shape ({len(toks)},), got {docs.shape}")
            ids, _ = neighbours_for_block(self.db.index, q, docs, self.db.train.doc_ids, k, 2 * k + 16)
        return self.db.train.neighbour_tokens(ids)
