"""The four Triton kernels of pallas_attention_gpu.py: forward, dK/dV, dQ and d(r).

One program owns one [Tq, Dh] query tile (forward, dQ) or one [Tk, Dh] key tile (dK/dV) of
one (batch row, head) and loops over the other side's tiles, as Pallas's reference GPU flash
attention (jax.experimental.pallas.ops.gpu.attention) does; a d(r) program owns one band of
the table for one head (see dr_kernel). Per tile pair:
  s = (q + u) k^T + skew((q + v) r_band^T),   r_band = the Wp table rows the pair spans
where Wp is Tq + Tk - 1 rounded up to a power of two (Triton's tensor dims are powers of
two; the extra rows are multiplied but never read). The Transformer-XL shift inside the
tile, s_rel[a, b] = pos[a, a - b + Tk - 1], is one store of the tile to this program's own
[Tq, Wp] slab of global memory (an extra kernel output, O(N Wp) floats, discarded) and one
gathered reload, with a CTA barrier around the store; the backward's reverse shift reads the
stored dS tile along the same diagonals. Under interpret=True the programs run one after
another and the barriers are left out.
d(r) of a tile is dpos^T (q + v) [Wp, Dh] at the tile's band rows. No atomics: the tile
pairs whose bands start at the same row (one "group") are summed by one program, and the
caller overlap-adds the groups' [Wp, Dh] partials (deterministic, O(N Dh) floats per head).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

NEG = -1e30  # finite "minus infinity", as layers.py: a fully masked row stays NaN-free
F32 = jnp.float32


def _dot(a, b, trans_a=False, trans_b=False):
    """float32 operands: full float32 (no TF32), so that a float32 call is the dense function
    to 1e-5 (bfloat16 calls multiply in bfloat16; their d(r) product, float32 only to keep its
    cotangent unrounded, may use TF32)."""
    exact = a.dtype == F32 and b.dtype == F32
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b,
                  precision=jax.lax.Precision.HIGHEST if exact else None)


def _barrier(plan):
    if not plan.interpret:
        plgpu.debug_barrier()


def _iota(shape, dim):
    return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def _skew(plan, slab_ref, pos_TqxWp):
    """s_rel[a, b] = pos[a, a - b + Tk - 1]: one store of the tile, one gathered reload."""
    tq, tk = plan.block_q, plan.block_k
    _barrier(plan)
    slab_ref[...] = pos_TqxWp
    _barrier(plan)
    a, b = _iota((tq, tk), 0), _iota((tq, tk), 1)
    return plgpu.load(slab_ref.at[a, a - b + tk - 1])


def _unskew(plan, slab_ref, ds_TqxTk):
    """The transpose of _skew: dpos[a, c] = dS[a, a - c + Tk - 1] (0 off the tile)."""
    tq, tk, wp = plan.block_q, plan.block_k, plan.band
    _barrier(plan)
    slab_ref[:, pl.ds(0, tk)] = ds_TqxTk
    _barrier(plan)
    a, c = _iota((tq, wp), 0), _iota((tq, wp), 1)
    b = a - c + tk - 1
    inside = (b >= 0) & (b < tk)
    return plgpu.load(slab_ref.at[a, jnp.clip(b, 0, tk - 1)], mask=inside, other=0.0)


def _q_start(plan, qi):
    """Position of query tile qi's first row (a period shorter than the length wraps)."""
    if plan.q_period < plan.q_len:
        return plan.q_offset + jax.lax.rem(qi * plan.block_q, plan.q_period)
    return plan.q_offset + qi * plan.block_q


def _k_start(plan, kj):
    if plan.k_period < plan.k_len:
        return plan.k_offset + jax.lax.rem(kj * plan.block_k, plan.k_period)
    return plan.k_offset + kj * plan.block_k


def _tile(plan, slab_ref, r_ref, qu, qw, k_j, valid_j, qi, kj):
    """Scores [Tq, Tk] float32 masked to NEG, the mask, the band of r and its first row."""
    tq, tk = plan.block_q, plan.block_k
    q0, k0 = _q_start(plan, qi), _k_start(plan, kj)
    # Band row c holds distance (q0 - k0) - (Tk - 1) + c (the pad puts r_base at pad_front).
    start = (q0 - k0) - (tk - 1) - plan.r_base + plan.pad_front
    r_band = r_ref[pl.ds(start, plan.band), :]
    s = _dot(qu, k_j, trans_b=True) + _skew(plan, slab_ref, _dot(qw, r_band, trans_b=True))
    allowed = jnp.broadcast_to((valid_j != 0)[None, :], (tq, tk))
    if plan.causal:
        allowed = allowed & (q0 + _iota((tq, tk), 0) >= k0 + _iota((tq, tk), 1))
    return jnp.where(allowed, s, NEG), allowed, r_band, start


def _k_blocks(plan, qi):
    """Key tiles query tile qi visits: causal stops at the diagonal tile."""
    if not plan.causal:
        return plan.nk
    return jnp.minimum(plan.nk, jax.lax.div(qi * plan.block_q + plan.block_q - 1, plan.block_k)
                       + 1)


def _biased(q_ref, u_ref, w_ref):
    q = q_ref[...]
    return q + u_ref[...][None, :], q + w_ref[...][None, :]


def forward_kernel(q_ref, k_ref, v_ref, u_ref, w_ref, r_ref, valid_ref,
                   o_ref, lse_ref, slab_ref, *, plan):
    """One query tile: online softmax over its key tiles; lse 0 for a row with no key."""
    qi, tk = pl.program_id(0), plan.block_k
    qu, qw = _biased(q_ref, u_ref, w_ref)
    dt = qu.dtype

    def body(kj, carry):
        m, l, acc = carry
        keys = pl.ds(kj * tk, tk)
        s, allowed, _, _ = _tile(plan, slab_ref, r_ref, qu, qw, k_ref[keys, :],
                                 valid_ref[keys], qi, kj)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(allowed, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        acc = alpha[:, None] * acc + _dot(p.astype(dt), v_ref[keys, :])
        return m_new, alpha * l + p.sum(axis=-1), acc

    tq, dh = qu.shape
    init = (jnp.full((tq,), NEG, F32), jnp.zeros((tq,), F32), jnp.zeros((tq, dh), F32))
    m, l, acc = jax.lax.fori_loop(0, _k_blocks(plan, qi), body, init)
    # A row with no allowed key (l == 0) gets 0, as the dense path; a NaN row stays NaN.
    some = l != 0
    l_safe = jnp.where(some, l, 1.0)
    o_ref[...] = jnp.where(some[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(some, m + jnp.log(l_safe), 0.0)


def _probs_and_ds(s, allowed, lse, delta, do, v_j):
    """FlashAttention-2: P = exp(S - lse), dS = P (dO V^T - rowsum(dO o O))."""
    p = jnp.where(allowed, jnp.exp(s - lse[:, None]), 0.0)
    return p, p * (_dot(do, v_j, trans_b=True) - delta[:, None])


def dkdv_kernel(q_ref, k_ref, v_ref, u_ref, w_ref, r_ref, valid_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, slab_ref, *, plan):
    """One key tile: dV = sum P^T dO, dK = sum dS^T (q + u) over the query tiles that see it."""
    kj, tq = pl.program_id(0), plan.block_q
    k_j, v_j, valid_j = k_ref[...], v_ref[...], valid_ref[...]
    u, w = u_ref[...][None, :], w_ref[...][None, :]
    dt = k_j.dtype

    def body(qi, carry):
        dk, dv = carry
        rows = pl.ds(qi * tq, tq)
        q_i, do_i = q_ref[rows, :], do_ref[rows, :]
        qu = q_i + u
        s, allowed, _, _ = _tile(plan, slab_ref, r_ref, qu, q_i + w, k_j, valid_j, qi, kj)
        p, ds = _probs_and_ds(s, allowed, lse_ref[rows], delta_ref[rows], do_i, v_j)
        dv = dv + _dot(p.astype(dt), do_i, trans_a=True)
        dk = dk + _dot(ds.astype(dt), qu, trans_a=True)
        return dk, dv

    lo = jax.lax.div(kj * plan.block_k, tq) if plan.causal else 0  # first tile on the diagonal
    zeros = jnp.zeros(k_j.shape, F32)
    dk, dv = jax.lax.fori_loop(lo, plan.nq, body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def dq_kernel(q_ref, k_ref, v_ref, u_ref, w_ref, r_ref, valid_ref, do_ref, lse_ref, delta_ref,
              dqu_ref, dqw_ref, slab_ref, *, plan):
    """One query tile: d(q + u) = sum dS K and d(q + v) = sum dpos r_band over its key tiles."""
    qi, tk = pl.program_id(0), plan.block_k
    qu, qw = _biased(q_ref, u_ref, w_ref)
    do_i, lse_i, delta_i = do_ref[...], lse_ref[...], delta_ref[...]
    dt = qu.dtype

    def body(kj, carry):
        dqu, dqw = carry
        keys = pl.ds(kj * tk, tk)
        k_j = k_ref[keys, :]
        s, allowed, r_band, _ = _tile(plan, slab_ref, r_ref, qu, qw, k_j, valid_ref[keys], qi, kj)
        _, ds = _probs_and_ds(s, allowed, lse_i, delta_i, do_i, v_ref[keys, :])
        dqu = dqu + _dot(ds.astype(dt), k_j)
        dqw = dqw + _dot(_unskew(plan, slab_ref, ds).astype(dt), r_band)
        return dqu, dqw

    zeros = jnp.zeros(qu.shape, F32)
    dqu, dqw = jax.lax.fori_loop(0, _k_blocks(plan, qi), body, (zeros, zeros))
    dqu_ref[...] = dqu
    dqw_ref[...] = dqw


def band_groups(plan):
    """(D of group 0, number of groups) for dr_kernel.

    Within a period, local tiles (i, j) start at q0 - k0 = (q_offset - k_offset) + D Tmin with
    D = i a - j b (Tmin = min(Tq, Tk), a = Tq / Tmin, b = Tk / Tmin: one of a, b is 1), and
    their band at the table row that D fixes: group g holds the pairs with D = D0 + g, in every
    period and batch row. Causal: the groups below the diagonal are the ones visited."""
    tq, tk = plan.block_q, plan.block_k
    tmin = min(tq, tk)
    a, b = tq // tmin, tk // tmin
    d_lo, d_hi = -(plan.k_period // tk - 1) * b, (plan.q_period // tq - 1) * a
    if plan.causal:  # key tile j is visited by query tile i iff j Tk <= i Tq + Tq - 1
        d_lo = max(d_lo, 1 - a)
    return d_lo, d_hi - d_lo + 1


def dr_kernel(q_ref, k_ref, v_ref, u_ref, w_ref, r_ref, valid_ref, do_ref, lse_ref, delta_ref,
              dr_ref, slab_ref, *, plan, batch):
    """One group, one head: the sum of dpos^T (q + v) over its tile pairs, [Wp, Dh] float32
    (r's cotangent stays float32: in bfloat16 rounding it first doubles its error)."""
    tq, tk = plan.block_q, plan.block_k
    tmin = min(tq, tk)
    a, b = tq // tmin, tk // tmin
    nqp, nkp = plan.q_period // tq, plan.k_period // tk  # tiles per period
    n_qper, n_kper = plan.nq // nqp, plan.nk // nkp  # periods
    d = pl.program_id(0) + band_groups(plan)[0]
    big = nqp * a + nkp * b + 1

    def floor_div(x, m):  # floor(x / m) for a static m >= 1 and |x| < big m
        return x if m == 1 else jax.lax.div(x + m * big, m) - big

    if b == 1:  # Tq >= Tk: query tile i steps, key tile j = i a - D
        lo = jnp.maximum(0, -floor_div(-d, a))
        hi = jnp.minimum(nqp - 1, floor_div(nkp - 1 + d, a))
        pair = lambda t: (lo + t, (lo + t) * a - d)  # noqa: E731
    else:  # Tq < Tk: key tile j steps, query tile i = D + j b
        lo = jnp.maximum(0, -floor_div(d, b))
        hi = jnp.minimum(nkp - 1, floor_div(nqp - 1 - d, b))
        pair = lambda t: (d + (lo + t) * b, lo + t)  # noqa: E731
    reps = batch * n_qper * n_kper
    u, w = u_ref[...][None, :], w_ref[...][None, :]

    def body(n, acc):
        t, rest = jax.lax.div(n, reps), jax.lax.rem(n, reps)
        bi, rest = jax.lax.div(rest, n_qper * n_kper), jax.lax.rem(rest, n_qper * n_kper)
        i, j = pair(t)
        qi = jax.lax.div(rest, n_kper) * nqp + i
        kj = jax.lax.rem(rest, n_kper) * nkp + j
        rows, keys = pl.ds(qi * tq, tq), pl.ds(kj * tk, tk)
        q_i, k_j = q_ref[bi, rows, :], k_ref[bi, keys, :]
        qw = q_i + w
        s, allowed, _, _ = _tile(plan, slab_ref, r_ref, q_i + u, qw, k_j, valid_ref[bi, keys],
                                 qi, kj)
        _, ds = _probs_and_ds(s, allowed, lse_ref[bi, rows], delta_ref[bi, rows],
                              do_ref[bi, rows, :], v_ref[bi, keys, :])
        dpos = _unskew(plan, slab_ref, ds)
        qw32 = qw.astype(F32)
        return acc + (_dot(dpos, qw32, trans_a=True) if q_i.dtype == F32 else
                      plgpu.dot(dpos, qw32, trans_a=True))

    count = jnp.maximum(hi - lo + 1, 0)
    acc = jnp.zeros((plan.band, q_ref.shape[-1]), F32)
    dr_ref[...] = jax.lax.fori_loop(0, count * reps, body, acc)
