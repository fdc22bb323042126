"""Exact nearest-neighbour search: blocked brute force by squared L2, in numpy.

The ground truth that recall is measured against, the search of tiny databases and tests,
and the fallback for CPUs that cannot run ScaNN's x86 wheel (retrieval/index.py).
"""

from __future__ import annotations

import numpy as np


def exact_search(
    db_NxD: np.ndarray,
    queries_QxD: np.ndarray,
    k: int,
    *,
    db_block: int = 16_384,
    query_block: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k by squared L2 over a (possibly memory-mapped) database.

    Candidates are chosen with ||q||^2 - 2 q.x + ||x||^2 (float32, BLAS) block by
    block, then the survivors are rescored as sum((q - x)^2), which depends only on
    the pair, so the result does not depend on how rows are blocked or sharded.
    Returns ids int64 [Q, k] (local rows, -1 past the end) and dists float32 [Q, k]
    (inf past the end), sorted by (distance, id).
    """
    n = db_NxD.shape[0]
    nq = queries_QxD.shape[0]
    keep = min(n, k + 8)  # slack for float32 error in the expanded formula
    ids_out = np.full((nq, k), -1, np.int64)
    d_out = np.full((nq, k), np.inf, np.float32)
    for q0 in range(0, nq, query_block):
        q_BxD = np.ascontiguousarray(queries_QxD[q0 : q0 + query_block], dtype=np.float32)
        qn_B = np.einsum("bd,bd->b", q_BxD, q_BxD)
        best_i = np.empty((len(q_BxD), 0), np.int64)
        best_d = np.empty((len(q_BxD), 0), np.float32)
        for x0 in range(0, n, db_block):
            x_NxD = np.ascontiguousarray(db_NxD[x0 : x0 + db_block], dtype=np.float32)
            xn_N = np.einsum("nd,nd->n", x_NxD, x_NxD)
            d_BxN = q_BxD @ x_NxD.T
            d_BxN *= -2.0
            d_BxN += qn_B[:, None]
            d_BxN += xn_N[None, :]
            m = min(keep, d_BxN.shape[1])
            part = np.argpartition(d_BxN, m - 1, axis=1)[:, :m]
            cand_i = np.concatenate([best_i, part + x0], 1)
            cand_d = np.concatenate([best_d, np.take_along_axis(d_BxN, part, 1)], 1)
            m = min(keep, cand_d.shape[1])
            part = np.argpartition(cand_d, m - 1, axis=1)[:, :m]
            best_i = np.take_along_axis(cand_i, part, 1)
            best_d = np.take_along_axis(cand_d, part, 1)
        # Rescore the survivors pair by pair, then order by (distance, id).
        order = np.argsort(best_i, axis=1)  # sorted ids -> sequential-ish memmap reads
        best_i = np.take_along_axis(best_i, order, 1)
        rows = np.asarray(db_NxD[best_i.ravel()], dtype=np.float32).reshape(*best_i.shape, -1)
        exact_d = np.sum(np.square(q_BxD[:, None, :] - rows), axis=-1, dtype=np.float32)
        ids, dists = sort_topk(best_i, exact_d, k)
        ids_out[q0 : q0 + len(q_BxD)] = ids
        d_out[q0 : q0 + len(q_BxD)] = dists
    return ids_out, d_out


def sort_topk(ids_QxM: np.ndarray, d_QxM: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """First k per row by (distance, id); pads with (-1, inf) when M < k."""
    order = np.lexsort((ids_QxM, d_QxM), axis=-1)[:, :k]
    ids = np.take_along_axis(ids_QxM, order, 1)
    d = np.take_along_axis(d_QxM, order, 1)
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        d = np.pad(d, ((0, 0), (0, pad)), constant_values=np.inf)
    return ids.astype(np.int64), d.astype(np.float32)
