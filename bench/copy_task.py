"""Does RETRO read its neighbours? A copy task that only retrieval can solve.

Random tokens, so nothing is predictable from the past; neighbour 0 of chunk u holds the true
tokens that follow chunk u's first token (its "continuation"), neighbour 1 is noise. Positions
0..m-2 can never see a neighbour (CCA is the identity there) and must stay at ln V; from
position m-1 on, the model can copy. Prints the loss curve and the final per-region loss.

    .venv/bin/python bench/copy_task.py [--steps 200]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.config import ModelConfig
from retro_jax.model import init_params
from retro_jax.model.retro import Retro
from retro_jax.runtime.state import TrainState
from retro_jax.train.step import make_optimizer, train_step


def copy_batch(rng: np.random.Generator, cfg: ModelConfig, batch: int, seq_len: int,
               max_shift: int = 0) -> dict[str, np.ndarray]:
    m, v = cfg.chunk_size, cfg.vocab_size
    toks = rng.integers(0, v, (batch, seq_len + 2 * m + max_shift), dtype=np.int32)
    nbrs = rng.integers(0, v, (batch, seq_len // m, 2, 2 * m), dtype=np.int32)
    for u in range(seq_len // m):
        for row, s in enumerate(rng.integers(0, max_shift + 1, batch)):
            nbrs[row, u, 0] = toks[row, u * m + 1 + s: u * m + 1 + s + 2 * m]
    return {"tokens": toks[:, :seq_len], "targets": toks[:, 1:seq_len + 1],
            "loss_mask": np.ones((batch, seq_len), np.float32), "neighbours": nbrs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--max-shift", type=int, default=0,
                    help="start each copied neighbour up to this many tokens late, at random, so "
                         "only matching content (not a fixed position) finds the next token")
    args = ap.parse_args()
    cfg = ModelConfig.from_preset("tiny").replace(vocab_size=256)
    b, n, m = 8, 256, cfg.chunk_size
    rng = np.random.default_rng(0)
    opt = make_optimizer(3e-3)
    state = TrainState.create(init_params(cfg, jax.random.key(0)), opt)
    step = jax.jit(lambda s, x: train_step(s, x, cfg=cfg, optimizer=opt))
    for i in range(args.steps + 1):
        state, metrics = step(state, {k: jnp.asarray(v) for k, v in copy_batch(rng, cfg, b, n, args.max_shift).items()})
        if i % 25 == 0:
            print(f"step {i:4d}  loss {float(metrics['loss']):.3f}", flush=True)
    x = copy_batch(rng, cfg, b, n, args.max_shift)
    logp = jax.nn.log_softmax(Retro(cfg).apply({"params": state.params}, x["tokens"], x["neighbours"]))
    nll = -np.take_along_axis(np.asarray(logp), x["targets"][..., None], -1)[..., 0].mean(0)
    print(f"\nln V = {np.log(cfg.vocab_size):.3f}; loss at positions 0..{m - 2} (no neighbour can reach): "
          f"{nll[:m - 1].mean():.3f}; at positions >= {m - 1}: {nll[m - 1:].mean():.3f}")


if __name__ == "__main__":
    main()
