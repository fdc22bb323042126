"""Properties of retro_jax.retrieval.neighbours: exclusion, fill, exactness, resume."""

from __future__ import annotations

import numpy as np
import pytest

from retro_jax.retrieval.index import IndexConfig, ShardedIndex, scann_available
from retro_jax.retrieval import neighbours as neighbours_mod
from retro_jax.retrieval.neighbours import (
    NeighboursIncompleteError,
    NeighboursInputError,
    NeighboursResumeError,
    compute_neighbours,
    distances_path,
    load_neighbours,
    progress_path,
)


def documents(rng: np.random.Generator, n_docs: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunks whose embeddings sit near their document's centre, like real text.

    Each chunk's nearest neighbours are mostly from its own document, so the
    exclusion has real work to do (and must re-query for the long documents).
    """
    lengths = rng.integers(1, 60, n_docs)
    doc_ids = np.repeat(np.arange(n_docs), lengths).astype(np.int64)
    centres = rng.normal(size=(n_docs, dim))
    emb = centres[doc_ids] + 0.3 * rng.normal(size=(len(doc_ids), dim))
    return emb.astype(np.float32), doc_ids


def reference(emb: np.ndarray, q: np.ndarray, qdoc: np.ndarray, doc: np.ndarray, k: int):
    """float64 brute force with same-document chunks removed; ordered by (distance, id)."""
    q64, x64 = q.astype(np.float64), emb.astype(np.float64)
    d = (q64**2).sum(1)[:, None] - 2 * q64 @ x64.T + (x64**2).sum(1)[None, :]
    d[qdoc[:, None] == doc[None, :]] = np.inf
    m = min(k + 8, d.shape[1])  # top-k by (distance, id) without sorting whole rows
    cand = np.argpartition(d, m - 1, axis=1)[:, :m]
    order = np.take_along_axis(cand, np.lexsort((cand, np.take_along_axis(d, cand, 1)), axis=-1), 1)[:, :k]
    rd = np.take_along_axis(d, order, 1)
    return np.where(np.isinf(rd), -1, order), rd


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    emb, doc = documents(rng, 100, 16)
    idx = ShardedIndex.build(emb, tmp_path_factory.mktemp("idx"), IndexConfig(mode="exact"), 2, progress=False)
    return emb, doc, idx


def test_exact_neighbours_equal_brute_force_with_exclusion(corpus, tmp_path):
    emb, doc, idx = corpus
    k = 5
    ids = compute_neighbours(idx, emb, doc, doc, k, tmp_path / "nb.npy", batch_size=500, margin=0, progress=False)
    _, dists = load_neighbours(tmp_path / "nb.npy")
    assert ids.shape == (len(emb), k) and ids.dtype == np.int64 and dists.dtype == np.float32
    assert np.all(ids >= 0)
    assert not np.any(doc[ids] == doc[:, None]), "a neighbour came from the query's own document"
    ref_ids, ref_d = reference(emb, emb, doc, doc, k)
    np.testing.assert_allclose(dists, ref_d, rtol=1e-5, atol=1e-5)
    gap = np.diff(np.concatenate([ref_d, np.full((len(emb), 1), np.inf)], 1), axis=1)
    clear = (gap > 1e-4) & np.concatenate([np.ones((len(emb), 1), bool), gap[:, :-1] > 1e-4], 1)
    np.testing.assert_array_equal(np.asarray(ids)[clear], ref_ids[clear])


def test_fills_minus_one_when_too_few_other_document_chunks(tmp_path):
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(10, 8)).astype(np.float32)
    doc = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2], np.int64)
    idx = ShardedIndex.build(emb, tmp_path / "i", IndexConfig(mode="exact"), progress=False)
    ids = np.asarray(compute_neighbours(idx, emb, doc, doc, 8, tmp_path / "nb.npy", batch_size=3, progress=False))
    _, dists = load_neighbours(tmp_path / "nb.npy")
    eligible = 10 - np.bincount(doc)[doc]  # 6 for doc 0, 7 for docs 1 and 2
    for row, n_ok in enumerate(eligible):
        assert np.all(ids[row, n_ok:] == -1) and np.all(np.isinf(dists[row, n_ok:]))
        got = ids[row, :n_ok]
        assert sorted(got.tolist()) == np.flatnonzero(doc != doc[row]).tolist()
        assert np.all(np.diff(dists[row, :n_ok]) >= 0)


class Crash(RuntimeError):
    """A simulated crash between two blocks."""


def crash_after(monkeypatch, blocks: int) -> None:
    """The next compute_neighbours dies (Crash) after writing `blocks` blocks."""
    real, seen = neighbours_mod.neighbours_for_block, []

    def block(*args, **kwargs):
        if len(seen) == blocks:
            raise Crash(f"simulated crash after {blocks} block(s)")
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(neighbours_mod, "neighbours_for_block", block)


def test_resume_after_interruption_is_byte_identical(corpus, tmp_path, monkeypatch):
    emb, doc, idx = corpus
    q, qdoc = emb[::3], doc[::3]  # queries need not be the database rows
    calls = []

    class Spy:
        """Counts the queries sent to the index."""

        size, dim, folder, num_ids = idx.size, idx.dim, idx.folder, idx.num_ids

        def search(self, x, k):
            calls.append(len(x))
            return idx.search(x, k)

    kw = dict(batch_size=100, progress=False)
    full = tmp_path / "full.npy"
    compute_neighbours(idx, q, qdoc, doc, 4, full, **kw)
    part = tmp_path / "part.npy"
    with monkeypatch.context() as m, pytest.raises(Crash):
        crash_after(m, 2)
        compute_neighbours(Spy(), q, qdoc, doc, 4, part, **kw)
    with pytest.raises(NeighboursIncompleteError):
        load_neighbours(part)
    calls.clear()
    compute_neighbours(Spy(), q, qdoc, doc, 4, part, **kw)
    assert calls[0] == min(100, len(q) - 200), "resume did not start after block 2"
    assert part.read_bytes() == full.read_bytes()
    assert distances_path(part).read_bytes() == distances_path(full).read_bytes()
    calls.clear()
    compute_neighbours(Spy(), q, qdoc, doc, 4, part, **kw)  # already complete: no work
    assert calls == []


def test_resume_with_other_settings_is_refused(corpus, tmp_path, monkeypatch):
    emb, doc, idx = corpus
    out = tmp_path / "nb.npy"
    with monkeypatch.context() as m, pytest.raises(Crash):
        crash_after(m, 1)
        compute_neighbours(idx, emb, doc, doc, 4, out, batch_size=100, progress=False)
    with pytest.raises(NeighboursResumeError, match="settings"):
        compute_neighbours(idx, emb, doc, doc, 4, out, batch_size=50, progress=False)
    progress_path(out).unlink()
    with pytest.raises(NeighboursResumeError, match="without its progress file"):
        compute_neighbours(idx, emb, doc, doc, 4, out, batch_size=50, progress=False)


@pytest.mark.skipif(not scann_available(), reason="ScaNN cannot run on this CPU")
def test_scann_neighbours_exclude_own_document(tmp_path):
    rng = np.random.default_rng(2)
    emb, doc = documents(rng, 300, 32)
    idx = ShardedIndex.build(emb, tmp_path / "i", IndexConfig(mode="scann"), progress=False)
    ids = np.asarray(compute_neighbours(idx, emb, doc, doc, 2, tmp_path / "nb.npy", progress=False))
    assert np.all(ids >= 0) and not np.any(doc[ids] == doc[:, None])
    ref_ids, _ = reference(emb, emb, doc, doc, 2)
    recall = np.mean([len(set(a) & set(b)) / 2 for a, b in zip(ids, ref_ids)])
    assert recall >= 0.95


def test_bad_inputs_are_reported(corpus, tmp_path):
    emb, doc, idx = corpus
    with pytest.raises(NeighboursInputError, match="db_doc_ids"):
        compute_neighbours(idx, emb, doc, doc[:-1], 2, tmp_path / "a.npy", progress=False)
    with pytest.raises(NeighboursInputError, match="query_embeddings"):
        compute_neighbours(idx, emb[:, :3], doc, doc, 2, tmp_path / "b.npy", progress=False)
    with pytest.raises(NeighboursInputError, match="query_doc_ids"):
        compute_neighbours(idx, emb, doc[:5], doc, 2, tmp_path / "c.npy", progress=False)
    with pytest.raises(NeighboursInputError, match="no rows"):
        compute_neighbours(idx, emb[:0], doc[:0], doc, 2, tmp_path / "d.npy", progress=False)
