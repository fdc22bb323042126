"""Properties of retro_jax.retrieval.index: recall, shard invariance, round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retro_jax.retrieval import index as index_mod
from retro_jax.retrieval.index import (
    IndexConfig,
    IndexInputError,
    IndexNotFoundError,
    ShardedIndex,
    exact_search,
    scann_available,
)

needs_scann = pytest.mark.skipif(not scann_available(), reason="ScaNN cannot run on this CPU")


def clustered(rng: np.random.Generator, n: int, dim: int, clusters: int = 200, noise: float = 0.5) -> np.ndarray:
    """Gaussian blobs, a rough stand-in for sentence embeddings."""
    centers = rng.normal(size=(clusters, dim))
    return (centers[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim))).astype(np.float32)


def brute_force(db: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 reference, ordered by (distance, id)."""
    q64, x64 = q.astype(np.float64), db.astype(np.float64)
    d = (q64**2).sum(1)[:, None] - 2 * q64 @ x64.T + (x64**2).sum(1)[None, :]
    m = min(k + 8, d.shape[1])  # top-k by (distance, id) without sorting whole rows
    cand = np.argpartition(d, m - 1, axis=1)[:, :m]
    order = np.take_along_axis(cand, np.lexsort((cand, np.take_along_axis(d, cand, 1)), axis=-1), 1)[:, :k]
    return order, np.take_along_axis(d, order, 1)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    both = clustered(rng, 24_000 + 500, 48, noise=1.0)  # overlapping blobs: recall is not trivial
    return both[:24_000], both[24_000:]


@pytest.fixture(scope="module")
def scann_index(data, tmp_path_factory) -> ShardedIndex:
    if not scann_available():
        pytest.skip("ScaNN cannot run on this CPU")
    db, _ = data
    return ShardedIndex.build(db, tmp_path_factory.mktemp("scann"), IndexConfig(mode="scann"), progress=False)


@needs_scann
def test_scann_recall_at_10_against_exact(data, scann_index):
    db, q = data
    assert all(s["config"]["mode"] == "scann" for s in scann_index.meta["shards"])
    ids, dists = scann_index.search(q, 10)
    ref_ids, ref_d = exact_search(db, q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref_ids)])
    assert recall >= 0.95, f"ScaNN recall@10 {recall:.3f} < 0.95"
    # Reordered distances are the true squared L2 of the returned rows ...
    true_d = ((q[:, None, :] - db[ids]) ** 2).sum(-1)
    np.testing.assert_allclose(dists, true_d, rtol=1e-4, atol=1e-3)
    # ... and the i-th approximate neighbour is never closer than the i-th exact one.
    assert np.all(dists >= ref_d - 1e-3 * (1 + ref_d))
    assert np.all(np.diff(dists, axis=1) >= 0)


@needs_scann
def test_scann_serialize_load_round_trip(data, scann_index):
    _, q = data
    before = scann_index.search(q, 10)
    folder = Path(scann_index.folder)
    assert not list(folder.rglob("*.pkl")), "a pickle file was written"
    reloaded = ShardedIndex.load(folder)
    after = reloaded.search(q, 10)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])


@needs_scann
def test_scann_refuses_pickled_docids(data, tmp_path):
    db, _ = data
    idx = ShardedIndex.build(db[:3000], tmp_path / "i", IndexConfig(mode="scann"), progress=False)
    (Path(idx.folder) / "shard_00000" / "scann_docids.pkl").write_bytes(b"not trusted")
    with pytest.raises(IndexInputError, match="pickle"):
        ShardedIndex.load(tmp_path / "i")


@pytest.mark.parametrize("num_shards", [1, 3, 4])
def test_sharded_exact_equals_single_exact_and_brute_force(num_shards, tmp_path):
    rng = np.random.default_rng(1)
    both = clustered(rng, 5000 + 300, 32, clusters=50)
    db, q = both[:5000], both[5000:]
    single = ShardedIndex.build(db, tmp_path / "one", IndexConfig(mode="exact"), progress=False)
    sharded = ShardedIndex.build(db, tmp_path / "many", IndexConfig(mode="exact"), num_shards, progress=False)
    ids1, d1 = single.search(q, 10)
    ids_s, d_s = sharded.search(q, 10)
    np.testing.assert_array_equal(ids1, ids_s)
    np.testing.assert_array_equal(d1, d_s)
    starts = [s["start"] for s in sharded.meta["shards"]]
    ends = [s["end"] for s in sharded.meta["shards"]]
    assert starts[0] == 0 and ends[-1] == 5000 and starts[1:] == ends[:-1]
    # Against a float64 reference: same distances; same ids except at genuine near-ties.
    ref_ids, ref_d = brute_force(db, q, 10)
    np.testing.assert_allclose(d1, ref_d, rtol=1e-5, atol=1e-5)
    gap = np.diff(np.concatenate([ref_d, np.full((len(q), 1), np.inf)], 1), axis=1)
    clear = (gap > 1e-4) & np.concatenate([np.ones((len(q), 1), bool), gap[:, :-1] > 1e-4], 1)
    np.testing.assert_array_equal(ids1[clear], ref_ids[clear])


def test_exact_search_is_independent_of_blocking_and_reads_memmaps(tmp_path):
    rng = np.random.default_rng(2)
    db = clustered(rng, 3000, 24, clusters=30)
    q = clustered(rng, 200, 24, clusters=30)
    path = tmp_path / "emb.npy"
    np.save(path, db)
    mm = np.load(path, mmap_mode="r")
    a = exact_search(db, q, 7)
    b = exact_search(mm, q, 7, db_block=257, query_block=33)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    idx = ShardedIndex.build(mm, tmp_path / "idx", IndexConfig(mode="exact"), 2, progress=False)
    np.testing.assert_array_equal(idx.search(q, 7)[0], a[0])


@pytest.mark.parametrize("mode", ["exact", pytest.param("scann", marks=needs_scann)])
def test_k_larger_than_database_pads_with_minus_one(mode, tmp_path):
    rng = np.random.default_rng(3)
    db = rng.normal(size=(100, 8)).astype(np.float32)
    idx = ShardedIndex.build(db, tmp_path, IndexConfig(mode=mode), num_shards=2, progress=False)
    assert all(s["config"]["mode"] == mode for s in idx.meta["shards"])
    ids, d = idx.search(db[:3], 120)
    assert ids.shape == (3, 120) and ids.dtype == np.int64 and d.dtype == np.float32
    assert np.all(ids[:, 100:] == -1) and np.all(np.isinf(d[:, 100:]))
    assert all(sorted(row[:100].tolist()) == list(range(100)) for row in ids)
    np.testing.assert_array_equal(ids[:, 0], [0, 1, 2])  # each row is its own nearest


@needs_scann
def test_scann_returns_every_row_when_asked_for_all(data, scann_index):
    db, q = data
    ids, d = scann_index.search(q[:4], len(db))
    assert all(np.array_equal(np.sort(row), np.arange(len(db))) for row in ids)
    assert np.all(np.isfinite(d))


def test_for_size_rule():
    small = IndexConfig.for_size(5_000, 384)
    assert small.mode == "exact"
    if scann_available():
        big = IndexConfig.for_size(1_000_000, 384)
        assert big.mode == "scann" and big.num_leaves == 1000
        assert 0 < big.num_leaves_to_search <= big.num_leaves and big.reorder_k >= 100
    assert IndexConfig.for_size(1_000_000, 384, mode="exact").mode == "exact"


def test_falls_back_to_exact_without_scann(monkeypatch):
    monkeypatch.setattr(index_mod, "scann_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="falling back to exact"):
        cfg = IndexConfig(mode="scann").resolved(50_000, 64)
    assert cfg.mode == "exact"


def test_clear_errors(tmp_path):
    with pytest.raises(IndexNotFoundError):
        ShardedIndex.load(tmp_path)
    with pytest.raises(IndexInputError, match="2-D"):
        ShardedIndex.build(np.zeros(10, np.float32), tmp_path / "x", progress=False)
    with pytest.raises(IndexInputError):
        IndexConfig(mode="annoy")  # type: ignore[arg-type]
    idx = ShardedIndex.build(np.ones((10, 4), np.float32), tmp_path / "y", progress=False)
    with pytest.raises(IndexInputError, match=r"\[Q, 4\]"):
        idx.search(np.ones((2, 5), np.float32), 3)
