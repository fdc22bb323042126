"""Leakage between evaluation chunks and the database (paper §2.6, Figure 6).

For each evaluation chunk C (a stored chunk of the split: at most m real tokens) and its
nearest database neighbours (each chunk + continuation, 2m tokens, -1 = missing):
  s(C) = length of the longest common token SUBSTRING (contiguous run) between C's real
         tokens and any neighbour; a -1 token matches nothing, so it breaks runs;
  r(C) = s(C) / m   (the paper: s(C) / 64).
bpb(alpha) is the bpb over the chunks with r(C) <= alpha: their summed losses over their
summed bytes. Every r(C) <= 1, so bpb(1) is the plain bpb.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm import tqdm

ALPHAS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)
LEAKAGE_NEIGHBOURS = 10  # the paper's 10 nearest neighbours


def alpha_key(alpha: float) -> str:
    """JSON key of an alpha: '0', '0.125', ..., '1'."""
    return f"{alpha:g}"


def longest_common_substring_batch(a_BxM: np.ndarray, b_BxKxR: np.ndarray) -> np.ndarray:
    """int [B]: for each row, the longest run shared by a[i] and any of b[i, 0..K-1].

    Negative tokens (padding, missing) in either input never match. Dynamic programming over
    the M positions of `a`, vectorised over rows, neighbours and the R positions of `b`."""
    a = np.asarray(a_BxM, np.int64)
    b = np.asarray(b_BxKxR, np.int64)
    if a.ndim != 2 or b.ndim != 3 or a.shape[0] != b.shape[0]:
        raise ValueError(f"need a [B, M] and b [B, K, R]; got {a.shape} and {b.shape}")
    rows, k, r = b.shape
    best = np.zeros(rows, np.int64)
    run = np.zeros((rows, k, r + 1), np.int32)  # run[..., j+1]: common run ending at a[i], b[j]
    b_ok = b >= 0
    for i in range(a.shape[1]):
        ai = a[:, i][:, None, None]
        match = (b == ai) & b_ok & (ai >= 0)
        new = np.zeros_like(run)
        new[..., 1:] = np.where(match, run[..., :-1] + 1, 0)
        run = new
        best = np.maximum(best, run.reshape(rows, -1).max(axis=1))
    return best


def longest_common_substring(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest contiguous token run in both 1-D sequences (negatives never match)."""
    return int(longest_common_substring_batch(np.asarray(a)[None, :], np.asarray(b)[None, None, :])[0])


def overlap_ratios(db: Any, split: str = "validation", k: int = LEAKAGE_NEIGHBOURS, batch_size: int = 2048,
                   progress: bool = False) -> np.ndarray:
    """float [C]: r(C) for every chunk of `split`, against its first k stored neighbours
    (capped at the number stored)."""
    store = db.chunks(split)
    k = min(k, db.neighbours_stored)
    m = store.chunk_size
    C = store.num_chunks
    r_C = np.zeros(C)
    for c0 in tqdm(range(0, C, batch_size), desc="leakage r(C)", unit="batch", disable=not progress):
        ids = np.arange(c0, min(c0 + batch_size, C))
        tokens = np.asarray(store.tokens[ids], np.int64)
        real = np.arange(m)[None, :] < np.asarray(store.lengths[ids], np.int64)[:, None]
        chunk = np.where(real, tokens, -1)
        r_C[ids] = longest_common_substring_batch(chunk, db.neighbour_tokens(split, ids, k)) / m
    return r_C


def bpb_alpha(bits_C: np.ndarray, bytes_C: np.ndarray, r_C: np.ndarray,
              alphas: tuple[float, ...] = ALPHAS) -> dict[str, float | None]:
    """{alpha key: bpb over the chunks with r(C) <= alpha} (None where those hold no byte)."""
    bits_C, bytes_C, r_C = np.asarray(bits_C), np.asarray(bytes_C), np.asarray(r_C)
    out: dict[str, float | None] = {}
    for a in alphas:
        keep = r_C <= a + 1e-12
        n = float(bytes_C[keep].sum())
        out[alpha_key(a)] = float(bits_C[keep].sum()) / n if n else None
    return out


def alpha_counts(bytes_C: np.ndarray, tokens_C: np.ndarray, r_C: np.ndarray,
                 alphas: tuple[float, ...] = ALPHAS) -> dict[str, dict[str, int]]:
    """{alpha key: chunks, tokens and bytes kept by the filter r(C) <= alpha}."""
    out = {}
    for a in alphas:
        keep = np.asarray(r_C) <= a + 1e-12
        out[alpha_key(a)] = {"chunks": int(keep.sum()), "tokens": int(np.asarray(tokens_C)[keep].sum()),
                             "bytes": int(np.asarray(bytes_C)[keep].sum())}
    return out


def histogram(r_C: np.ndarray, bins: int = 16) -> dict[str, list]:
    """Counts of r(C) in `bins` equal bins over [0, 1] (the last bin includes 1), plus how many
    chunks share nothing (r = 0) and how many are copied whole (r = 1)."""
    r_C = np.asarray(r_C)
    counts, edges = np.histogram(r_C, bins=bins, range=(0.0, 1.0))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts],
            "zero": int((r_C == 0).sum()), "one": int((r_C >= 1).sum()),
            "mean": float(r_C.mean()) if r_C.size else None}
