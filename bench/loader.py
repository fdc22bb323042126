"""Host input pipeline alone: tokens/s of the training loader (tokens, targets, masks and 2
neighbours x 128 tokens per 64-token chunk gathered from the memory-mapped database), to compare
with an accelerator's step rate.

    .venv/bin/python bench/loader.py [--db out/quickstart/db] [--seq-len 2048] [--batch 64] [--batches 50]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from retro_jax.retrieval.database import Database
from retro_jax.train.loader import TrainLoader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", default="out/quickstart/db")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=64, help="sequences per batch (at most the split's sequences)")
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--neighbours", type=int, default=2)
    args = ap.parse_args()
    db = Database.open(args.db)
    loader = TrainLoader(db, "train", args.seq_len, args.batch, args.neighbours, seed=0)
    next(loader)  # warm the page cache once, as a long run would
    times = []
    for _ in range(args.batches):
        t0 = time.perf_counter()
        batch = next(loader)
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    tokens = args.batch * args.seq_len
    nbytes = sum(v.nbytes for v in batch.values())
    print(f"{args.batch} x {args.seq_len} tokens with {args.neighbours} neighbours per chunk: {t * 1e3:.1f} ms per "
          f"batch (median of {args.batches}), {tokens / t:,.0f} tokens/s, {nbytes / t / 2**20:,.0f} MiB/s of arrays "
          f"on one host thread")


if __name__ == "__main__":
    main()
