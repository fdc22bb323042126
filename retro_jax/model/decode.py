"""Incremental decoding: the decoder run one position at a time against a key/value cache.

`decode_step(params, tables, cache, tokens_Bx1, t, neighbours)` computes the logits of position
t, the same function of tokens 0..t (and of the neighbours of the chunks completed by then) as
`Retro.apply` on the whole sequence, in O(t) work instead of O(t^2):

- every self-attention layer keeps its keys and values for positions 0..T-1 (T = the cache's
  length); position t writes its own and attends to 0..t;
- the relative-position terms read a table of W_R R(d) for every distance d, projected once
  per parameter set (`position_tables`) rather than per step;
- the first CCA layer keeps the current chunk's activations (after its self-attention); at
  t = u*m + m-1 chunk u is complete, and the caller passes its neighbours: they are encoded
  once (conditioned on those activations, as in training) and every CCA layer stores their
  keys and values. Positions u*m + m-1 .. u*m + 2m-2 read them (row i of the attending chunk
  H+_u at offset m-1+i); positions 0..m-2 read nothing. This is model/cca.py's rule, one row
  at a time.

Parameters are the unrolled layout (model/layout.py converts scanned ones). The code reuses the
model's modules (RMSNorm, FeedForward, Encoder, the embedding) through `apply` on their
parameter subtrees; only the attention of a single query against a cache is written here.
That attention is the same for every `model.attention` mode, and dense on purpose: one query
row against T cached keys is a [B, H, 1, T] score row, linear in T, so there is no N x N tensor
for blocks to avoid, and a loop over key blocks would only add steps to a latency-bound call.
(The encoder it runs uses the model's mode, which for its 2m-token windows resolves to dense.)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from retro_jax.config import ModelConfig
from retro_jax.model.encoder import Encoder
from retro_jax.model.layers import _NEG, FeedForward, RMSNorm, sinusoids

Params = dict[str, Any]


def _layers(cfg: ModelConfig) -> range:
    return range(1, cfg.num_layers + 1)


def _first_cca(cfg: ModelConfig) -> int | None:
    return min(cfg.cca_layers) if cfg.is_retro else None


def _table(p: Params, distances: jax.Array, d_q: int, cfg: ModelConfig) -> jax.Array:
    """W_R R(d) for the given distances: [C, H, Dh], as RelativeAttention computes it."""
    dt = jnp.dtype(cfg.dtype)
    r_CxD = sinusoids(distances, d_q, cfg.max_wavelength).astype(dt)
    return jnp.einsum("cd,dhk->chk", r_CxD, p["wr"].astype(dt))


def position_tables(params: Params, cfg: ModelConfig, max_len: int) -> Params:
    """Per layer, the projected relative-position table of self-attention (distances 0..max_len-1)
    and of CCA (distances m-r .. 2m-2, every (query row, neighbour token) pair of a chunk)."""
    m, r = cfg.chunk_size, cfg.neighbour_len
    out: Params = {"self": {}, "cca": {}}
    for i in _layers(cfg):
        layer = params[f"layer_{i}"]
        out["self"][i] = _table(layer["attn"], jnp.arange(max_len), cfg.d_model, cfg)
        if i in cfg.cca_layers:
            out["cca"][i] = _table(layer["cca"]["attn"], jnp.arange(m - r, 2 * m - 1), cfg.d_model, cfg)
    return out


def init_cache(cfg: ModelConfig, batch: int, max_len: int, retrieval: bool) -> Params:
    """An empty cache for `batch` sequences of up to `max_len` positions."""
    dt = jnp.dtype(cfg.dtype)
    kv = (batch, max_len, cfg.num_heads, cfg.head_dim)
    cache: Params = {"k": {i: jnp.zeros(kv, dt) for i in _layers(cfg)},
                     "v": {i: jnp.zeros(kv, dt) for i in _layers(cfg)}}
    if retrieval and cfg.is_retro:
        kr = cfg.num_neighbours * cfg.neighbour_len
        nkv = (batch, kr, cfg.num_heads, cfg.head_dim)
        cache["chunk_h"] = jnp.zeros((batch, cfg.chunk_size, cfg.d_model), dt)
        cache["cca_k"] = {i: jnp.zeros(nkv, dt) for i in cfg.cca_layers}
        cache["cca_v"] = {i: jnp.zeros(nkv, dt) for i in cfg.cca_layers}
        cache["cca_valid"] = jnp.zeros((batch, kr), bool)
    return cache


def _attend(p: Params, q_Bx1xHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array,
            pos_Bx1xS: jax.Array, mask_BxS: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Softmax over content + position scores of one query; a row with no key allowed gives 0."""
    dt = jnp.dtype(cfg.dtype)
    scale = cfg.head_dim ** -0.5
    logits = jnp.einsum("bqhk,bshk->bhqs", q_Bx1xHxK + (p["u_bias"] * scale).astype(dt), k_BxSxHxK,
                        preferred_element_type=jnp.float32) + pos_Bx1xS
    mask = mask_BxS[:, None, None, :]
    probs = jax.nn.softmax(jnp.where(mask, logits, _NEG), axis=-1)
    probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bhqs,bshk->bqhk", probs.astype(dt), v_BxSxHxK)
    return jnp.einsum("bqhk,hkd->bqd", out, p["wo"].astype(dt))


def _project(x_BxSxD: jax.Array, w: jax.Array, dt: Any, scale: float = 1.0) -> jax.Array:
    return jnp.einsum("bsd,dhk->bshk", x_BxSxD, (w * scale).astype(dt) if scale != 1.0 else w.astype(dt))


def _by_distance(p: Params, q_Bx1xHxK: jax.Array, table_CxHxK: jax.Array, cfg: ModelConfig) -> jax.Array:
    """(q + v) . W_R R(d) for every distance d of the table: [B, H, 1, C]."""
    dt = jnp.dtype(cfg.dtype)
    return jnp.einsum("bqhk,chk->bhqc", q_Bx1xHxK + (p["v_bias"] * cfg.head_dim ** -0.5).astype(dt),
                      table_CxHxK, preferred_element_type=jnp.float32)


def _self_attention(p: Params, y_Bx1xD: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                    table_TxHxK: jax.Array, t: jax.Array, cfg: ModelConfig):
    dt = jnp.dtype(cfg.dtype)
    q = _project(y_Bx1xD, p["wq"], dt, cfg.head_dim ** -0.5)
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, _project(y_Bx1xD, p["wk"], dt), t, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, _project(y_Bx1xD, p["wv"], dt), t, axis=1)
    n = k_cache.shape[1]
    # key j needs distance t - j: reversed, the distances t, t-1, ..., 0 are one contiguous slice
    # (no gather); keys after t read the zero padding and are masked
    by_distance = _by_distance(p, q, table_TxHxK, cfg)
    padded = jnp.concatenate([jnp.flip(by_distance, -1), jnp.zeros_like(by_distance)], axis=-1)
    pos = jax.lax.dynamic_slice_in_dim(padded, n - 1 - t, n, axis=-1)
    mask = jnp.broadcast_to(jnp.arange(n) <= t, (y_Bx1xD.shape[0], n))
    return _attend(p, q, k_cache, v_cache, pos, mask, cfg), k_cache, v_cache


def _cca(p: Params, y_Bx1xD: jax.Array, cache: Params, i: int, table: jax.Array, t: jax.Array,
         cfg: ModelConfig) -> jax.Array:
    """Row (t - (m-1)) mod m of the attending chunk: query offset m-1+row, neighbour token j at j."""
    dt = jnp.dtype(cfg.dtype)
    m, r = cfg.chunk_size, cfg.neighbour_len
    row = (t - (m - 1)) % m
    q = _project(y_Bx1xD, p["wq"], dt, cfg.head_dim ** -0.5)
    j = jnp.tile(jnp.arange(r), cfg.num_neighbours)
    pos = jnp.take(_by_distance(p, q, table, cfg), (m - 1 + row) - j - (m - r), axis=-1)
    out = _attend(p, q, cache["cca_k"][i], cache["cca_v"][i], pos, cache["cca_valid"], cfg)
    return jnp.where(t >= m - 1, out, jnp.zeros_like(out))  # positions 0..m-2 see no neighbours


def _encode(params: Params, neighbours_BxKxR: jax.Array, cache: Params, cfg: ModelConfig) -> Params:
    """Encode the completed chunk's neighbours (conditioned on its activations) and store every
    CCA layer's keys and values of them."""
    dt = jnp.dtype(cfg.dtype)
    b = neighbours_BxKxR.shape[0]
    e, valid = Encoder(cfg).apply({"params": params["encoder"]}, neighbours_BxKxR[:, None], cache["chunk_h"][:, None])
    e_BxKRxE = e.reshape(b, -1, cfg.enc_d_model)
    cache = dict(cache, cca_valid=valid.reshape(b, -1), cca_k=dict(cache["cca_k"]), cca_v=dict(cache["cca_v"]))
    for i in cfg.cca_layers:
        p = params[f"layer_{i}"]["cca"]["attn"]
        cache["cca_k"][i] = _project(e_BxKRxE, p["wk"], dt)
        cache["cca_v"][i] = _project(e_BxKRxE, p["wv"], dt)
    return cache


def decode_step(params: Params, tables: Params, cache: Params, tokens_Bx1: jax.Array, t: jax.Array,
                neighbours_BxKxR: jax.Array | None, *, cfg: ModelConfig,
                retrieval: bool) -> tuple[jax.Array, Params]:
    """(logits [B, V] of position t, the updated cache) for the tokens at position t.

    neighbours_BxKxR: the neighbours of chunk t // m, given exactly when t = u*m + m-1 (chunk u
    complete) and retrieval is on; None otherwise. retrieval=False runs the model with retrieval
    off (no CCA), like `Retro.apply(..., neighbours=None)`."""
    dt = jnp.dtype(cfg.dtype)
    m = cfg.chunk_size
    use_cca = retrieval and cfg.is_retro
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=jnp.float32)
    x = embed.apply({"params": params["embed"]}, tokens_Bx1)
    cache = dict(cache, k=dict(cache["k"]), v=dict(cache["v"]))
    for i in _layers(cfg):
        p = params[f"layer_{i}"]
        y = RMSNorm(cfg.norm_eps, dt).apply({"params": p["attn_norm"]}, x)
        a, cache["k"][i], cache["v"][i] = _self_attention(p["attn"], y, cache["k"][i], cache["v"][i],
                                                          tables["self"][i], t, cfg)
        h = x + a
        if use_cca and i == _first_cca(cfg):
            cache["chunk_h"] = jax.lax.dynamic_update_slice_in_dim(cache["chunk_h"], h, t % m, axis=1)
            if neighbours_BxKxR is not None:
                cache = _encode(params, neighbours_BxKxR, cache, cfg)
        if use_cca and i in cfg.cca_layers:
            y = RMSNorm(cfg.norm_eps, dt).apply({"params": p["cca_norm"]}, h)
            h = h + _cca(p["cca"]["attn"], y, cache, i, tables["cca"][i], t, cfg)
        y = RMSNorm(cfg.norm_eps, dt).apply({"params": p["ffw_norm"]}, h)
        x = h + FeedForward(cfg.d_ff, dtype=dt).apply({"params": p["ffw"]}, y)
    x = RMSNorm(cfg.norm_eps, dt).apply({"params": params["final_norm"]}, x)
    logits = jnp.dot(x[:, 0], params["unembed"].astype(dt), preferred_element_type=jnp.float32)
    return logits, cache
