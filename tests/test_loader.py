"""TrainLoader and make_batch on a tiny real database (chunk size 32)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _db_helpers import shared

from retro_jax.retrieval.database import Database
from retro_jax.train.loader import TrainLoader, make_batch

SEQ, K = 128, 2  # L = 4 chunks of 32 per sequence


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Database:
    return Database.open(shared(tmp_path_factory)["db"])


def take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def doc_streams(db: Database, split: str) -> dict[int, list[int]]:
    """{doc id: its real tokens in order}, built chunk by chunk (independently of the loader)."""
    store, out = db.chunks(split), {}
    for i in range(store.num_chunks):
        out.setdefault(int(store.doc_ids[i]), []).extend(store.chunk_tokens(i).tolist())
    return out


def test_same_seed_same_batches_other_seed_other_order(db):
    a = take(TrainLoader(db, "train", SEQ, 8, K, seed=3), 3)
    b = take(TrainLoader(db, "train", SEQ, 8, K, seed=3), 3)
    c = take(TrainLoader(db, "train", SEQ, 8, K, seed=4), 3)
    assert_batches_equal(a, b)
    assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))


def test_each_epoch_is_a_fresh_permutation_of_the_sequences(db):
    loader = TrainLoader(db, "train", SEQ, 8, K, seed=0)
    assert loader.num_sequences == db.train.num_chunks // 4
    epochs = [np.concatenate([loader.global_sequence_ids(e, p) for p in range(loader.batches_per_epoch)])
              for e in range(2)]
    for ids in epochs:
        assert len(set(ids.tolist())) == len(ids) == loader.batches_per_epoch * 8
    assert not np.array_equal(epochs[0], epochs[1])


def test_restore_mid_epoch_continues_exactly(db):
    """Interrupt after 7 batches (mid-epoch), restore from JSON, and cross an epoch boundary."""
    loader = TrainLoader(db, "train", SEQ, 16, K, seed=1)
    per_epoch = loader.batches_per_epoch
    assert 7 % per_epoch  # really mid-epoch
    uninterrupted = take(TrainLoader(db, "train", SEQ, 16, K, seed=1), 7 + 2 * per_epoch)
    take(loader, 7)
    state = json.loads(json.dumps(loader.state()))
    assert (state["epoch"], state["position"]) == divmod(7, per_epoch)
    resumed = TrainLoader(db, "train", SEQ, 16, K, seed=1)
    resumed.restore(state)
    assert_batches_equal(take(resumed, 2 * per_epoch), uninterrupted[7:])
    with pytest.raises(ValueError, match="seed=1 but this loader has seed=2"):
        TrainLoader(db, "train", SEQ, 16, K, seed=2).restore(state)


@pytest.mark.parametrize("processes", [2, 3])
def test_process_slices_concatenate_to_the_global_batch(db, processes):
    whole = take(TrainLoader(db, "train", SEQ, 6, K, seed=0), 2)
    parts = [take(TrainLoader(db, "train", SEQ, 6, K, seed=0, process_index=p, process_count=processes), 2)
             for p in range(processes)]
    for step, batch in enumerate(whole):
        for key, value in batch.items():
            assert parts[0][step][key].shape[0] == 6 // processes
            np.testing.assert_array_equal(np.concatenate([p[step][key] for p in parts]), value)
    explicit = next(TrainLoader(db, "train", SEQ, 6, K, seed=0, rows=slice(2, 4)))  # e.g. from the mesh
    np.testing.assert_array_equal(explicit["tokens"], whole[0]["tokens"][2:4])


def test_targets_and_mask_follow_documents(db):
    """Masked-in pairs are consecutive tokens of one document; every such pair of a window is
    masked in; pads and document ends are masked out."""
    store, m, L = db.train, db.chunk_size, SEQ // db.chunk_size
    streams = doc_streams(db, "train")
    starts = np.arange(0, (store.num_chunks // L) * L, L)
    batch = make_batch(db, "train", starts, SEQ, K, retrieval=False)
    assert batch["tokens"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
    assert batch["tokens"].shape == batch["targets"].shape == batch["loss_mask"].shape == (len(starts), SEQ)
    boundary_checked = 0
    for row, c0 in enumerate(starts):
        toks, tgts, mask = batch["tokens"][row], batch["targets"][row], batch["loss_mask"][row]
        np.testing.assert_array_equal(toks, np.asarray(store.tokens[c0:c0 + L]).reshape(-1))
        expected_pairs = 0
        for j in range(L):
            c, n = c0 + j, int(store.lengths[c0 + j])
            doc, pos = int(store.doc_ids[c]), slice(j * m, (j + 1) * m)
            assert not mask[pos][n:].any(), "pads are masked"
            has_next = c + 1 < store.num_chunks and int(store.doc_ids[c + 1]) == doc
            expected_pairs += n - 1 + (has_next and n == m)
            if not has_next:  # the document's last real token predicts nothing
                assert mask[j * m + n - 1] == 0
                boundary_checked += 1
                if n == m and c + 1 < store.num_chunks:  # full last chunk: target is the next doc's first token
                    assert tgts[j * m + m - 1] == store.tokens[c + 1, 0]
        assert int(mask.sum()) == expected_pairs
        if c0 + L < store.num_chunks:
            assert tgts[-1] == store.tokens[c0 + L, 0]
        for t in np.flatnonzero(mask):  # every counted pair is (token, next token) of one document
            c = c0 + t // m
            stream = streams[int(store.doc_ids[c])]
            first = int(np.flatnonzero(store.doc_ids[:] == store.doc_ids[c])[0])
            offset = (c - first) * m + t % m
            assert stream[offset] == toks[t] and stream[offset + 1] == tgts[t]
    assert boundary_checked > 5


def test_neighbours_are_the_first_k_stored_from_outside_the_sequence(db):
    """Each chunk gets its first K stored neighbours whose document is not one of the sequence's
    (the window rule; tests/test_window_rule.py plants a neighbour it must drop)."""
    loader = TrainLoader(db, "train", SEQ, 4, K, seed=0)
    batch = next(loader)
    starts = loader.global_sequence_ids(0, 0) * 4
    assert batch["neighbours"].shape == (4, 4, K, 2 * db.chunk_size) and batch["neighbours"].dtype == np.int32
    stored, docs = np.asarray(db.neighbours("train")), np.asarray(db.train.doc_ids)
    for b, c0 in enumerate(starts):
        window_docs = set(docs[c0:c0 + 4].tolist())
        want = np.full((4, K), -1)
        for u in range(4):
            kept = [n for n in stored[c0 + u].tolist() if n >= 0 and docs[n] not in window_docs][:K]
            want[u, :len(kept)] = kept
        np.testing.assert_array_equal(batch["neighbours"][b], db.train.neighbour_tokens(want))
    assert loader.window_stats["slots"] == 4 * 4 * K
    baseline = next(TrainLoader(db, "train", SEQ, 4, K, seed=0, retrieval=False))
    assert "neighbours" not in baseline
    np.testing.assert_array_equal(baseline["tokens"], batch["tokens"])


def test_bad_settings_name_the_numbers(db):
    with pytest.raises(ValueError, match="seq_len 100 must be a positive multiple of the database's chunk size 32"):
        TrainLoader(db, "train", 100, 4, K, seed=0)
    have = db.train.num_chunks // 4
    with pytest.raises(ValueError, match=f"global batch size 1000 .* has {have} sequences of 128 tokens"):
        TrainLoader(db, "train", SEQ, 1000, K, seed=0)
    with pytest.raises(ValueError, match=r"num_neighbours 11 must be in \[1, 10\]"):
        TrainLoader(db, "train", SEQ, 4, 11, seed=0)
    TrainLoader(db, "train", SEQ, 4, 11, seed=0, retrieval=False)  # baseline: K unused
    with pytest.raises(ValueError, match="global batch size 4 must divide evenly across 3 processes"):
        TrainLoader(db, "train", SEQ, 4, K, seed=0, process_index=0, process_count=3)
