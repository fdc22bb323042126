"""Blocked relative attention is the dense RelativeAttention, computed without [N, N] tensors.

Exactness is checked two ways: against layers.py's dense formula on the same projections (the
output and the gradients w.r.t. q, k, v, u, v-bias and the table r), and against the
RelativeAttention module itself (its output and its gradients w.r.t. every parameter and
input, with the blocked function placed between the same projections). Errors are relative to
the largest entry of the reference: max |blocked - dense| / max |dense| <= 1e-5 (float32).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.model import blocked_attention
from retro_jax.model.blocked_attention import blocked_relative_attention, distance_span
from retro_jax.model.layers import sinusoids, skew
from retro_jax.model.relative_attention import RelativeAttention

H, DH = 2, 8
TOL = 1e-5


@pytest.fixture(params=["strips", "tiles"])
def schedule(request, monkeypatch):
    """Each test that takes it runs under both schedules (tiles: the loop past MAX_STRIPS)."""
    if request.param == "tiles":
        monkeypatch.setattr(blocked_attention, "MAX_STRIPS", 0)
    return request.param


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _dense(q, k, v, u, w, r, *, causal=False, key_valid=None, q_offset=0, k_offset=0,
           q_period=None, k_period=None):
    """RelativeAttention's dense formula after its projections (r: the distance_span table)."""
    b, q_len, _, _ = q.shape
    k_len = k.shape[1]
    qp, kp = q_period or q_len, k_period or k_len
    count = r.shape[0]
    shift = 0 if causal else kp - 1
    f32 = jnp.float32
    logits = jnp.einsum("bqhk,bshk->bhqs", q + u, k, preferred_element_type=f32)
    pos = jnp.einsum("bqhk,chk->bhqc", q + w, r, preferred_element_type=f32)
    pos = pos.reshape(b, H, q_len // qp, qp, count)
    pos = skew(pos, kp, shift).reshape(b, H, q_len, 1, kp)
    logits = (logits.reshape(b, H, q_len, k_len // kp, kp) + pos).reshape(b, H, q_len, k_len)
    mask = jnp.ones((b, 1, 1, k_len), bool) if key_valid is None else key_valid[:, None, None]
    if causal:
        mask = mask & jnp.tril(jnp.ones((q_len, k_len), bool))
    probs = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1)
    probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)
    return jnp.einsum("bhqs,bshk->bqhk", probs.astype(q.dtype), v)


def _inputs(seed, b, q_len, k_len, count):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return (f(b, q_len, H, DH) * DH ** -0.5, f(b, k_len, H, DH), f(b, k_len, H, DH),
            f(H, DH) * 0.3, f(H, DH) * 0.3, f(count, H, DH), f(b, q_len, H, DH))


def _check_equal(layout, key_valid, blocks, seed=0):
    """Output and all six gradients of the blocked path equal the dense formula's."""
    b, q_len, k_len = key_valid.shape[0], layout.pop("q_len"), key_valid.shape[1]
    r_base, count = distance_span(q_len, k_len, **layout)
    q, k, v, u, w, r, ct = _inputs(seed, b, q_len, k_len, count)

    def blocked(*args):
        return blocked_relative_attention(*args, r_base=r_base, key_valid_BxK=key_valid,
                                          block_q=blocks[0], block_k=blocks[1], **layout)

    def dense(*args):
        return _dense(*args, key_valid=key_valid, **layout)

    args = (q, k, v, u, w, r)
    got, want = jax.jit(blocked)(*args), dense(*args)
    assert got.shape == want.shape == q.shape
    assert _rel_err(got, want) <= TOL
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * ct), argnums=range(6)))(*args)
             for f in (blocked, dense)]
    for name, g, gd in zip(("q", "k", "v", "u", "v_bias", "r"), *grads):
        assert np.abs(gd).max() > 0, name
        assert _rel_err(g, gd) <= TOL, (name, _rel_err(g, gd))
    return np.asarray(got), np.asarray(want)


@pytest.mark.parametrize("n", [64, 50])
def test_causal_self_attention_equals_dense(n, schedule):
    """Decoder self-attention, T=16, at a multiple of T and not; in batch 1 the first 3 keys are
    invalid, so rows 0..2 have no allowed key and must come out zero, as the dense path gives."""
    key_valid = jnp.ones((2, n), bool).at[1, :3].set(False)
    got, _ = _check_equal(dict(q_len=n, causal=True), key_valid, (16, 16))
    assert np.all(got[1, :3] == 0) and np.abs(got[1, 3:]).min(axis=-1).max() > 0


_M, _R = 8, 16  # a chunk of 8 queries, neighbours of 16 tokens


def _cca_valid():
    """Two neighbours of R tokens; batch 0: the second neighbour's tail missing; batch 1: none."""
    valid = np.ones((2, 2 * _R), bool)
    valid[0, _R + 10:] = False
    valid[1] = False
    return jnp.asarray(valid)


@pytest.mark.parametrize("case", ["cca", "encoder_self", "encoder_cross"])
def test_non_causal_masked_attention_equals_dense(case, schedule):
    """CCA (query offset m-1, k neighbours as key periods, missing neighbours), the encoder's
    self-attention (padded keys masked) and its cross-attention to the chunk (query periods),
    with lengths that are not multiples of the blocks."""
    if case == "cca":
        layout, blocks = dict(q_len=_M + 4, q_offset=_M - 1, k_period=_R), (8, 8)
        valid = _cca_valid()
    elif case == "encoder_self":
        layout, blocks = dict(q_len=20), (8, 8)
        valid = jnp.ones((2, 20), bool).at[0, 13:].set(False).at[1, 17:].set(False)
    else:
        layout, blocks = dict(q_len=2 * _R, q_period=_R), (8, 16)
        valid = jnp.ones((2, 12), bool)
    got, _ = _check_equal(layout, valid, blocks, seed=1)
    if case == "cca":
        assert np.all(got[1] == 0) and np.abs(got[0]).max() > 0


def test_bfloat16_is_as_close_to_float32_as_the_dense_path_is(schedule):
    """In bfloat16 (the dtype of the bf16 presets) the blocked output and gradients are no
    further from the float32 result than the dense bfloat16 path is (within 2x + 1e-3)."""
    n = 50
    q, k, v, u, w, r, ct = (x.astype(jnp.bfloat16) for x in _inputs(6, 2, n, n, n))
    run = {"blocked": lambda *a: blocked_relative_attention(*a, r_base=0, causal=True,
                                                            block_q=16, block_k=16),
           "dense": lambda *a: _dense(*a, causal=True)}

    def out_and_grads(f, dtype):
        args = tuple(x.astype(dtype) for x in (q, k, v, u, w, r))
        loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32) * ct.astype(jnp.float32))  # noqa: E731
        return (f(*args), *jax.grad(loss, argnums=range(6))(*args))

    truth = out_and_grads(run["dense"], jnp.float32)
    blocked, dense = (out_and_grads(run[m], jnp.bfloat16) for m in ("blocked", "dense"))
    for name, t, b, d in zip(("out", "q", "k", "v", "u", "v_bias", "r"), truth, blocked, dense):
        assert b.dtype == jnp.bfloat16, name
        assert _rel_err(b, t) <= 2 * _rel_err(d, t) + 1e-3, (name, _rel_err(b, t))


def _module_pair(causal, q_len, k_len, blocks, **pos):
    """RelativeAttention.apply, and the same parameters through the blocked function."""
    d = H * DH
    mod = RelativeAttention(H, DH)
    rng = np.random.default_rng(3)
    xq = jnp.asarray(rng.normal(size=(2, q_len, d)), jnp.float32)
    xkv = xq if causal else jnp.asarray(rng.normal(size=(2, k_len, 12)), jnp.float32)
    params = nn.unbox(mod.init(jax.random.key(0), xq, xkv, None, causal=causal, **pos))
    params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape), p.dtype),
                          params)  # the biases start at zero: make them count
    key_valid = None if causal else _cca_valid()

    def dense(params, xq, xkv):
        return mod.apply(params, xq, xkv, key_valid, causal=causal, **pos)

    def blocked(params, xq, xkv):
        p = params["params"]
        scale = DH ** -0.5
        q = jnp.einsum("bqd,dhk->bqhk", xq, p["wq"] * scale)
        k = jnp.einsum("bsd,dhk->bshk", xkv, p["wk"])
        v = jnp.einsum("bsd,dhk->bshk", xkv, p["wv"])
        r_base, count = distance_span(q_len, k_len, causal=causal, **pos)
        r = jnp.einsum("cd,dhk->chk", sinusoids(r_base + jnp.arange(count), d), p["wr"])
        out = blocked_relative_attention(
            q, k, v, p["u_bias"] * scale, p["v_bias"] * scale, r, r_base=r_base, causal=causal,
            key_valid_BxK=None if causal else _cca_valid(), block_q=blocks[0],
            block_k=blocks[1], **pos)
        return jnp.einsum("bqhk,hkd->bqd", out, p["wo"])

    return dense, blocked, (params, xq, xkv)


@pytest.mark.parametrize("case", ["causal", "cca"])
def test_relative_attention_module_equals_blocked_between_its_projections(case):
    """The blocked function computes RelativeAttention itself: same output, same gradients
    w.r.t. every parameter (wq, wk, wv, wr, wo, u, v) and the inputs."""
    if case == "causal":
        dense, blocked, args = _module_pair(True, 50, 50, (16, 16))
    else:
        dense, blocked, args = _module_pair(False, _M, 2 * _R, (8, 8), q_offset=_M - 1,
                                            k_period=_R)
    assert _rel_err(jax.jit(blocked)(*args), dense(*args)) <= TOL
    def grads(f):
        return jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2)))(*args)

    got, want = grads(blocked), grads(dense)
    if case == "cca":  # kv is the neighbours, a different input from the queries
        assert _rel_err(got[2], want[2]) <= TOL
    assert _rel_err(got[1], want[1]) <= TOL
    flat_got, flat_want = jax.tree.leaves_with_path(got[0]), jax.tree.leaves(want[0])
    for (path, g), gd in zip(flat_got, flat_want):
        assert np.abs(gd).max() > 0, path
        assert _rel_err(g, gd) <= TOL, (jax.tree_util.keystr(path), _rel_err(g, gd))


def test_key_blocks_above_the_causal_diagonal_are_never_read(schedule):
    """NaN in the keys and values of the last key block: the dense path's rows all become NaN
    (0 * NaN in probs @ v); the blocked rows of every earlier query block stay finite and equal
    the dense output without the NaN, so those blocks were never computed."""
    n, t = 64, 16
    q, k, v, u, w, r, _ = _inputs(2, 1, n, n, n)
    def run(k, v):
        return blocked_relative_attention(q, k, v, u, w, r, r_base=0, causal=True,
                                          block_q=t, block_k=t)

    k_nan, v_nan = k.at[:, n - t:].set(jnp.nan), v.at[:, n - t:].set(jnp.nan)
    assert np.isnan(np.asarray(_dense(q, k_nan, v_nan, u, w, r, causal=True))).all()
    got = np.asarray(run(k_nan, v_nan))
    assert np.isfinite(got[:, :n - t]).all() and np.isnan(got[:, n - t:]).any()
    assert _rel_err(got[:, :n - t], _dense(q, k, v, u, w, r, causal=True)[:, :n - t]) <= TOL


def _avals_with_two_dims_at_least(closed_jaxpr, n):
    """Every intermediate (any nesting: scan, while, custom VJP bodies) with two dims >= n."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                shape = getattr(var.aval, "shape", ())
                if sum(s >= n for s in shape) >= 2:
                    found.append((eqn.primitive.name, shape))
            for p in eqn.params.values():
                for sub in p if isinstance(p, (tuple, list)) else (p,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(closed_jaxpr.jaxpr)
    return found


def test_no_n_by_n_intermediate_forward_or_backward(schedule):
    """value_and_grad at N=256, T=32 holds no tensor with two dims >= N anywhere in its jaxpr
    (the dense path, traced the same way, does: the check can fail)."""
    n = 256
    q, k, v, u, w, r, ct = _inputs(4, 1, n, n, n)

    def loss(f):
        return jax.value_and_grad(lambda *a: jnp.sum(f(*a) * ct), argnums=range(6))

    blocked = lambda *a: blocked_relative_attention(*a, r_base=0, causal=True,  # noqa: E731
                                                    block_q=32, block_k=32)
    dense = lambda *a: _dense(*a, causal=True)  # noqa: E731
    args = (q, k, v, u, w, r)
    assert _avals_with_two_dims_at_least(jax.make_jaxpr(loss(dense))(*args), n)
    assert _avals_with_two_dims_at_least(jax.make_jaxpr(loss(blocked))(*args), n) == []


@pytest.mark.parametrize("kwargs, words", [
    (dict(k_period=12, block_k=8), "key block 8 must divide the key period 12"),
    (dict(r_base=1, causal=True), "r covers distances 1..24 but these positions need 0..23"),
    (dict(causal=True, q_offset=3), "causal needs identical query/key positions"),
    (dict(block_q=0), "block sizes (0, 8) must be >= 1"),
])
def test_bad_layout_is_one_clear_line(kwargs, words):
    q, k, v, u, w, r, _ = _inputs(5, 1, 24, 24, 24)
    kwargs = dict(dict(r_base=0, causal=False, block_q=8, block_k=8), **kwargs)
    with pytest.raises(ValueError) as err:
        blocked_relative_attention(q, k, v, u, w, r, **kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)
