"""Batches of tokens, next-token targets, loss masks and precomputed neighbours, from a database.

Sequences. With L = seq_len / m chunks per sequence, sequence s is the chunks
[s*L, (s+1)*L) of a split: non-overlapping windows over the chunk array, so every
sequence starts at a chunk boundary (and CCA's chunks are the database's chunks). A
sequence may span documents. Training uses the C // L full windows (the trailing
C % L chunks are not trained on); evaluation scores whole documents instead (eval/bpb.py).

Per sequence (flattening its chunks, pads included, into N = L*m positions):
  tokens     int32   [B, N]        the chunks' tokens (pad id past a document's end)
  targets    int32   [B, N]        the next position of the flattened chunk array; the last
                                   position's target is the first token of the next chunk
  loss_mask  float32 [B, N]        1 only where input and target are real tokens of the SAME
                                   document (document ends, pads and cross-document pairs are 0)
  neighbours int32   [B, L, K, 2m] each chunk's first K stored neighbours that survive the window
                                   rule, [N, F], -1 = missing (absent with retrieval=False)

The window rule (retrieval/window_rule.py): no neighbour, nor its continuation, comes from any
document present in the sequence (stored neighbours exclude only the query chunk's own document,
and a sequence packs several). Neighbours from a window document are dropped, later-ranked stored
neighbours move up, -1 fills what is left. `TrainLoader.window_stats` counts what it did.

Order. Epoch e visits the sequences in `np.random.default_rng((seed, e)).permutation`, in
batches of `global_batch_size` (the last incomplete batch of an epoch is dropped). Process p
of P loads rows [p*B/P, (p+1)*B/P) of every global batch. `state()` / `restore()` give
exact resume: the restored iterator yields what the uninterrupted one would have.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from retro_jax.retrieval.database import Database
from retro_jax.retrieval.window_rule import STATS, window_neighbour_tokens

Batch = dict[str, np.ndarray]


def chunks_per_sequence(db: Database, seq_len: int) -> int:
    """L = seq_len / m, or a ValueError naming both numbers."""
    m = db.chunk_size
    if seq_len <= 0 or seq_len % m:
        raise ValueError(f"seq_len {seq_len} must be a positive multiple of the database's chunk size {m}")
    return seq_len // m


def _check_k(db: Database, num_neighbours: int) -> None:
    if not 1 <= num_neighbours <= db.neighbours_stored:
        raise ValueError(f"num_neighbours {num_neighbours} must be in [1, {db.neighbours_stored}]: "
                         f"the database at {str(db.root)!r} stores {db.neighbours_stored} neighbours per chunk")


def make_batch(db: Database, split: str, starts_B: np.ndarray, seq_len: int, num_neighbours: int,
               retrieval: bool = True) -> Batch:
    """The batch of sequences starting at chunks `starts_B` (each a multiple of L).

    A start of -1 is a padding row (pad tokens, loss_mask 0, no neighbours); chunks past the
    split's end are padding as well."""
    return make_batch_with_stats(db, split, starts_B, seq_len, num_neighbours, retrieval)[0]


def make_batch_with_stats(db: Database, split: str, starts_B: np.ndarray, seq_len: int, num_neighbours: int,
                          retrieval: bool = True) -> tuple[Batch, dict[str, int]]:
    """`make_batch`, and the window rule's counts for it (window_rule.window_neighbours; all 0
    with retrieval=False)."""
    store = db.chunks(split)
    L, m, C = chunks_per_sequence(db, seq_len), db.chunk_size, store.num_chunks
    starts_B = np.asarray(starts_B, np.int64)
    b = starts_B.shape[0]
    # L+1 chunks per row: the extra chunk gives the last position its target.
    ids_BxE = starts_B[:, None] + np.arange(L + 1)[None, :]
    valid_BxE = (starts_B[:, None] >= 0) & (ids_BxE < C)
    safe_BxE = np.where(valid_BxE, ids_BxE, 0)
    order = np.unique(safe_BxE[valid_BxE])  # sorted reads from the memmaps
    pos = np.searchsorted(order, safe_BxE)
    tok_UxM = np.asarray(store.tokens[order], np.int32)
    real_UxM = np.arange(m)[None, :] < np.asarray(store.lengths[order], np.int64)[:, None]
    doc_U = np.asarray(store.doc_ids[order], np.int64)

    tok_BxEM = np.where(valid_BxE[..., None], tok_UxM[pos], store.pad_id).reshape(b, -1)
    real_BxEM = (valid_BxE[..., None] & real_UxM[pos]).reshape(b, -1)
    doc_BxEM = np.repeat(np.where(valid_BxE, doc_U[pos], -1), m, axis=1)
    n = L * m
    same_doc = doc_BxEM[:, :n] == doc_BxEM[:, 1:n + 1]
    batch = {
        "tokens": tok_BxEM[:, :n].copy(),
        "targets": tok_BxEM[:, 1:n + 1].copy(),
        "loss_mask": (real_BxEM[:, :n] & real_BxEM[:, 1:n + 1] & same_doc).astype(np.float32),
    }
    stats = dict.fromkeys(STATS, 0)
    if retrieval:
        _check_k(db, num_neighbours)
        batch["neighbours"], stats = window_neighbour_tokens(db, split, safe_BxE[:, :L], num_neighbours,
                                                             valid_BxE[:, :L])
    return batch, stats


class TrainLoader:
    """Infinite, deterministic, resumable iterator over this process's share of training batches.

    `rows` (e.g. `mesh.local_batch_slice(global_batch_size, mesh)`) overrides the default
    share, rows [process_index*B/P, (process_index+1)*B/P) of every global batch.

    `window_stats`: the window rule's counts summed over every batch this loader (and, through
    `state()`, the run before a resume) yielded, on this process's rows: neighbour slots, slots
    whose stored neighbour was dropped for coming from a document of the sequence, and slots left
    empty (-1). The training loop can log them; divide by `slots` for rates."""

    def __init__(self, db: Database, split: str, seq_len: int, global_batch_size: int, num_neighbours: int,
                 seed: int, process_index: int = 0, process_count: int = 1, retrieval: bool = True,
                 rows: slice | None = None) -> None:
        self.db, self.split, self.seq_len = db, split, int(seq_len)
        self.L = chunks_per_sequence(db, seq_len)
        self.num_sequences = db.chunks(split).num_chunks // self.L
        if global_batch_size <= 0 or global_batch_size > self.num_sequences:
            raise ValueError(
                f"global batch size {global_batch_size} needs at least that many sequences, but the "
                f"{split} split has {self.num_sequences} sequences of {seq_len} tokens "
                f"({db.chunks(split).num_chunks} chunks of {db.chunk_size}); use a smaller batch or a bigger database")
        if not 0 <= process_index < process_count or global_batch_size % process_count:
            raise ValueError(f"global batch size {global_batch_size} must divide evenly across "
                             f"{process_count} processes, and process_index {process_index} be in [0, {process_count})")
        if retrieval:
            _check_k(db, num_neighbours)
        self.global_batch_size, self.num_neighbours, self.seed = int(global_batch_size), int(num_neighbours), int(seed)
        self.retrieval = retrieval
        per = self.global_batch_size // process_count
        self.rows = slice(process_index * per, (process_index + 1) * per) if rows is None else rows
        if not 0 <= self.rows.start < self.rows.stop <= self.global_batch_size or self.rows.step not in (None, 1):
            raise ValueError(f"rows {self.rows} must be a contiguous, non-empty slice of the "
                             f"global batch of {self.global_batch_size}")
        self.batches_per_epoch = self.num_sequences // self.global_batch_size
        self.epoch, self.position = 0, 0
        self.window_stats = dict.fromkeys(STATS, 0)
        self._order: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng((self.seed, epoch)).permutation(self.num_sequences))
        return self._order[1]

    def global_sequence_ids(self, epoch: int, position: int) -> np.ndarray:
        """int64 [global_batch_size]: the sequence ids of global batch `position` of `epoch`."""
        b = self.global_batch_size
        return self._permutation(epoch)[position * b:(position + 1) * b]

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        seq_B = self.global_sequence_ids(self.epoch, self.position)[self.rows]
        batch, stats = make_batch_with_stats(self.db, self.split, seq_B * self.L, self.seq_len,
                                             self.num_neighbours, self.retrieval)
        self.window_stats = {key: self.window_stats[key] + stats[key] for key in STATS}
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state(self) -> dict[str, Any]:
        """JSON-able position of the iterator (the next batch to yield) plus what it depends on."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "seq_len": self.seq_len,
                "num_sequences": self.num_sequences, "window_stats": dict(self.window_stats)}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state()`; refuses a state of a different seed, batch, length or split size."""
        for key in ("seed", "global_batch_size", "seq_len", "num_sequences"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"data state has {key}={state[key]} but this loader has {key}="
                                 f"{getattr(self, key)}: resuming would not continue the same sequence order")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise ValueError(f"data state epoch={epoch} position={position} out of range "
                             f"(epochs have {self.batches_per_epoch} batches)")
        self.epoch, self.position = epoch, position
        saved = state.get("window_stats") or {}  # absent in states saved before the window rule
        self.window_stats = {key: int(saved.get(key, 0)) for key in STATS}
