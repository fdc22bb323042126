"""The Pallas TPU (Mosaic) kernels behind pallas_attention_tpu.relative_attention_tpu.

Layout inside the kernels: q, k, v, dO as [B, H, L, Dh] (L padded to whole blocks), u and the
v bias as [H, 1, Dh], per-row statistics lane-dense [B, H, 1, Qp], the relative table in two
copies [H, Cp, Dh]: in distance order (`ro`) and reversed (`rr`). Mosaic takes no roll stride
of -1 and no lax.rev: the skew is a stride +1 roll against `rr`; its transpose is a column flip
(an anti-identity matmul) and a stride +1 roll, against `ro`.

Each kernel walks a static list of tiles (query block qi, key block kj) given as one packed
int32 word per step through scalar prefetch: only the tiles a causal mask lets through are in
the list, so blocks above the diagonal are neither fetched nor computed. A step's word holds
qi, kj and flags: `first`/`last` of its run (where the resident output block starts and ends)
and `live` (0 only for a key block no query reaches: its gradient block is written as zeros).

Per tile (Tq queries against Tk keys) only the window of the Tq + Tk - 1 table rows the tile
spans (Wd: rounded up to whole 128-lane vregs) is fetched (pl.Element rows, the start computed
from qi and kj in the index map):
  pos_rev = (q + vbias) rr_win^T                    [Tq, Wd]
  s       = (q + u) k^T + roll(pos_rev, Tk, stride +1 along rows)[:, :Tk]
(row a rolled by Tk + a puts table row a - b + Tk - 1 of the window under key b). The backward
turns dS [Tq, Tk] back into the window's cotangent with the transposed shift: its columns are
flipped by an anti-identity matmul (exact: bf16 passes over a 3-way split) into [Tq, Wd], then
rolled by a (stride +1, shift 0); that cotangent is in distance order, against `ro`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_NEG = -1e30
_F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # a @ b^T
_TN = (((0,), (0,)), ((), ()))  # a^T @ b
_NN = (((1,), (0,)), ((), ()))  # a @ b
_LIVE, _FIRST, _LAST = 1, 2, 4  # flag bits of a step word (bits 0-2); qi: bits 3-16; kj: 17-30


def pack_steps(qi, kj, first, last, live) -> np.ndarray:
    qi, kj = np.asarray(qi, np.int64), np.asarray(kj, np.int64)
    word = (np.asarray(live) * _LIVE + np.asarray(first) * _FIRST + np.asarray(last) * _LAST
            + (qi << 3) + (kj << 17))
    return word.astype(np.int32)


def _unpack(word):
    return (word >> 3) & 0x3FFF, (word >> 17) & 0x3FFF


def _flag(word, bit):
    return (word & bit) != 0


def window_start(plan, qi, kj):
    """Row of the distance-ordered padded table where tile (qi, kj)'s window starts."""
    q0 = plan.q_offset + (qi * plan.block_q) % plan.q_period
    k0 = plan.k_offset + (kj * plan.block_k) % plan.k_period
    return q0 - k0 - (plan.block_k - 1) - plan.r_base + plan.pad_front


def _params(plan, n_parallel):
    return dict(interpret=plan.interpret, compiler_params=pltpu.CompilerParams(
        dimension_semantics=("parallel",) * n_parallel + ("arbitrary",)))


# ---- block specs (index maps get the grid indices, then the scalar-prefetch ref) ----------

def _rows(plan, which, tile, dh):
    """[B, H, L, Dh] blocks of the query (which=0) or key (1) block of the step."""
    def index(b, h, s, steps):
        return b, h, _unpack(steps[s])[which], 0
    return pl.BlockSpec((None, None, tile, dh), index)


def _stat_spec(plan):
    """Per-row statistics saved for the backward: lane-dense [B, H, 1, Qp] where the query block
    fills whole 128-lane vregs (a [Qp, 1] column takes 128 lanes a row in HBM), else as such a
    column [B, H, Qp, 1] (Mosaic takes no (1, 64) block of a longer row)."""
    if plan.row_stats:
        return pl.BlockSpec((None, None, 1, plan.block_q),
                            lambda b, h, s, steps: (b, h, 0, _unpack(steps[s])[0]))
    return pl.BlockSpec((None, None, plan.block_q, 1),
                        lambda b, h, s, steps: (b, h, _unpack(steps[s])[0], 0))


def column(plan, ref):
    """A statistics block as the [Tq, 1] column that broadcasts against [Tq, Tk] tiles."""
    return jnp.expand_dims(ref[0], -1) if plan.row_stats else ref[...]


def _bias_spec(dh):
    return pl.BlockSpec((None, 1, dh), lambda b, h, s, steps: (h, 0, 0))


def _valid_spec(plan):
    return pl.BlockSpec((None, None, 1, plan.block_k),
                        lambda b, h, s, steps: (b, _unpack(steps[s])[1], 0, 0))


def _table_spec(plan, dh, reverse):
    def index(b, h, s, steps):
        start = window_start(plan, *_unpack(steps[s]))
        row = (plan.table_rows - plan.window - start) if reverse else start
        return h, pl.multiple_of(row, plan.align), 0  # aligned by make_plan's padding
    return pl.BlockSpec((None, pl.Element(plan.window), pl.Element(dh)), index)


# ---- the tile shared by every kernel --------------------------------------------------------

def _scores(plan, word, q_ref, k_ref, u_ref, w_ref, rr_ref, valid_ref):
    """(s [Tq, Tk] f32 masked to _NEG, allowed, q + u, q + vbias) of the step's tile."""
    tq, tk = plan.block_q, plan.block_k
    q = q_ref[...]
    qu, qw = q + u_ref[...], q + w_ref[...]
    s = jax.lax.dot_general(qu, k_ref[...], _NT, preferred_element_type=_F32)
    pos = jax.lax.dot_general(qw, rr_ref[...], _NT, preferred_element_type=_F32)
    s = s + pltpu.roll(pos, tk, 1, stride=1, stride_axis=0)[:, :tk]
    allowed = jnp.broadcast_to(valid_ref[...] > 0, (tq, tk))
    if plan.causal:
        qi, kj = _unpack(word)
        rows = qi * tq + jax.lax.broadcasted_iota(jnp.int32, (tq, tk), 0)
        cols = kj * tk + jax.lax.broadcasted_iota(jnp.int32, (tq, tk), 1)
        allowed = allowed & (rows >= cols)
    return jnp.where(allowed, s, _NEG), allowed, qu, qw


def _window_cotangent(plan, ds_f32, dtype=_F32):
    """The transposed skew: dS [Tq, Tk] -> d pos [Tq, Wd] against the distance-ordered window,
    exact in `dtype` (f32, or bf16 where the cotangent is rounded to it anyway)."""
    tk, wd = plan.block_k, plan.window
    flip = (jax.lax.broadcasted_iota(jnp.int32, (tk, wd), 0)
            + jax.lax.broadcasted_iota(jnp.int32, (tk, wd), 1) == tk - 1).astype(jnp.bfloat16)
    # The anti-identity picks one entry a column, so each bf16 pass is exact; f32 is split into
    # three bf16 parts (8 + 8 + 8 mantissa bits): 3 MXU passes where precision HIGHEST takes 6.
    x = jax.lax.dot_general(ds_f32.astype(jnp.bfloat16), flip, _NN, preferred_element_type=_F32)
    if jnp.dtype(dtype) != jnp.bfloat16:
        rest = ds_f32 - ds_f32.astype(jnp.bfloat16).astype(_F32)
        for _ in range(2):
            part = rest.astype(jnp.bfloat16)
            x = x + jax.lax.dot_general(part, flip, _NN, preferred_element_type=_F32)
            rest = rest - part.astype(_F32)
    return pltpu.roll(x, 0, 1, stride=1, stride_axis=0)  # x[a, c] = dS[a, Tk-1-c]; row a moves a


# ---- forward ------------------------------------------------------------------------------

def _fwd_kernel(plan, steps, q_ref, k_ref, v_ref, u_ref, w_ref, rr_ref, valid_ref,
                o_ref, lse_ref, m_sc, l_sc, acc_sc):
    word = steps[pl.program_id(2)]

    @pl.when(_flag(word, _FIRST))
    def _():
        m_sc[...] = jnp.full(m_sc.shape, _NEG, _F32)
        l_sc[...] = jnp.zeros(l_sc.shape, _F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

    s, allowed, _, _ = _scores(plan, word, q_ref, k_ref, u_ref, w_ref, rr_ref, valid_ref)
    m = m_sc[...]
    m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
    p = jnp.where(allowed, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    m_sc[...] = m_new
    l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
    acc_sc[...] = alpha * acc_sc[...] + jax.lax.dot_general(
        p.astype(v_ref.dtype), v_ref[...], _NN, preferred_element_type=_F32)

    @pl.when(_flag(word, _LAST))
    def _():
        # A row with no allowed key (l == 0) gets 0, as the dense path; NaN rows stay NaN.
        l = l_sc[...]
        some = l != 0
        l_safe = jnp.where(some, l, 1.0)
        o_ref[...] = jnp.where(some, acc_sc[...] / l_safe, 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(some, m_sc[...] + jnp.log(l_safe), 0.0)


def forward(plan, steps, q, k, v, u, w, rr, valid):
    """(out [B, H, Qp, Dh] in q's dtype, lse [B, H, Qp, 1] f32: the wrapper saves it as a row)."""
    b, h, qp_len, dh = q.shape
    tq = plan.block_q
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(b, h, len(steps)),
        in_specs=[_rows(plan, 0, tq, dh), _rows(plan, 1, plan.block_k, dh),
                  _rows(plan, 1, plan.block_k, dh), _bias_spec(dh), _bias_spec(dh),
                  _table_spec(plan, dh, True), _valid_spec(plan)],
        out_specs=[_rows(plan, 0, tq, dh), pl.BlockSpec(
            (None, None, tq, 1), lambda b, h, s, steps: (b, h, _unpack(steps[s])[0], 0))],
        scratch_shapes=[pltpu.VMEM((tq, 1), _F32), pltpu.VMEM((tq, 1), _F32),
                        pltpu.VMEM((tq, dh), _F32)])
    return pl.pallas_call(
        functools.partial(_fwd_kernel, plan), grid_spec=spec, name="relative_attention_fwd",
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, qp_len, 1), _F32)],
        **_params(plan, 2))(jnp.asarray(steps), q, k, v, u, w, rr, valid)
