"""`retro-jax quickstart`: the preset table, then one jitted train step of `tiny` on random data.

(Once training lands this becomes: build a database, train a tiny RETRO and baseline, evaluate.)
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.config import PAPER_PARAMS_M, PRESETS, ModelConfig
from retro_jax.model import init_params
from retro_jax.model.count import flops_per_token, param_counts
from retro_jax.train.step import TrainState, make_optimizer, train_step


def preset_table() -> str:
    """Markdown table of the presets: shapes, non-embedding/retrieval params, paper's Table 2."""
    rows = ["| preset | d_model | d_ff | heads x head | layers | CCA layers | params (M) | "
            "retrieval (M) | paper (M) | train GFLOPs/token |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, cfg in PRESETS.items():
        c = param_counts(cfg)
        paper = PAPER_PARAMS_M.get(name)
        rows.append(
            f"| {name} | {cfg.d_model} | {cfg.d_ff} | {cfg.num_heads}x{cfg.head_dim} | {cfg.num_layers} | "
            f"{','.join(map(str, cfg.cca_layers)) or '-'} | {c.non_embedding / 1e6:,.1f} | "
            f"{c.retrieval / 1e6:,.1f} | {paper if paper else '-'} | {flops_per_token(cfg) / 1e9:.2f} |")
    return "\n".join(rows)


def random_batch(cfg: ModelConfig, batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens and neighbours of the right shapes (for smoke runs and benchmarks)."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, cfg.vocab_size, (batch, seq_len + 1), dtype=np.int32)
    out = {"tokens": toks[:, :-1], "targets": toks[:, 1:],
           "loss_mask": np.ones((batch, seq_len), np.float32)}
    if cfg.is_retro:
        l = -(-seq_len // cfg.chunk_size)
        out["neighbours"] = rng.integers(0, cfg.vocab_size, (batch, l, cfg.num_neighbours, cfg.neighbour_len),
                                         dtype=np.int32)
    return out


def smoke_step(cfg: ModelConfig, batch: int = 8, seq_len: int = 256, steps: int = 5) -> dict[str, float]:
    """Jit one forward+backward+AdamW step; return first loss and the median step time."""
    params = init_params(cfg, jax.random.key(0), seq_len)
    opt = make_optimizer(2e-4)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params))
    step = jax.jit(lambda s, b: train_step(s, b, cfg=cfg, optimizer=opt), donate_argnums=0)
    data = {k: jnp.asarray(v) for k, v in random_batch(cfg, batch, seq_len).items()}
    t0 = time.perf_counter()
    state, metrics = step(state, data)
    loss = float(metrics["loss"])
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
    return {"loss": loss, "compile_s": compile_s, "step_s": float(np.median(times)),
            "tokens_per_s": batch * seq_len / float(np.median(times))}


def run(out: str | None = None) -> None:
    print("RETRO presets (parameters exclude token embeddings, as in the paper's Table 2)\n")
    print(preset_table())
    cfg = PRESETS["tiny"]
    print(f"\nOne jitted forward+backward+AdamW step of `tiny` (batch 8 x 256 tokens, random tokens "
          f"and {cfg.num_neighbours} random neighbours per chunk) on {jax.devices()[0].platform}:")
    r = smoke_step(cfg)
    print(f"  loss {r['loss']:.3f} (ln V = {np.log(cfg.vocab_size):.3f}), compile {r['compile_s']:.1f} s, "
          f"step {r['step_s'] * 1e3:.0f} ms, {r['tokens_per_s']:,.0f} tokens/s")
