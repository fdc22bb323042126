"""faiss IVF-PQ on the same vectors and queries as bench/retrieval.py; run by the PEER's python.

    ../peer-venv/bin/python bench/peer/faiss_search.py --work DIR --k 10 --nlist 1024 --m 96 \
        --nprobe 8 16 32 64 --k-factor 4 25 --sample 250000

Reads DIR/db.npy [N, D] and DIR/queries.npy [Q, D] (float32), builds each index kind below once
(train on the first --sample rows, add all rows) and for every search setting writes the ids it
returns to DIR/faiss-<kind>-<setting>.npy and one JSON line per setting to stdout:
{"method", "setting", "build_s", "search_s", "queries"}. Recall is computed by the caller from
the ids, the same way for every method, so nothing here is trusted for quality.

Index kinds (what retro-pytorch's autofaiss builds is an IVF-PQ of this family):
  ivfpq      IVF<nlist>,PQ<m>x8         8-bit codes, m sub-quantizers (m=96 on 384-d: 96 B/vector)
  ivfpq-fs   IVF<nlist>,PQ<2m>x4fs      4-bit fast-scan codes over 2-d blocks (SIMD look-up tables):
                                        ScaNN's AH layout at 2 dims per block, also 96 B/vector
and each of them with exact re-ranking (IndexRefineFlat, k_factor x k candidates rescored in
float32; k_factor 25 at k 10 rescores 250, as ScaNN's reorder does), the counterpart of ScaNN's reorder step. Search time is the best of --repeats full
passes over the queries after one warm-up pass, with faiss's OpenMP threads (all cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for timing.py
from timing import best_of  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nlist", type=int, required=True)
    p.add_argument("--m", type=int, required=True, help="PQ sub-quantizers")
    p.add_argument("--nprobe", type=int, nargs="+", required=True)
    p.add_argument("--k-factor", type=int, nargs="+", default=[4, 25], help="re-ranked candidates per result")
    p.add_argument("--sample", type=int, default=250_000, help="training rows")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kinds", nargs="+", default=["ivfpq", "ivfpq-fs"])
    args = p.parse_args()
    xb = np.load(args.work / "db.npy", mmap_mode="r")
    xq = np.ascontiguousarray(np.load(args.work / "queries.npy"), np.float32)
    n, d = xb.shape
    print(json.dumps({"faiss": faiss.__version__, "threads": faiss.omp_get_max_threads(), "rows": n}), flush=True)
    for kind in args.kinds:
        spec = f"IVF{args.nlist},PQ{args.m}x8" if kind == "ivfpq" else f"IVF{args.nlist},PQ{2 * args.m}x4fs"
        t0 = time.perf_counter()
        refine = faiss.IndexRefineFlat(faiss.index_factory(d, spec, faiss.METRIC_L2))
        refine.train(np.ascontiguousarray(xb[: args.sample], np.float32))
        for r0 in range(0, n, 100_000):
            refine.add(np.ascontiguousarray(xb[r0 : r0 + 100_000], np.float32))
        build_s = time.perf_counter() - t0
        base = faiss.extract_index_ivf(refine.base_index)
        for nprobe in args.nprobe:
            base.nprobe = nprobe
            for k_factor in (0, *args.k_factor):
                index = refine if k_factor else refine.base_index
                refine.k_factor = max(1, k_factor)
                (_, ids), sec = best_of(lambda: index.search(xq, args.k), args.repeats)
                method = f"faiss {spec}" + (f" + re-rank x{k_factor}" if k_factor else "")
                tag = f"faiss-{kind}-rr{k_factor}-{nprobe}"
                np.save(args.work / f"{tag}.npy", ids.astype(np.int64))
                print(json.dumps({"method": method, "setting": f"nprobe={nprobe}", "ids": f"{tag}.npy",
                                  "build_s": build_s, "search_s": sec, "queries": len(xq)}), flush=True)


if __name__ == "__main__":
    main()
