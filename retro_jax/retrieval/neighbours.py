"""Precomputed neighbours: the k nearest database chunks of every query chunk.

RETRO precomputes all training neighbours (Section 2.3) and removes every
neighbour that comes from the query's own document (Section 2.4: otherwise chunk
u+1 is retrieved for chunk u and the model learns to copy). ``compute_neighbours``
does exactly that over a ``ShardedIndex``:

* it over-fetches ``k + margin`` candidates, drops same-document ones, and
  re-queries with a 4x larger fetch the queries left with fewer than k, until k
  survive or the whole database has been seen; the rest is filled with id -1 and
  distance inf;
* it writes ids int64 [Q, k] and squared-L2 distances float32 [Q, k] into
  preallocated ``.npy`` memmaps block by block, and records progress in a JSON
  sidecar after each flushed block, so a rerun continues after the last complete
  block and the finished files are byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from retro_jax.retrieval.index import ShardedIndex

log = logging.getLogger(__name__)

GROWTH = 4  # fetch multiplier when a query lost too many candidates to exclusion


class NeighboursInputError(ValueError):
    """Shapes, dtypes or settings given to ``compute_neighbours`` do not fit."""


class NeighboursResumeError(ValueError):
    """Existing output in ``out_path`` was made with different settings or is foreign."""


class NeighboursIncompleteError(FileNotFoundError):
    """The neighbour files are missing or their computation has not finished."""


def distances_path(out_path: str | os.PathLike[str]) -> Path:
    """Where the distances for ``out_path`` (``X.npy``) live: ``X.dists.npy``."""
    p = Path(out_path)
    return p.with_name(p.name.removesuffix(".npy") + ".dists.npy")


def progress_path(out_path: str | os.PathLike[str]) -> Path:
    """The JSON sidecar recording progress for ``out_path``: ``X.progress.json``."""
    p = Path(out_path)
    return p.with_name(p.name.removesuffix(".npy") + ".progress.json")


def load_neighbours(out_path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Open finished neighbours read-only: (ids int64 [Q, k], dists float32 [Q, k])."""
    side = progress_path(out_path)
    if not side.is_file() or not json.loads(side.read_text()).get("complete"):
        raise NeighboursIncompleteError(
            f"neighbours at {out_path} are missing or unfinished; rerun compute_neighbours to finish them"
        )
    ids = np.load(out_path, mmap_mode="r", allow_pickle=False)
    dists = np.load(distances_path(out_path), mmap_mode="r", allow_pickle=False)
    return ids, dists


def exclude_same_document(
    ids_QxM: np.ndarray,
    dists_QxM: np.ndarray,
    query_doc_Q: np.ndarray,
    db_doc_ids: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop candidates from the query's own document (and -1 pads), keep order, take k.

    Returns (ids [Q, k], dists [Q, k], number of eligible candidates found [Q]).
    """
    valid = ids_QxM >= 0
    cand_doc = np.asarray(db_doc_ids[np.where(valid, ids_QxM, 0).ravel()]).reshape(ids_QxM.shape)
    keep = valid & (cand_doc != query_doc_Q[:, None])
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # eligible first, in rank order
    ids = np.take_along_axis(ids_QxM, order, 1)
    dists = np.take_along_axis(dists_QxM, order, 1).astype(np.float32)
    kept = np.take_along_axis(keep, order, 1)
    ids = np.where(kept, ids, -1).astype(np.int64)
    dists = np.where(kept, dists, np.float32(np.inf))
    if ids.shape[1] < k:  # the index returned fewer than k columns
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        dists = np.pad(dists, ((0, 0), (0, pad)), constant_values=np.inf)
    return ids, dists, keep.sum(1)


def neighbours_for_block(
    index: ShardedIndex,
    q_BxD: np.ndarray,
    qdoc_B: np.ndarray,
    db_doc_ids: np.ndarray,
    k: int,
    margin: int,
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest other-document neighbours of one block of queries (see module doc)."""
    fetch = min(k + margin, index.size)
    cand_i, cand_d = index.search(q_BxD, fetch)
    ids, dists, found = exclude_same_document(cand_i, cand_d, qdoc_B, db_doc_ids, k)
    short = np.flatnonzero(found < k)
    while short.size and fetch < index.size:
        fetch = min(fetch * GROWTH, index.size)
        cand_i, cand_d = index.search(q_BxD[short], fetch)
        ids[short], dists[short], found_s = exclude_same_document(
            cand_i, cand_d, qdoc_B[short], db_doc_ids, k
        )
        short = short[found_s < k]
    return ids, dists


def _settings(index: ShardedIndex, nq: int, k: int, batch_size: int, margin: int) -> dict[str, Any]:
    return {
        "num_queries": nq,
        "k": k,
        "batch_size": batch_size,
        "margin": margin,
        "index_size": index.size,
        "dim": index.dim,
    }


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _validate(
    index: ShardedIndex, query_embeddings: np.ndarray, query_doc_ids: np.ndarray, db_doc_ids: np.ndarray, k: int,
    batch_size: int, margin: int,
) -> None:
    if getattr(query_embeddings, "ndim", 0) != 2 or query_embeddings.shape[1] != index.dim:
        raise NeighboursInputError(
            f"query_embeddings must be [Q, {index.dim}] to match the index, got {getattr(query_embeddings, 'shape', None)}"
        )
    nq = query_embeddings.shape[0]
    if nq == 0:
        raise NeighboursInputError("query_embeddings has no rows: there is nothing to retrieve for")
    if np.shape(query_doc_ids) != (nq,) or not np.issubdtype(np.asarray(query_doc_ids[:1]).dtype, np.integer):
        raise NeighboursInputError(f"query_doc_ids must be integers of shape ({nq},), got {np.shape(query_doc_ids)}")
    if np.shape(db_doc_ids) != (index.num_ids,) or not np.issubdtype(np.asarray(db_doc_ids[:1]).dtype, np.integer):
        raise NeighboursInputError(
            f"db_doc_ids must be integers of shape ({index.num_ids},) (one per id the index returns), "
            f"got {np.shape(db_doc_ids)}"
        )
    if k < 1 or batch_size < 1 or margin < 0:
        raise NeighboursInputError(f"need k >= 1, batch_size >= 1, margin >= 0; got {k}, {batch_size}, {margin}")


def compute_neighbours(
    index: ShardedIndex,
    query_embeddings: np.ndarray,
    query_doc_ids: np.ndarray,
    db_doc_ids: np.ndarray,
    k: int,
    out_path: str | os.PathLike[str],
    batch_size: int = 4096,
    margin: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Write the k nearest other-document neighbours of every query to ``out_path``.

    Args:
      index: the database index; ids it returns are rows of ``db_doc_ids``.
      query_embeddings: float [Q, D] (memmap fine; read ``batch_size`` rows at a time).
      query_doc_ids: int [Q], document of each query chunk.
      db_doc_ids: int [C], document of each chunk of the id space the index returns
        (``index.num_ids``: every database chunk, also when the index covers a subset).
      k: neighbours per query.
      out_path: ``X.npy`` for ids int64 [Q, k]; distances go to ``X.dists.npy``
        and progress to ``X.progress.json``.
      batch_size: queries per block (the unit of resumption; must match on resume).
      margin: extra candidates fetched up front (default ``2 k + 16``).

    Returns the ids as a read-only int64 memmap [Q, k] (-1 where fewer than k
    other-document chunks exist).
    """
    margin = 2 * k + 16 if margin is None else margin
    _validate(index, query_embeddings, query_doc_ids, db_doc_ids, k, batch_size, margin)
    nq = int(query_embeddings.shape[0])
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    dpath, side = distances_path(out), progress_path(out)
    settings = _settings(index, nq, k, batch_size, margin)
    num_blocks = -(-nq // batch_size)

    state = _open_state(out, dpath, side, settings, nq, k)
    if state["complete"]:
        log.info("neighbours already complete at %s", out)
        return np.load(out, mmap_mode="r", allow_pickle=False)
    ids_out = np.lib.format.open_memmap(out, mode="r+")
    d_out = np.lib.format.open_memmap(dpath, mode="r+")

    done = int(state["blocks_done"])
    bar = tqdm(total=nq, initial=min(done * batch_size, nq), desc="neighbours", unit="query", disable=not progress)
    qdoc_all = query_doc_ids
    for b in range(done, num_blocks):
        b0, b1 = b * batch_size, min((b + 1) * batch_size, nq)
        q_BxD = np.asarray(query_embeddings[b0:b1], dtype=np.float32)
        qdoc_B = np.asarray(qdoc_all[b0:b1], dtype=np.int64)
        ids, dists = neighbours_for_block(index, q_BxD, qdoc_B, db_doc_ids, k, margin)
        ids_out[b0:b1] = ids
        d_out[b0:b1] = dists
        ids_out.flush()
        d_out.flush()
        state["blocks_done"] = b + 1
        _write_json(side, state)
        bar.update(b1 - b0)
    bar.close()
    del ids_out, d_out
    state["complete"] = True
    _write_json(side, state)
    log.info("wrote neighbours int64 [%d, %d] to %s and distances to %s", nq, k, out, dpath)
    return np.load(out, mmap_mode="r", allow_pickle=False)


def _open_state(out: Path, dpath: Path, side: Path, settings: dict[str, Any], nq: int, k: int) -> dict[str, Any]:
    """Resume from the sidecar if it matches ``settings``; otherwise start fresh files."""
    if side.is_file():
        state = json.loads(side.read_text())
        if state.get("settings") != settings:
            raise NeighboursResumeError(
                f"{side} was written with settings {state.get('settings')}, but this call uses {settings}; "
                f"delete {out}, {dpath} and {side} to start over, or rerun with the original settings"
            )
        ok = all(
            p.is_file() and np.load(p, mmap_mode="r", allow_pickle=False).shape == (nq, k) for p in (out, dpath)
        )
        if ok:
            if state["blocks_done"]:
                log.info("resuming neighbours at %s after block %d", out, state["blocks_done"])
            return state
        if state.get("blocks_done") or state.get("complete"):
            raise NeighboursResumeError(f"{side} records progress but {out} or {dpath} is missing or mis-shaped")
    elif out.exists() or dpath.exists():
        raise NeighboursResumeError(
            f"{out} or {dpath} exists without its progress file {side}; refusing to overwrite it. Delete it first."
        )
    state = {"settings": settings, "blocks_done": 0, "complete": False}
    log.info("computing neighbours into %s (%s)", out, settings)
    _write_json(side, state)  # sidecar first: a crash below leaves a restartable state
    for path, dtype in ((out, np.int64), (dpath, np.float32)):
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(nq, k))
        mm.flush()
        del mm
    return state
