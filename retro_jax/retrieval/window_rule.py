"""The window rule: no neighbour (nor its continuation) from any document of the window.

A model window is L consecutive chunks of a split: a training sequence of seq_len / m chunks,
which may span several packed documents (train/loader.py), or an evaluation window, which lies
inside one document (eval/bpb.py). Stored neighbours exclude only the query chunk's own document
(retrieval/neighbours.py), so chunk u of document A could retrieve a chunk of document B that
comes later in the same training window, and self-attention would carry that future text to the
positions that predict it. RETRO (Section 2.4) excludes neighbours from the training sequence's
document; with packing the rule must cover every document of the window.

`window_neighbours` applies the rule where batches are made: it reads all stored neighbours of
each window chunk (ranked by distance), drops those whose document is a document of the window
(a neighbour's continuation is the next chunk of the same document, so it goes with it), keeps
the first k survivors in rank order and fills -1 (masked) where fewer than k survive.

Document ids are corpus positions, shared by both splits (a document is in one split only), so a
validation window's documents are never neighbours' documents and the rule drops nothing there.
"""

from __future__ import annotations

from typing import Any

import numpy as np

STATS = ("chunks", "slots", "dropped", "empty")


def _check_k(db: Any, k: int) -> None:
    if not 1 <= k <= db.neighbours_stored:
        raise ValueError(f"k must be in [1, {db.neighbours_stored}] (neighbours stored), got {k}")


def in_window(nb_doc_BxLxS: np.ndarray, window_doc_BxL: np.ndarray) -> np.ndarray:
    """bool [B, L, S]: neighbour document nb_doc[b, l, s] is one of window b's documents.

    Both in the corpus's document ids; -1 (a missing neighbour, a padding chunk) matches nothing."""
    b = nb_doc_BxLxS.shape[0]
    nb = np.asarray(nb_doc_BxLxS, np.int64).reshape(b, -1)
    win = np.asarray(window_doc_BxL, np.int64).reshape(b, -1)
    span = int(max(nb.max(initial=-1), win.max(initial=-1))) + 1
    rows = np.arange(b, dtype=np.int64)[:, None] * span  # (row, document) as one int64 key
    keys = (rows + win)[win >= 0]
    hit = (nb >= 0) & np.isin(rows + nb, keys)
    return hit.reshape(nb_doc_BxLxS.shape)


def neighbour_documents(db: Any, ids: np.ndarray) -> np.ndarray:
    """int64 [...]: the document of each train-split neighbour id, -1 where the id is -1."""
    ids = np.asarray(ids, np.int64)
    docs = np.asarray(db.train.doc_ids[np.maximum(ids, 0).ravel()], np.int64).reshape(ids.shape)
    return np.where(ids >= 0, docs, -1)


def window_documents(db: Any, split: str, chunk_ids_BxL: np.ndarray, valid_BxL: np.ndarray) -> np.ndarray:
    """int64 [B, L]: the document of each window chunk of `split`, -1 where not valid."""
    ids = np.asarray(chunk_ids_BxL, np.int64)
    docs = np.asarray(db.chunks(split).doc_ids[np.where(valid_BxL, ids, 0).ravel()], np.int64)
    return np.where(valid_BxL, docs.reshape(ids.shape), -1)


def window_neighbours(db: Any, split: str, chunk_ids_BxL: np.ndarray, k: int,
                      valid_BxL: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """Neighbour ids under the window rule, and what the rule did.

    chunk_ids_BxL: int [B, L], window b's chunks of `split` (a window is one row); valid_BxL:
    bool [B, L], False for padding chunks (no neighbours, and not part of the window).
    Returns ids int64 [B, L, k] into the train split (-1 = none) and counts over valid chunks:
    chunks, slots (chunks * k), dropped (first-k stored slots whose document is in the window:
    what the model would have been handed without the rule), empty (slots left -1)."""
    _check_k(db, k)
    ids = np.asarray(chunk_ids_BxL, np.int64)
    if ids.ndim != 2:
        raise ValueError(f"chunk_ids must be [windows, chunks], got shape {ids.shape}")
    valid = np.ones(ids.shape, bool) if valid_BxL is None else np.asarray(valid_BxL, bool)
    stored = db.neighbours(split)
    if valid.any() and (ids[valid].min() < 0 or ids[valid].max() >= stored.shape[0]):
        raise ValueError(f"{split} chunk ids must be in [0, {stored.shape[0]})")
    nb = np.asarray(stored[np.where(valid, ids, 0).ravel()], np.int64).reshape(ids.shape + (-1,))
    nb[~valid] = -1
    inside = in_window(neighbour_documents(db, nb), window_documents(db, split, ids, valid))
    keep = (nb >= 0) & ~inside
    rank = np.argsort(~keep, axis=-1, kind="stable")[..., :k]  # survivors first, in stored order
    out = np.where(np.take_along_axis(keep, rank, -1), np.take_along_axis(nb, rank, -1), -1)
    chunks = int(valid.sum())
    stats = {"chunks": chunks, "slots": chunks * k, "dropped": int(inside[..., :k].sum()),
             "empty": int((out[valid] < 0).sum())}
    return out, stats


def window_neighbour_tokens(db: Any, split: str, chunk_ids_BxL: np.ndarray, k: int,
                            valid_BxL: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """int32 [B, L, k, 2m] neighbour tokens ([N, F], -1 = none) under the window rule, and its counts."""
    ids, stats = window_neighbours(db, split, chunk_ids_BxL, k, valid_BxL)
    return db.train.neighbour_tokens(ids).astype(np.int32, copy=False), stats


def check_training_windows(db: Any, seq_len: int, k: int, block: int = 1024) -> dict[str, Any]:
    """The rule on the database's own training windows (train split, L = seq_len / m chunks each,
    the C // L full windows the loader trains on): how many stored first-k slots come from a
    document of their window (before), and how many after `window_neighbours` (must be 0).

    before.later_document: from a document that starts later in the window than the query's;
    before.later_window_chunks: the neighbour is itself a later chunk of the same window;
    sequences_affected(_later): windows with at least one in_window (later_document) slot."""
    m = db.chunk_size
    if seq_len <= 0 or seq_len % m:
        raise ValueError(f"seq_len {seq_len} must be a positive multiple of the database's chunk size {m}")
    _check_k(db, k)
    L = seq_len // m
    n_seq = db.train.num_chunks // L
    stored = db.neighbours("train")
    before = {"in_window": 0, "later_document": 0, "later_window_chunks": 0}
    after = {"in_window": 0, "empty": 0}
    affected = affected_later = 0
    for s0 in range(0, n_seq, block):
        chunk_BxL = (np.arange(s0, min(s0 + block, n_seq), dtype=np.int64)[:, None] * L) + np.arange(L)
        win_doc = window_documents(db, "train", chunk_BxL, np.ones(chunk_BxL.shape, bool))
        first = np.asarray(stored[chunk_BxL.ravel(), :k], np.int64).reshape(chunk_BxL.shape + (k,))
        nb_doc = neighbour_documents(db, first)
        hit = in_window(nb_doc, win_doc)
        before["in_window"] += int(hit.sum())
        later = hit & (nb_doc > win_doc[:, :, None])
        before["later_document"] += int(later.sum())
        affected_later += int(later.any(axis=(1, 2)).sum())
        later_chunk = (first > chunk_BxL[:, :, None]) & (first < chunk_BxL[:, -1:, None] + 1)
        before["later_window_chunks"] += int(later_chunk.sum())
        affected += int(hit.any(axis=(1, 2)).sum())
        ids, stats = window_neighbours(db, "train", chunk_BxL, k)
        after["in_window"] += int(in_window(neighbour_documents(db, ids), win_doc).sum())
        after["empty"] += stats["empty"]
    return {"seq_len": int(seq_len), "num_neighbours": int(k), "sequences": int(n_seq),
            "slots": int(n_seq * L * k), "before": before, "sequences_affected": affected,
            "sequences_affected_later": affected_later, "after": after}
