"""Nearest-neighbour search over chunk embeddings: ScaNN or exact, sharded.

RETRO keys every database chunk by a frozen-BERT embedding and retrieves by
squared L2 distance (Section 2.3). This module owns that search and nothing else:

* ``exact``: blocked brute force in numpy. Used for tests, tiny databases and for
  CPUs that cannot run ScaNN's x86 wheel (it needs AVX + FMA).
* ``scann``: a ScaNN tree (k-means partitioning) + asymmetric hashing + exact
  float32 reordering, built on the host (never inside ``jit``) and serialized to a
  folder that reloads without rebuilding and without pickle.

An index on disk is ``out_dir/index.json`` plus one folder per shard. Shard ``s``
holds the contiguous global rows ``[start_s, end_s)``; a search fans out to every
shard and merges the top-k by (distance, global id), so results are deterministic.
Distances are squared L2 everywhere.

An index may cover a subset of a larger id space (a database-size subset, see
``retrieval/subset.py``): ``row_ids`` (strictly increasing, saved as ``row_ids.npy``)
maps its rows to those ids, and ``search`` returns the mapped ids.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import platform
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from retro_jax.retrieval.exact import exact_search, sort_topk

log = logging.getLogger(__name__)

INDEX_JSON = "index.json"
FORMAT_VERSION = 1
Mode = Literal["auto", "exact", "scann"]
MIN_SCANN_ROWS = 32  # asymmetric hashing trains 16 centres per block; tinier shards go exact


class IndexInputError(ValueError):
    """Bad embeddings, queries or configuration given to the index."""


class IndexNotFoundError(FileNotFoundError):
    """The folder does not hold a complete index."""


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """How to index one shard. Zero-valued ScaNN fields are filled by ``for_size``.

    Rule used by ``for_size(n, dim)`` (``n`` = rows in the shard):
      * ``n < exact_threshold`` (20k): exact brute force; it is fast enough and
        ScaNN's k-means has too few points per leaf to help.
      * otherwise ScaNN: ``num_leaves = round(sqrt(n))`` (about sqrt(n) points per
        leaf); ``num_leaves_to_search = max(16, ceil(4 sqrt(num_leaves)))``, so the
        points scored per query grow like n^(3/4), not n (72 of 316 leaves at 100k
        rows, 127 of 1000 at 1M); asymmetric hashing with 2 dims per block;
        ``reorder_k = 250`` candidates rescored exactly in float32; a k-means
        training sample of ``min(n, 250_000)`` rows. Measured by bench/retrieval.py:
        recall@10 0.990 at 5.8x exact's queries/s on 100k real MiniLM embeddings,
        0.999 at 12.3x on 1M synthetic clustered vectors (README, Performance; there
        a reorder_k of 100 gave the same recall about 17% faster, not yet adopted). 4 dims per block was ~1.8x faster at the same recall
        there, but lost recall on 32-d data (0.85 vs 0.99), so 2 (ScaNN's advice
        for L2) stays the default; pass ``dims_per_block=4`` after measuring.
      * a shard under ``MIN_SCANN_ROWS`` (32) rows is always exact.
    """

    mode: Mode = "auto"
    num_leaves: int = 0
    num_leaves_to_search: int = 0
    dims_per_block: int = 2
    reorder_k: int = 0
    training_sample_size: int = 0
    exact_threshold: int = 20_000

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "exact", "scann"):
            raise IndexInputError(f"IndexConfig.mode must be auto, exact or scann, got {self.mode!r}")
        for name in ("num_leaves", "num_leaves_to_search", "reorder_k", "training_sample_size"):
            if getattr(self, name) < 0:
                raise IndexInputError(f"IndexConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.dims_per_block < 1:
            raise IndexInputError(f"IndexConfig.dims_per_block must be >= 1, got {self.dims_per_block}")

    @classmethod
    def for_size(cls, n: int, dim: int, mode: Mode = "auto", **overrides: Any) -> IndexConfig:
        """A concrete config for ``n`` rows of width ``dim`` (see the class docstring)."""
        return cls(mode=mode, **overrides).resolved(n, dim)

    def resolved(self, n: int, dim: int) -> IndexConfig:
        """This config with ``auto`` decided and every zero ScaNN field filled in."""
        if n < 1 or dim < 1:
            raise IndexInputError(f"cannot index {n} rows of width {dim}")
        mode = self.mode
        if mode == "auto":
            mode = "exact" if n < self.exact_threshold else "scann"
        if mode == "scann" and n < MIN_SCANN_ROWS:
            log.info("shard of %d rows is below ScaNN's minimum of %d; using exact search", n, MIN_SCANN_ROWS)
            mode = "exact"
        if mode == "scann" and not scann_available():
            warnings.warn(
                "ScaNN is unavailable on this CPU/platform (its x86 wheel needs AVX and "
                "FMA); falling back to exact brute-force search.",
                RuntimeWarning,
                stacklevel=2,
            )
            mode = "exact"
        if mode == "exact":
            return dataclasses.replace(self, mode="exact")
        leaves = self.num_leaves or max(1, round(math.sqrt(n)))
        leaves = min(leaves, max(1, n // 2))
        to_search = self.num_leaves_to_search or max(16, math.ceil(4 * math.sqrt(leaves)))
        return dataclasses.replace(
            self,
            mode="scann",
            num_leaves=leaves,
            num_leaves_to_search=min(to_search, leaves),
            dims_per_block=min(self.dims_per_block, dim),
            reorder_k=self.reorder_k or 250,
            training_sample_size=self.training_sample_size or min(n, 250_000),
        )


@functools.lru_cache(maxsize=1)
def scann_available() -> bool:
    """True when ScaNN can run here. Checked before import: a missing AVX/FMA kills the process."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        try:
            words = set(Path("/proc/cpuinfo").read_text().split())
        except OSError:
            words = set()
        if words and not {"avx", "avx2", "fma"} <= words:
            return False
    try:
        import scann  # noqa: F401
    except Exception:  # ImportError, or a broken native extension
        return False
    return True


# ----------------------------------------------------------------------------- shards


class _ExactShard:
    """A shard searched by brute force over its own float32 copy of the rows."""

    def __init__(self, folder: Path) -> None:
        self.vectors_NxD = np.load(folder / "vectors.npy", mmap_mode="r", allow_pickle=False)

    @staticmethod
    def build(rows_NxD: np.ndarray, folder: Path, block: int = 65_536) -> None:
        out = np.lib.format.open_memmap(folder / "vectors.npy", mode="w+", dtype=np.float32, shape=rows_NxD.shape)
        for r0 in range(0, rows_NxD.shape[0], block):
            out[r0 : r0 + block] = rows_NxD[r0 : r0 + block]
        out.flush()
        del out

    def search(self, q_QxD: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return exact_search(self.vectors_NxD, q_QxD, k)


class _ScannShard:
    """A shard searched by a serialized ScaNN searcher (tree + AH + reorder)."""

    def __init__(self, folder: Path, config: IndexConfig, size: int) -> None:
        if (folder / "scann_docids.pkl").exists():
            raise IndexInputError(f"{folder} holds scann_docids.pkl; refusing to unpickle it")
        if not scann_available():
            raise IndexInputError(f"{folder} is a ScaNN index but ScaNN cannot run on this CPU/platform")
        import scann

        self.searcher = scann.scann_ops_pybind.load_searcher(str(folder), assets_backcompat_shim=False)
        self.config = config
        self.size = size

    @staticmethod
    def build(rows_NxD: np.ndarray, folder: Path, config: IndexConfig) -> None:
        import scann

        x_NxD = np.ascontiguousarray(rows_NxD, dtype=np.float32)
        searcher = (
            scann.scann_ops_pybind.builder(x_NxD, 10, "squared_l2")
            .tree(
                num_leaves=config.num_leaves,
                num_leaves_to_search=config.num_leaves_to_search,
                training_sample_size=min(config.training_sample_size, len(x_NxD)),
                min_partition_size=1,
            )
            .score_ah(config.dims_per_block, anisotropic_quantization_threshold=float("nan"))
            .reorder(config.reorder_k)
            .set_n_training_threads(os.cpu_count() or 1)
            .build()
        )
        searcher.serialize(str(folder), relative_path=True)

    def search(self, q_QxD: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        kk = min(k, self.size)
        q = np.ascontiguousarray(q_QxD, dtype=np.float32)
        # Asked for a large share of the shard (neighbour re-queries do this): search
        # every leaf, so that "all rows" really means all rows.
        leaves = self.config.num_leaves if 4 * kk >= self.size else None
        ids, d = self.searcher.search_batched_parallel(
            q, final_num_neighbors=kk, pre_reorder_num_neighbors=max(self.config.reorder_k, kk),
            leaves_to_search=leaves,
        )
        ids = np.asarray(ids, np.int64)
        d = np.asarray(d, np.float32)
        missing = ~np.isfinite(d)  # ScaNN pads short results with id 0 and NaN
        ids[missing], d[missing] = -1, np.inf
        return sort_topk(ids, d, k)


class ShardedIndex:
    """Contiguous row shards, each an exact or ScaNN index; search merges them."""

    def __init__(self, folder: Path, meta: dict[str, Any], shards: list[Any]) -> None:
        self.folder = folder
        self.meta = meta
        self._shards = shards
        self.starts = np.array([s["start"] for s in meta["shards"]], np.int64)

    @property
    def size(self) -> int:
        """Total number of database rows."""
        return int(self.meta["size"])

    @property
    def dim(self) -> int:
        """Embedding width."""
        return int(self.meta["dim"])

    @property
    def num_ids(self) -> int:
        """Size of the id space that ``search`` returns ids from (``size`` unless a subset)."""
        return int(self.meta.get("num_ids", self.meta["size"]))

    @functools.cached_property
    def row_ids(self) -> np.ndarray | None:
        """int64 [size]: the id of each indexed row, or None when row r is id r."""
        name = self.meta.get("row_ids")
        return None if name is None else np.load(self.folder / name, mmap_mode="r", allow_pickle=False)

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        out_dir: str | os.PathLike[str],
        config: IndexConfig = IndexConfig(),
        num_shards: int = 1,
        progress: bool = True,
        row_ids: np.ndarray | None = None,
        num_ids: int | None = None,
    ) -> ShardedIndex:
        """Index ``embeddings`` [C, D] (array or memmap) into ``out_dir`` and load it.

        Each shard gets ``config.resolved(shard_rows, D)``; an exact shard is copied
        block by block (works for memmaps bigger than RAM), a ScaNN shard is read
        into RAM for training. ``index.json`` is written last, marking completion.
        ``row_ids`` (int [C], strictly increasing, all < ``num_ids``): the ids that
        ``search`` returns for the rows, when they are a subset of a larger id space.
        """
        if not hasattr(embeddings, "ndim") or embeddings.ndim != 2:
            raise IndexInputError(f"embeddings must be a 2-D [C, D] array, got shape {getattr(embeddings, 'shape', None)}")
        n, dim = (int(s) for s in embeddings.shape)
        if n == 0 or dim == 0:
            raise IndexInputError(f"embeddings are empty (shape {embeddings.shape}); nothing to index")
        if not np.issubdtype(embeddings.dtype, np.floating):
            raise IndexInputError(f"embeddings must be floating point, got {embeddings.dtype}")
        if not 1 <= num_shards <= n:
            raise IndexInputError(f"num_shards must be in [1, {n}] for {n} rows, got {num_shards}")
        if row_ids is not None:
            row_ids = np.asarray(row_ids, np.int64)
            total = int(num_ids) if num_ids is not None else int(row_ids[-1]) + 1 if len(row_ids) else 0
            if (row_ids.shape != (n,) or (n > 1 and np.any(np.diff(row_ids) <= 0))
                    or row_ids[0] < 0 or row_ids[-1] >= total):
                raise IndexInputError(f"row_ids must be {n} strictly increasing ids in [0, {total})")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / INDEX_JSON).unlink(missing_ok=True)
        bounds = np.linspace(0, n, num_shards + 1).round().astype(np.int64)
        shard_meta = []
        bar = tqdm(range(num_shards), desc="index shards", unit="shard", disable=not progress)
        for s in bar:
            start, end = int(bounds[s]), int(bounds[s + 1])
            cfg = config.resolved(end - start, dim)
            folder = out / f"shard_{s:05d}"
            folder.mkdir(exist_ok=True)
            bar.set_postfix(mode=cfg.mode, rows=end - start)
            if cfg.mode == "scann":
                _ScannShard.build(embeddings[start:end], folder, cfg)
            else:
                _ExactShard.build(embeddings[start:end], folder)
            shard_meta.append({"start": start, "end": end, "dir": folder.name, "config": dataclasses.asdict(cfg)})
        meta = {
            "format": "retro-jax-index",
            "version": FORMAT_VERSION,
            "distance": "squared_l2",
            "size": n,
            "dim": dim,
            "requested_config": dataclasses.asdict(config),
            "shards": shard_meta,
        }
        if row_ids is not None:
            np.save(out / "row_ids.npy", row_ids)
            meta |= {"row_ids": "row_ids.npy", "num_ids": total}
        tmp = out / (INDEX_JSON + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, out / INDEX_JSON)
        modes = sorted({m["config"]["mode"] for m in shard_meta})
        log.info("wrote %s index of %d x %d in %d shard(s) to %s", "+".join(modes), n, dim, num_shards, out)
        return cls.load(out)

    @classmethod
    def load(cls, out_dir: str | os.PathLike[str]) -> ShardedIndex:
        """Open an index written by ``build`` (no rebuilding, no pickle)."""
        folder = Path(out_dir)
        path = folder / INDEX_JSON
        if not path.is_file():
            raise IndexNotFoundError(f"no {INDEX_JSON} in {folder}: not an index, or its build did not finish")
        meta = json.loads(path.read_text())
        if meta.get("format") != "retro-jax-index" or meta.get("version") != FORMAT_VERSION:
            raise IndexInputError(f"{path} is not a version-{FORMAT_VERSION} retro-jax index")
        shards: list[Any] = []
        for sm in meta["shards"]:
            cfg = IndexConfig(**sm["config"])
            sdir = folder / sm["dir"]
            if not sdir.is_dir():
                raise IndexNotFoundError(f"shard folder {sdir} listed in {path} is missing")
            size = sm["end"] - sm["start"]
            shards.append(_ScannShard(sdir, cfg, size) if cfg.mode == "scann" else _ExactShard(sdir))
        return cls(folder, meta, shards)

    def search(self, queries_QxD: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k database rows per query: (ids int64 [Q, k] global, dists float32 [Q, k]).

        Sorted by (squared L2, id); when the index has fewer than k rows the tail
        is padded with id -1 and distance inf.
        """
        if k < 1:
            raise IndexInputError(f"k must be >= 1, got {k}")
        if getattr(queries_QxD, "ndim", 0) != 2 or queries_QxD.shape[1] != self.dim:
            raise IndexInputError(
                f"queries must be [Q, {self.dim}], got shape {getattr(queries_QxD, 'shape', None)}"
            )
        q = np.ascontiguousarray(queries_QxD, dtype=np.float32)
        if not np.all(np.isfinite(q)):
            raise IndexInputError("queries contain NaN or inf")
        all_i, all_d = [], []
        for start, shard in zip(self.starts, self._shards):
            ids, d = shard.search(q, k)
            all_i.append(np.where(ids >= 0, ids + start, -1))
            all_d.append(d)
        if len(self._shards) == 1:
            ids, d = all_i[0], all_d[0]
        else:
            ids, d = sort_topk(np.concatenate(all_i, 1), np.concatenate(all_d, 1), k)
        rows = self.row_ids
        if rows is not None:  # an increasing map, so the (distance, id) order is kept
            ids = np.where(ids >= 0, np.asarray(rows)[np.maximum(ids, 0)], -1)
        return ids, d
