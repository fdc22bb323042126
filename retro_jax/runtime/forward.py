"""The sharded forward pass: per-token negative log-likelihoods of `Retro(cfg)` on host batches.

Every number a stage reports about a trained model (validation during training, `retro-jax
eval`, the quickstart) comes through `make_nll_fn`, so they cannot disagree.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np
import optax

from retro_jax.config import ModelConfig
from retro_jax.model.retro import Retro
from retro_jax.runtime.mesh import global_batch, local_batch_slice, on_mesh, replicated

# (tokens [B, W] int32, targets [B, W] int32, neighbours [B, ceil(W/m), K, 2m] int32 or None)
#   -> negative log-likelihood of each target in nats, float [B, W]
NllFn = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]


def token_nll(params: Any, tokens: jax.Array, targets: jax.Array, neighbours: jax.Array | None, *,
              cfg: ModelConfig) -> jax.Array:
    """float32 [B, N]: -log p(target) of every position (compute in cfg.dtype, loss in float32)."""
    logits = Retro(cfg).apply({"params": params}, tokens, neighbours)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype("float32"), targets)


@functools.lru_cache(maxsize=16)
def _jitted(cfg: ModelConfig, mesh: jax.sharding.Mesh | None) -> Callable:
    """token_nll jitted once per (model, mesh): repeated validations reuse the compilation."""
    fn = functools.partial(token_nll, cfg=cfg)
    if mesh is None:
        return jax.jit(fn)
    return on_mesh(jax.jit(fn, out_shardings=replicated(mesh)), mesh)


def make_nll_fn(cfg: ModelConfig, params: Any, mesh: jax.sharding.Mesh | None = None) -> NllFn:
    """An NllFn running `Retro(cfg)` with `params`, compiled once per shape; with a mesh, each batch
    is split over its data x fsdp axes (the batch size must divide across them) and every process
    passes the whole host batch (it feeds only its own rows)."""
    jitted = _jitted(cfg, mesh)
    if mesh is None:
        return lambda t, y, nb: np.asarray(jax.device_get(jitted(params, t, y, nb)))

    def call(tokens: np.ndarray, targets: np.ndarray, neighbours: np.ndarray | None) -> np.ndarray:
        rows = local_batch_slice(tokens.shape[0], mesh)
        host = {"tokens": tokens[rows], "targets": targets[rows]}
        if neighbours is not None:
            host["neighbours"] = neighbours[rows]
        batch = global_batch(host, mesh)
        out = jitted(params, batch["tokens"], batch["targets"], batch.get("neighbours"))
        return np.asarray(jax.device_get(out))

    return call
