"""Benchmark the frozen BERT embedder: chunks/s and achieved FLOP/s on chunk-sized Python source.

A RETRO chunk is 64 SentencePiece tokens, about 250 characters of Python source; this embeds
`--n` such slices of the local Python standard library at `--batch-size` and prints the rate,
the FLOP/s counted on padded tokens (what the hardware did) and on real tokens (useful work).
Not collected by pytest; it lives here because tests/data/*bert* is the embedder's corner.

    .venv/bin/python tests/data/bench_bert.py --n 2048 --batch-size 64
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.retrieval.bert import Embedder


def python_source_chunks(n: int, chars: int = 250) -> list[str]:
    """n consecutive `chars`-character slices of the standard library's source."""
    texts: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        src = path.read_text(encoding="utf-8", errors="replace")
        texts += [src[i:i + chars] for i in range(0, len(src) - chars + 1, chars)]
        if len(texts) >= n:
            return texts[:n]
    raise ValueError(f"the standard library holds fewer than {n} chunks of {chars} characters")


def main() -> None:
    """Warm up (compile every bucket), then time one full pass."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--bf16", action="store_true", help="compute in bfloat16")
    args = parser.parse_args()
    emb = Embedder.load(batch_size=args.batch_size,
                        dtype=jnp.bfloat16 if args.bf16 else jnp.float32)
    texts = python_source_chunks(args.n)
    lengths = np.array([len(ids) for ids, _ in emb.tokenize(texts)])
    emb.embed(texts)  # compile all shapes this input needs
    start = time.perf_counter()
    emb.embed(texts, progress=True)
    seconds = time.perf_counter() - start
    order = np.sort(lengths)
    padded = sum(emb.padded_rows(len(b)) * emb.bucket(int(b.max())) * emb.flops_per_token(
        emb.bucket(int(b.max()))) for b in np.split(order, range(emb._rows, len(order), emb._rows)))
    useful = sum(emb.flops_per_token(int(n)) * n for n in lengths)
    print(f"device {jax.devices()[0].device_kind} x{len(jax.local_devices())}, model {emb.name}")
    print(f"{len(texts)} chunks, BERT tokens/chunk median {np.median(lengths):.0f} "
          f"(p95 {np.percentile(lengths, 95):.0f}), batch {args.batch_size}, "
          f"dtype {'bf16' if args.bf16 else 'f32'}")
    print(f"{len(texts) / seconds:.1f} chunks/s, {lengths.sum() / seconds:.0f} tokens/s")
    print(f"{padded / seconds / 1e9:.1f} GFLOP/s on padded tokens, "
          f"{useful / seconds / 1e9:.1f} GFLOP/s useful")


if __name__ == "__main__":
    main()
