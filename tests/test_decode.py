"""Cached incremental decoding computes what the full forward pass computes, position by position."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.config import ModelConfig
from retro_jax.model import init_params
from retro_jax.model.decode import decode_step, init_cache, position_tables
from retro_jax.model.retro import Retro

# float32 on CPU: the cached step sums the same products in another order (one query row
# against the cache instead of the whole score matrix); observed differences are ~1e-6.
ATOL, RTOL = 2e-4, 2e-4


def _params(cfg: ModelConfig, seed: int = 0):
    """Random parameters with every term live (the biases start at zero in init)."""
    params = init_params(cfg, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves)


def _decode_all(params, cfg: ModelConfig, tokens: np.ndarray, neighbours: np.ndarray | None) -> np.ndarray:
    """Logits of every position, one cached step at a time (neighbours of chunk u passed at
    t = u*m + m-1, when the chunk is complete)."""
    b, n = tokens.shape
    m = cfg.chunk_size
    retrieval = neighbours is not None
    step = jax.jit(functools.partial(decode_step, cfg=cfg, retrieval=retrieval))
    tables = position_tables(params, cfg, n)
    cache = init_cache(cfg, b, n, retrieval)
    out = []
    for t in range(n):
        nb = neighbours[:, t // m] if retrieval and t % m == m - 1 else None
        logits, cache = step(params, tables, cache, tokens[:, t:t + 1], jnp.int32(t), nb)
        out.append(np.asarray(logits))
    return np.stack(out, axis=1)


@pytest.mark.slow
@pytest.mark.parametrize("preset,retrieval", [("tiny", True), ("tiny", False), ("tiny-baseline", False)])
def test_cached_decoding_matches_the_full_forward_at_every_position(preset, retrieval):
    cfg = dataclasses.replace(ModelConfig.from_preset(preset), scan_layers=False, cca_zero_init=False)
    params = _params(cfg)
    m = cfg.chunk_size
    n = 2 * m + 9  # two chunk boundaries where new neighbours arrive (t = 63, 127), and a partial chunk
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (2, n), dtype=np.int32)
    neighbours = None
    if retrieval:
        neighbours = rng.integers(0, cfg.vocab_size, (2, -(-n // m), cfg.num_neighbours, cfg.neighbour_len),
                                  dtype=np.int32)
        neighbours[0, 1, 1] = -1  # an empty neighbour slot
        neighbours[1, 1, :, 100:] = -1  # continuations cut by a document's end
    full = np.asarray(Retro(cfg).apply({"params": params}, tokens, neighbours))
    cached = _decode_all(params, cfg, tokens, neighbours)
    np.testing.assert_allclose(cached, full, atol=ATOL, rtol=RTOL)
    if retrieval:  # the neighbours matter from position m-1 on, and not before
        off = np.asarray(Retro(cfg).apply({"params": params}, tokens, None))
        np.testing.assert_allclose(full[:, :m - 1], off[:, :m - 1], atol=ATOL, rtol=RTOL)
        assert np.abs(full[:, m - 1:] - off[:, m - 1:]).max() > 100 * ATOL
