"""Backward kernels of the Pallas TPU relative attention (FlashAttention-2's, tile by tile).

Every kernel recomputes its tile's scores from q, k, the reversed table window and the saved
per-row logsumexp: P = exp(S - lse), dS = P (dP - delta), delta = rowsum(dO * O).
- dq: tiles grouped by query block; dq = dS k  +  d pos . window (two outputs, f32: the sums of
  the two halves give d(u) and d(vbias) outside).
- dk, dv: tiles grouped by key block; dv = P^T dO, dk = dS^T (q + u).
- d r: tiles (of every batch row) grouped by their window's start, so each group's partial
  [Wd, Dh] = sum d pos^T (q + vbias) stays resident; the overlapping windows are added into the
  table outside (O(N Dh), never [N, N]).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from retro_jax.model.pallas_attention_tpu_kernels import (
    _F32, _FIRST, _LAST, _LIVE, _NN, _NT, _TN, _bias_spec, _flag, _params, _rows, _scores,
    _stat_spec, _table_spec, _unpack, _valid_spec, _window_cotangent, column)


def _probs_and_ds(plan, word, refs):
    q_ref, k_ref, v_ref, u_ref, w_ref, rr_ref, valid_ref, do_ref, lse_ref, delta_ref = refs
    s, allowed, qu, qw = _scores(plan, word, q_ref, k_ref, u_ref, w_ref, rr_ref, valid_ref)
    p = jnp.where(allowed, jnp.exp(s - column(plan, lse_ref)), 0.0)
    dp = jax.lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=_F32)
    return p, p * (dp - column(plan, delta_ref)), qu, qw


def _zero_on_first(word, *refs):
    @pl.when(_flag(word, _FIRST))
    def _():
        for ref in refs:
            ref[...] = jnp.zeros(ref.shape, ref.dtype)


def _dq_kernel(plan, steps, *refs):
    *ins, ro_ref, dq_ref, du_ref, dw_ref, dqu_acc, dqw_acc = refs
    word = steps[pl.program_id(2)]
    _zero_on_first(word, dqu_acc, dqw_acc)
    _, ds, _, _ = _probs_and_ds(plan, word, ins)
    dt = ins[0].dtype
    dqu_acc[...] += jax.lax.dot_general(ds.astype(dt), ins[1][...], _NN,
                                        preferred_element_type=_F32)
    dpos = _window_cotangent(plan, ds, dt)  # rounded to dt for the matmul, as blocked_attention
    dqw_acc[...] += jax.lax.dot_general(dpos.astype(dt), ro_ref[...], _NN,
                                        preferred_element_type=_F32)

    @pl.when(_flag(word, _LAST))
    def _():  # dq = d(q + u) + d(q + vbias); u and vbias get every row's sum (f32)
        dq_ref[...] = (dqu_acc[...] + dqw_acc[...]).astype(dq_ref.dtype)
        du_ref[...] = dqu_acc[...].sum(axis=0, keepdims=True)
        dw_ref[...] = dqw_acc[...].sum(axis=0, keepdims=True)


def _dkv_kernel(plan, steps, *refs):
    *ins, dk_ref, dv_ref, dk_acc, dv_acc = refs
    word = steps[pl.program_id(2)]
    _zero_on_first(word, dk_acc, dv_acc)

    @pl.when(_flag(word, _LIVE))
    def _():
        p, ds, qu, _ = _probs_and_ds(plan, word, ins)
        dt = ins[0].dtype
        dv_acc[...] += jax.lax.dot_general(p.astype(dt), ins[7][...], _TN,
                                           preferred_element_type=_F32)
        dk_acc[...] += jax.lax.dot_general(ds.astype(dt), qu, _TN, preferred_element_type=_F32)

    @pl.when(_flag(word, _LAST))
    def _():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dr_kernel(plan, steps, *refs):
    """Grid (H, steps, B): the batch rows of a tile are the innermost loop, so each window
    group's steps stay consecutive and its output block resident."""
    *ins, dr_ref = refs
    word = steps[pl.program_id(1)]

    @pl.when(_flag(word, _FIRST) & (pl.program_id(2) == 0))
    def _():
        dr_ref[...] = jnp.zeros(dr_ref.shape, dr_ref.dtype)

    _, ds, _, qw = _probs_and_ds(plan, word, ins)
    # r's gradient sums over every query row: its cotangent stays float32 (as blocked_attention).
    dr_ref[...] += jax.lax.dot_general(_window_cotangent(plan, ds), qw.astype(_F32), _TN,
                                       preferred_element_type=_F32)


def _in_specs(plan, dh):
    tq, tk = plan.block_q, plan.block_k
    return [_rows(plan, 0, tq, dh), _rows(plan, 1, tk, dh), _rows(plan, 1, tk, dh),
            _bias_spec(dh), _bias_spec(dh), _table_spec(plan, dh, True), _valid_spec(plan),
            _rows(plan, 0, tq, dh), _stat_spec(plan), _stat_spec(plan)]


def dq(plan, steps, q, k, v, u, w, rr, valid, do, lse, delta, ro):
    """(dq [B, H, Qp, Dh] in q's dtype, per-block row sums of d(q + u) and d(q + vbias)
    [B, H, nq, 1, Dh] f32)."""
    b, h, _, dh = q.shape
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(b, h, len(steps)),
        in_specs=_in_specs(plan, dh) + [_table_spec(plan, dh, False)],
        out_specs=[_rows(plan, 0, plan.block_q, dh)] + [pl.BlockSpec(
            (None, None, None, 1, dh),
            lambda b, h, s, steps: (b, h, _unpack(steps[s])[0], 0, 0))] * 2,
        scratch_shapes=[pltpu.VMEM((plan.block_q, dh), _F32)] * 2)
    return pl.pallas_call(
        functools.partial(_dq_kernel, plan), grid_spec=spec, name="relative_attention_dq",
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)]
        + [jax.ShapeDtypeStruct((b, h, plan.n_q, 1, dh), _F32)] * 2,
        **_params(plan, 2))(jnp.asarray(steps), q, k, v, u, w, rr, valid, do, lse, delta, ro)


def dkv(plan, steps, q, k, v, u, w, rr, valid, do, lse, delta):
    b, h, _, dh = q.shape
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(b, h, len(steps)), in_specs=_in_specs(plan, dh),
        out_specs=[_rows(plan, 1, plan.block_k, dh)] * 2,
        scratch_shapes=[pltpu.VMEM((plan.block_k, dh), _F32)] * 2)
    return pl.pallas_call(
        functools.partial(_dkv_kernel, plan), grid_spec=spec, name="relative_attention_dkv",
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        **_params(plan, 2))(jnp.asarray(steps), q, k, v, u, w, rr, valid, do, lse, delta)


def dr_windows(plan, steps, groups, n_groups, q, k, v, u, w, rr, valid, do, lse, delta):
    """Per-window partials of d r [H, G, Wd, Dh] f32: step s adds tile (qi, kj) of every batch
    row into window group groups[s] (the steps of one group are consecutive). The step list
    does not grow with the batch (scalar prefetch lives in SMEM, 1 MiB)."""
    b, h, _, dh = q.shape

    def lift(spec):
        def index(hh, s, bb, steps_ref, groups_ref):
            return spec.index_map(bb, hh, s, steps_ref)
        return pl.BlockSpec(spec.block_shape, index)

    out = pl.BlockSpec((None, None, plan.window, dh),
                       lambda hh, s, bb, steps_ref, groups_ref: (hh, groups_ref[s], 0, 0))
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(h, len(steps), b),
        in_specs=[lift(x) for x in _in_specs(plan, dh)], out_specs=out)

    def kernel(steps_ref, groups_ref, *refs):
        _dr_kernel(plan, steps_ref, *refs)

    params = _params(plan, 1)
    params["compiler_params"] = pltpu.CompilerParams(
        dimension_semantics=("parallel", "arbitrary", "arbitrary"))
    return pl.pallas_call(
        kernel, grid_spec=spec, name="relative_attention_dr",
        out_shape=jax.ShapeDtypeStruct((h, n_groups, plan.window, dh), _F32),
        **params)(jnp.asarray(steps), jnp.asarray(groups), q, k, v, u, w, rr, valid, do, lse,
                  delta)
