"""Benchmark: nearest-neighbour search, ScaNN (ours) against exact search and against faiss IVF-PQ.

    python bench/retrieval.py --embeddings /tmp/emb100k.npy         # real MiniLM embeddings (bench/embed.py --corpus)
    python bench/retrieval.py --n 1000000                           # synthetic clustered vectors
    python bench/retrieval.py --n 100000 --no-faiss --json out/bench/retrieval.json

Same vectors, same queries, same machine, one run. With ``--embeddings`` the last ``--queries``
rows are held out as queries and the rest are indexed; without it, synthetic data is used and
labelled as such: a Gaussian mixture in a 48-d latent space, projected to ``--dim`` with a little
isotropic noise and L2-normalised (sentence embeddings have a low intrinsic dimension; pure
isotropic noise would make any ANN look bad).

Methods, each timed as the best of 3 full passes over the queries after a warm-up, all threads:
  exact   retro_jax.retrieval.exact (blocked BLAS brute force): the ground truth and the baseline
  ScaNN   the index build-db makes (IndexConfig.for_size: tree + 4-bit AH + float32 reorder),
          searched at its default number of leaves (the row marked "default") and at 1/4, 1/2, 2x
  faiss   IVF-PQ as the PyTorch RETROs build it (autofaiss), with 8-bit codes and with 4-bit
          fast-scan codes, both the size of ScaNN's (96 B per 384-d vector), each without and with
          exact re-ranking of 4 x k and 25 x k candidates, over a sweep of nprobe; run in the peer environment (bench/peer/
          faiss_search.py, ``--peer-python``), never in ours
Recall@k is computed here for every method alike from the ids it returns: a returned neighbour
counts when its true squared distance is within the exact k-th distance (ties between duplicate
vectors otherwise make id sets differ with no loss; id-set recall is printed beside it).
Summary: for each method, the fastest setting whose recall reaches ``--target`` (0.95), its
queries/s and its speed-up over exact. Prints figures only: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from retro_jax.retrieval.index import IndexConfig, ShardedIndex, scann_available
from timing import best_of  # bench/timing.py (this folder)

DEFAULT_PEER = Path(__file__).resolve().parents[2] / "peer-venv" / "bin" / "python"


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


def recalls(db: np.ndarray, q: np.ndarray, ids: np.ndarray, ref_ids: np.ndarray, ref_d: np.ndarray) -> tuple[float, float]:
    """(distance recall, id recall) of ``ids`` against the exact top-k (see the module docstring)."""
    k = ref_ids.shape[1]
    flat = np.where(ids >= 0, ids, 0).ravel()
    order = np.argsort(flat, kind="stable")  # read rows in id order: sequential memmap reads
    back = np.empty((len(flat), db.shape[1]), np.float32)
    back[order] = db[flat[order]]
    true_d = np.sum(np.square(q[:, None, :] - back.reshape(*ids.shape, -1)), axis=-1)
    true_d[ids < 0] = np.inf
    within = float(np.mean(true_d <= ref_d[:, -1:] * (1 + 1e-5) + 1e-6))
    by_id = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, ref_ids)]))
    return within, by_id


def run_faiss(args, db: np.ndarray, q: np.ndarray, work: Path) -> list[dict]:
    """faiss rows from the peer environment's worker (ids only; recall is computed by the caller)."""
    np.save(work / "db.npy", np.ascontiguousarray(db, np.float32))
    np.save(work / "queries.npy", q)
    n = len(db)
    nlist = args.nlist or 1 << round(np.log2(4 * np.sqrt(n)))  # faiss's guideline: 4-16 sqrt(N) lists
    cmd = [str(args.peer_python), str(Path(__file__).with_name("peer") / "faiss_search.py"), "--work", str(work),
           "--k", str(args.k), "--nlist", str(nlist), "--m", str(args.pq_m), "--sample", str(min(n, 250_000)),
           "--nprobe", *map(str, args.nprobe)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"error: faiss worker failed ({' '.join(cmd)}):\n{res.stderr[-3000:]}")
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    info, rows = lines[0], lines[1:]
    print(f"faiss     : {info['faiss']} ({info['threads']} threads), nlist {nlist}, PQ m={args.pq_m}; "
          f"worker ran {time.perf_counter() - t0:.0f}s")
    for r in rows:
        r["ids"] = np.load(work / r.pop("ids"))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", type=Path, help="float [C, D] .npy of real chunk embeddings")
    p.add_argument("--rows", type=int, default=0, help="use only the first ROWS rows of --embeddings")
    p.add_argument("--n", type=int, default=100_000, help="synthetic database rows (default 100k)")
    p.add_argument("--dim", type=int, default=384, help="synthetic width (default 384, MiniLM)")
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--target", type=float, default=0.95, help="recall the summary compares speeds at")
    p.add_argument("--dims-per-block", type=int, default=2, help="ScaNN asymmetric-hashing block width")
    p.add_argument("--no-faiss", action="store_true", help="skip the peer's faiss IVF-PQ")
    p.add_argument("--peer-python", type=Path, default=DEFAULT_PEER, help=f"peer env python (default {DEFAULT_PEER})")
    p.add_argument("--nlist", type=int, default=0, help="faiss inverted lists (default 4 sqrt(N), a power of 2)")
    p.add_argument("--pq-m", type=int, default=96, help="faiss PQ sub-quantizers (96 on 384-d = ScaNN's code size)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the rows and the summary here")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    if args.embeddings:
        if not args.embeddings.is_file():
            sys.exit(f"error: {args.embeddings} does not exist (make it with bench/embed.py --corpus)")
        allx = np.load(args.embeddings, mmap_mode="r", allow_pickle=False)
        if args.rows:  # e.g. the finished blocks of a partial bench/embed.py --corpus file (rows are shuffled)
            allx = allx[: args.rows]
        if allx.ndim != 2 or allx.shape[0] <= args.queries:
            sys.exit(f"error: {args.embeddings} has shape {allx.shape}; need [C, D] with C > --queries")
        label = f"real MiniLM embeddings {args.embeddings.name} (last {args.queries} rows held out as queries)"
        db, q = np.asarray(allx[: -args.queries], np.float32), np.asarray(allx[-args.queries :], np.float32)
    else:
        label = "SYNTHETIC clustered embeddings (1000 blobs, 48-d latent, unit norm) - not real text"
        allx = synthetic(args.n + args.queries, args.dim, args.seed)
        db, q = allx[: args.n], allx[args.n :]
    n, dim = db.shape
    print(f"data      : {label}")
    print(f"database  : {n:,} x {dim}   queries: {len(q):,}   k={args.k}   cores {os.cpu_count()}"
          f"   (made in {time.perf_counter() - t0:.1f}s)")
    rows: list[dict] = []

    def add(method: str, setting: str, ids: np.ndarray, sec: float, build_s: float, default: bool = False) -> None:
        within, by_id = recalls(db, q, ids, ref_ids, ref_d)
        rows.append({"method": method, "setting": setting, "default": default, "recall": within, "recall_ids": by_id,
                     "queries_per_s": len(q) / sec, "speedup_vs_exact": exact_s / sec, "build_s": build_s})
        r = rows[-1]
        print(f"  {method:<38} {setting:<22} recall@{args.k} {within:.4f} (ids {by_id:.4f})   "
              f"{r['queries_per_s']:9.1f} q/s   {r['speedup_vs_exact']:6.1f}x exact{'   <- default' if default else ''}",
              flush=True)

    with tempfile.TemporaryDirectory(prefix="retro-bench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        exact = ShardedIndex.build(db, work / "exact", IndexConfig(mode="exact"), 1, progress=False)
        (ref_ids, ref_d), exact_s = best_of(lambda: exact.search(q, args.k))
        add("exact (numpy BLAS)", "-", ref_ids, exact_s, time.perf_counter() - t0)
        if scann_available():
            t0 = time.perf_counter()
            index = ShardedIndex.build(db, work / "scann", IndexConfig(mode="scann", dims_per_block=args.dims_per_block),
                                       1, progress=False)
            build_s = time.perf_counter() - t0
            sc = index.meta["shards"][0]["config"]
            (ids, _), sec = best_of(lambda: index.search(q, args.k))  # the product's own search path
            method = f"ScaNN {sc['num_leaves']} leaves, AH {sc['dims_per_block']}d, reorder {sc['reorder_k']}"
            add(method, f"leaves={sc['num_leaves_to_search']}", ids, sec, build_s, default=True)
            searcher = index._shards[0].searcher  # the same searcher at other depths, no rebuild
            for f in (0.25, 0.5, 2.0):
                leaves = max(1, min(sc["num_leaves"], round(f * sc["num_leaves_to_search"])))
                (ids, _), sec = best_of(lambda: searcher.search_batched_parallel(
                    q, final_num_neighbors=args.k, pre_reorder_num_neighbors=sc["reorder_k"], leaves_to_search=leaves))
                add(method, f"leaves={leaves}", np.asarray(ids, np.int64), sec, build_s)
        else:
            print("ScaNN     : NOT available on this CPU (its x86 wheel needs AVX/FMA); exact only")
        if not args.no_faiss:
            if not args.peer_python.is_file():
                sys.exit(f"error: no peer python at {args.peer_python} (make bench-peer makes it; or --no-faiss)")
            (work / "faiss").mkdir()
            for r in run_faiss(args, db, q, work / "faiss"):
                add(r["method"], r["setting"], r["ids"], r["search_s"], r["build_s"])

    summary = {}
    for method in dict.fromkeys(r["method"].split(" + ")[0].split(" ")[0] for r in rows):
        ok = [r for r in rows if r["method"].startswith(method) and r["recall"] >= args.target]
        best = max(ok, key=lambda r: r["queries_per_s"]) if ok else None
        summary[method] = best
        print(f"best {method:<6}: " + (f"{best['queries_per_s']:9.1f} q/s at recall {best['recall']:.4f} "
              f"({best['speedup_vs_exact']:.1f}x exact; {best['method']}, {best['setting']})" if best
              else f"no setting reaches recall {args.target}"))
    if summary.get("ScaNN") and summary.get("faiss"):
        print(f"ScaNN / faiss at recall >= {args.target}: "
              f"{summary['ScaNN']['queries_per_s'] / summary['faiss']['queries_per_s']:.2f}x")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS  : {peak:.0f} MiB (this process)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"data": label, "rows": n, "dim": dim, "queries": len(q), "k": args.k,
                                         "target": args.target, "results": rows, "best": summary}, indent=1))


if __name__ == "__main__":
    main()
