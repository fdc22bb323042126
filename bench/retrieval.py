"""Benchmark: ScaNN recall@k and queries/s against exact search, side by side.

    python bench/retrieval.py                       # synthetic clustered, 100k x 384
    python bench/retrieval.py --embeddings db/embeddings.npy --queries 2000

With ``--embeddings`` the last ``--queries`` rows are held out as queries and the
rest are indexed. Without it, synthetic data is used and labelled as such: a
Gaussian mixture in a 48-d latent space, projected to ``--dim`` with a little
isotropic noise and L2-normalised (sentence embeddings have a low intrinsic
dimension; pure isotropic noise would make any ANN look bad). Prints figures
only: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from retro_jax.retrieval.index import IndexConfig, ShardedIndex, exact_search, scann_available


def bench_embedding(args: argparse.Namespace) -> None:
    """LEAD: fill in the ``--embed`` benchmark (frozen-BERT chunks/s) here.

    Not part of the retrieval index work; kept as a marked hook so the two
    benchmarks share one script. It should print chunks/s and peak RSS.
    """
    raise NotImplementedError("--embed is not implemented yet (hook for retro_jax.retrieval.bert)")


def synthetic(n: int, dim: int, seed: int, clusters: int = 1000, latent: int = 48) -> np.ndarray:
    """Clustered, low-intrinsic-dimension, unit-norm float32 [n, dim] embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, latent)).astype(np.float32)
    proj = (rng.normal(size=(latent, dim)) / np.sqrt(latent)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for r0 in range(0, n, 50_000):
        m = min(50_000, n - r0)
        z = centres[rng.integers(0, clusters, m)] + rng.normal(size=(m, latent)).astype(np.float32)
        x = z @ proj + 0.1 * rng.normal(size=(m, dim)).astype(np.float32)
        out[r0 : r0 + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def timed_search(index: ShardedIndex, q: np.ndarray, k: int, repeats: int = 3) -> tuple[np.ndarray, np.ndarray, float]:
    """Warm up on a slice, then the best of ``repeats`` timings of the full query set
    (best-of damps noise from other processes on a shared machine)."""
    index.search(q[:64], k)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        ids, d = index.search(q, k)
        best = min(best, time.perf_counter() - t0)
    return ids, d, best


def folder_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", type=Path, help="float [C, D] .npy of real chunk embeddings")
    p.add_argument("--n", type=int, default=100_000, help="synthetic database rows (default 100k)")
    p.add_argument("--dim", type=int, default=384, help="synthetic width (default 384, MiniLM)")
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--num-leaves-to-search", type=int, default=0, help="override the for_size rule")
    p.add_argument("--dims-per-block", type=int, default=2, help="asymmetric-hashing block width")
    p.add_argument("--reorder-k", type=int, default=0, help="override the for_size rule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embed", action="store_true", help="benchmark the BERT embedder instead (lead's hook)")
    args = p.parse_args(argv)
    if args.embed:
        try:
            bench_embedding(args)
        except NotImplementedError as e:
            sys.exit(f"error: {e}")
        return

    t0 = time.perf_counter()
    if args.embeddings:
        if not args.embeddings.is_file():
            sys.exit(f"error: {args.embeddings} does not exist")
        allx = np.load(args.embeddings, mmap_mode="r", allow_pickle=False)
        if allx.ndim != 2 or allx.shape[0] <= args.queries:
            sys.exit(f"error: {args.embeddings} has shape {allx.shape}; need [C, D] with C > --queries")
        label = f"embeddings from {args.embeddings} (last {args.queries} rows held out as queries)"
        db, q = allx[: -args.queries], np.asarray(allx[-args.queries :], np.float32)
    else:
        label = "SYNTHETIC clustered embeddings (1000 blobs, 48-d latent, unit norm) - not real text"
        allx = synthetic(args.n + args.queries, args.dim, args.seed)
        db, q = allx[: args.n], allx[args.n :]
    n, dim = db.shape
    print(f"data      : {label}")
    print(f"database  : {n:,} x {dim}   queries: {len(q):,}   k={args.k}   shards={args.num_shards}"
          f"   (made in {time.perf_counter() - t0:.1f}s)")
    print(f"ScaNN     : {'available' if scann_available() else 'NOT available on this CPU (exact only)'}")

    with tempfile.TemporaryDirectory(prefix="retro-bench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        exact = ShardedIndex.build(db, work / "exact", IndexConfig(mode="exact"), args.num_shards, progress=False)
        exact_build = time.perf_counter() - t0
        ref_ids, ref_d, exact_s = timed_search(exact, q, args.k)
        print(f"exact     : build {exact_build:7.1f}s   {len(q) / exact_s:10.1f} queries/s"
              f"   disk {folder_mib(work / 'exact'):.0f} MiB")
        if not scann_available():
            return
        cfg = IndexConfig(mode="scann", num_leaves_to_search=args.num_leaves_to_search, reorder_k=args.reorder_k,
                      dims_per_block=args.dims_per_block)
        t0 = time.perf_counter()
        scann = ShardedIndex.build(db, work / "scann", cfg, args.num_shards, progress=False)
        scann_build = time.perf_counter() - t0
        ids, d, scann_s = timed_search(scann, q, args.k)
        recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ids, ref_ids)])
        ratio = float(np.mean(d[:, -1] / np.maximum(ref_d[:, -1], 1e-12)))
        sc = scann.meta["shards"][0]["config"]
        print(f"scann     : build {scann_build:7.1f}s   {len(q) / scann_s:10.1f} queries/s"
              f"   disk {folder_mib(work / 'scann'):.0f} MiB")
        print(f"  config  : leaves={sc['num_leaves']} search={sc['num_leaves_to_search']}"
              f" dims/block={sc['dims_per_block']} reorder_k={sc['reorder_k']}")
        print(f"  recall@{args.k}: {recall:.4f}   k-th distance / exact k-th: {ratio:.4f}"
              f"   speed-up vs exact: {exact_s / scann_s:.1f}x")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"peak RSS  : {peak_mib:.0f} MiB (now {psutil.Process().memory_info().rss / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
