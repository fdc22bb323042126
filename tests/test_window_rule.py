"""The window rule: no neighbour (nor its continuation) from any document of the model's window.

A tiny real database whose first training document has a verbatim copy right after it (a
planted copy, the next document in corpus order): the copy's chunks are the nearest other-document
neighbours of the original's chunks, and both documents lie in the first training window.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from _db_helpers import BUILD, write_corpus, write_tiny_bert

from retro_jax.data.split import is_validation
from retro_jax.eval.bpb import score_split
from retro_jax.retrieval.database import Database
from retro_jax.retrieval.window_rule import check_training_windows, window_neighbours
from retro_jax.train.loader import TrainLoader, make_batch

K = 2


def _train_copy_path(first):
    """A path sorting right after `first` (x.txt -> x_copyI.txt) that the split hashes into training."""
    for i in range(100):
        path = first.with_name(f"{first.stem}_copy{i}.txt")
        if not is_validation(str(path), BUILD["seed"], BUILD["val_fraction"]):
            return path
    raise AssertionError("no training name found")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    base = tmp_path_factory.mktemp("window_rule")
    paths = write_corpus(base / "corpus", n_docs=14, seed=7, min_validation=2)
    first = next(p for p in paths if not is_validation(str(p), BUILD["seed"], BUILD["val_fraction"]))
    shutil.copy(first, _train_copy_path(first))
    from retro_jax.retrieval.build import build_database

    build_database([str(base / "corpus")], str(base / "db"), embedder=str(write_tiny_bert(base / "bert")), **BUILD)
    db = Database.open(base / "db")
    docs = np.asarray(db.train.doc_ids)
    doc_a, doc_b = (int(d) for d in np.unique(docs)[:2])  # the original and its copy, adjacent
    n_a = int((docs == doc_a).sum())
    assert int((docs == doc_b).sum()) == n_a and np.array_equal(db.train.tokens[:n_a], db.train.tokens[n_a:2 * n_a])
    L = 2 * n_a + 1  # the first window holds both documents and a chunk of the next
    return {"db": db, "root": base / "db", "doc_a": doc_a, "doc_b": doc_b, "n_a": n_a, "L": L,
            "seq_len": L * db.chunk_size}


def reference_ids(db: Database, split: str, chunk_ids: list[int], k: int) -> np.ndarray:
    """[len, k] the rule written out plainly: for each chunk, its stored neighbours in order,
    skipping any whose document (or whose continuation's document) is a document of the window."""
    store, train_docs = db.chunks(split), np.asarray(db.train.doc_ids)
    window_docs = {int(store.doc_ids[c]) for c in chunk_ids}
    out = np.full((len(chunk_ids), k), -1, np.int64)
    for row, c in enumerate(chunk_ids):
        kept = []
        for n in np.asarray(db.neighbours(split)[c]).tolist():
            if n < 0 or int(train_docs[n]) in window_docs:
                continue
            if n + 1 < len(train_docs) and train_docs[n + 1] == train_docs[n]:
                assert int(train_docs[n + 1]) not in window_docs  # the continuation goes with it
            kept.append(n)
        out[row, :min(k, len(kept))] = kept[:k]
    return out


def test_the_plant_is_the_stored_nearest_neighbour(planted):
    """Without the rule, chunk u of the original would be handed its copy from later in the window."""
    db, n_a = planted["db"], planted["n_a"]
    stored = np.asarray(db.neighbours("train"))
    np.testing.assert_array_equal(stored[:n_a, 0], np.arange(n_a) + n_a)
    np.testing.assert_array_equal(stored[n_a:2 * n_a, 0], np.arange(n_a))  # and the copy the original


def test_make_batch_hands_no_neighbour_from_a_document_of_the_window(planted):
    db, L, seq = planted["db"], planted["L"], planted["seq_len"]
    starts = np.arange(0, (db.train.num_chunks // L) * L, L)
    batch = make_batch(db, "train", starts, seq, K)
    m = db.chunk_size
    docs = np.asarray(db.train.doc_ids)
    for row, c0 in enumerate(starts.tolist()):
        chunks = list(range(c0, c0 + L))
        window_docs = {int(docs[c]) for c in chunks}
        window_rows = {tuple(db.train.tokens[c]) for c in np.flatnonzero(np.isin(docs, list(window_docs)))}
        got = batch["neighbours"][row]
        for u in range(L):
            for j in range(K):
                if got[u, j, 0] >= 0:  # neither the neighbour nor its continuation is window text
                    assert tuple(got[u, j, :m]) not in window_rows, f"window {row} chunk {u} slot {j}"
                    if got[u, j, m] >= 0:
                        assert tuple(got[u, j, m:]) not in window_rows, f"window {row} chunk {u} slot {j}"
        np.testing.assert_array_equal(got, db.train.neighbour_tokens(reference_ids(db, "train", chunks, K)))
    assert planted["doc_b"] in {int(docs[c]) for c in range(L)}  # the copy really is in window 0


def test_validation_windows_lose_nothing(planted):
    """Validation documents never enter the database: the rule drops no validation neighbour."""
    db = planted["db"]
    c = db.validation.num_chunks
    ids, stats = window_neighbours(db, "validation", np.arange(c)[None, :], K)
    np.testing.assert_array_equal(ids[0], np.asarray(db.neighbours("validation"))[:, :K])
    assert stats["dropped"] == 0 and stats["slots"] == c * K


def test_loader_counts_what_the_rule_did_and_resumes_the_counts(planted):
    db, L, seq = planted["db"], planted["L"], planted["seq_len"]
    n_seq = db.train.num_chunks // L
    loader = TrainLoader(db, "train", seq, n_seq, K, seed=0)  # one batch = every sequence
    next(loader)
    check = check_training_windows(db, seq, K)
    stats = loader.window_stats
    assert stats["slots"] == check["slots"] == n_seq * L * K
    assert stats["dropped"] == check["before"]["in_window"] >= 2 * planted["n_a"]
    assert check["before"]["later_document"] >= planted["n_a"] and check["sequences_affected_later"] >= 1
    assert check["before"]["later_window_chunks"] >= planted["n_a"]
    assert check["after"] == {"in_window": 0, "empty": stats["empty"]}
    resumed = TrainLoader(db, "train", seq, n_seq, K, seed=0)
    resumed.restore(json.loads(json.dumps(loader.state())))
    assert resumed.window_stats == stats
    next(loader), next(resumed)
    assert resumed.window_stats == loader.window_stats and loader.window_stats["dropped"] == 2 * stats["dropped"]
    baseline = TrainLoader(db, "train", seq, n_seq, K, seed=0, retrieval=False)
    next(baseline)
    assert baseline.window_stats == dict.fromkeys(stats, 0)


def test_db_check_counts_the_plant_before_and_none_after(planted, capsys):
    import argparse

    from retro_jax.retrieval import commands

    out = planted["db"].check(sample=10, seq_len=planted["seq_len"], num_neighbours=K, verify=False)
    assert out["window_rule"]["before"]["in_window"] > 0 and out["window_rule"]["after"]["in_window"] == 0
    p = argparse.ArgumentParser()
    commands.register(p.add_subparsers(dest="verb", required=True))
    args = p.parse_args(["db-check", str(planted["root"]), "--sample", "10", "--seq-len", str(planted["seq_len"])])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert f"{out['window_rule']['before']['in_window']} slots from a document of their window" in text
    assert "loaded, in window        0" in text


def test_eval_windows_apply_the_rule_even_to_planted_stored_neighbours(planted, tmp_path):
    """An eval window is one document, whose chunks stored neighbours already exclude. Plant a
    violation (each train chunk's neighbour list gets the next chunk of its own document in front)
    and check that score_split hands the model exactly what the well-built database gives it."""
    bad = tmp_path / "db"
    shutil.copytree(planted["root"], bad)
    path = bad / "train" / "neighbours.npy"
    nb = np.load(path)
    docs = np.asarray(planted["db"].train.doc_ids)
    inner = np.flatnonzero(docs[:-1] == docs[1:])
    nb[inner] = np.concatenate([inner[:, None] + 1, nb[inner, :-1]], axis=1)
    np.save(path, nb)

    def handed(db: Database) -> np.ndarray:
        seen = []

        def nll_fn(tokens, targets, neighbours):
            seen.append(neighbours)
            return np.zeros(tokens.shape, np.float32)

        m = db.chunk_size
        score_split(db, "train", nll_fn, window=4 * m, stride=2 * m, batch_size=4, k=K, keep_tokens=False)
        return np.concatenate(seen)

    want = handed(planted["db"])
    assert (want[..., 0] >= 0).any()
    np.testing.assert_array_equal(handed(Database.open(bad)), want)
