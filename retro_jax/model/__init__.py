"""The RETRO model: layers, chunked cross-attention, encoder, decoder stack.

`init_variables` is the one place the model is initialised; everything that needs the parameter
tree (counting, sharding, restoring, retrofitting, training) starts from it or from
`abstract_variables`, its shapes without memory.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from retro_jax.config import ModelConfig
from retro_jax.model.retro import Retro


def init_variables(cfg: ModelConfig, rng: jax.Array) -> dict:
    """`Retro(cfg).init` on one chunk: parameters boxed in `nn.Partitioned` (logical axis names).

    Parameter shapes do not depend on the sequence length, and the retrieval parameters are
    created even though no neighbours are passed."""
    return Retro(cfg).init(rng, jnp.zeros((1, cfg.chunk_size), jnp.int32), None)


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Plain (unboxed) float32 parameters; `apply` accepts these or the boxed ones."""
    return nn.unbox(init_variables(cfg, rng))["params"]


def abstract_variables(cfg: ModelConfig) -> dict:
    """`init_variables` as ShapeDtypeStructs (jax.eval_shape: nothing is allocated), still boxed."""
    return jax.eval_shape(functools.partial(init_variables, cfg), jax.random.key(0))


def abstract_params(cfg: ModelConfig) -> dict:
    """The parameter tree as plain ShapeDtypeStructs."""
    return nn.unbox(abstract_variables(cfg))["params"]


__all__ = ["ModelConfig", "Retro", "abstract_params", "abstract_variables", "init_params", "init_variables"]
