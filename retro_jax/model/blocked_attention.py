"""Relative attention computed block by block: never an [N, N] tensor, forward or backward.

The same function as `RelativeAttention` in layers.py after its projections (Transformer-XL,
Dai et al. 2019, eq. 4):
  score(i, j) = (q_i + u) . k_j  +  (q_i + v) . r[d(i, j) - r_base],   d(i, j) = pos(i) - pos(j)
  out_i = sum_j softmax_j(score(i, j) over the allowed j) v_j   (0 when no j is allowed)
where q is already scaled by Dh^-0.5 (and so are u and v), and r [C, H, Dh] is the projected
sinusoid table W_R R(d) for the distances r_base .. r_base + C - 1 (`distance_span` gives the
ones layers.py encodes).

Two schedules, one function; both skip causal blocks above the diagonal, and both have a
custom VJP whose backward recomputes the scores from q, k, v, r and the saved per-row
logsumexp (residuals: the inputs, the output and that logsumexp, O(N), never O(N^2)):
- strips (up to MAX_STRIPS query blocks, the model's lengths): each query block of Tq rows
  against its whole key range at once (causal: keys up to its last row), a plain softmax, no
  loop; the position term is the block times the Tq + period - 1 distances it spans (causal: the
  keys' count), skewed by slice/reshape on a table reversed once (no flip). Temporaries
  [H, B, Tq, K]: linear in the length for a fixed block. Faster on XLA:CPU than the tiles, whose
  loop runs many small ops per tile.
- tiles (longer): FlashAttention's loop, queries in blocks of Tq, keys in blocks of Tk
  (lengths that are not multiples padded, the padded keys masked); per block pair only the
  band of Tq + Tk - 1 distances, skewed inside the tile by layers.skew; an online softmax
  across key blocks (running max and sum in float32); causal key blocks entirely above the
  diagonal never visited (the key loop stops at the diagonal block). Temporaries [B, H, Tq, Tk].

Masks are what the model needs and no more: `causal` and a per-key validity [B, K] (padding,
missing neighbours). Positions: query row i sits at q_offset + (i mod q_period), key j at
k_offset + (j mod k_period), as in layers.py; a period shorter than its length must be a
multiple of the block size, so that each block lies inside one period.
Offsets are Python ints here (the decode step's traced offset is a later step).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.model.blocked_strips import _strip_attention_call
from retro_jax.model.layers import skew

_NEG = -1e30  # finite "minus infinity", as layers.py: a fully masked row stays NaN-free
_F32 = jnp.float32
MAX_STRIPS = 16  # query blocks up to which the strip schedule runs (below); the tile loop past it


class _Plan(NamedTuple):
    """The static layout of one call (hashable: the custom VJP's non-differentiable argument)."""

    block_q: int
    block_k: int
    q_offset: int
    k_offset: int
    q_period: int
    k_period: int
    causal: bool
    pad_front: int  # r's row 0 (distance r_base) sits at row pad_front of the padded table
    r_base: int


def distance_span(q_len: int, k_len: int, *, q_offset: int = 0, k_offset: int = 0,
                  q_period: int | None = None, k_period: int | None = None,
                  causal: bool = False) -> tuple[int, int]:
    """(r_base, count): the distances RelativeAttention encodes for these positions.

    Causal self-attention needs 0 .. n-1; otherwise every signed distance between a query and
    a key period: (q_offset - k_offset) - (kp - 1) .. (q_offset - k_offset) + (qp - 1)."""
    qp, kp = q_period or q_len, k_period or k_len
    if causal:
        return 0, qp
    return (q_offset - k_offset) - (kp - 1), qp + kp - 1


def check_layout(who: str, q_len: int, k_len: int, c: int, r_base: int, causal: bool,
                 q_offset: int, k_offset: int, q_period: int | None, k_period: int | None,
                 tq: int, tk: int) -> tuple[int, int]:
    """The layout rules every computation of this function shares (blocked, and both Pallas
    kernels, each naming itself as `who`): one-line ValueErrors; returns the periods (qp, kp).

    tq, tk: the block sizes the caller settled on (its own rules: powers of two for Triton,
    multiples of 8 for Mosaic)."""
    if not all(isinstance(x, (int, np.integer)) for x in (q_offset, k_offset, r_base)):
        raise ValueError(f"{who}: q_offset, k_offset and r_base must be Python ints")
    qp, kp = q_period or q_len, k_period or k_len
    if q_len % qp or k_len % kp:
        raise ValueError(f"{who}: periods ({qp}, {kp}) must divide the lengths "
                         f"({q_len}, {k_len})")
    for name, t, period, n in (("query", tq, qp, q_len), ("key", tk, kp, k_len)):
        if period != n and period % t:
            raise ValueError(f"{who}: the {name} block {t} must divide the {name} period "
                             f"{period} (shorter than the length {n})")
    if causal and (qp != q_len or kp != k_len or q_len != k_len or q_offset != k_offset):
        raise ValueError(f"{who}: causal needs identical query/key positions "
                         "(same length and offset, no periods)")
    lo, n_dist = distance_span(q_len, k_len, q_offset=q_offset, k_offset=k_offset,
                               q_period=qp, k_period=kp, causal=causal)
    if r_base > lo or r_base + c < lo + n_dist:
        raise ValueError(f"{who}: r covers distances {r_base}..{r_base + c - 1} but these "
                         f"positions need {lo}..{lo + n_dist - 1}")
    return qp, kp


def blocked_relative_attention(
        q_BxQxHxDh: jax.Array, k_BxKxHxDh: jax.Array, v_BxKxHxDh: jax.Array,
        u_HxDh: jax.Array, vbias_HxDh: jax.Array, r_CxHxDh: jax.Array, *, r_base: int,
        causal: bool = False, key_valid_BxK: jax.Array | None = None,
        q_offset: int = 0, k_offset: int = 0, q_period: int | None = None,
        k_period: int | None = None, block_q: int = 128, block_k: int = 128) -> jax.Array:
    """Attention output [B, Q, H, Dh] (before the output projection), as RelativeAttention.

    q is projected and scaled (x W_Q Dh^-0.5); u and vbias are the scaled biases; r holds the
    projected table for distances r_base .. r_base + C - 1. key_valid: bool [B, K], True =
    may be attended. A block larger than its length shrinks to the length."""
    b, q_len, h, dh = q_BxQxHxDh.shape
    k_len = k_BxKxHxDh.shape[1]
    if k_BxKxHxDh.shape != (b, k_len, h, dh) or v_BxKxHxDh.shape != k_BxKxHxDh.shape:
        raise ValueError(f"blocked attention: q {q_BxQxHxDh.shape}, k {k_BxKxHxDh.shape} and "
                         f"v {v_BxKxHxDh.shape} must be [B, len, H, Dh] with the same B, H, Dh")
    if r_CxHxDh.ndim != 3 or r_CxHxDh.shape[1:] != (h, dh):
        raise ValueError(f"blocked attention: r {r_CxHxDh.shape} must be [C, {h}, {dh}]")
    plan, nq, nk = _make_plan(q_len, k_len, r_CxHxDh.shape[0], r_base, causal, q_offset,
                              k_offset, q_period, k_period, block_q, block_k)
    tq, tk = plan.block_q, plan.block_k
    dt = q_BxQxHxDh.dtype
    if nq <= MAX_STRIPS:
        return _strip_attention_call(plan, q_BxQxHxDh, k_BxKxHxDh, v_BxKxHxDh, u_HxDh, vbias_HxDh,
                                     r_CxHxDh, key_valid_BxK)
    if key_valid_BxK is None:
        key_valid_BxK = jnp.ones((b, k_len), bool)
    key_valid_BxK = jnp.broadcast_to(key_valid_BxK.astype(bool), (b, k_len))

    def blocks(x, n, t):  # [B, L, H, Dh] -> [n, B, H, t, Dh], the length padded to n * t
        x = jnp.pad(x.astype(dt), ((0, 0), (0, n * t - x.shape[1]), (0, 0), (0, 0)))
        return x.reshape(b, n, t, h, dh).transpose(1, 0, 3, 2, 4)

    valid_NkxBxTk = jnp.pad(key_valid_BxK, ((0, 0), (0, nk * tk - k_len)))
    valid_NkxBxTk = valid_NkxBxTk.reshape(b, nk, tk).transpose(1, 0, 2)
    c = r_CxHxDh.shape[0]
    starts = _band_starts(plan, nq, nk)
    pad_back = max(0, int(starts.max()) + tq + tk - 1 - (plan.pad_front + c))
    r_pad = jnp.pad(r_CxHxDh.astype(dt), ((plan.pad_front, pad_back), (0, 0), (0, 0)))
    out = _attention(plan, blocks(q_BxQxHxDh, nq, tq), blocks(k_BxKxHxDh, nk, tk),
                     blocks(v_BxKxHxDh, nk, tk), u_HxDh.astype(dt), vbias_HxDh.astype(dt),
                     r_pad, valid_NkxBxTk)
    return out.transpose(1, 0, 3, 2, 4).reshape(b, nq * tq, h, dh)[:, :q_len]


def _make_plan(q_len, k_len, c, r_base, causal, q_offset, k_offset, q_period, k_period,
               block_q, block_k) -> tuple[_Plan, int, int]:
    """Checks the layout (one-line ValueErrors) and fixes the static plan."""
    if block_q < 1 or block_k < 1:
        raise ValueError(f"blocked attention: block sizes ({block_q}, {block_k}) must be >= 1")
    tq, tk = min(block_q, q_len), min(block_k, k_len)
    qp, kp = check_layout("blocked attention", q_len, k_len, c, r_base, causal, q_offset,
                          k_offset, q_period, k_period, tq, tk)
    nq, nk = -(-q_len // tq), -(-k_len // tk)
    plan = _Plan(tq, tk, q_offset, k_offset, qp, kp, bool(causal), 0, r_base)
    return plan._replace(pad_front=max(0, -int(_band_starts(plan, nq, nk).min()))), nq, nk


def _band_starts(plan: _Plan, nq: int, nk: int) -> np.ndarray:
    """Row of the padded r table where each block pair's band starts (static: for the pads)."""
    q0 = plan.q_offset + (np.arange(nq) * plan.block_q) % plan.q_period
    k0 = plan.k_offset + (np.arange(nk) * plan.block_k) % plan.k_period
    return np.array([q0.min() - k0.max(), q0.max() - k0.min()]) - (plan.block_k - 1) \
        - plan.r_base + plan.pad_front


def _k_blocks(plan: _Plan, qi: jax.Array, nk: int) -> jax.Array | int:
    """How many key blocks query block qi visits: causal stops at the diagonal block."""
    if not plan.causal:
        return nk
    last_row = qi * plan.block_q + plan.block_q - 1
    return jnp.minimum(nk, last_row // plan.block_k + 1)


def _tile(plan: _Plan, qu, qw, k_nbhtd, r_pad, valid_nbt, qi, kj):
    """Scores of one tile [B, H, Tq, Tk] (float32, masked to _NEG), its mask and r band."""
    tq, tk = plan.block_q, plan.block_k
    k_j = jax.lax.dynamic_index_in_dim(k_nbhtd, kj, keepdims=False)
    s = jnp.einsum("bhqd,bhkd->bhqk", qu, k_j, preferred_element_type=_F32)
    q0 = plan.q_offset + (qi * tq) % plan.q_period
    k0 = plan.k_offset + (kj * tk) % plan.k_period
    # Band row c holds distance (q0 - k0) - (tk - 1) + c; tile entry (a, b) reads row
    # c = a - b + tk - 1 (layers.skew with shift tk - 1): every row of the band is used.
    start = (q0 - k0) - (tk - 1) - plan.r_base + plan.pad_front
    r_band = jax.lax.dynamic_slice_in_dim(r_pad, start, tq + tk - 1, axis=0)
    pos = jnp.einsum("bhqd,whd->bhqw", qw, r_band, preferred_element_type=_F32)
    s = s + skew(pos, tk, tk - 1)
    allowed = jax.lax.dynamic_index_in_dim(valid_nbt, kj, keepdims=False)[:, None, None, :]
    if plan.causal:
        rows = q0 + jnp.arange(tq)
        cols = k0 + jnp.arange(tk)
        allowed = allowed & (rows[:, None] >= cols[None, :])
    return jnp.where(allowed, s, _NEG), allowed, r_band, start


def _biased(q_i, u, w):
    return q_i + u[:, None, :], q_i + w[:, None, :]


def _forward(plan: _Plan, qb, kb, vb, u, w, r_pad, valid):
    """(out [nq, B, H, Tq, Dh] in q's dtype, logsumexp [nq, B, H, Tq] float32 (0: no key))."""
    dt, nk = qb.dtype, kb.shape[0]
    _, b, h, tq, dh = qb.shape

    def q_block(_, xs):
        qi, q_i = xs
        qu, qw = _biased(q_i, u, w)

        def k_block(kj, state):
            m, l, acc = state
            s, allowed, _, _ = _tile(plan, qu, qw, kb, r_pad, valid, qi, kj)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            v_j = jax.lax.dynamic_index_in_dim(vb, kj, keepdims=False)
            pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(dt), v_j, preferred_element_type=_F32)
            return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

        init = (jnp.full((b, h, tq), _NEG, _F32), jnp.zeros((b, h, tq), _F32),
                jnp.zeros((b, h, tq, dh), _F32))
        m, l, acc = jax.lax.fori_loop(0, _k_blocks(plan, qi, nk), k_block, init)
        # A row with no allowed key (l == 0) gets a zero output, as the dense path gives; a NaN
        # row stays NaN (l != 0), so a diverging step is still seen as one.
        some = l != 0
        l_safe = jnp.where(some, l, 1.0)
        out = jnp.where(some[..., None], acc / l_safe[..., None], 0.0)
        return None, (out.astype(dt), jnp.where(some, m + jnp.log(l_safe), 0.0))

    _, (out, lse) = jax.lax.scan(q_block, None, (jnp.arange(qb.shape[0]), qb))
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan, qb, kb, vb, u, w, r_pad, valid):
    return _forward(plan, qb, kb, vb, u, w, r_pad, valid)[0]


def _attention_fwd(plan, qb, kb, vb, u, w, r_pad, valid):
    out, lse = _forward(plan, qb, kb, vb, u, w, r_pad, valid)
    return out, (qb, kb, vb, u, w, r_pad, valid, out, lse)


def _attention_bwd(plan, res, d_out):
    """FlashAttention-2's backward, tile by tile: P = exp(S - lse), dS = P (dP - rowsum(dO o))."""
    qb, kb, vb, u, w, r_pad, valid, out, lse = res
    dt, nk = qb.dtype, kb.shape[0]
    tq, tk = plan.block_q, plan.block_k
    delta = jnp.sum(d_out.astype(_F32) * out.astype(_F32), axis=-1)  # [nq, B, H, Tq]
    skew_t = jax.linear_transpose(lambda p: skew(p, tk, tk - 1),
                                  jax.ShapeDtypeStruct(qb.shape[1:-1] + (tq + tk - 1,), _F32))

    def q_block(carry, xs):
        qi, q_i, do_i, lse_i, delta_i = xs
        qu, qw = _biased(q_i, u, w)

        def k_block(kj, state):
            dqu, dqw, dk, dv, dr = state
            s, allowed, r_band, start = _tile(plan, qu, qw, kb, r_pad, valid, qi, kj)
            p = jnp.where(allowed, jnp.exp(s - lse_i[..., None]), 0.0)
            v_j = jax.lax.dynamic_index_in_dim(vb, kj, keepdims=False)
            k_j = jax.lax.dynamic_index_in_dim(kb, kj, keepdims=False)
            dv_j = jnp.einsum("bhqk,bhqd->bhkd", p.astype(dt), do_i, preferred_element_type=_F32)
            dp = jnp.einsum("bhqd,bhkd->bhqk", do_i, v_j, preferred_element_type=_F32)
            ds = p * (dp - delta_i[..., None])
            dpos32 = skew_t(ds)[0]  # [B, H, Tq, Tq+Tk-1]: the band's cotangent
            dpos = dpos32.astype(dt)
            ds = ds.astype(dt)
            dqu = dqu + jnp.einsum("bhqk,bhkd->bhqd", ds, k_j, preferred_element_type=_F32)
            dk_j = jnp.einsum("bhqk,bhqd->bhkd", ds, qu, preferred_element_type=_F32)
            dqw = dqw + jnp.einsum("bhqw,whd->bhqd", dpos, r_band, preferred_element_type=_F32)
            # r's gradient sums over every query row: its cotangent stays float32 (in bfloat16
            # rounding it first doubled the error against float32).
            dr_band = jnp.einsum("bhqw,bhqd->whd", dpos32, qw.astype(_F32))
            dk = _add_at(dk, kj, dk_j)
            dv = _add_at(dv, kj, dv_j)
            band = jax.lax.dynamic_slice_in_dim(dr, start, tq + tk - 1, axis=0)
            dr = jax.lax.dynamic_update_slice_in_dim(dr, band + dr_band, start, axis=0)
            return dqu, dqw, dk, dv, dr

        zeros_q = jnp.zeros(q_i.shape, _F32)
        dqu, dqw, *carry = jax.lax.fori_loop(0, _k_blocks(plan, qi, nk), k_block,
                                             (zeros_q, zeros_q, *carry))
        return tuple(carry), (dqu, dqw)

    init = (jnp.zeros(kb.shape, _F32), jnp.zeros(vb.shape, _F32), jnp.zeros(r_pad.shape, _F32))
    (dk, dv, dr), (dqu, dqw) = jax.lax.scan(
        q_block, init, (jnp.arange(qb.shape[0]), qb, d_out.astype(dt), lse, delta))
    du, dw = dqu.sum(axis=(0, 1, 3)), dqw.sum(axis=(0, 1, 3))  # u, v bias: every row, batch
    return ((dqu + dqw).astype(dt), dk.astype(dt), dv.astype(dt), du.astype(u.dtype),
            dw.astype(w.dtype), dr.astype(r_pad.dtype), None)


def _add_at(x_NxR, i, y_R):
    """x[i] += y for a traced i, as a dynamic update (no scatter)."""
    row = jax.lax.dynamic_index_in_dim(x_NxR, i, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(x_NxR, row + y_R, i, axis=0)


_attention.defvjp(_attention_fwd, _attention_bwd)
