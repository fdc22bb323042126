"""Sharded training gives the single-device results: 3 AdamW steps on 8 fake CPU devices laid out
as data x fsdp x tensor = 2x2x2, 8x1x1 and 1x4x2 match one device. Only the order of float32
reductions differs, so: losses within rtol 1e-5; parameters compared with how far they moved
(per tensor, max |diff| <= 5% of the max move and mean |diff| <= 0.5% of the mean move; the
initial parameters exactly). Adam divides by sqrt(nu), so where a gradient is almost zero (the
high-frequency rows of the relative-position projection W_R) reduction noise in the gradient
becomes a visible share of the step; everywhere else the difference is below 1e-6.
A non-finite step is skipped bit for bit and counted; frozen parameters never move."""

import functools

import jax
import numpy as np
import pytest

from retro_jax.model import init_params
from retro_jax.runtime import mesh as mesh_lib
from retro_jax.runtime.forward import make_nll_fn
from retro_jax.runtime.state import TrainState
from retro_jax.train.step import train_step
import _train_setup as setup

LOSS_RTOL, MAX_SHARE, MEAN_SHARE = 1e-5, 0.05, 0.005


@pytest.fixture(scope="module")
def reference():
    """One device, no mesh, no rules: the plain jitted step."""
    cfg, (opt, schedule) = setup.cfg(), setup.optimizer()
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    init = jax.device_get(params)
    state = TrainState.create(params, opt)
    step = jax.jit(functools.partial(train_step, cfg=cfg, optimizer=opt, schedule=schedule))
    metrics = []
    for b in setup.batches():
        state, m = step(state, b)
        metrics.append(jax.device_get(m))
    return {"init": init, "final": jax.device_get(state.params), "metrics": metrics}


def _leaves(*trees):
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(trees[0])[0]]
    return zip(paths, *(map(np.asarray, jax.tree_util.tree_leaves(t)) for t in trees))


def _assert_params_close(got, want, init):
    for path, x, y, x0 in _leaves(got, want, init):
        diff, move = np.abs(x - y), np.abs(y - x0)
        assert diff.max() <= MAX_SHARE * move.max(), (path, diff.max(), move.max())
        assert diff.mean() <= MEAN_SHARE * move.mean(), (path, diff.mean(), move.mean())


def _check_run(run, reference):
    losses = [float(m["loss"]) for m in reference["metrics"]]
    np.testing.assert_allclose(run["losses"], losses, rtol=LOSS_RTOL)
    _assert_params_close(jax.device_get(run["state"].params), reference["final"], reference["init"])


def test_2x2x2_matches_one_device(reference):
    run = setup.run_8_devices()
    # sharded_init gives the single-device initial parameters, born on their shards.
    for path, x, y in _leaves(run["init_params"], reference["init"]):
        np.testing.assert_array_equal(x, y, err_msg=path)
    _check_run(run, reference)
    state, shardings = run["state"], run["shardings"]
    for x, sh in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(shardings)):
        assert isinstance(x, jax.Array) and x.sharding.spec == sh.spec  # plain arrays, no boxes
    wi = state.params["layer_1"]["ffw"]["wi"]
    assert wi.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    # Optimizer moments are sharded like the parameters they mirror (masked state included).
    mu = [x for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
          if "mu" in jax.tree_util.keystr(p) and "wi" in jax.tree_util.keystr(p)]
    assert mu and all(x.sharding.spec == wi.sharding.spec for x in mu)


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 4, 2)])
def test_other_meshes_match_one_device(reference, shape):
    _check_run(setup.run_sharded(shape), reference)


def test_frozen_params_are_bitwise_unchanged(reference):
    mask = setup.trainable_mask()
    final = jax.device_get(setup.run_8_devices()["state"].params)
    moved = 0
    for (path, t), a, b in zip(jax.tree_util.tree_flatten_with_path(mask)[0],
                               jax.tree_util.tree_leaves(final), jax.tree_util.tree_leaves(reference["init"])):
        if t:
            moved += not np.array_equal(a, b)
        else:
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert moved == sum(jax.tree_util.tree_leaves(mask))  # every trainable tensor moved


def test_metrics(reference):
    _, schedule = setup.optimizer()
    for i, m in enumerate(reference["metrics"]):
        np.testing.assert_allclose(m["bits_per_token"], m["loss"] / np.log(2), rtol=1e-6)
        np.testing.assert_allclose(m["learning_rate"], schedule(i), rtol=1e-6)
        assert m["skipped"] == 0 and np.isfinite(m["grad_norm"]) and m["tokens"] == setup.BATCH * setup.SEQ


def _fresh_copy(run):
    """A copy of the run's state in new buffers (the step donates its input)."""
    return jax.device_put(jax.device_get(run["state"]), run["shardings"])


@pytest.mark.parametrize("poison", ["loss_mask", "param"])
def test_non_finite_step_is_skipped(poison):
    run = setup.run_8_devices()
    state, mesh, step = _fresh_copy(run), run["mesh"], run["step"]
    batch = dict(setup.batches()[0])
    if poison == "loss_mask":
        batch["loss_mask"] = batch["loss_mask"].copy()
        batch["loss_mask"][3, 17] = np.nan
    else:
        host = jax.device_get(state)
        wi = np.array(host.params["encoder"]["layer_1_ffw"]["wi"])
        wi[0, 0] = np.inf
        host.params["encoder"]["layer_1_ffw"]["wi"] = wi
        state = jax.device_put(host, run["shardings"])
    before = jax.device_get(state)
    state, m = step(state, mesh_lib.global_batch(batch, mesh))
    after = jax.device_get(state)
    assert int(m["skipped"]) == 1 and not np.isfinite(float(m["loss"]))
    for x, y in zip(jax.tree_util.tree_leaves((before.params, before.opt_state)),
                    jax.tree_util.tree_leaves((after.params, after.opt_state))):
        assert np.array_equal(x, y, equal_nan=True)  # bit for bit (same dtype, same values)
    assert (int(after.step), int(after.skipped), int(after.bad_in_a_row)) == (int(before.step) + 1,
                                                                              int(before.skipped) + 1, 1)
    if poison == "loss_mask":  # a good step afterwards resets the run of bad ones
        state, m = step(state, mesh_lib.global_batch(setup.batches()[1], mesh))
        assert int(m["skipped"]) == 0 and int(state.bad_in_a_row) == 0 and int(state.skipped) == 1


def test_sharded_forward_matches_one_device(reference):
    """The runtime's forward (what eval and validation score with) on 8 devices, per token."""
    run = setup.run_8_devices()
    cfg, mesh = setup.cfg(), run["mesh"]
    batch = setup.batches()[0]
    args = (batch["tokens"], batch["targets"], batch["neighbours"])
    sharded_params = jax.device_put(reference["final"], run["shardings"].params)
    got = make_nll_fn(cfg, sharded_params, mesh)(*args)
    want = make_nll_fn(cfg, reference["final"])(*args)
    assert got.shape == batch["tokens"].shape and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=LOSS_RTOL, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("microbatches", [2, 4])
def test_gradient_accumulation_gives_the_whole_batch_update(reference, microbatches):
    """train.microbatches: the same losses and parameters as one pass over the whole batch
    (float32, same tolerances as sharding: only the order of the sums differs)."""
    cfg, (opt, schedule) = setup.cfg(), setup.optimizer()
    state = TrainState.create(jax.device_put(reference["init"]), opt)
    step = jax.jit(functools.partial(train_step, cfg=cfg, optimizer=opt, schedule=schedule,
                                     microbatches=microbatches))
    losses = []
    for b in setup.batches():
        state, m = step(state, b)
        losses.append(float(m["loss"]))
        assert int(m["tokens"]) == setup.BATCH * setup.SEQ
    np.testing.assert_allclose(losses, [float(m["loss"]) for m in reference["metrics"]], rtol=LOSS_RTOL)
    _assert_params_close(jax.device_get(state.params), reference["final"], reference["init"])
