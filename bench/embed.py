"""Benchmark: the frozen-BERT embedder's chunks/s against its FLOP bound; real chunk embeddings.

    python bench/embed.py                                   # 512 real chunks, 3 reps
    python bench/embed.py --n 2048 --json out/bench/embed.json
    python bench/embed.py --corpus /tmp/emb100k.npy --n 100000   # real embeddings for bench/retrieval.py

The default mode embeds real chunk texts (bench/python_corpus.py) with the real embedder
(all-MiniLM-L6-v2) and times it against a dense f32 matmul, batch by batch alternately, so machine
load hits both. The bound is the analytic ``Embedder.flops_per_token`` work at the matmul's
FLOP/s, counted two ways: without padding (each text's own tokens at its own length: the work a
perfect batcher would do) and as the embedder actually lays batches out (padding included).
``--corpus`` writes ``--n`` real chunk embeddings (shuffled, so a held-out tail is a random
sample) to a .npy, block by block; rerun the same command to resume. Prints figures only:
nothing asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np

from python_corpus import chunk_texts, texts_sha256  # bench/python_corpus.py (this folder)


def _load_embedder(args: argparse.Namespace):
    from retro_jax.retrieval.bert import Embedder

    return Embedder.load(args.embedder, max_length=args.max_length, batch_size=args.batch_size)


def _texts(args: argparse.Namespace, n: int) -> list[str]:
    return chunk_texts(n, chars=args.chars, tokenizer=args.tokenizer)


def _cut_label(args: argparse.Namespace) -> str:
    return f"64 SentencePiece tokens ({args.tokenizer})" if args.tokenizer else f"{args.chars} characters"


def _matmul_flops_per_s(size: int, seconds: float) -> float:
    """Dense f32 [size, size] @ [size, size] FLOP/s under jit, timed for about `seconds`."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    reps, t0 = 0, time.perf_counter()
    while reps == 0 or time.perf_counter() - t0 < seconds:
        f(a, a).block_until_ready()
        reps += 1
    return 2.0 * size**3 * reps / (time.perf_counter() - t0)


def bench_embedding(args: argparse.Namespace) -> dict:
    """Chunks/s of the real embedder on real chunk texts vs its FLOP bound, measured side by side."""
    import jax

    emb = _load_embedder(args)
    n, block = args.n or 4096, args.block
    texts = _texts(args, n)
    lengths = np.array([len(ids) for ids, _ in emb.tokenize(texts)])
    blocks = [texts[b0:b0 + block] for b0 in range(0, n, block)]
    work = [emb.work_flops([int(t) for t in lengths[b0:b0 + block]]) for b0 in range(0, n, block)]
    done_all, useful_all = (sum(w[i] for w in work) for i in (0, 1))
    emb.embed(blocks[0])  # compile the shapes a block needs
    print(f"device    : {jax.devices()[0].device_kind} x{len(jax.local_devices())}   model {emb.name}"
          f"   batch {args.batch_size}   max_length {args.max_length}")
    print(f"texts     : {n} real chunks of Python source, cut at {_cut_label(args)}; BERT tokens/chunk "
          f"median {np.median(lengths):.0f} p95 {np.percentile(lengths, 95):.0f}; embedded {block} per call (build-db's block)")
    print(f"layout    : sorted by length, {args.batch_size} per batch, padded to a multiple of 8 tokens: "
          f"padding adds {done_all / useful_all - 1:.1%} work")
    print(f"work      : {useful_all / n / 1e6:.1f} MFLOP/chunk without padding, {done_all / n / 1e6:.1f} as laid out"
          f" (Embedder.flops_per_token x tokens)")
    # Alternate one block and a matmul burst, pair by pair, so load from other processes hits
    # both timings of a pair; the per-pair ratio is the achieved fraction of the bound.
    pairs = []
    for rep in range(args.reps):
        for texts_b, (done, useful) in zip(blocks, work):
            t0 = time.perf_counter()
            emb.tokenize(texts_b)
            tok_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            emb.embed(texts_b)
            sec = time.perf_counter() - t0
            peak = _matmul_flops_per_s(args.matmul_size, max(0.3, sec / 2))
            pairs.append((len(texts_b), sec, useful / sec / peak, done / sec / peak, tok_s / sec, peak))
        c, sec, frac, frac_done, tok, peak = (np.array(x) for x in zip(*pairs[-len(blocks):]))
        print(f"rep {rep}     : {c.sum() / sec.sum():6.1f} chunks/s   matmul {args.matmul_size}^2 f32 "
              f"{np.median(peak) / 1e9:6.1f} GFLOP/s   {np.median(frac):5.1%} of the bound without padding, "
              f"{np.median(frac_done):5.1%} as laid out (median of {len(c)} pairs)")
    c, sec, frac, frac_done, tok, peak = (np.array(x) for x in zip(*pairs))
    res = {"chunks_per_s": float(c.sum() / sec.sum()), "matmul_flops_per_s": float(np.median(peak)),
           "fraction_of_bound_unpadded": float(np.median(frac)), "fraction_of_bound_as_laid_out": float(np.median(frac_done)),
           "padding_overhead": done_all / useful_all - 1, "tokenize_share": float(np.median(tok)), "texts": n, "block": block, "median_tokens": float(np.median(lengths))}
    print(f"all reps  : {res['chunks_per_s']:.1f} chunks/s = {res['fraction_of_bound_unpadded']:.1%} of the FLOP bound "
          f"without padding ({res['matmul_flops_per_s'] * n / useful_all:.1f} chunks/s at the matmul rate), "
          f"{res['fraction_of_bound_as_laid_out']:.1%} as laid out; tokenizing is {res['tokenize_share']:.1%} of a block's time")
    print(f"peak RSS  : {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return res


def embed_corpus(args: argparse.Namespace) -> None:
    """Write `--n` real chunk embeddings to `--corpus` (.npy), resumable block by block."""
    from tqdm.auto import tqdm

    out = args.corpus
    n, block = args.n or 100_000, args.block
    t0 = time.perf_counter()
    texts = _texts(args, n)
    emb = _load_embedder(args)
    cut = "64 SentencePiece tokens" if args.tokenizer else f"{args.chars} characters"
    settings = {"n": n, "cut": cut, "embedder": emb.name, "max_length": args.max_length,
                "block": block, "texts_sha256": texts_sha256(texts)}
    side = out.with_name(out.name + ".progress.json")
    state = json.loads(side.read_text()) if side.is_file() else None
    if state is None or state["settings"] != settings or not out.is_file():
        if out.is_file():
            print(f"{out} was made with other settings or is incomplete without a record; starting over")
        state = {"settings": settings, "blocks_done": 0}
        np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(n, emb.dim)).flush()
        side.write_text(json.dumps(state))
    print(f"{n} chunk texts ({_cut_label(args)}) ready in {time.perf_counter() - t0:.1f}s; "
          f"{state['blocks_done']} of {-(-n // block)} blocks already done")
    arr = np.lib.format.open_memmap(out, mode="r+")
    bar = tqdm(total=n, initial=min(n, state["blocks_done"] * block), unit="chunk", desc=f"embed {out.name}")
    for b in range(state["blocks_done"], -(-n // block)):
        arr[b * block:(b + 1) * block] = emb.embed(texts[b * block:(b + 1) * block])
        arr.flush()
        state["blocks_done"] = b + 1
        tmp = side.with_name(side.name + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, side)
        bar.update(min(n, (b + 1) * block) - b * block)
    bar.close()
    print(f"wrote float32 [{n}, {emb.dim}] to {out}; now: python bench/retrieval.py --embeddings {out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, metavar="OUT.npy", help="embed --n real chunks into OUT.npy (resumable)")
    p.add_argument("--n", type=int, default=0, help="chunks (default 4096 timed, 100k for --corpus)")
    p.add_argument("--block", type=int, default=1024, help="chunks per embed call (build-db's embed_block)")
    p.add_argument("--embedder", help="Hugging Face BERT folder (default all-MiniLM-L6-v2)")
    p.add_argument("--batch-size", type=int, default=64, help="texts per forward call")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--tokenizer", help="SentencePiece model: cut 64-token chunks (else --chars characters)")
    p.add_argument("--chars", type=int, default=250)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if args.corpus:
        return embed_corpus(args)
    res = bench_embedding(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
