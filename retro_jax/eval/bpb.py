"""Bits-per-byte over whole documents, with sliding windows that score every token exactly once.

Documents. A split's chunk store holds each document as consecutive chunks (all full but the
last); a document's tokens are `tokens[c, :lengths[c]]` of its chunks, in order.

What is scored. Token t_i of an n-token document is predicted from t_0..t_{i-1}. There is no
BOS token in the database, so t_0 has no context and is NOT scored: the targets are
t_1..t_{n-1}, and the bytes are exactly those of the scored targets (`token_num_bytes`). A
one-token document contributes nothing. In a database that marks document ends
(`document_end: eos`, build-db's default) t_{n-1} is EOS: predicting it is scored, at 0 bytes.

Windows (the usual strided-perplexity scheme, the paper's 2048 / 1024). Window j of a document
feeds the model the tokens [j*S, j*S + W) and predicts the targets (j*S, j*S + W]. Window 0
scores all of its targets; every later window scores only its last S targets, so each target
is scored once and (after the first window) sees at least W - S tokens of context. Windows
start at multiples of S, and S must be a multiple of the chunk size m, so every window starts
at a chunk boundary and its chunks are the document's own chunks: with retrieval, window
chunk u gets the stored neighbours of document chunk j*S/m + u (-1 = none past the end), under
the training loader's window rule (retrieval/window_rule.py: none from a document of the
window). A window holds one document, whose chunks stored neighbours already exclude, so the
rule drops nothing from a well-built database; applying it keeps the guarantee by construction.

Losses come back per scored target (its split chunk id = the chunk holding the target, and its
offset in the document) and summed per chunk, so leakage filtering (`leakage.py`) can keep or
drop whole chunks.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from retro_jax.retrieval.window_rule import window_neighbour_tokens
from retro_jax.runtime.forward import NllFn

LN2 = math.log(2.0)


def plan_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, lo, hi) per window of an n-token document: inputs are tokens [start, start+window),
    and the targets t with lo <= t < hi are scored (document offsets; together 1..n-1, once)."""
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got window={window}, stride={stride}")
    out: list[tuple[int, int, int]] = []
    start, lo = 0, 1
    while lo < n:
        hi = min(start + window + 1, n)
        out.append((start, lo, hi))
        lo, start = hi, start + stride
    return out


@dataclasses.dataclass(frozen=True)
class Document:
    """One document of a split: its chunks [first_chunk, end_chunk) and its real tokens."""

    doc_id: int
    first_chunk: int
    end_chunk: int
    tokens: np.ndarray  # int32 [n]


def documents(store: Any) -> Iterator[Document]:
    """Every document of a ChunkStore, in order, reassembled from its chunks' real tokens."""
    doc_ids = np.asarray(store.doc_ids)
    if doc_ids.size == 0:
        return
    starts = np.flatnonzero(np.r_[True, doc_ids[1:] != doc_ids[:-1]])
    ends = np.r_[starts[1:], doc_ids.size]
    m = store.chunk_size
    for c0, c1 in zip(starts.tolist(), ends.tolist()):
        lengths = np.asarray(store.lengths[c0:c1], np.int64)
        if (lengths[:-1] != m).any():
            raise ValueError(f"document {int(doc_ids[c0])}: a chunk other than its last is not full "
                             f"(lengths {lengths.tolist()}); windows would not start at chunk boundaries")
        rows = np.asarray(store.tokens[c0:c1], np.int32)
        tokens = np.concatenate([rows[i, :lengths[i]] for i in range(c1 - c0)])
        yield Document(int(doc_ids[c0]), c0, c1, tokens)


@dataclasses.dataclass
class Scores:
    """Losses of the scored targets of a split, per chunk and (optionally) per target.

    bits_C / bytes_C / tokens_C: per split chunk, the summed -log2 p, UTF-8 bytes and count of
    the scored targets that lie in that chunk. Per target (when kept): `chunk` (split chunk id),
    `position` (offset in its document), `bits`, `num_bytes`."""

    bits_C: np.ndarray
    bytes_C: np.ndarray
    tokens_C: np.ndarray
    chunk: np.ndarray | None = None
    position: np.ndarray | None = None
    bits: np.ndarray | None = None
    num_bytes: np.ndarray | None = None

    @property
    def bpb(self) -> float:
        return self.bpb_where(np.ones(self.bits_C.shape, bool))

    def bpb_where(self, keep_C: np.ndarray) -> float:
        """bpb over the chunks where keep_C is True (NaN if they hold no scored byte)."""
        n_bytes = float(self.bytes_C[keep_C].sum())
        return float(self.bits_C[keep_C].sum()) / n_bytes if n_bytes else float("nan")

    @property
    def loss_per_token(self) -> float:
        """Mean negative log-likelihood of the scored targets, in nats per token."""
        return float(self.bits_C.sum()) * LN2 / max(float(self.tokens_C.sum()), 1.0)

    @property
    def counts(self) -> dict[str, int]:
        return {"chunks": int(self.bits_C.size), "tokens": int(self.tokens_C.sum()),
                "bytes": int(self.bytes_C.sum())}


@dataclasses.dataclass
class _Batch:
    """Host arrays of one batch of windows, plus where each scored target goes."""

    tokens: np.ndarray  # int32 [B, W]
    targets: np.ndarray  # int32 [B, W]
    score: np.ndarray  # bool [B, W]
    chunk: np.ndarray  # int64 [B, W] split chunk id of the target (valid where score)
    position: np.ndarray  # int64 [B, W] document offset of the target
    window_chunks: np.ndarray  # int64 [B, ceil(W/m)] split chunk id of each window chunk, -1 none


def _batches(store: Any, window: int, stride: int, batch_size: int) -> Iterator[_Batch]:
    m, pad = store.chunk_size, store.pad_id
    L = -(-window // m)
    rows: list[tuple[Document, int, int, int]] = []

    def flush() -> _Batch:
        b = batch_size
        out = _Batch(np.full((b, window), pad, np.int32), np.full((b, window), pad, np.int32),
                     np.zeros((b, window), bool), np.zeros((b, window), np.int64),
                     np.zeros((b, window), np.int64), np.full((b, L), -1, np.int64))
        for r, (doc, start, lo, hi) in enumerate(rows):
            n = doc.tokens.size
            inp = doc.tokens[start:start + window]
            out.tokens[r, :inp.size] = inp
            tgt = doc.tokens[start + 1:start + window + 1]
            out.targets[r, :tgt.size] = tgt
            out.score[r, lo - start - 1:hi - start - 1] = True
            pos = start + 1 + np.arange(window)
            out.position[r] = pos
            out.chunk[r] = doc.first_chunk + np.minimum(pos, n - 1) // m
            local = start // m + np.arange(L)
            out.window_chunks[r] = np.where(doc.first_chunk + local < doc.end_chunk, doc.first_chunk + local, -1)
        rows.clear()
        return out

    for doc in documents(store):
        for start, lo, hi in plan_windows(doc.tokens.size, window, stride):
            rows.append((doc, start, lo, hi))
            if len(rows) == batch_size:
                yield flush()
    if rows:
        yield flush()


def num_windows(store: Any, window: int, stride: int) -> int:
    """How many windows `score_split` runs over a chunk store (for progress bars)."""
    doc_ids = np.asarray(store.doc_ids)
    if doc_ids.size == 0:
        return 0
    starts = np.flatnonzero(np.r_[True, doc_ids[1:] != doc_ids[:-1]])
    ends = np.r_[starts[1:], doc_ids.size]
    lengths = np.asarray(store.lengths, np.int64)
    total = 0
    for c0, c1 in zip(starts.tolist(), ends.tolist()):
        n = (c1 - c0 - 1) * store.chunk_size + int(lengths[c1 - 1])
        total += 0 if n < 2 else 1 + max(0, -(-(n - 1 - window) // stride))
    return total


def score_split(db: Any, split: str, nll_fn: NllFn, window: int, stride: int, batch_size: int,
                k: int | None = None, token_num_bytes: np.ndarray | None = None,
                keep_tokens: bool = True, progress: bool = False, desc: str = "bpb",
                max_batches: int | None = None) -> Scores:
    """Score every target of every document of `split` once (see the module docstring); with
    `max_batches`, only the documents' windows in the first that many batches (a quick estimate).

    k: neighbours per chunk (None = retrieval off: neither the index nor the neighbours are
    read). token_num_bytes: bytes per token id (default: the database tokenizer's table)."""
    store = db.chunks(split)
    m = store.chunk_size
    if stride % m:
        raise ValueError(f"eval stride {stride} must be a multiple of the chunk size {m}, so that "
                         "every window starts at a chunk boundary")
    if batch_size <= 0:
        raise ValueError(f"eval batch size must be positive, got {batch_size}")
    table = np.asarray(db.tokenizer.token_num_bytes() if token_num_bytes is None else token_num_bytes, np.int64)
    C = store.num_chunks
    bits_C, bytes_C, tokens_C = np.zeros(C), np.zeros(C, np.int64), np.zeros(C, np.int64)
    kept: dict[str, list[np.ndarray]] = {"chunk": [], "position": [], "bits": [], "num_bytes": []}
    total = -(-num_windows(store, window, stride) // batch_size)
    total = total if not max_batches else min(total, max_batches)
    batches = itertools.islice(_batches(store, window, stride, batch_size), total)
    for batch in tqdm(batches, total=total, desc=desc, unit="batch", disable=not progress):
        neighbours = None
        if k is not None:  # the training loader's window rule (a window here is one document)
            ids = batch.window_chunks
            neighbours, _ = window_neighbour_tokens(db, split, np.maximum(ids, 0), k, ids >= 0)
        nll = np.asarray(nll_fn(batch.tokens, batch.targets, neighbours), np.float64)
        sel = batch.score
        chunk, bits = batch.chunk[sel], nll[sel] / LN2
        n_bytes = table[batch.targets[sel]]
        np.add.at(bits_C, chunk, bits)
        np.add.at(bytes_C, chunk, n_bytes)
        np.add.at(tokens_C, chunk, 1)
        if keep_tokens:
            for name, v in (("chunk", chunk), ("position", batch.position[sel]), ("bits", bits),
                            ("num_bytes", n_bytes)):
                kept[name].append(v)
    if not np.isfinite(bits_C).all():
        raise FloatingPointError(f"non-finite loss on {int((~np.isfinite(bits_C)).sum())} {split} chunk(s)")
    scores = Scores(bits_C, bytes_C, tokens_C)
    if keep_tokens:
        empty = {"chunk": np.int64, "position": np.int64, "bits": np.float64, "num_bytes": np.int64}
        for name, parts in kept.items():
            setattr(scores, name, np.concatenate(parts) if parts else np.zeros(0, empty[name]))
    return scores
