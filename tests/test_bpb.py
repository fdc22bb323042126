"""Bits-per-byte: a hand-computed value, every target scored exactly once whatever (window,
stride), windows and neighbours aligned on chunks, and retrieval off never reading neighbours."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from retro_jax.data.chunks import ChunkStore, ChunkWriter
from retro_jax.eval import bpb
from retro_jax.retrieval.database import Database, chunks_dir

M, V = 4, 16
TABLE = np.array([0, 1, 1, 1, 1, 2, 3, 1, 1, 2, 2, 2, 1, 1, 1, 4])  # bytes per token id


def _store(root: Path, docs: list[list[int]], table: np.ndarray = TABLE) -> ChunkStore:
    out = chunks_dir(root, "validation")
    with ChunkWriter(str(out), M, token_num_bytes=table, pad_id=0) as w:
        for i, d in enumerate(docs):
            w.add(i, d)
    return ChunkStore.open(str(out))


class _FakeTrain:
    """The database side: train chunk c (of a document no validation window holds) has tokens c."""

    def __init__(self, num_chunks: int) -> None:
        self.doc_ids = 10**6 + np.arange(num_chunks)

    def neighbour_tokens(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        return np.broadcast_to(ids[..., None], ids.shape + (2 * M,)).astype(np.int32)


class FakeDb:
    """chunks(split), and neighbours under the window rule: each neighbour token is the id of the
    chunk it is for (every stored neighbour of chunk c is train chunk c)."""

    neighbours_stored = 2

    def __init__(self, store: ChunkStore) -> None:
        self.store = store
        self.train = _FakeTrain(store.num_chunks)

    def chunks(self, split: str) -> ChunkStore:
        return self.store

    def neighbours(self, split: str) -> np.ndarray:
        return np.repeat(np.arange(self.store.num_chunks)[:, None], self.neighbours_stored, axis=1)


def _uniform(tokens, targets, neighbours):
    return np.full(tokens.shape, math.log(V))


def test_uniform_model_bpb_is_the_hand_computed_value(tmp_path):
    # Doc A: ten tokens of id 5 (2 bytes each): 9 scored targets, 18 bytes. Doc B: three of
    # id 6 (3 bytes): 2 targets, 6 bytes. Doc C: one token, nothing to score.
    # bits = 11 targets * log2(16) = 44; bytes = 24 -> 11/6.
    store = _store(tmp_path, [[5] * 10, [6] * 3, [9]])
    s = bpb.score_split(FakeDb(store), "validation", _uniform, window=8, stride=4, batch_size=3,
                        token_num_bytes=TABLE)
    assert s.bpb == pytest.approx(11 / 6)
    assert s.counts == {"chunks": 5, "tokens": 11, "bytes": 24}
    # Per chunk: A's chunks hold targets 1-3, 4-7, 8-9; B's chunk 2 targets; C's none.
    np.testing.assert_array_equal(s.tokens_C, [3, 4, 2, 2, 0])


DOCS = [list(range(1, 16)) * 2 + [3],  # 31 tokens: 8 chunks, the last with 3 tokens
        [7, 8, 9],  # shorter than any window
        [4],  # nothing to score
        list(range(15, 0, -1)) * 1 + [2, 2]]  # 17 tokens: a last chunk of one token


@pytest.mark.parametrize("window,stride", [(8, 4), (8, 8), (4, 4), (12, 4), (16, 8), (64, 4), (5, 4)])
def test_every_target_scored_exactly_once_with_the_right_target(tmp_path, window, stride):
    store = _store(tmp_path, DOCS)
    ln2 = math.log(2.0)
    nll_is_target = lambda tokens, targets, nb: targets * ln2  # noqa: E731  bits = the target id
    s = bpb.score_split(FakeDb(store), "validation", nll_is_target, window, stride, batch_size=4,
                        token_num_bytes=TABLE)
    first_chunk = np.cumsum([0] + [-(-len(d) // M) for d in DOCS])
    got_docs = np.searchsorted(first_chunk, s.chunk, side="right") - 1
    for d, doc in enumerate(DOCS):
        pos = s.position[got_docs == d]
        np.testing.assert_array_equal(np.sort(pos), np.arange(1, len(doc)))  # 1..n-1, once each
        bits = s.bits[got_docs == d][np.argsort(pos)]
        np.testing.assert_allclose(bits, doc[1:])  # the loss is that of the NEXT token
        np.testing.assert_array_equal(s.chunk[got_docs == d], first_chunk[d] + s.position[got_docs == d] // M)
    want_bytes = sum(TABLE[doc[1:]].sum() for doc in DOCS)
    assert s.bytes_C.sum() == want_bytes


@pytest.mark.parametrize("window,stride", [(8, 4), (12, 4), (16, 8), (8, 8)])
def test_later_windows_give_at_least_window_minus_stride_context(tmp_path, window, stride):
    store = _store(tmp_path, DOCS)
    ln2 = math.log(2.0)

    def context(tokens, targets, nb):  # bits = context length: the target's place in the window
        return np.broadcast_to(np.arange(1, tokens.shape[1] + 1) * ln2, tokens.shape)

    s = bpb.score_split(FakeDb(store), "validation", context, window, stride, batch_size=2, token_num_bytes=TABLE)
    assert (s.bits >= np.minimum(s.position, window - stride + 1) - 1e-9).all()
    assert (s.bits <= np.minimum(s.position, window) + 1e-9).all()


def test_plan_windows_cover_targets_once_from_stride_aligned_starts():
    for n in [0, 1, 2, 5, 8, 9, 17, 100]:
        for window, stride in [(8, 4), (8, 8), (4, 4), (16, 4), (3, 1)]:
            plan = bpb.plan_windows(n, window, stride)
            covered = np.concatenate([np.arange(lo, hi) for _, lo, hi in plan]) if plan else np.zeros(0, int)
            np.testing.assert_array_equal(covered, np.arange(1, n))
            for j, (start, lo, hi) in enumerate(plan):
                assert start == j * stride and start < lo <= hi <= start + window + 1
                if j:  # later windows: only their last `stride` targets
                    assert lo == start + window - stride + 1
    with pytest.raises(ValueError, match="stride"):
        bpb.plan_windows(10, 4, 8)


def test_window_neighbours_are_those_of_the_document_chunks_covered(tmp_path):
    # Token 10*c + i + 1 is token i of split chunk c: the model input tells which chunk it is.
    docs, c = [], 0
    for d in DOCS:
        n_chunks = -(-len(d) // M)
        docs.append([10 * (c + j) + i + 1 for j in range(n_chunks) for i in range(M)][:len(d)])
        c += n_chunks
    table = np.ones(10 * c + M + 1, np.int64)
    store = _store(tmp_path, docs, table)
    seen = []

    def check(tokens, targets, nb):
        assert nb.shape == (tokens.shape[0], 3, 2, 2 * M)
        for r in range(tokens.shape[0]):
            for u in range(3):
                t = int(tokens[r, u * M])  # the first token of window chunk u, or a pad (0)
                want = (t - 1) // 10 if t > 0 else -1
                assert (nb[r, u] == want).all()
                seen.append(want)
        return np.zeros(tokens.shape)

    bpb.score_split(FakeDb(store), "validation", check, window=12, stride=4, batch_size=3, k=2,
                    token_num_bytes=table)
    # Every chunk is an input of some window but chunk 9 (the one-token document) and chunk 14
    # (the 17-token document's last chunk: its one token is only ever a target).
    assert -1 in seen and set(seen) - {-1} == set(range(c)) - {9, 14}


class NoNeighboursDatabase(Database):
    """A database whose neighbours and index cannot be read."""

    def neighbours(self, *a, **k):
        raise AssertionError("retrieval off read the neighbours")

    def neighbour_tokens(self, *a, **k):
        raise AssertionError("retrieval off read the neighbour tokens")

    @property
    def index(self):
        raise AssertionError("retrieval off touched the index")


def test_retrieval_off_never_reads_neighbours_or_index(tmp_path):
    _store(tmp_path, [[5] * 10, [6] * 3])
    db = NoNeighboursDatabase(tmp_path, {"chunk_size": M, "neighbours_stored": 2})
    s = bpb.score_split(db, "validation", _uniform, 8, 4, 2, k=None, token_num_bytes=TABLE)
    assert s.bpb == pytest.approx(11 * 4 / (9 * 2 + 2 * 3))
    with pytest.raises(AssertionError, match="neighbour"):  # the trap works
        bpb.score_split(db, "validation", _uniform, 8, 4, 2, k=1, token_num_bytes=TABLE)


def test_stride_must_start_windows_on_chunk_boundaries(tmp_path):
    store = _store(tmp_path, [[5] * 10])
    with pytest.raises(ValueError, match="multiple of the chunk size"):
        bpb.score_split(FakeDb(store), "validation", _uniform, 8, 6, 2, token_num_bytes=TABLE)
