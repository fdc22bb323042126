"""Chunk stores round-trip documents, keep continuations inside documents, commit atomically."""

import os

import numpy as np
import pytest

from retro_jax.data import chunks as chunks_mod
from retro_jax.data.chunks import (
    ChunkStore,
    ChunkStoreError,
    ChunkWriter,
    IncompleteChunkStoreError,
)
from retro_jax.data.tokenizer import train_tokenizer

M = 8
VOCAB = 50


def _docs(seed=0):
    """doc_id -> tokens, lengths covering 0, < m, == m, multiples and odd sizes."""
    rng = np.random.default_rng(seed)
    lengths = [0, 1, M - 1, M, M + 1, 2 * M, 3 * M + 5, 0, 40, 2, 100]
    return {10 * i + 3: rng.integers(1, VOCAB, n) for i, n in enumerate(lengths)}


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(chunks_mod, "_FLUSH_CHUNKS", 3)  # exercise streaming flushes
    table = np.random.default_rng(1).integers(0, 5, VOCAB).astype(np.int32)
    docs = _docs()
    with ChunkWriter(str(tmp_path / "c"), chunk_size=M, token_num_bytes=table, pad_id=0) as w:
        for doc_id, toks in docs.items():
            w.add(doc_id, toks)
    return ChunkStore.open(str(tmp_path / "c")), docs, table, w


def test_round_trip_per_document(store):
    s, docs, table, writer = store
    stored = {d: t for d, t in docs.items() if len(t)}
    assert writer.stats.skipped_empty == 2 and writer.stats.documents == len(stored)
    assert s.num_chunks == sum(-(-len(t) // M) for t in stored.values())
    assert s.tokens.dtype == np.int32 and s.tokens.shape == (s.num_chunks, M)
    assert (s.doc_ids.dtype, s.lengths.dtype, s.num_bytes.dtype) == (np.int64, np.int16, np.int32)
    for doc_id, toks in stored.items():
        idx = np.flatnonzero(np.asarray(s.doc_ids) == doc_id)
        assert (np.diff(idx) == 1).all()  # contiguous
        real = np.concatenate([s.chunk_tokens(i) for i in idx])
        np.testing.assert_array_equal(real, toks)
        assert int(np.asarray(s.num_bytes)[idx].sum()) == int(table[toks].sum())
        last = s.tokens[idx[-1]]
        assert (last[s.lengths[idx[-1]]:] == 0).all()  # pad past the document end


def test_neighbour_tokens_stay_in_document_and_mask(store):
    s, docs, _, _ = store
    ids = np.arange(s.num_chunks)
    out = s.neighbour_tokens(ids)
    assert out.shape == (s.num_chunks, 2 * M) and out.dtype == np.int32
    doc_ids = np.asarray(s.doc_ids)
    for i in ids:
        toks = docs[int(doc_ids[i])]
        start = (i - np.flatnonzero(doc_ids == doc_ids[i])[0]) * M
        want = toks[start : start + 2 * M]  # the chunk and what follows it in the doc
        np.testing.assert_array_equal(out[i, : len(want)], want)
        assert (out[i, len(want) :] == -1).all()
    # -1 ids give all -1; shapes [...] are kept; order does not matter.
    batch = np.array([[-1, 5], [3, -1]], dtype=np.int64)
    got = s.neighbour_tokens(batch)
    assert got.shape == (2, 2, 2 * M)
    assert (got[0, 0] == -1).all() and (got[1, 1] == -1).all()
    np.testing.assert_array_equal(got[0, 1], out[5])
    np.testing.assert_array_equal(got[1, 0], out[3])
    with pytest.raises(ChunkStoreError, match="out of range"):
        s.neighbour_tokens(np.array([s.num_chunks]))


def test_reopen_is_identical_and_interrupted_writes_look_incomplete(store, tmp_path):
    s, _, table, _ = store
    again = ChunkStore.open(s.directory)
    for name in ["tokens", "doc_ids", "lengths", "num_bytes"]:
        np.testing.assert_array_equal(getattr(again, name), getattr(s, name))
        assert isinstance(getattr(again, name), np.memmap)
    with pytest.raises(FileExistsError):
        ChunkWriter(s.directory, M, token_num_bytes=table)
    # A writer that dies before close() leaves no manifest, so nothing looks complete.
    out = str(tmp_path / "broken")
    with pytest.raises(RuntimeError):
        with ChunkWriter(out, M, token_num_bytes=table) as w:
            w.add(0, np.arange(1, 20))
            raise RuntimeError("worker killed")
    assert not ChunkStore.is_complete(out)
    with pytest.raises(IncompleteChunkStoreError):
        ChunkStore.open(out)
    # Overwriting an old store first un-commits it.
    w = ChunkWriter(s.directory, M, token_num_bytes=table, overwrite=True)
    assert not ChunkStore.is_complete(s.directory)
    w.add(1, np.array([4, 5]))
    w.close()
    assert ChunkStore.open(s.directory).num_chunks == 1
    assert not [f for f in os.listdir(s.directory) if f.endswith((".part", ".tmp"))]


def test_bad_input_is_rejected(tmp_path):
    table = np.ones(VOCAB, np.int32)
    w = ChunkWriter(str(tmp_path / "x"), M, token_num_bytes=table, min_tokens=3)
    w.add(5, [1, 2, 3])
    assert w.add(6, [1, 2]) == 0 and w.stats.skipped_short == 1
    with pytest.raises(ChunkStoreError, match="strictly increasing"):
        w.add(6, [1, 2, 3])
    with pytest.raises(ChunkStoreError, match="token ids must be in"):
        w.add(7, [1, VOCAB])
    with pytest.raises(ChunkStoreError, match="chunk_size"):
        ChunkWriter(str(tmp_path / "y"), 0, token_num_bytes=table)


def test_with_a_real_tokenizer_bytes_and_text_match(tmp_path):
    texts = [f"def fn_{i}(x):\n    return x * {i}  # ok\n" * (i % 7 + 1) for i in range(60)]
    tok = train_tokenizer(texts, str(tmp_path / "sp"), vocab_size=300, seed=0)
    with ChunkWriter(str(tmp_path / "c"), 16, token_num_bytes=tok.token_num_bytes(),
                     pad_id=tok.pad_id) as w:
        for doc_id, ids in enumerate(tok.encode_batch(texts)):
            w.add(doc_id, ids)
    s = ChunkStore.open(str(tmp_path / "c"))
    doc_ids = np.asarray(s.doc_ids)
    for doc_id, text in enumerate(texts):
        idx = np.flatnonzero(doc_ids == doc_id)
        assert "".join(s.chunk_text(i, tok) for i in idx) == text  # ASCII: no split chars
        assert int(np.asarray(s.num_bytes)[idx].sum()) == len(text.encode("utf-8"))
    # The model's view: -1 masked tokens decode to nothing, so [N, F] text is a substring.
    pair = s.neighbour_tokens(np.array([0]))[0]
    assert tok.decode(pair) in texts[0]
