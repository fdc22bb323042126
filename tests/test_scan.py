"""Scanned, rematerialised decoder layers compute what the unrolled stack computes: the same
logits and gradients (float32 tolerance stated below), the same parameter counts, the same
retrofit invariant, and causality, for every remat policy."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _stand_ins import random_batch
from retro_jax.config import ModelConfig, model_config
from retro_jax.model import Retro, abstract_params, init_params
from retro_jax.model.count import is_retrieval_path, param_counts
from retro_jax.model.layout import stack_layers, unstack_layers
from retro_jax.train.step import loss_fn

# 6 layers, CCA in 2, 4, 6: layers 1-2 unrolled (2 runs the encoder), then 2 scanned blocks of 2.
CFG = ModelConfig.from_preset("tiny").replace(vocab_size=512, num_layers=6, cca_layers=(2, 4, 6), scan_start=2,
                                              scan_period=2, cca_zero_init=False)
RTOL, ATOL = 2e-5, 2e-6  # float32: scan and remat reorder nothing but fusion boundaries


@functools.lru_cache(maxsize=None)
def unrolled():
    params = init_params(CFG, jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in random_batch(CFG, 2, 192, seed=1).items()}
    loss, grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, CFG, batch)[0]))(params)
    logits = jax.jit(lambda p: Retro(CFG).apply({"params": p}, batch["tokens"], batch["neighbours"]))(params)
    return params, batch, logits, grads


@pytest.mark.parametrize("policy", ["none", "dots", "full"])
def test_scanned_logits_and_gradients_equal_the_unrolled_stack(policy):
    params, batch, logits, grads = unrolled()
    cfg = CFG.replace(scan_layers=True, remat_policy=policy)
    stacked = stack_layers(params, cfg)
    assert "blocks" in stacked and "layer_3" not in stacked
    assert jax.tree.structure(stacked) == jax.tree.structure(abstract_params(cfg))
    got = jax.jit(lambda p: Retro(cfg).apply({"params": p}, batch["tokens"], batch["neighbours"]))(stacked)
    np.testing.assert_allclose(np.asarray(got), np.asarray(logits), rtol=RTOL, atol=ATOL)
    got_grads = jax.jit(jax.grad(lambda p: loss_fn(p, cfg, batch)[0]))(stacked)
    for a, b in zip(jax.tree.leaves(unstack_layers(got_grads, cfg)), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_unstack_inverts_stack_exactly():
    params = unrolled()[0]
    cfg = CFG.replace(scan_layers=True)
    back = unstack_layers(stack_layers(params, cfg), cfg)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["retro-172m", "baseline-132m", "retro-1.5b", "retro-7.5b", "baseline-7b"])
def test_paper_presets_scan_with_the_same_parameter_counts(name):
    cfg = model_config(name)
    assert param_counts(cfg.replace(scan_layers=True)) == param_counts(cfg)


def test_a_scanned_retro_is_its_scanned_baseline_plus_the_retrieval_weights():
    retro = model_config("retro-172m").replace(scan_layers=True)
    decoder = jax.tree_util.tree_flatten_with_path(abstract_params(retro))[0]
    kept = {jax.tree_util.keystr(p): (x.shape, x.dtype) for p, x in decoder
            if not is_retrieval_path(tuple(getattr(k, "key", str(k)) for k in p))}
    base = jax.tree_util.tree_flatten_with_path(abstract_params(retro.baseline()))[0]
    assert kept == {jax.tree_util.keystr(p): (x.shape, x.dtype) for p, x in base}


@pytest.mark.slow
def test_scanned_model_is_causal():
    params, batch, _, _ = unrolled()
    cfg = CFG.replace(scan_layers=True, remat_policy="full")
    apply = jax.jit(lambda p, t: Retro(cfg).apply({"params": p}, t, batch["neighbours"]))
    stacked = stack_layers(params, cfg)
    t = 100
    changed = batch["tokens"].at[:, t].set((batch["tokens"][:, t] + 1) % cfg.vocab_size)
    a, b = np.asarray(apply(stacked, batch["tokens"])), np.asarray(apply(stacked, changed))
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert not np.allclose(a[:, t:], b[:, t:])


@pytest.mark.parametrize("change,message", [
    (dict(cca_layers=(4, 6), scan_start=2), "runs the encoder"),
    (dict(cca_layers=(2, 3, 6), scan_start=2), "do not repeat"),
    (dict(remat_policy="some"), "remat_policy"),
])
def test_layouts_that_cannot_scan_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        CFG.replace(scan_layers=True, **change)


def test_scanned_params_shard_on_one_mesh_and_restore_bitwise_onto_another(tmp_path):
    from retro_jax.runtime.checkpoint import Checkpointer
    from retro_jax.runtime.mesh import make_mesh
    from retro_jax.runtime.state import restore_params, sharded_init
    from retro_jax.train.step import make_optimizer

    cfg = CFG.replace(scan_layers=True, remat_policy="dots")
    state, shardings = sharded_init(cfg, make_optimizer(1e-3), make_mesh(2, 2, 2), jax.random.key(0))
    wi = state.params["blocks"]["layer_1"]["ffw"]["wi"]
    assert wi.shape[0] == 2 and wi.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {}, {}, force=True)
    restored = restore_params(tmp_path, cfg, make_mesh(8, 1, 1))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state.params)):
        assert len(a.sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
