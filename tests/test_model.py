"""Properties of the RETRO model a user relies on: causality (tokens and neighbours), the m-1
offset of chunked cross-attention, masking of missing neighbours, baseline equivalence
(retrofitting), jit vs eager, bfloat16 vs float32."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.config import ModelConfig
from retro_jax.model.count import is_retrieval_path
from retro_jax.model.retro import Retro

# Live CCA output projections, so every path through the neighbours is exercised.
CFG = ModelConfig.from_preset("tiny").replace(vocab_size=512, cca_zero_init=False)
M = CFG.chunk_size


def _inputs(seed: int, b: int, n: int, k: int = 2):
    l = -(-n // M)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (b, n), dtype=np.int32)
    nbrs = rng.integers(0, CFG.vocab_size, (b, l, k, 2 * M), dtype=np.int32)
    return tokens, nbrs


@pytest.fixture(scope="module")
def model():
    tokens, nbrs = _inputs(0, 2, 4 * M)
    variables = Retro(CFG).init(jax.random.key(0), tokens, nbrs)
    apply = jax.jit(lambda v, t, nb: Retro(CFG).apply(v, t, nb))
    return variables, apply


def test_causality_through_tokens(model):
    variables, apply = model
    n = 3 * M + 10  # not a multiple of the chunk size
    tokens, nbrs = _inputs(1, 2, n)
    base = np.asarray(apply(variables, tokens, nbrs))
    for t in (0, M - 2, M - 1, M, 2 * M - 1, 2 * M + 5, n - 1):
        changed = tokens.copy()
        changed[:, t] = (changed[:, t] + 7) % CFG.vocab_size
        out = np.asarray(apply(variables, changed, nbrs))
        np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-5, rtol=0,
                                   err_msg=f"changing token {t} changed earlier logits")
        assert np.abs(out[:, t] - base[:, t]).max() > 1e-3, f"token {t} does not affect its own logits"


def test_causality_through_neighbours(model):
    """Neighbours of chunk u reach position u*m + m-1 first, never earlier."""
    variables, apply = model
    n = 4 * M
    tokens, nbrs = _inputs(2, 2, n)
    base = np.asarray(apply(variables, tokens, nbrs))
    for u in range(n // M):
        changed = nbrs.copy()
        changed[:, u] = (changed[:, u] + 11) % CFG.vocab_size
        out = np.asarray(apply(variables, tokens, changed))
        first = u * M + M - 1
        np.testing.assert_allclose(out[:, :first], base[:, :first], atol=1e-5, rtol=0,
                                   err_msg=f"neighbours of chunk {u} leaked before position {first}")
        assert np.abs(out[:, first] - base[:, first]).max() > 1e-3, \
            f"neighbours of chunk {u} do not reach position {first}"


def test_first_positions_never_see_neighbours_and_none_equals_all_missing(model):
    variables, apply = model
    tokens, nbrs = _inputs(3, 2, 3 * M)
    with_nb = np.asarray(apply(variables, tokens, nbrs))
    off = np.asarray(jax.jit(lambda v, t: Retro(CFG).apply(v, t, None))(variables, tokens))
    missing = np.asarray(apply(variables, tokens, -np.ones_like(nbrs)))
    np.testing.assert_allclose(with_nb[:, :M - 1], off[:, :M - 1], atol=1e-5, rtol=0)
    assert np.abs(with_nb[:, M - 1:] - off[:, M - 1:]).max() > 1e-3
    np.testing.assert_allclose(missing, off, atol=1e-5, rtol=0)


def test_missing_slot_equals_fewer_neighbours(model):
    """A slot of -1 is masked out: K=2 with slot 1 missing == K=1; a partly missing neighbour
    (padding past a document's end) differs from the full one only through the unmasked part."""
    variables, apply = model
    tokens, nbrs = _inputs(4, 2, 2 * M)
    one = nbrs[:, :, :1]
    two_missing = np.concatenate([one, -np.ones_like(one)], axis=2)
    np.testing.assert_allclose(np.asarray(apply(variables, tokens, two_missing)),
                               np.asarray(apply(variables, tokens, one)), atol=1e-5, rtol=0)


def test_baseline_with_retrieval_params_removed_equals_retrieval_off(model):
    variables, _ = model
    params = nn.unbox(variables)["params"]
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    kept = {}
    for keypath, leaf in flat:
        path = tuple(k.key for k in keypath)
        if not is_retrieval_path(path):
            node = kept
            for p in path[:-1]:
                node = node.setdefault(p, {})
            node[path[-1]] = leaf
    base_cfg = CFG.baseline()
    tokens, _ = _inputs(5, 2, 2 * M + 3)
    base_vars = Retro(base_cfg).init(jax.random.key(1), tokens)
    # Same tree structure as a freshly initialised baseline: nothing missing, nothing extra.
    assert jax.tree.structure(nn.unbox(base_vars)["params"]) == jax.tree.structure(kept)
    baseline = Retro(base_cfg).apply({"params": kept}, tokens)
    retro_off = Retro(CFG).apply(variables, tokens, None)
    np.testing.assert_array_equal(np.asarray(baseline), np.asarray(retro_off))


def test_fresh_retro_computes_its_baseline_and_learns_to_read():
    """With the default zero-initialised CCA output projections, a fresh RETRO's logits do not
    depend on its neighbours, and the gradient still reaches the CCA output projections, so
    training moves it off its baseline's function."""
    cfg = CFG.replace(cca_zero_init=True)
    tokens, nbrs = _inputs(8, 2, 3 * M)
    variables = Retro(cfg).init(jax.random.key(3), tokens, nbrs)
    apply = jax.jit(lambda v, t, nb: Retro(cfg).apply(v, t, nb))
    on = apply(variables, tokens, nbrs)
    other = apply(variables, tokens, (nbrs + 5) % cfg.vocab_size)
    off = jax.jit(lambda v, t: Retro(cfg).apply(v, t, None))(variables, tokens)
    np.testing.assert_array_equal(np.asarray(on), np.asarray(off))
    np.testing.assert_array_equal(np.asarray(on), np.asarray(other))

    def loss(params):
        logits = Retro(cfg).apply({"params": params}, tokens, nbrs)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grads = nn.unbox(jax.jit(jax.grad(loss))(variables["params"]))
    cca_wo = [np.abs(np.asarray(leaf)).max() for path, leaf in jax.tree_util.tree_leaves_with_path(grads)
              if "cca" in jax.tree_util.keystr(path) and jax.tree_util.keystr(path).endswith("['wo']")]
    assert len(cca_wo) == len(cfg.cca_layers) and min(cca_wo) > 0


def test_jit_equals_eager(model):
    variables, apply = model
    tokens, nbrs = _inputs(6, 1, 2 * M)
    jitted = np.asarray(apply(variables, tokens, nbrs))
    with jax.disable_jit():
        eager = np.asarray(Retro(CFG).apply(variables, tokens, nbrs))
    np.testing.assert_allclose(jitted, eager, atol=2e-5, rtol=2e-5)


def test_bfloat16_close_to_float32(model):
    """bf16 compute (f32 params, f32 softmax/norm statistics) stays within 3% of the logit
    scale and 1% of the cross-entropy of float32."""
    variables, apply = model
    tokens, nbrs = _inputs(7, 2, 3 * M)
    f32 = np.asarray(apply(variables, tokens, nbrs))
    bf16 = np.asarray(jax.jit(lambda v, t, nb: Retro(CFG.replace(dtype="bfloat16")).apply(v, t, nb))(
        variables, tokens, nbrs))
    assert bf16.dtype == np.float32
    assert np.abs(bf16 - f32).mean() / f32.std() < 0.03

    def xent(logits):
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], -1).mean()

    assert abs(xent(bf16) - xent(f32)) / xent(f32) < 0.01


def test_bad_neighbour_shape_is_a_clear_error(model):
    variables, _ = model
    tokens, nbrs = _inputs(8, 1, 2 * M)
    with pytest.raises(ValueError, match=r"ceil\(N/m\)"):
        Retro(CFG).apply(variables, tokens, nbrs[:, :1])
    with pytest.raises(ValueError, match="no CCA layers"):
        Retro(CFG.baseline()).apply(variables, tokens, nbrs)
