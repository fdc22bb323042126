"""The strip schedule of blocked_attention.py: each query block against its whole key range at once.

For at most MAX_STRIPS query blocks (every length the model trains at by default) this beats the
tile loop on XLA:CPU: no loop, each strip's scores [H*B, t, keys] exist only inside the strip
(causal: keys up to the strip's last row), and the backward recomputes them from the saved
logsumexp, as the tile loop's does. Semantics and arguments: blocked_attention.py.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

_NEG = -1e30  # finite "minus infinity", as layers.py: a fully masked row stays NaN-free
_F32 = jnp.float32

# ---------------------------------------------------------------------------------------------
# The strip schedule: each query block against its whole key range at once.
# Layout [H*B, L, Dh] (H major): every product is a plain batched matmul with one batch axis,
# and the position term a matmul per head over all B*t rows, which XLA:CPU's fast dot paths
# take (two batch axes, or a contraction over two axes, fell to a path 10-20x slower).

class _Strip(NamedTuple):
    lo: int  # first query row
    t: int  # query rows
    keys: int  # keys 0..keys-1 (causal: up to the block's last row)
    period: int  # keys per period (the band is skewed to one period, added to each)
    row0: int  # first row of the band in the reversed table
    width: int  # band rows: distances d_max .. d_max - width + 1


class _Layout(NamedTuple):
    strips: tuple[_Strip, ...]
    causal: bool
    heads: int


def _strips(plan, q_len: int, k_len: int) -> tuple[tuple[_Strip, ...], int]:
    """The static strips and the largest distance (the reversed table's row 0)."""
    out = []
    for lo in range(0, q_len, plan.block_q):
        t = min(plan.block_q, q_len - lo)
        keys, period = (lo + t, lo + t) if plan.causal else (k_len, plan.k_period)
        d_max = plan.q_offset + lo % plan.q_period - plan.k_offset + t - 1
        # Causal: only distances >= 0 are read (the extra row, distance -1, is masked).
        width = keys + 1 if plan.causal else max(period + t - 1, period + 1)
        out.append((lo, t, keys, period, d_max, width))
    top = max(s[4] for s in out)
    return tuple(_Strip(lo, t, keys, p, top - d, w) for lo, t, keys, p, d, w in out), top


def _shift(p_NxTxW: jax.Array, t: int, keys: int) -> jax.Array:
    """out[n, a, j] = p[n, a, j - a + t - 1] (j < keys) by slice/reshape: Transformer-XL's shift
    on a band whose columns run from the largest distance down, so no flip is needed."""
    n, _, w = p_NxTxW.shape
    seg = jax.lax.slice_in_dim(p_NxTxW.reshape(n, t * w), t - 1, t - 1 + t * (w - 1), axis=1)
    return seg.reshape(n, t, w - 1)[..., :keys]


def _unshift(ds_NxTxK: jax.Array, t: int, w: int) -> jax.Array:
    """The transpose of _shift: each score's cotangent back to its band entry."""
    n, _, keys = ds_NxTxK.shape
    flat = jnp.pad(ds_NxTxK, ((0, 0), (0, 0), (0, w - 1 - keys))).reshape(n, t * (w - 1))
    return jnp.pad(flat, ((0, 0), (t - 1, 1))).reshape(n, t, w)


def _strip_attention_call(plan, q, k, v, u, w, r, key_valid):
    """[B, L, H, Dh] in and out; the strips run on [H*B, L, Dh]."""
    b, q_len, h, dh = q.shape
    k_len, c, dt = k.shape[1], r.shape[0], q.dtype
    strips, top = _strips(plan, q_len, k_len)
    bottom = min(top - s.row0 - s.width + 1 for s in strips)
    # The table reversed: row i holds distance top - i, for top .. bottom (zeros outside r).
    lo, hi = plan.r_base, plan.r_base + c - 1
    table = jnp.pad(r.astype(dt), ((max(0, lo - bottom), max(0, top - hi)), (0, 0), (0, 0)))
    start = max(0, lo - bottom) + bottom - lo
    table = table[start:start + top - bottom + 1][::-1].transpose(1, 0, 2)  # [H, rows, Dh]
    valid = None
    if key_valid is not None:  # [H*B, 1, K], the same for every head
        valid = jnp.broadcast_to(key_valid.astype(bool), (b, k_len))
        valid = jnp.broadcast_to(valid[None], (h, b, k_len)).reshape(h * b, 1, k_len)
    hb = lambda x: x.astype(dt).transpose(2, 0, 1, 3).reshape(h * b, -1, dh)  # noqa: E731
    rep = lambda x: jnp.repeat(x.astype(dt), b, axis=0)[:, None]  # noqa: E731  [H, Dh] -> [H*B, 1, Dh]
    out = _strip_attention(_Layout(strips, plan.causal, h), hb(q), hb(k), hb(v), rep(u), rep(w),
                           table, valid)
    return out.reshape(h, b, q_len, dh).transpose(1, 2, 0, 3)


def _per_head(x_NxTxX: jax.Array, h: int) -> jax.Array:
    """[H*B, t, X] -> [H, B*t, X] (a bitcast: H is the major axis)."""
    return x_NxTxX.reshape(h, -1, x_NxTxX.shape[-1])


def _strip_scores(strip, layout, qu, qw, k, table, valid):
    """One strip's scores [H*B, t, keys] (float32, masked to _NEG), its mask (None: every
    entry that matters is kept by _NEG alone) and its band [H, width, Dh]."""
    t, keys, period, h = strip.t, strip.keys, strip.period, layout.heads
    s = jnp.einsum("nqd,nkd->nqk", qu, k[:, :keys], preferred_element_type=_F32)
    band = table[:, strip.row0:strip.row0 + strip.width]
    pos = jnp.einsum("hmd,hwd->hmw", _per_head(qw, h), band, preferred_element_type=_F32)
    pos = _shift(pos.reshape(qw.shape[0], t, strip.width), t, period)
    s = (s.reshape(*s.shape[:2], keys // period, period) + pos[..., None, :]).reshape(s.shape)
    allowed = None if valid is None else valid[..., :keys]
    if layout.causal:  # alone, it leaves every row its diagonal: exp(_NEG - max) is 0, no mask
        tri = (strip.lo + jnp.arange(t))[:, None] >= jnp.arange(keys)[None, :]
        s = jnp.where(tri, s, _NEG)
        allowed = None if allowed is None else allowed & tri
    if allowed is not None:
        s = jnp.where(allowed, s, _NEG)
    return s, allowed, band


def _strip_forward(layout, q, k, v, u, w, table, valid):
    dt = q.dtype
    outs, lses = [], []
    for st in layout.strips:
        q_i = q[:, st.lo:st.lo + st.t]
        s, allowed, _ = _strip_scores(st, layout, q_i + u, q_i + w, k, table, valid)
        m = s.max(-1, keepdims=True)
        p = jnp.exp(s - m)
        if allowed is not None:
            p = jnp.where(allowed, p, 0.0)
        l = p.sum(-1, keepdims=True)
        acc = jnp.einsum("nqk,nkd->nqd", p.astype(dt), v[:, :st.keys], preferred_element_type=_F32)
        some = l != 0  # a row with no allowed key: zero output (a NaN row stays NaN)
        l_safe = jnp.where(some, l, 1.0)
        outs.append(jnp.where(some, acc / l_safe, 0.0).astype(dt))
        lses.append(jnp.where(some, m + jnp.log(l_safe), 0.0)[..., 0])
    return jnp.concatenate(outs, 1), jnp.concatenate(lses, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _strip_attention(layout, q, k, v, u, w, table, valid):
    return _strip_forward(layout, q, k, v, u, w, table, valid)[0]


def _strip_attention_fwd(layout, q, k, v, u, w, table, valid):
    out, lse = _strip_forward(layout, q, k, v, u, w, table, valid)
    return out, (q, k, v, u, w, table, valid, out, lse)


def _strip_attention_bwd(layout, res, d_out):
    """Per strip, FlashAttention-2's backward from the recomputed scores and the saved lse."""
    q, k, v, u, w, table, valid, out, lse = res
    dt, h = q.dtype, layout.heads
    delta = jnp.sum(d_out.astype(_F32) * out.astype(_F32), axis=-1)  # [H*B, Q]
    # dk, dv and the table's gradient are accumulated transposed ([.., Dh, keys]): XLA:CPU runs
    # a product that contracts the query rows 3x faster when its output is laid out that way.
    dk_t = jnp.zeros((k.shape[0], k.shape[2], k.shape[1]), _F32)
    dv_t = jnp.zeros(dk_t.shape, _F32)
    d_table_t = jnp.zeros((h, table.shape[2], table.shape[1]), _F32)
    dqus, dqws = [], []
    for st in layout.strips:
        rows, keys = slice(st.lo, st.lo + st.t), st.keys
        q_i, do_i = q[:, rows], d_out[:, rows].astype(dt)
        qu, qw = q_i + u, q_i + w
        s, allowed, band = _strip_scores(st, layout, qu, qw, k, table, valid)
        p = jnp.exp(s - lse[:, rows, None])
        if allowed is not None:
            p = jnp.where(allowed, p, 0.0)
        dv_t = dv_t.at[..., :keys].add(jnp.einsum("nqd,nqk->ndk", do_i, p.astype(dt),
                                                  preferred_element_type=_F32))
        dp = jnp.einsum("nqd,nkd->nqk", do_i, v[:, :keys], preferred_element_type=_F32)
        ds = p * (dp - delta[:, rows, None])
        d_pos32 = _unshift(ds.reshape(*ds.shape[:2], keys // st.period, st.period).sum(2),
                           st.t, st.width)
        ds = ds.astype(dt)
        dqus.append(jnp.einsum("nqk,nkd->nqd", ds, k[:, :keys], preferred_element_type=_F32))
        dk_t = dk_t.at[..., :keys].add(jnp.einsum("nqd,nqk->ndk", qu, ds,
                                                  preferred_element_type=_F32))
        dqw = jnp.einsum("hmw,hwd->hmd", _per_head(d_pos32.astype(dt), h), band,
                         preferred_element_type=_F32)
        dqws.append(dqw.reshape(q_i.shape))
        # The table's gradient sums over every query row: its cotangent stays float32.
        d_band_t = jnp.einsum("hmd,hmw->hdw", _per_head(qw.astype(_F32), h), _per_head(d_pos32, h))
        d_table_t = d_table_t.at[..., st.row0:st.row0 + st.width].add(d_band_t)
    dqu, dqw = jnp.concatenate(dqus, 1), jnp.concatenate(dqws, 1)
    return ((dqu + dqw).astype(dt), dk_t.swapaxes(1, 2).astype(dt), dv_t.swapaxes(1, 2).astype(dt),
            dqu.sum(1, keepdims=True).astype(u.dtype), dqw.sum(1, keepdims=True).astype(w.dtype),
            d_table_t.swapaxes(1, 2).astype(table.dtype), None)


_strip_attention.defvjp(_strip_attention_fwd, _strip_attention_bwd)
