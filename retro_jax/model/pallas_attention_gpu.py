"""Relative attention as Pallas GPU (Triton) kernels, forward and backward (issue 21, item 3).

The same function as `blocked_relative_attention` (blocked_attention.py), with the same
arguments and semantics: Transformer-XL's
  score(i, j) = (q_i + u) . k_j  +  (q_i + v) . r[d(i, j) - r_base],   d(i, j) = pos(i) - pos(j)
with q, u and v already scaled by Dh^-0.5, r the projected table for distances r_base ..
r_base + C - 1, a row with no allowed key giving 0, key_valid bool [B, K], and positions
q_offset + (i mod q_period), k_offset + (j mod k_period).

How (the kernels are pallas_attention_gpu_kernels.py):
- a forward kernel per query tile with an online softmax over key tiles, saving the per-row
  logsumexp; key tiles above the causal diagonal are never visited (forward and backward);
- a custom VJP with the backward kernels of Pallas's reference GPU flash attention, one per
  key tile (dK, dV) and one per query tile (d(q + u) and d(q + v), whose sums over rows are
  d(u) and d(v)), and a third for d(r): one program per group of tile pairs whose bands start
  at the same table row, per head; the groups' float32 partials are overlap-added outside
  (deterministic: no atomics);
- per tile pair only the band of Tq + Tk - 1 table rows it spans is multiplied with the query
  tile, and shifted inside the tile through a store and reload of the tile.
Nothing of size [N, N] exists in HBM: residuals are the inputs, the output and the logsumexp;
the shift's slabs are [N, Wp] per (batch row, head), d(r)'s partials [about 2N / Tmin, Wp, Dh]
per head.

Layout rules: block sizes are powers of two >= 16 (Triton's dot dims); a block larger than
its length shrinks to the length's next power of two (>= 16); lengths that are not multiples
are padded and the padded keys masked; a head dim that is not a power of two >= 16 is padded
with zeros (which changes no dot product); a period shorter than its length must be a
multiple of the block. Bad layouts are one-line ValueErrors raised before anything traces.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from retro_jax.model import attention_mode
from retro_jax.model import pallas_attention_gpu_kernels as kernels
from retro_jax.model.blocked_attention import check_layout

_WHO = "attention mode 'pallas' (backend gpu, Triton)"
_F32 = jnp.float32


class _Plan(NamedTuple):
    """The static layout of one call (hashable: the custom VJP's non-differentiable argument)."""

    block_q: int
    block_k: int
    q_len: int  # padded lengths: nq * block_q, nk * block_k
    k_len: int
    nq: int
    nk: int
    q_offset: int
    k_offset: int
    q_period: int
    k_period: int
    causal: bool
    r_base: int
    pad_front: int  # r's row 0 (distance r_base) sits at row pad_front of the padded table
    band: int  # Wp: Tq + Tk - 1 rounded up to a power of two
    interpret: bool
    num_warps: int


def relative_attention_gpu(
        q_BxQxHxDh: jax.Array, k_BxKxHxDh: jax.Array, v_BxKxHxDh: jax.Array,
        u_HxDh: jax.Array, vbias_HxDh: jax.Array, r_CxHxDh: jax.Array, *, r_base: int,
        causal: bool = False, key_valid_BxK: jax.Array | None = None,
        q_offset: int = 0, k_offset: int = 0, q_period: int | None = None,
        k_period: int | None = None, block_q: int = 64, block_k: int = 64,
        interpret: bool = False) -> jax.Array:
    """Attention output [B, Q, H, Dh] (before the output projection), as RelativeAttention.

    interpret=True runs the kernels in Pallas interpret mode (any backend); otherwise the
    platform traced for (attention_mode.platform(): the default backend, or the one
    `attention_mode.compile_for` names, so a CPU host can lower the kernels for a GPU) must be
    gpu."""
    on = attention_mode.platform()
    if not interpret and on != "gpu":
        raise ValueError(f"{_WHO} cannot run on backend {on!r} outside interpret mode "
                         "(pass interpret=True)")
    b, q_len, h, dh = q_BxQxHxDh.shape
    k_len = k_BxKxHxDh.shape[1]
    if k_BxKxHxDh.shape != (b, k_len, h, dh) or v_BxKxHxDh.shape != k_BxKxHxDh.shape:
        raise ValueError(f"{_WHO}: q {q_BxQxHxDh.shape}, k {k_BxKxHxDh.shape} and v "
                         f"{v_BxKxHxDh.shape} must be [B, len, H, Dh] with the same B, H, Dh")
    if r_CxHxDh.ndim != 3 or r_CxHxDh.shape[1:] != (h, dh):
        raise ValueError(f"{_WHO}: r {r_CxHxDh.shape} must be [C, {h}, {dh}]")
    c = r_CxHxDh.shape[0]
    plan = _make_plan(q_len, k_len, c, r_base, causal, q_offset, k_offset, q_period, k_period,
                      block_q, block_k, dh, interpret)
    dt = q_BxQxHxDh.dtype
    dhp = max(16, pl.next_power_of_2(dh))
    if key_valid_BxK is None:
        key_valid_BxK = jnp.ones((b, k_len), bool)
    valid_BxKp = jnp.pad(jnp.broadcast_to(key_valid_BxK.astype(bool), (b, k_len)),
                         ((0, 0), (0, plan.k_len - k_len))).astype(jnp.int32)

    def pad(x, length):  # [B, L, H, Dh] -> [B, length, H, dhp]
        return jnp.pad(x.astype(dt), ((0, 0), (0, length - x.shape[1]), (0, 0), (0, dhp - dh)))

    starts = _band_starts(plan)
    pad_back = max(0, int(starts.max()) + plan.band - (plan.pad_front + c))
    r_pad = jnp.pad(r_CxHxDh.astype(dt), ((plan.pad_front, pad_back), (0, 0), (0, dhp - dh)))
    bias = lambda x: jnp.pad(x.astype(dt), ((0, 0), (0, dhp - dh)))  # noqa: E731
    out = _attention(plan, pad(q_BxQxHxDh, plan.q_len), pad(k_BxKxHxDh, plan.k_len),
                     pad(v_BxKxHxDh, plan.k_len), bias(u_HxDh), bias(vbias_HxDh), r_pad,
                     valid_BxKp)
    return out[:, :q_len, :, :dh]


def _pow2_block(name: str, requested: int, length: int) -> int:
    if requested < 16 or requested & (requested - 1):
        raise ValueError(f"{_WHO}: block_{name} {requested} must be a power of two >= 16 "
                         "(Triton's dot dims)")
    return min(requested, max(16, pl.next_power_of_2(length)))


def _make_plan(q_len, k_len, c, r_base, causal, q_offset, k_offset, q_period, k_period,
               block_q, block_k, dh, interpret) -> _Plan:
    """Checks the layout (one-line ValueErrors, before anything traces) and fixes the plan."""
    tq, tk = _pow2_block("q", block_q, q_len), _pow2_block("k", block_k, k_len)
    qp, kp = check_layout(_WHO, q_len, k_len, c, r_base, causal, q_offset, k_offset,
                          q_period, k_period, tq, tk)
    nq, nk = -(-q_len // tq), -(-k_len // tk)
    # A period equal to the length: the padded rows continue the positions (no wrap).
    qp, kp = (qp if qp < q_len else nq * tq), (kp if kp < k_len else nk * tk)
    plan = _Plan(tq, tk, nq * tq, nk * tk, nq, nk, q_offset, k_offset, qp, kp, bool(causal),
                 r_base, 0, pl.next_power_of_2(tq + tk - 1), bool(interpret),
                 4 if max(dh, tq, tk) <= 64 else 8)
    return plan._replace(pad_front=max(0, -int(_band_starts(plan).min())))


def _band_starts(plan: _Plan) -> np.ndarray:
    """Row of the padded r table where each tile pair's band starts (static: for the pads)."""
    q0 = plan.q_offset + (np.arange(plan.nq) * plan.block_q) % plan.q_period
    k0 = plan.k_offset + (np.arange(plan.nk) * plan.block_k) % plan.k_period
    return np.array([q0.min() - k0.max(), q0.max() - k0.min()]) - (plan.block_k - 1) \
        - plan.r_base + plan.pad_front


def _compiler_params(plan: _Plan) -> plgpu.CompilerParams:
    """num_stages=1: no software pipelining. The pipeliner moves a loop's loads into earlier
    stages, and nothing here shows (no GPU was lent to this work) that it keeps a slab's reload
    after the same iteration's store into it (triton-lang/triton#8139 is a race of that kind
    between a pipelined load and a store); a GPU session should measure 2 against it."""
    return plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=1)


def _specs(plan, b, h, dhp, c_pad):
    """BlockSpecs on the grid (tile, batch row, head)."""
    tile = lambda t: pl.BlockSpec((None, t, None, dhp), lambda i, j, k: (j, i, k, 0))  # noqa
    whole = lambda n: pl.BlockSpec((None, n, None, dhp), lambda i, j, k: (j, 0, k, 0))  # noqa
    head = pl.BlockSpec((None, dhp), lambda i, j, k: (k, 0))
    table = pl.BlockSpec((c_pad, None, dhp), lambda i, j, k: (0, k, 0))
    rows = lambda n, tiled: pl.BlockSpec(  # noqa: E731  [B, H, n] per-row floats
        (None, None, n), (lambda i, j, k: (j, k, i)) if tiled else (lambda i, j, k: (j, k, 0)))
    slab = lambda n: (pl.BlockSpec((None, None, None, plan.block_q, plan.band),  # noqa: E731
                                   lambda i, j, k: (i, j, k, 0, 0)),
                      jax.ShapeDtypeStruct((n, b, h, plan.block_q, plan.band), _F32))
    return tile, whole, head, table, rows, slab


def _forward(plan, q, k, v, u, w, r_pad, valid):
    b, _, h, dhp = q.shape
    tile, whole, head, table, rows, slab = _specs(plan, b, h, dhp, r_pad.shape[0])
    keys = pl.BlockSpec((None, plan.k_len), lambda i, j, k: (j, 0))
    slab_spec, slab_shape = slab(plan.nq)
    out, lse, _ = pl.pallas_call(
        functools.partial(kernels.forward_kernel, plan=plan), grid=(plan.nq, b, h),
        in_specs=[tile(plan.block_q), whole(plan.k_len), whole(plan.k_len), head, head, table,
                  keys],
        out_specs=[tile(plan.block_q), rows(plan.block_q, True), slab_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, plan.q_len), _F32), slab_shape],
        compiler_params=_compiler_params(plan), interpret=plan.interpret,
        name="relative_attention_fwd")(q, k, v, u, w, r_pad, valid)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan, q, k, v, u, w, r_pad, valid):
    return _forward(plan, q, k, v, u, w, r_pad, valid)[0]


def _attention_fwd(plan, q, k, v, u, w, r_pad, valid):
    out, lse = _forward(plan, q, k, v, u, w, r_pad, valid)
    return out, (q, k, v, u, w, r_pad, valid, out, lse)


def _attention_bwd(plan, res, d_out):
    q, k, v, u, w, r_pad, valid, out, lse = res
    b, _, h, dhp = q.shape
    c_pad = r_pad.shape[0]
    d_out = d_out.astype(q.dtype)
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(_F32), out.astype(_F32))
    tile, whole, head, table, rows, slab = _specs(plan, b, h, dhp, c_pad)
    params = _compiler_params(plan)
    args = (q, k, v, u, w, r_pad, valid, d_out, lse, delta)

    slab_spec, slab_shape = slab(plan.nk)
    dk, dv, _ = pl.pallas_call(
        functools.partial(kernels.dkdv_kernel, plan=plan), grid=(plan.nk, b, h),
        in_specs=[whole(plan.q_len), tile(plan.block_k), tile(plan.block_k), head, head, table,
                  pl.BlockSpec((None, plan.block_k), lambda i, j, k: (j, i)),
                  whole(plan.q_len), rows(plan.q_len, False), rows(plan.q_len, False)],
        out_specs=[tile(plan.block_k), tile(plan.block_k), slab_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype), slab_shape],
        compiler_params=params, interpret=plan.interpret, name="relative_attention_dkdv")(*args)

    slab_spec, slab_shape = slab(plan.nq)
    dqu, dqw, _ = pl.pallas_call(
        functools.partial(kernels.dq_kernel, plan=plan), grid=(plan.nq, b, h),
        in_specs=[tile(plan.block_q), whole(plan.k_len), whole(plan.k_len), head, head, table,
                  pl.BlockSpec((None, plan.k_len), lambda i, j, k: (j, 0)),
                  tile(plan.block_q), rows(plan.block_q, True), rows(plan.block_q, True)],
        out_specs=[tile(plan.block_q), tile(plan.block_q), slab_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, _F32), jax.ShapeDtypeStruct(q.shape, _F32),
                   slab_shape],
        compiler_params=params, interpret=plan.interpret, name="relative_attention_dq")(*args)
    du, dw = dqu.sum(axis=(0, 1)), dqw.sum(axis=(0, 1))  # u, v bias: every row, batch row
    return ((dqu + dqw).astype(q.dtype), dk, dv, du.astype(u.dtype), dw.astype(w.dtype),
            _d_table(plan, args, c_pad).astype(r_pad.dtype), None)


def _d_table(plan, args, c_pad):
    """r's cotangent [Cp, H, Dh] float32: one dr_kernel program per (band group, head), then
    the groups' bands, which start Tmin rows apart, overlap-added."""
    b, _, h, dhp = args[0].shape
    d_lo, n_groups = kernels.band_groups(plan)
    per_head = lambda n: pl.BlockSpec(  # noqa: E731  [B, n, H, Dh], the head axis squeezed
        (b, n, None, dhp), lambda g, k: (0, 0, k, 0))
    rows = pl.BlockSpec((b, None, plan.q_len), lambda g, k: (0, k, 0))
    head = pl.BlockSpec((None, dhp), lambda g, k: (k, 0))
    parts, _ = pl.pallas_call(
        functools.partial(kernels.dr_kernel, plan=plan, batch=b), grid=(n_groups, h),
        in_specs=[per_head(plan.q_len), per_head(plan.k_len), per_head(plan.k_len), head, head,
                  pl.BlockSpec((c_pad, None, dhp), lambda g, k: (0, k, 0)),
                  pl.BlockSpec((b, plan.k_len), lambda g, k: (0, 0)), per_head(plan.q_len),
                  rows, rows],
        out_specs=[pl.BlockSpec((None, None, plan.band, dhp), lambda g, k: (g, k, 0, 0)),
                   pl.BlockSpec((None, None, plan.block_q, plan.band),
                                lambda g, k: (g, k, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((n_groups, h, plan.band, dhp), _F32),
                   jax.ShapeDtypeStruct((n_groups, h, plan.block_q, plan.band), _F32)],
        compiler_params=_compiler_params(plan), interpret=plan.interpret,
        name="relative_attention_dr")(*args)
    tmin = min(plan.block_q, plan.block_k)
    m = plan.band // tmin  # group g's band: rows start0 + g Tmin .. + m Tmin
    parts = parts.reshape(n_groups, h, m, tmin, dhp)
    chunks = sum(jnp.pad(parts[:, :, j], ((j, m - 1 - j), (0, 0), (0, 0), (0, 0)))
                 for j in range(m))  # [G + m - 1, H, Tmin, Dh]
    rows_dr = chunks.transpose(0, 2, 1, 3).reshape((n_groups + m - 1) * tmin, h, dhp)
    start0 = (plan.q_offset - plan.k_offset) + d_lo * tmin - (plan.block_k - 1) \
        - plan.r_base + plan.pad_front
    return jnp.pad(rows_dr, ((start0, c_pad - start0 - rows_dr.shape[0]), (0, 0), (0, 0)))


_attention.defvjp(_attention_fwd, _attention_bwd)
