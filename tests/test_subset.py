"""Database-size subsets: which chunks, nested sizes, neighbours equal to brute force over the
subset, the full-size subset equal to its parent, nothing re-embedded, reruns and refusals."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
from _db_helpers import BUILD, shared

from retro_jax.retrieval import commands
from retro_jax.retrieval.database import Database, Retriever
from retro_jax.retrieval.exact import exact_search
from retro_jax.retrieval.stages import BuildError
from retro_jax.retrieval.subset import select_rows, subset_database


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return shared(tmp_path_factory)


@pytest.fixture(scope="module")
def parent(base):
    return Database.open(base["db"])


@pytest.fixture(scope="module")
def half(parent, tmp_path_factory):
    n = len(parent.train) // 2
    out = tmp_path_factory.mktemp("subset") / "half"
    subset_database(parent.root, out, n, seed=3, progress=False)
    return Database.open(out, verify=True)


def test_document_subsets_are_whole_documents_nested_across_sizes():
    docs = np.repeat(np.arange(40), np.random.default_rng(0).integers(1, 12, 40))
    previous = np.array([], np.int64)
    for n in (5, 17, 60, len(docs) // 2, len(docs)):
        rows = select_rows(docs, n, "documents", seed=1)
        assert len(rows) == n and np.all(np.diff(rows) > 0)
        assert set(previous) <= set(rows)  # nested: a larger database holds every smaller one
        cut = [d for d in np.unique(docs[rows]) if (docs[rows] == d).sum() < (docs == d).sum()]
        assert len(cut) <= 1  # whole documents, but for the last one, cut to fit
        if cut:  # a cut document keeps its first chunks (a neighbour's continuation stays real)
            own = np.flatnonzero(docs == cut[0])
            np.testing.assert_array_equal(np.intersect1d(rows, own), own[:len(np.intersect1d(rows, own))])
        previous = rows
    assert not np.array_equal(select_rows(docs, 60, seed=1), select_rows(docs, 60, seed=2))
    np.testing.assert_array_equal(select_rows(docs, 60, "prefix"), np.arange(60))
    for bad in (0, len(docs) + 1):
        with pytest.raises(BuildError, match="chunks"):
            select_rows(docs, bad)
    with pytest.raises(BuildError, match="mode"):
        select_rows(docs, 3, "random")


def test_subset_neighbours_are_brute_force_over_the_subset_excluding_own_document(parent, half):
    rows = np.asarray(half.index.row_ids)
    assert len(rows) == half.manifest["subset"]["chunks"] == len(parent.train) // 2
    np.testing.assert_array_equal(rows, select_rows(parent.train.doc_ids, len(rows), "documents", seed=3))
    keys = np.asarray(parent.embeddings("train"))[rows]
    train_docs = np.asarray(parent.train.doc_ids)
    k = half.neighbours_stored
    for split in ("train", "validation"):
        q = np.asarray(parent.embeddings(split))
        qdocs = np.asarray(parent.chunks(split).doc_ids)
        cand, _ = exact_search(keys, q, len(rows))
        cand = rows[cand]
        want = np.full((len(q), k), -1)
        for i in range(len(q)):
            other = cand[i][train_docs[cand[i]] != qdocs[i]][:k]
            want[i, :len(other)] = other
        got = np.asarray(half.neighbours(split))
        assert np.isin(got[got >= 0], rows).all()
        agree = (got == want).all(1).mean()
        assert agree > 0.98, f"{split}: {agree:.3f} of rows equal brute force"  # ties may flip
    # Training data is untouched: the same chunk files (linked, not copied or re-embedded).
    for rel in ("train/chunks/tokens.npy", "train/embeddings.npy", "validation/embeddings.npy"):
        assert os.path.samefile(parent.root / rel, half.root / rel)
    check = half.check(sample=50)
    assert check["recall_at_10"] == 1.0 and check["same_document_neighbours"] == 0 and check["checksums_ok"]


def test_full_size_prefix_subset_equals_its_parent(parent, tmp_path):
    subset_database(parent.root, tmp_path / "full", len(parent.train), mode="prefix", progress=False)
    full = Database.open(tmp_path / "full")
    for split in ("train", "validation"):
        np.testing.assert_array_equal(full.neighbours(split), parent.neighbours(split))
        np.testing.assert_array_equal(full.neighbour_distances(split), parent.neighbour_distances(split))


def test_live_retrieval_returns_only_subset_chunks(half, base):
    from retro_jax.retrieval.build import load_embedder

    emb = load_embedder(str(base["bert"]), BUILD["max_length"], BUILD["embed_batch_size"])
    rows = np.asarray(half.index.row_ids)
    outside = np.setdiff1d(np.arange(len(half.train)), rows)[:3]
    got = Retriever(half, embedder=emb).neighbours_for_chunks(np.asarray(half.train.tokens[outside]), k=3)
    want = half.train.neighbour_tokens(np.asarray(half.index.search(emb.embed(
        [half.tokenizer.decode(t) for t in np.asarray(half.train.tokens[outside])]), 3)[0]))
    np.testing.assert_array_equal(got, want)
    ids, _ = half.index.search(np.asarray(half.embeddings("train")[outside]), 5)
    assert np.isin(ids, rows).all()


def test_rerun_is_a_no_op_and_another_request_is_refused(parent, half, tmp_path, capsys):
    before = (half.root / "manifest.json").stat().st_mtime_ns
    again = subset_database(parent.root, half.root, half.manifest["subset"]["chunks"], seed=3, progress=False)
    assert again == half.manifest and (half.root / "manifest.json").stat().st_mtime_ns == before
    with pytest.raises(BuildError, match="another database"):
        subset_database(parent.root, half.root, 10, seed=3, progress=False)
    with pytest.raises(BuildError, match="differ"):
        subset_database(parent.root, parent.root, 10, progress=False)

    p = argparse.ArgumentParser(prog="retro-jax")
    commands.register(p.add_subparsers(dest="verb", required=True))
    out = tmp_path / "cli"
    args = p.parse_args(["db-subset", "--db", str(parent.root), "--out", str(out), "--chunks", "20", "--mode",
                         "prefix", "--no-progress"])
    assert args.func(args) == 0
    assert "retrieves from 20 of" in capsys.readouterr().out
    args = p.parse_args(["db-info", str(out), "--json"])
    assert args.func(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["subset"]["chunks"] == 20 and info["subset"]["mode"] == "prefix"
    args = p.parse_args(["db-subset", "--db", str(parent.root), "--out", str(tmp_path / "x"), "--chunks", "0"])
    assert args.func(args) == 2
