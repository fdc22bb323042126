"""The RETRO model: layers, chunked cross-attention, encoder, decoder stack."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from retro_jax.config import ModelConfig
from retro_jax.model.retro import Retro


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int | None = None):
    """Plain (unboxed) float32 parameters for callers who do not shard.

    `Retro(cfg).init` returns parameters boxed in `nn.Partitioned` (they carry logical axis
    names for sharding); `apply` accepts either form and `nn.unbox` strips the boxes.
    """
    n = seq_len or cfg.chunk_size
    tokens = jnp.zeros((1, n), jnp.int32)
    return nn.unbox(Retro(cfg).init(rng, tokens, None))["params"]


__all__ = ["ModelConfig", "Retro", "init_params"]
