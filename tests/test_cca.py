"""Chunked cross-attention in isolation: the attending chunk layout of RETRO's Listing 1."""

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.config import ModelConfig
from retro_jax.model.cca import ChunkedCrossAttention

CFG = ModelConfig.from_preset("tiny").replace(chunk_size=8, num_heads=2, head_dim=8, d_model=16,
                                               enc_d_model=12, cca_zero_init=False)
M, L, K, R = CFG.chunk_size, 3, 2, 2 * CFG.chunk_size


def _setup():
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(1, L * M, CFG.d_model)), jnp.float32)
    e = jnp.asarray(rng.normal(size=(1, L, K, R, CFG.enc_d_model)), jnp.float32)
    valid = jnp.ones((1, L, K, R), bool)
    cca = ChunkedCrossAttention(CFG)
    params = cca.init(jax.random.key(0), h, e, valid)
    return jax.jit(lambda h, e, v: cca.apply(params, h, e, v)), h, e, valid


def test_row_t_is_the_query_of_position_t_and_sees_only_finished_chunks():
    """out[t] depends on h[t] itself (the query is position t, not a neighbour of it), on no
    other position of h, and on E_u exactly for the chunks u with u*m + m-1 <= t < (u+1)*m + m-1."""
    f, h, e, valid = _setup()
    base = np.asarray(f(h, e, valid))
    assert np.all(base[0, :M - 1] == 0), "positions 0..m-2 must attend to nothing"
    for t in range(L * M):
        dh = np.asarray(f(h.at[0, t].add(1.0), e, valid))
        changed = np.flatnonzero(np.abs(dh - base).max(-1)[0] > 1e-6)
        expect = [t] if t >= M - 1 else []
        assert list(changed) == expect, (t, changed)
    for u in range(L):
        de = np.asarray(f(h, e.at[0, u].add(1.0), valid))
        changed = np.flatnonzero(np.abs(de - base).max(-1)[0] > 1e-6)
        lo = u * M + M - 1
        assert list(changed) == list(range(lo, min(lo + M, L * M))), (u, changed)


def test_fully_masked_chunk_is_identity():
    f, h, e, valid = _setup()
    out = np.asarray(f(h, e, valid.at[0, 1].set(False)))
    assert np.all(out[0, 2 * M - 1:3 * M - 1] == 0)
    assert np.abs(out[0, M - 1:2 * M - 1]).max() > 0


def test_skew_equals_gather():
    """The pad/reshape relative shift picks p[i, i - j + shift] (checked against a gather)."""
    from retro_jax.model.layers import skew

    rng = np.random.default_rng(1)
    for q, k, shift in [(5, 5, 0), (4, 7, 6), (3, 9, 8), (6, 2, 1)]:
        c = q + k - 1 if shift else q
        p = rng.normal(size=(2, q, c)).astype(np.float32)
        out = np.asarray(skew(jnp.asarray(p), k, shift))
        for i in range(q):
            for j in range(k):
                col = i - j + shift
                if 0 <= col < c:
                    assert out[0, i, j] == p[0, i, col] and out[1, i, j] == p[1, i, col]
