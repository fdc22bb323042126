"""Relative attention as Pallas TPU (Mosaic) kernels: forward and backward, never [N, N] in HBM.

The same function as `blocked_relative_attention` (blocked_attention.py, the pure-JAX schedule
this ports) and so as layers.RelativeAttention after its projections (Transformer-XL, Dai et al.
2019): score(i, j) = (q_i + u) . k_j + (q_i + v) . r[d(i, j) - r_base], softmax over the allowed
keys, 0 for a row with none. q, u and v come scaled by Dh^-0.5; r [C, H, Dh] is the projected
table of the distances r_base .. r_base + C - 1; positions as there (offsets, periods).

What runs where: the kernels (pallas_attention_tpu_kernels.py, pallas_attention_tpu_bwd.py) do
every O(N^2) step on tiles in VMEM; outside them only O(N) work is done: the [B, H, L, Dh]
layout, the padding of lengths to whole blocks, the reversed copy of the table, delta =
rowsum(dO * O), the sums of the dq kernel's per-block row sums into d(u) and d(vbias), and the
sum of the d r window partials (one [Wd, Dh] per distinct window, f32) into the table.
`interpret=True` runs the same kernels in Pallas' interpreter (any backend; what the tests use
on CPU); outside it the kernels need a TPU backend or a TPU topology to compile for.

Blocks: Mosaic tiles the last two dims of every block by (8, 128), so block_q and block_k must
be multiples of 8 (a block larger than its length shrinks to the length rounded up to 8;
(8, 8), (16, 16), (32, 64), (64, 128) .. (256, 512) compiled for v5e, f32 and bf16); the table
window spans a multiple of 128 rows. A period shorter than its length must be a multiple of its
block. The step lists live in SMEM (1 MiB): about 115,000 tiles at most (causal, blocks of
128: 61k tokens). Bad values are one ValueError line, raised before anything is traced.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.model import pallas_attention_tpu_bwd as bwd
from retro_jax.model import pallas_attention_tpu_kernels as kern
from retro_jax.model.blocked_attention import check_layout

_F32 = jnp.float32
_WHO = 'attention mode "pallas" (TPU kernel)'
# The d r kernel's step list (two int32 words a tile) and Mosaic's own scalars share 1 MiB SMEM.
_SMEM_STEP_BYTES = 900 * 1024


class _Plan(NamedTuple):
    """The static layout of one call (hashable: the custom VJP's non-differentiable argument)."""

    block_q: int
    block_k: int
    n_q: int
    n_k: int
    window: int  # Wd: table rows fetched per tile (>= Tq + Tk - 1, a multiple of 128)
    table_rows: int  # Cp: rows of the padded table
    pad_front: int  # r's row 0 sits at row pad_front of the padded table
    align: int  # every window starts at a multiple of this many rows (Mosaic's sublane tile)
    row_stats: bool  # logsumexp and delta saved as rows [B, H, 1, Qp], not columns [.., Qp, 1]
    q_offset: int
    k_offset: int
    q_period: int
    k_period: int
    causal: bool
    r_base: int
    interpret: bool


def relative_attention_tpu(
        q_BxQxHxDh: jax.Array, k_BxKxHxDh: jax.Array, v_BxKxHxDh: jax.Array,
        u_HxDh: jax.Array, vbias_HxDh: jax.Array, r_CxHxDh: jax.Array, *, r_base: int,
        causal: bool = False, key_valid_BxK: jax.Array | None = None, q_offset: int = 0,
        k_offset: int = 0, q_period: int | None = None, k_period: int | None = None,
        block_q: int = 128, block_k: int = 128, interpret: bool = False) -> jax.Array:
    """Attention output [B, Q, H, Dh] (before the output projection), as
    blocked_relative_attention with the same arguments; key_valid: bool [B, K], True = may be
    attended. interpret=True runs the kernels in Pallas' interpreter."""
    b, q_len, h, dh = q_BxQxHxDh.shape
    k_len = k_BxKxHxDh.shape[1]
    if k_BxKxHxDh.shape != (b, k_len, h, dh) or v_BxKxHxDh.shape != k_BxKxHxDh.shape:
        raise ValueError(f"{_WHO}: q {q_BxQxHxDh.shape}, k {k_BxKxHxDh.shape} and v "
                         f"{v_BxKxHxDh.shape} must be [B, len, H, Dh] with the same B, H, Dh")
    if r_CxHxDh.ndim != 3 or r_CxHxDh.shape[1:] != (h, dh):
        raise ValueError(f"{_WHO}: r {r_CxHxDh.shape} must be [C, {h}, {dh}]")
    plan = make_plan(q_len, k_len, r_CxHxDh.shape[0], r_base, causal, q_offset, k_offset,
                     q_period, k_period, block_q, block_k, bool(interpret))
    dt = q_BxQxHxDh.dtype
    if key_valid_BxK is None:
        key_valid_BxK = jnp.ones((b, k_len), bool)
    valid = jnp.broadcast_to(key_valid_BxK.astype(bool), (b, k_len))
    kp_len = plan.n_k * plan.block_k
    valid = jnp.pad(valid, ((0, 0), (0, kp_len - k_len))).astype(_F32)
    valid = valid.reshape(b, plan.n_k, 1, plan.block_k)

    def heads_first(x, n):  # [B, L, H, Dh] -> [B, H, n, Dh], zero-padded
        return jnp.pad(x.astype(dt), ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))).transpose(
            0, 2, 1, 3)

    c = r_CxHxDh.shape[0]
    ro = jnp.pad(r_CxHxDh.astype(dt).transpose(1, 0, 2),
                 ((0, 0), (plan.pad_front, plan.table_rows - plan.pad_front - c), (0, 0)))
    out = _attention(plan, heads_first(q_BxQxHxDh, plan.n_q * plan.block_q),
                     heads_first(k_BxKxHxDh, kp_len), heads_first(v_BxKxHxDh, kp_len),
                     u_HxDh.astype(dt)[:, None], vbias_HxDh.astype(dt)[:, None], ro, valid)
    return out.transpose(0, 2, 1, 3)[:, :q_len]


def make_plan(q_len, k_len, c, r_base, causal, q_offset, k_offset, q_period, k_period,
              block_q, block_k, interpret) -> _Plan:
    """Checks the layout and the block sizes (one-line ValueErrors) and fixes the static plan."""
    for name, x in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(x, (int, np.integer)) or x < 8 or x % 8:
            raise ValueError(f"{_WHO}: {name} {x} must be a multiple of 8 (Mosaic tiles a "
                             "block's rows by 8)")
    tq, tk = min(block_q, _round_up(q_len, 8)), min(block_k, _round_up(k_len, 8))
    qp, kp = check_layout(_WHO, q_len, k_len, c, r_base, causal, q_offset, k_offset,
                          q_period, k_period, tq, tk)
    nq, nk = -(-q_len // tq), -(-k_len // tk)
    if max(nq, nk) >= 2**14:  # a step word holds qi and kj in 14 bits each
        raise ValueError(f"{_WHO}: {max(nq, nk)} blocks per length is over 16383: use larger "
                         f"blocks than ({block_q}, {block_k})")
    wd = _round_up(tq + tk - 1, 128)
    plan = _Plan(tq, tk, nq, nk, wd, 0, 0, 8, tq % 128 == 0 or nq == 1, int(q_offset),
                 int(k_offset), qp, kp, bool(causal), int(r_base), interpret)
    starts = _all_starts(plan)
    if 2 * 4 * len(starts) > _SMEM_STEP_BYTES:
        raise ValueError(f"{_WHO}: {len(starts)} tiles of ({tq}, {tk}) need "
                         f"{8 * len(starts) / 2**20:.2f} MiB of step lists in SMEM (1 MiB): use "
                         f"larger blocks than ({block_q}, {block_k})")
    # Window starts (and so the reversed table's) fall on whole sublane tiles: 16 rows (packed
    # bfloat16) where both blocks allow it, else 8.
    align = 16 if math.gcd(tq, tk) % 16 == 0 else 8
    lowest = int(starts.min())
    pad_front = max(0, -lowest)
    pad_front += (-(lowest + pad_front)) % align
    rows = _round_up(max(int(starts.max()) + pad_front + wd, pad_front + c), align)
    return plan._replace(pad_front=pad_front, table_rows=rows, align=align)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _visible(plan: _Plan, qi: int, kj: int) -> bool:
    """A causal mask leaves tile (qi, kj) some allowed entry (the diagonal block or below)."""
    return not plan.causal or kj * plan.block_k <= qi * plan.block_q + plan.block_q - 1


def _all_starts(plan: _Plan) -> np.ndarray:
    """Window starts (pad_front not yet added) of every visible tile."""
    return np.array([kern.window_start(plan, qi, kj) for qi, kj in _tiles(plan)], np.int64)


def _runs(keys: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """first/last flags of the runs of equal leading keys in an ordered list."""
    lead = [k[0] for k in keys]
    first = np.array([i == 0 or lead[i] != lead[i - 1] for i in range(len(lead))])
    last = np.array([i == len(lead) - 1 or lead[i] != lead[i + 1] for i in range(len(lead))])
    return first, last


@functools.lru_cache(maxsize=64)
def _steps(plan: _Plan, kind: str):
    """The static step list of a kernel: 'q' (grouped by query block: forward, dq), 'k' (by key
    block: dk/dv) or 'r' (by window start: d r; with each step's window group and the starts)."""
    tiles = _tiles(plan)
    if kind == "q":
        keys = [(qi, qi, kj, 1) for qi, kj in tiles]
    elif kind == "k":
        keys = []
        for kj in range(plan.n_k):
            qis = [qi for qi, k in tiles if k == kj]
            keys += [(kj, qi, kj, 1) for qi in qis] or [(kj, 0, kj, 0)]
    else:
        keys = sorted((kern.window_start(plan, qi, kj), qi, kj, 1) for qi, kj in tiles)
        starts = sorted({k[0] for k in keys})
        rank = {x: i for i, x in enumerate(starts)}
        group = np.array([rank[k[0]] for k in keys], np.int32)
        first, last = _runs(keys)
        words = kern.pack_steps([k[1] for k in keys], [k[2] for k in keys], first, last, 1)
        return words, group, np.array(starts)
    first, last = _runs(keys)
    return kern.pack_steps([k[1] for k in keys], [k[2] for k in keys], first, last,
                           [k[3] for k in keys])


def _tiles(plan: _Plan) -> list[tuple[int, int]]:
    return [(qi, kj) for qi in range(plan.n_q) for kj in range(plan.n_k)
            if _visible(plan, qi, kj)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan, q, k, v, u, w, ro, valid):
    return kern.forward(plan, _steps(plan, "q"), q, k, v, u, w, jnp.flip(ro, 1), valid)[0]


def _attention_fwd(plan, q, k, v, u, w, ro, valid):
    out, lse = kern.forward(plan, _steps(plan, "q"), q, k, v, u, w, jnp.flip(ro, 1), valid)
    if plan.row_stats:  # saved lane-dense: [B, H, 1, Qp]
        lse = lse.reshape(lse.shape[0], lse.shape[1], 1, -1)
    return out, (q, k, v, u, w, ro, valid, out, lse)


def _attention_bwd(plan, res, d_out):
    q, k, v, u, w, ro, valid, out, lse = res
    dt = q.dtype
    rr = jnp.flip(ro, 1)
    do = d_out.astype(dt)
    delta = jnp.sum(d_out.astype(_F32) * out.astype(_F32), axis=-1)
    delta = delta[:, :, None] if plan.row_stats else delta[..., None]  # as lse
    common = (q, k, v, u, w, rr, valid, do, lse, delta)
    dq, du, dw = bwd.dq(plan, _steps(plan, "q"), *common, ro)
    dk, dv = bwd.dkv(plan, _steps(plan, "k"), *common)
    words, group, starts = _steps(plan, "r")
    part = bwd.dr_windows(plan, words, group, len(starts), *common)
    rows = jnp.asarray(starts[:, None] + np.arange(plan.window))  # starts hold pad_front
    d_ro = jnp.zeros(ro.shape, _F32).at[:, rows].add(part)
    du, dw = du.sum(axis=(0, 2)), dw.sum(axis=(0, 2))  # [H, 1, Dh]
    return (dq, dk, dv, du.astype(u.dtype), dw.astype(w.dtype), d_ro.astype(ro.dtype),
            jnp.zeros_like(valid))


_attention.defvjp(_attention_fwd, _attention_bwd)
