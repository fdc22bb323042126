"""The Pallas GPU (Triton) kernels compute the dense RelativeAttention, in Pallas interpret mode.

Output and gradients (q, k, v, u, v-bias, r) against layers.py's dense formula on the same
projections (test_blocked_attention's `_dense`), relative to the largest reference entry:
<= 1e-5 in float32. No GPU is needed: the kernels run interpreted, and the GPU lowering
(StableHLO with the Triton IR of each kernel) is produced for a CUDA target on this host.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.triton import pallas_call_registration as triton_registration
from test_blocked_attention import (_avals_with_two_dims_at_least, _cca_valid, _dense, _inputs,
                                    _M, _R, _rel_err)

from retro_jax.model.blocked_attention import distance_span
from retro_jax.model.attention_mode import compile_for
from retro_jax.model.pallas_attention_gpu import relative_attention_gpu

TOL = 1e-5
NAMES = ("out", "q", "k", "v", "u", "v_bias", "r")


def _out_and_grads(f, args, ct, compiled=None):
    """The output and the six input cotangents of sum(f * ct), from one compiled vjp."""
    def run(*a):
        out, vjp = jax.vjp(f, *a)
        return (out, *vjp(ct.astype(out.dtype)))
    run = compiled or jax.jit(run)
    return run(*args), run


def _check_equal(layout, key_valid, blocks, seed=0, interpret=True):
    b, q_len, k_len = key_valid.shape[0], layout.pop("q_len"), key_valid.shape[1]
    r_base, count = distance_span(q_len, k_len, **layout)
    q, k, v, u, w, r, ct = _inputs(seed, b, q_len, k_len, count)
    common = dict(r_base=r_base, key_valid_BxK=key_valid, block_q=blocks[0], block_k=blocks[1])

    def pallas(*a):
        return relative_attention_gpu(*a, interpret=interpret, **common, **layout)

    def dense(*a):
        return _dense(*a, key_valid=key_valid, **layout)

    args = (q, k, v, u, w, r)
    got, compiled = _out_and_grads(pallas, args, ct)
    want, _ = _out_and_grads(dense, args, ct)
    assert got[0].shape == q.shape
    for name, g, gd in zip(NAMES, got, want):
        assert np.abs(gd).max() > 0, name
        assert _rel_err(g, gd) <= TOL, (name, _rel_err(g, gd))
    return got, lambda *a: _out_and_grads(None, a, ct, compiled)[0], args


@pytest.mark.parametrize("n, blocks", [(64, (32, 16)), (40, (16, 32))])
def test_causal_self_attention_equals_dense_and_skips_blocks_above_the_diagonal(n, blocks):
    """Decoder self-attention at a multiple of the blocks and not (40: queries padded to 48,
    keys to 64), with query blocks longer and shorter than key blocks; batch row 1 has its
    first 3 keys invalid, so rows 0..2 give 0, as the dense path. Then NaN in the keys and
    values of the last key block: the output and dq of every query block before the one that
    holds it stay finite and unchanged, so no kernel computed a tile above the diagonal."""
    key_valid = jnp.ones((2, n), bool).at[1, :3].set(False)
    got, run, (q, k, v, u, w, r) = _check_equal(dict(q_len=n, causal=True), key_valid, blocks)
    assert np.all(got[0][1, :3] == 0) and np.abs(got[0][1, 3:]).min(axis=-1).max() > 0
    tq, tk = blocks
    last = (n - 1) // tk * tk  # the last key block's first row
    clean = last // tq * tq  # query rows of the blocks before it
    nan_out, nan_dq = run(q, k.at[:, last:].set(jnp.nan), v.at[:, last:].set(jnp.nan), u, w, r)[:2]
    assert clean > 0 and np.isnan(np.asarray(nan_out[:, last:])).any()
    for clean_x, poisoned in ((got[0], nan_out), (got[1], nan_dq)):
        assert np.array_equal(np.asarray(clean_x[:, :clean]), np.asarray(poisoned[:, :clean]))


@pytest.mark.parametrize("case", ["cca", "encoder_self", "encoder_cross"])
def test_non_causal_masked_attention_equals_dense(case):
    """CCA (query offset m-1, the neighbours as key periods of 16, missing neighbours, a batch
    row with no valid key at all, which gives 0), the encoder's self-attention (padded keys)
    and its cross-attention to the chunk (query periods), lengths not multiples of blocks."""
    if case == "cca":
        layout, blocks, valid = dict(q_len=_M + 4, q_offset=_M - 1, k_period=_R), (16, 16), \
            _cca_valid()
    elif case == "encoder_self":
        layout, blocks = dict(q_len=20), (16, 32)
        valid = jnp.ones((2, 20), bool).at[0, 13:].set(False).at[1, 17:].set(False)
    else:
        layout, blocks, valid = dict(q_len=2 * _R, q_period=_R), (16, 16), jnp.ones((2, 12), bool)
    out = _check_equal(layout, valid, blocks, seed=1)[0][0]
    if case == "cca":
        assert np.all(out[1] == 0) and np.abs(out[0]).max() > 0


def test_bfloat16_is_as_close_to_float32_as_the_dense_path_is():
    """In bfloat16 the kernels' output and gradients are no further from the float32 result
    than the dense bfloat16 path is (within 2x + 1e-3), and come back in bfloat16."""
    n = 40
    args32 = _inputs(6, 2, n, n, n)
    ct = args32[-1]
    pallas = lambda *a: relative_attention_gpu(*a, r_base=0, causal=True, block_q=16,  # noqa
                                               block_k=16, interpret=True)
    dense = lambda *a: _dense(*a, causal=True)  # noqa: E731
    bf16 = tuple(x.astype(jnp.bfloat16) for x in args32[:6])
    truth = _out_and_grads(dense, args32[:6], ct)[0]
    got, ref = _out_and_grads(pallas, bf16, ct)[0], _out_and_grads(dense, bf16, ct)[0]
    for name, t, g, d in zip(NAMES, truth, got, ref):
        assert g.dtype == jnp.bfloat16, name
        assert _rel_err(g, t) <= 2 * _rel_err(d, t) + 1e-3, (name, _rel_err(g, t))


def test_no_n_by_n_array_in_the_jaxpr_nor_in_the_gpu_lowering(monkeypatch):
    """value_and_grad at N=256 (Dh 64, blocks 64): no array with two dims >= N in its jaxpr
    (kernel bodies included; the dense path's has them), and, lowered for CUDA on this host,
    four Triton kernels (forward, dK/dV, dQ, d(r)) whose operands have no such shape either;
    each kernel's Triton module passes the MLIR verifier and holds the shift's CTA barrier."""
    n, h, dh = 256, 2, 64
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.normal(size=(1, n, h, dh)), jnp.float32) for _ in range(3))
    u, w = (jnp.asarray(rng.normal(size=(h, dh)), jnp.float32) for _ in range(2))
    r = jnp.asarray(rng.normal(size=(n, h, dh)), jnp.float32)

    def loss(f, **kw):
        return jax.value_and_grad(lambda *a: jnp.sum(f(*a, r_base=0, causal=True, **kw)),
                                  argnums=range(6))

    args = (q, k, v, u, w, r)
    interpreted = jax.make_jaxpr(loss(relative_attention_gpu, block_q=64, block_k=64,
                                      interpret=True))(*args)
    assert _avals_with_two_dims_at_least(interpreted, n) == []
    dense_jaxpr = jax.make_jaxpr(jax.value_and_grad(
        lambda *a: jnp.sum(_dense(*a, causal=True)), argnums=range(6)))(*args)
    assert _avals_with_two_dims_at_least(dense_jaxpr, n)

    modules = []
    lower_module = triton_registration.lowering.lower_jaxpr_to_triton_module

    def verified(*a, **kw):  # jax's own Triton lowering, each module kept for the checks
        result = lower_module(*a, **kw)
        result.module.operation.verify()
        modules.append(result.module.operation.get_asm())
        return result

    monkeypatch.setattr(triton_registration.lowering, "lower_jaxpr_to_triton_module", verified)
    step = jax.jit(loss(relative_attention_gpu, block_q=64, block_k=64))
    with compile_for("gpu"):  # as retro-jax plan traces for a backend this host lacks
        text = step.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @__gpu$xla.gpu.triton") == len(modules) == 4
    assert all("gpu.barrier" in m and "tt.dot" in m for m in modules)
    text = re.sub(r'ir = "[^"]*"', "", text)  # the kernels' Triton IR (bytecode)
    shapes = [tuple(int(d) for d in s.split("x")) for s in re.findall(r"tensor<([\dx]+)x", text)]
    assert shapes and max(max(s) for s in shapes) >= n
    assert [s for s in shapes if sum(d >= n for d in s) >= 2] == []


_GPU_CASES = {  # name: (layout, key validity, blocks), at the model's sizes of blocks
    "causal-256": (dict(q_len=256, causal=True), np.ones((2, 256), bool), (64, 64)),
    "causal-200": (dict(q_len=200, causal=True), np.ones((2, 200), bool), (64, 32)),
    "cca": (dict(q_len=64, q_offset=63, k_period=128),
            np.ones((2, 256), bool) & (np.arange(256) < 200)[None], (64, 64)),
    "encoder-cross": (dict(q_len=256, q_period=128), np.ones((2, 64), bool), (64, 64)),
}


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="needs a GPU backend (JAX_PLATFORMS=cuda): runs the compiled kernels")
@pytest.mark.parametrize("case", sorted(_GPU_CASES))
def test_on_a_gpu_the_compiled_kernels_equal_dense(case):
    """The prepared device check: the Triton-compiled kernels (not interpreted) against the
    dense formula, both in full float32 (no TF32 in the reference either)."""
    layout, valid, blocks = _GPU_CASES[case]
    with jax.default_matmul_precision("highest"):
        _check_equal(dict(layout), jnp.asarray(valid), blocks, interpret=False)


@pytest.mark.parametrize("kwargs, words", [
    (dict(block_q=24), "block_q 24 must be a power of two >= 16"),
    (dict(block_k=8), "block_k 8 must be a power of two >= 16"),
    (dict(k_period=24, block_k=16), "the key block 16 must divide the key period 24"),
    (dict(q_period=24, block_q=32), "the query block 32 must divide the query period 24"),
    (dict(r_base=1, causal=True), "r covers distances 1..48 but these positions need 0..47"),
])
def test_bad_layout_is_one_clear_line_before_anything_traces(kwargs, words):
    q, k, v, u, w, r, _ = _inputs(5, 1, 48, 48, 48)
    kwargs = dict(dict(r_base=0, causal=False, block_q=16, block_k=16, interpret=True), **kwargs)
    with pytest.raises(ValueError) as err:
        relative_attention_gpu(q, k, v, u, w, r, **kwargs)
    msg = str(err.value)
    assert words in msg and "'pallas'" in msg and "gpu" in msg and "\n" not in msg


def test_outside_interpret_mode_a_cpu_backend_is_one_clear_line():
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU backend runs the kernels")
    q, k, v, u, w, r, _ = _inputs(5, 1, 16, 16, 16)
    with pytest.raises(ValueError) as err:
        relative_attention_gpu(q, k, v, u, w, r, r_base=0, causal=True)
    msg = str(err.value)
    assert "'pallas'" in msg and jax.default_backend() in msg and "\n" not in msg
