"""Benchmark: decode tokens/s with the key/value cache against recomputing the whole forward pass
per token (what the PyTorch RETROs do), retrieval on, and where a cached token's time goes.

    python bench/generate.py                                  # retro-172m, contexts 512 and 2048
    python bench/generate.py --config tiny --contexts 512 2048 --db out/quickstart/db

Per context C (the sequence holds C tokens when the next one is predicted):
  cached   one `decode_step` (model/decode.py) against a cache of C positions: 63 ordinary steps and
           one chunk-boundary step (which encodes the new neighbours) per 64 tokens, plus the host's
           retrieval for that chunk (BERT embedding + index search), amortised over its 64 tokens
  full     `Retro.apply` over all C tokens with the neighbours of every chunk, for one new token,
           plus the same amortised retrieval; only the last position's logits are computed (the
           final norm's output is captured and only its last row meets the unembedding; the
           model's full logits are dead code that XLA drops), as a real recompute would
           (its XLA FLOPs are printed beside those of all C positions' logits)
The two are timed in alternating rounds (so machine load hits both) and the ratio is full / cached.
Where the time goes: an ordinary step with retrieval off (no CCA) and with a cache of 64 positions
(little attention) beside the full step; the differences are CCA's and self-attention's shares.
Parameters are random (timing does not depend on their values); retrieval uses a real database
(`--db`, default the quickstart's) when one exists. Prints figures only: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.config import ModelConfig
from retro_jax.model import init_params
from retro_jax.model.decode import decode_step, init_cache, position_tables
from retro_jax.model.retro import Retro


def _time(fn, reps: int) -> float:
    """Median seconds of `fn()` (which blocks) over reps calls."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


class Cached:
    """A jitted decode step against a cache of `length` positions, at a position near its end."""

    def __init__(self, params, cfg: ModelConfig, length: int, retrieval: bool) -> None:
        self.params, self.cfg, self.retrieval = params, cfg, retrieval
        self.tables = position_tables(params, cfg, length)
        self.cache = init_cache(cfg, 1, length, retrieval)
        self.step = jax.jit(functools.partial(decode_step, cfg=cfg, retrieval=retrieval), donate_argnums=2)
        self.t = length - 2  # an ordinary position (length is a multiple of 64)
        self.nb = jnp.zeros((1, cfg.num_neighbours, cfg.neighbour_len), jnp.int32) if retrieval else None
        self.token = jnp.zeros((1, 1), jnp.int32)
        self.ordinary(), self.boundary()  # compile both

    def ordinary(self) -> None:
        logits, self.cache = self.step(self.params, self.tables, self.cache, self.token, jnp.int32(self.t), None)
        logits.block_until_ready()

    def boundary(self) -> None:
        if self.nb is None:
            return self.ordinary()
        t = jnp.int32(self.t - (self.t % 64) - 1)
        logits, self.cache = self.step(self.params, self.tables, self.cache, self.token, t, self.nb)
        logits.block_until_ready()


def full_recompute(cfg: ModelConfig):
    """Jitted (params, tokens [1, C], neighbours) -> float32 [1, V]: the whole forward over the
    context, and the logits of its last position only (what predicting the next token needs)."""

    def last_logits(params, tokens_BxN, neighbours):
        _, state = Retro(cfg).apply({"params": params}, tokens_BxN, neighbours, mutable=["intermediates"],
                                    capture_intermediates=lambda module, _: module.name == "final_norm")
        h_BxD = state["intermediates"]["final_norm"]["__call__"][0][:, -1]
        return jnp.dot(h_BxD, params["unembed"].astype(h_BxD.dtype), preferred_element_type=jnp.float32)

    return jax.jit(last_logits)


def retrieval_seconds_per_chunk(db_dir: str | None, k: int, chunks: int = 64) -> tuple[float, str]:
    """Host seconds to retrieve one chunk's neighbours (decode, BERT-embed, search, gather), one
    chunk per call as generation does, on real validation chunks of a database."""
    if not db_dir or not Path(db_dir, "manifest.json").is_file():
        return 0.0, "no database: retrieval not timed (pass --db)"
    from retro_jax.retrieval.database import Database, Retriever

    db = Database.open(db_dir)
    r = Retriever(db)
    store = db.validation
    rows = [np.asarray(store.tokens[i], np.int32) for i in range(min(chunks, len(store)))]
    r.neighbours_for_chunks(rows[0][None], k)  # compile the embedder's bucket
    t = [_time(lambda row=row: r.neighbours_for_chunks(row[None], k), 1) for row in rows]
    return statistics.median(t), f"{db_dir}: {len(db.train):,} chunks, embedder {r.embedder.name}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="retro-172m", help="model preset (default retro-172m)")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048], help="tokens of context")
    p.add_argument("--db", default="out/quickstart/db", help="database for timing live retrieval")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of full vs cached")
    p.add_argument("--steps", type=int, default=16, help="cached steps timed per round")
    p.add_argument("--json", type=Path, help="also write the table here")
    args = p.parse_args()

    cfg = dataclasses.replace(ModelConfig.from_preset(args.config), scan_layers=False, dtype="float32")
    params = init_params(cfg, jax.random.key(0))
    m, k = cfg.chunk_size, cfg.num_neighbours
    ret_s, ret_label = retrieval_seconds_per_chunk(args.db, k)
    print(f"device   : {jax.devices()[0].device_kind} x{len(jax.devices())}; {cfg.name} ({cfg.d_model} wide, "
          f"{cfg.num_layers} layers, CCA {list(cfg.cca_layers)}), float32, batch 1, {k} neighbours per chunk")
    print(f"retrieval: {ret_s * 1e3:.1f} ms per chunk (BERT embedding + search, on the host), {ret_label}")
    full_fn = full_recompute(cfg)
    all_logits_fn = jax.jit(lambda p, x, n: Retro(cfg).apply({"params": p}, x, n))  # for its FLOPs only
    rows = []
    for c in args.contexts:
        if c % m:
            sys.exit(f"--contexts must be multiples of {m}")
        tokens = jnp.zeros((1, c), jnp.int32)
        nb = jnp.zeros((1, c // m, k, cfg.neighbour_len), jnp.int32) if cfg.is_retro else None
        full_c = full_fn.lower(params, tokens, nb).compile()
        flops = float(full_c.cost_analysis()["flops"])  # after XLA dropped the dead logits
        flops_all = float(all_logits_fn.lower(params, tokens, nb).cost_analysis()["flops"])  # not compiled
        on = Cached(params, cfg, c, retrieval=cfg.is_retro)
        off = Cached(params, cfg, c, retrieval=False)
        short = Cached(params, cfg, 2 * m, retrieval=False)
        times: dict[str, list[float]] = {"full": [], "ordinary": [], "boundary": [], "no_cca": [], "short": []}
        for _ in range(args.rounds):  # alternate, so load from other processes hits every figure
            times["full"].append(_time(lambda: full_c(params, tokens, nb).block_until_ready(), 1))
            times["ordinary"].append(_time(on.ordinary, args.steps))
            times["boundary"].append(_time(on.boundary, 2))
            times["no_cca"].append(_time(off.ordinary, args.steps))
            times["short"].append(_time(short.ordinary, args.steps))
        full, ordinary, boundary, no_cca, little_attn = (statistics.median(times[k]) for k in times)
        cached = ((m - 1) * ordinary + boundary) / m + ret_s / m
        full_tok = full + ret_s / m
        rows.append((c, full_tok, cached, flops))
        print(f"\ncontext {c}: cached {1 / cached:,.1f} tokens/s vs full recompute {1 / full_tok:,.2f} tokens/s: "
              f"{full_tok / cached:,.1f}x")
        print(f"  per cached token {cached * 1e3:.2f} ms = ordinary step {ordinary * 1e3:.2f} ms x 63/64 "
              f"+ boundary step {boundary * 1e3:.2f} ms / 64 + retrieval {ret_s * 1e3:.1f} ms / 64")
        print(f"  ordinary step: {ordinary * 1e3:.2f} ms; without CCA {no_cca * 1e3:.2f} ms (CCA "
              f"{max(ordinary - no_cca, 0) * 1e3:.2f} ms); without CCA and a {2 * m}-position cache "
              f"{little_attn * 1e3:.2f} ms (self-attention over the {c}-position cache "
              f"{max(no_cca - little_attn, 0) * 1e3:.2f} ms); the rest is the projections, FFW and logits")
        print(f"  boundary step extra (encoding {k} neighbours, CCA keys/values): {(boundary - ordinary) * 1e3:.2f} ms;"
              f" retrieval on the host {ret_s * 1e3:.1f} ms per chunk")
        print(f"  full recompute: {full:.3f} s per token (the forward over {c} tokens, the last position's "
              f"logits): {flops / 1e9:,.1f} GFLOP (XLA), against {flops_all / 1e9:,.1f} GFLOP with every "
              f"position's logits")
    print("\n| context | cached tokens/s | full-recompute tokens/s | speed-up |\n|---|---|---|---|")
    for c, full_tok, cached, *_ in rows:
        print(f"| {c} | {1 / cached:,.1f} | {1 / full_tok:,.2f} | {full_tok / cached:,.1f}x |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": cfg.name, "retrieval": ret_label, "contexts": [
            {"context": c, "cached_tokens_per_s": 1 / cached, "full_tokens_per_s": 1 / full_tok,
             "speedup": full_tok / cached, "full_gflop": flops / 1e9} for c, full_tok, cached, flops in rows]},
            indent=1))


if __name__ == "__main__":
    main()
