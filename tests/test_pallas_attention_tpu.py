"""The Pallas TPU relative attention is the dense RelativeAttention formula (Pallas interpret mode).

The kernels run in Pallas' interpreter on this CPU; they are the same kernels that
bench/pallas_tpu_compile.py compiles for TPU slices. Output and the gradients w.r.t. q, k, v,
u, v bias and the table r equal test_blocked_attention's dense formula within relative 1e-5
(float32; max |pallas - dense| / max |dense|), bfloat16 no further from float32 than the
dense bfloat16 path is.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.model.blocked_attention import distance_span
from retro_jax.model.pallas_attention_tpu import _steps, make_plan, relative_attention_tpu
from test_blocked_attention import (_avals_with_two_dims_at_least, _cca_valid, _dense,
                                          _inputs, _M, _R, _rel_err)

TOL = 1e-5
# The interpreter's loops compile slowly at XLA's full optimisation; the values do not change.
_FAST = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)


def _out_and_grads(f, args, ct):
    def both(*a):
        out, vjp = jax.vjp(f, *a)
        return out, vjp(ct.astype(out.dtype))
    return jax.jit(both).lower(*args).compile(compiler_options=_FAST)(*args)


def _check_equal(layout, key_valid, blocks, seed=0):
    b, q_len, k_len = key_valid.shape[0], layout.pop("q_len"), key_valid.shape[1]
    r_base, count = distance_span(q_len, k_len, **layout)
    q, k, v, u, w, r, ct = _inputs(seed, b, q_len, k_len, count)

    def pallas(*a):
        return relative_attention_tpu(*a, r_base=r_base, key_valid_BxK=key_valid,
                                      block_q=blocks[0], block_k=blocks[1], interpret=True,
                                      **layout)

    args = (q, k, v, u, w, r)
    got, got_grads = _out_and_grads(pallas, args, ct)
    want, want_grads = _out_and_grads(lambda *a: _dense(*a, key_valid=key_valid, **layout),
                                      args, ct)
    assert got.shape == want.shape == q.shape
    assert _rel_err(got, want) <= TOL
    for name, g, gd in zip(("q", "k", "v", "u", "v_bias", "r"), got_grads, want_grads):
        assert np.abs(gd).max() > 0, name
        assert _rel_err(g, gd) <= TOL, (name, _rel_err(g, gd))
    return np.asarray(got)


@pytest.mark.parametrize("n", [64, 50])
def test_causal_self_attention_equals_dense(n):
    """Blocks of 16 at a length that is a multiple of them and one that is not; in batch row 1
    the first 3 keys are invalid, so rows 0..2 have no allowed key and come out zero."""
    key_valid = jnp.ones((2, n), bool).at[1, :3].set(False)
    got = _check_equal(dict(q_len=n, causal=True), key_valid, (16, 16))
    assert np.all(got[1, :3] == 0) and np.abs(got[1, 3:]).min(axis=-1).max() > 0


@pytest.mark.parametrize("case", ["cca", "encoder_self", "encoder_cross"])
def test_non_causal_masked_attention_equals_dense(case):
    """CCA (query offset m-1, neighbours as key periods, a missing neighbour tail, a batch row
    with no valid key, which gives 0), the encoder's self-attention (padded keys) and its
    cross-attention to the chunk (query periods), lengths not multiples of the blocks."""
    if case == "cca":
        # one query block: logsumexp is saved as a row [B, H, 1, Q] (elsewhere as a column)
        layout, blocks = dict(q_len=_M + 4, q_offset=_M - 1, k_period=_R), (16, 8)
        valid = _cca_valid()
    elif case == "encoder_self":
        layout, blocks = dict(q_len=20), (8, 8)
        valid = jnp.ones((2, 20), bool).at[0, 13:].set(False).at[1, 17:].set(False)
    else:
        layout, blocks, valid = dict(q_len=2 * _R, q_period=_R), (8, 16), jnp.ones((2, 12), bool)
    got = _check_equal(layout, valid, blocks, seed=1)
    if case == "cca":
        assert np.all(got[1] == 0) and np.abs(got[0]).max() > 0


def test_bfloat16_is_as_close_to_float32_as_the_dense_path_is():
    """bfloat16 output and gradients are no further from the float32 dense result than the dense
    bfloat16 path is (within 2x + 1e-3), and stay bfloat16."""
    n = 50
    q, k, v, u, w, r, ct = _inputs(6, 2, n, n, n)
    args = (q, k, v, u, w, r)
    pallas = lambda *a: relative_attention_tpu(*a, r_base=0, causal=True, block_q=16,  # noqa: E731
                                               block_k=16, interpret=True)
    dense = lambda *a: _dense(*a, causal=True)  # noqa: E731
    bf16 = tuple(x.astype(jnp.bfloat16) for x in args)
    truth = _out_and_grads(dense, args, ct)
    runs = [_out_and_grads(f, bf16, ct) for f in (pallas, dense)]
    for name, t, p, d in zip(("out", "q", "k", "v", "u", "v_bias", "r"),
                             *[[o, *g] for o, g in (truth, *runs)]):
        assert p.dtype == jnp.bfloat16, name
        assert _rel_err(p, t) <= 2 * _rel_err(d, t) + 1e-3, (name, _rel_err(p, t))


def test_causal_step_lists_hold_no_tile_above_the_diagonal():
    """Every kernel's static step list visits exactly the tiles on or below the causal diagonal
    (blocks above it are never fetched nor computed)."""
    plan = make_plan(100, 100, 100, 0, True, 0, 0, None, None, 16, 8, True)
    below = {(qi, kj) for qi in range(plan.n_q) for kj in range(plan.n_k)
             if kj * 8 <= qi * 16 + 15}
    assert len(below) < plan.n_q * plan.n_k
    for words in (_steps(plan, "q"), _steps(plan, "k"), _steps(plan, "r")[0]):
        tiles = [((w >> 3) & 0x3FFF, (w >> 17) & 0x3FFF) for w in words if w & 1]
        assert sorted(tiles) == sorted(below)


def test_key_blocks_above_the_causal_diagonal_are_never_read():
    """NaN in the keys and values of the last key block: every dense row becomes NaN (0 * NaN in
    probs @ v); the kernel's rows of every earlier query block stay finite and equal the dense
    output without the NaN, so the tiles above the diagonal were never fetched."""
    n, t = 64, 16
    q, k, v, u, w, r, _ = _inputs(2, 1, n, n, n)
    k_nan, v_nan = k.at[:, n - t:].set(jnp.nan), v.at[:, n - t:].set(jnp.nan)
    assert np.isnan(np.asarray(_dense(q, k_nan, v_nan, u, w, r, causal=True))).all()
    run = jax.jit(lambda *a: relative_attention_tpu(*a, r_base=0, causal=True, block_q=t,
                                                    block_k=t, interpret=True))
    args = (q, k_nan, v_nan, u, w, r)
    got = np.asarray(run.lower(*args).compile(compiler_options=_FAST)(*args))
    assert np.isfinite(got[:, :n - t]).all() and np.isnan(got[:, n - t:]).any()
    assert _rel_err(got[:, :n - t], _dense(q, k, v, u, w, r, causal=True)[:, :n - t]) <= TOL


def test_no_n_by_n_intermediate_forward_or_backward():
    """value_and_grad at N=256, blocks of 32: no value with two dims >= N in its jaxpr, the
    kernels' bodies included (the dense path, traced the same way, has them)."""
    n = 256
    q, k, v, u, w, r, ct = _inputs(4, 1, n, n, n)

    def loss(f):
        return jax.value_and_grad(lambda *a: jnp.sum(f(*a) * ct), argnums=range(6))

    pallas = lambda *a: relative_attention_tpu(*a, r_base=0, causal=True, block_q=32,  # noqa: E731
                                               block_k=32, interpret=True)
    args = (q, k, v, u, w, r)
    dense = lambda *a: _dense(*a, causal=True)  # noqa: E731
    assert _avals_with_two_dims_at_least(jax.make_jaxpr(loss(dense))(*args), n)
    assert _avals_with_two_dims_at_least(jax.make_jaxpr(loss(pallas))(*args), n) == []


def test_step_lists_over_smem_are_one_line():
    """A causal 65,536 at blocks of 128 would need over 1 MiB of scalar step lists: refused."""
    with pytest.raises(ValueError) as err:
        make_plan(65536, 65536, 65536, 0, True, 0, 0, None, None, 128, 128, False)
    msg = str(err.value)
    assert "SMEM" in msg and "use larger blocks" in msg and '"pallas"' in msg and "\n" not in msg


@pytest.mark.parametrize("kwargs, words", [
    (dict(block_q=12), "block_q 12 must be a multiple of 8"),
    (dict(block_k=0), "block_k 0 must be a multiple of 8"),
    (dict(k_period=12, block_k=8), "key block 8 must divide the key period 12"),
    (dict(r_base=1, causal=True), "r covers distances 1..24 but these positions need 0..23"),
])
def test_bad_block_or_layout_is_one_line_naming_the_mode(kwargs, words):
    q, k, v, u, w, r, _ = _inputs(5, 1, 24, 24, 24)
    kwargs = dict(dict(r_base=0, block_q=8, block_k=8), **kwargs)
    with pytest.raises(ValueError) as err:
        relative_attention_tpu(q, k, v, u, w, r, **kwargs)
    msg = str(err.value)
    assert words in msg and '"pallas"' in msg and "TPU" in msg and "\n" not in msg
