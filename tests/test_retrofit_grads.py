"""Retrofit differentiates only what it trains: the step takes gradients of the encoder and CCA
weights alone (XLA never forms the frozen decoder's weight gradients), the logged grad_norm is
the norm gradient clipping scales by, and the update equals the one computed from every gradient."""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest

from _stand_ins import random_batch
from _train_setup import cfg as small_cfg
from retro_jax.config import ModelConfig, load_config
from retro_jax.model import abstract_params, init_params
from retro_jax.runtime.state import TrainState, abstract_state
from retro_jax.train import retrofit
from retro_jax.train.step import loss_fn, make_optimizer, optimizer_from_config, train_step

B1, CLIP = 0.9, 1e-3  # a clip norm far below the gradients' norm: clipping always acts


def _trained(tree, mask) -> list:
    return [x for x, keep in zip(jax.tree.leaves(tree), jax.tree.leaves(mask)) if keep]


@pytest.mark.parametrize("microbatches", [1, 2])
def test_grad_norm_is_the_trained_leaves_norm_that_clipping_divides_by(microbatches):
    cfg = small_cfg()
    params = init_params(cfg, jax.random.key(0))
    mask = retrofit.trainable_mask(params)
    batch = random_batch(cfg, 4, 128, seed=1)
    opt = make_optimizer(1e-3, clip_norm=CLIP, b1=B1, trainable_mask=mask)
    state = TrainState.create(params, opt)
    step = functools.partial(train_step, cfg=cfg, optimizer=opt, microbatches=microbatches)
    new, metrics = jax.jit(functools.partial(step, trainable_mask=mask))(state, batch)

    every = jax.jit(jax.grad(lambda p: loss_fn(p, cfg, batch)[0]))(params)  # all params' gradients
    g = _trained(every, mask)
    norm = float(optax.tree.norm(g))
    logged = float(metrics["grad_norm"])
    assert logged == pytest.approx(norm, rel=1e-4)
    assert float(optax.tree.norm(every)) > 1.05 * norm  # the frozen decoder's gradients are not in it
    assert norm > 10 * CLIP

    # AdamW's first moment after one step is (1 - b1) x the clipped gradient: clipping divided the
    # trained leaves' gradients by the logged norm (and no frozen gradient entered its norm).
    mu = jax.tree.leaves(optax.tree_utils.tree_get(new.opt_state, "mu"))  # frozen leaves are MaskedNodes
    assert len(mu) == len(g)
    clipped = [x * (CLIP / logged) for x in g]
    err = float(optax.tree.norm([m / (1 - B1) - c for m, c in zip(mu, clipped)]))
    assert err <= 1e-4 * CLIP

    for before, after, keep in zip(jax.tree.leaves(params), jax.tree.leaves(new.params), jax.tree.leaves(mask)):
        if not keep:
            np.testing.assert_array_equal(np.asarray(after), np.asarray(before))  # frozen: bit for bit
    assert any(not np.array_equal(a, b) for a, b in zip(_trained(params, mask), _trained(new.params, mask)))

    # The same update as differentiating every parameter and letting the optimizer drop the frozen ones.
    ref, _ = jax.jit(step)(state, batch)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def _flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def test_the_retrofit_backward_costs_at_most_three_quarters_of_every_gradient():
    """XLA's cost analysis of one `tiny` train step (its batch and sequence length) with the decoder
    frozen: differentiating only encoder + CCA against differentiating every parameter (the frozen
    branch then drops the decoder's gradients, but computing a norm over all of them kept XLA from
    removing them). Backward = step - forward (the optimizer's elementwise work is in both)."""
    config = load_config("tiny")
    cfg, tc = ModelConfig.from_preset("tiny"), config.train
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                         random_batch(cfg, tc.batch_size, tc.seq_len))
    mask = retrofit.trainable_mask(abstract_params(cfg))
    opt, schedule = optimizer_from_config(tc, trainable_mask=mask)
    state = abstract_state(cfg, opt)

    def step(trainable_mask):
        return functools.partial(train_step, cfg=cfg, optimizer=opt, schedule=schedule, trainable_mask=trainable_mask)

    retro, every = _flops(step(mask), state, batch), _flops(step(None), state, batch)
    forward = _flops(lambda p, b: loss_fn(p, cfg, b)[0], state.params, batch)
    ratio = (retro - forward) / (every - forward)
    print(f"\ntiny retrofit step FLOPs (XLA cost analysis, batch {tc.batch_size} x {tc.seq_len}): "
          f"forward {forward:.4g}; step: trainable subtree {retro:.4g}, every param {every:.4g} "
          f"({retro / every:.3f}x); backward {retro - forward:.4g} vs {every - forward:.4g} ({ratio:.3f}x)")
    assert 0 < forward < retro < every
    assert ratio <= 0.75
