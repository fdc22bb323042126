"""Sharded training gives the single-device results: 3 AdamW steps that train EVERY parameter, on
8 fake CPU devices laid out as data x fsdp x tensor = 2x2x2, 8x1x1 and 1x4x2, and 2x2x2 with
2 microbatches per step, match one device; so does gradient accumulation on one device. Only the
order of float32 reductions differs, so: losses within rtol 1e-5; every parameter tensor moves,
and each is compared with how far it moved (max |diff| <= 5% of the max move and mean |diff| <=
0.5% of the mean move; the initial parameters exactly). Adam divides by sqrt(nu), so where a
gradient is almost zero (the high-frequency rows of the relative-position projection W_R)
reduction noise in the gradient becomes a visible share of the step; everywhere else the
difference is below 1e-6. A non-finite step is skipped bit for bit and counted. With the decoder
frozen (retrofitting) the frozen parameters never move and the rest match one device."""

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


def _one_device(frozen_decoder: bool = False, microbatches: int = 1, init=None) -> dict:
    """One device, no mesh, no rules: the plain jitted step, STEPS times."""
    cfg, (opt, schedule) = setup.cfg(), setup.optimizer(frozen_decoder)
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0)) if init is None else jax.device_put(init)
    init = jax.device_get(params)
    state = TrainState.create(params, opt)
    step = jax.jit(functools.partial(train_step, cfg=cfg, optimizer=opt, schedule=schedule,
                                     microbatches=microbatches))
    metrics = []
    for b in setup.batches():
        state, m = step(state, b)
        metrics.append(jax.device_get(m))
    return {"init": init, "final": jax.device_get(state.params), "metrics": metrics}


@pytest.fixture(scope="module")
def reference():
    return _one_device()


def _leaves(*trees):
    """(path, leaf, leaf, ...) of trees of one structure, every leaf (the trees must match: no
    leaf of one left out of the zip)."""
    flat = [jax.tree_util.tree_flatten_with_path(t) for t in trees]
    assert all(f[1] == flat[0][1] for f in flat), "the trees differ"
    paths = [jax.tree_util.keystr(p) for p, _ in flat[0][0]]
    assert paths, "no leaves"
    return zip(paths, *([np.asarray(x) for _, x in f[0]] for f in flat))


def _assert_params_close(got, want, init, mask=None):
    """Every tensor (or every trainable one, given the mask) moved in both runs, and by the same."""
    mask = jax.tree_util.tree_map(lambda _: True, init) if mask is None else mask
    compared = 0
    for path, x, y, x0, trainable in _leaves(got, want, init, mask):
        if not trainable:
            continue
        diff, move = np.abs(x - y), np.abs(y - x0)
        assert move.max() > 0 and np.abs(x - x0).max() > 0, (path, "did not move")
        assert diff.max() <= MAX_SHARE * move.max(), (path, diff.max(), move.max())
        assert diff.mean() <= MEAN_SHARE * move.mean(), (path, diff.mean(), move.mean())
        compared += 1
    assert compared == sum(jax.tree_util.tree_leaves(mask)) > 0


def _losses(run) -> list[float]:
    return run["losses"] if "losses" in run else [float(m["loss"]) for m in run["metrics"]]


def _final(run):
    return run["final"] if "final" in run else jax.device_get(run["state"].params)


def _check_run(run, reference, mask=None):
    """A run (sharded, or one device) gives the reference's losses and parameters."""
    np.testing.assert_allclose(_losses(run), _losses(reference), rtol=LOSS_RTOL)
    _assert_params_close(_final(run), reference["final"], reference["init"], mask)


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
    # Optimizer moments are sharded like the parameters they mirror.
    mu = [x for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
          if "mu" in jax.tree_util.keystr(p) and "'wi'" in jax.tree_util.keystr(p)]
    assert mu and all(x.sharding.spec == wi.sharding.spec for x in mu)


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 4, 2)])
def test_other_meshes_match_one_device(reference, shape):
    _check_run(setup.run_sharded(shape), reference)


def _while_loops(run) -> int:
    """While loops in the run's sharded step as lowered for its state (scan over microbatches)."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), run["state"])
    batch = mesh_lib.global_batch(setup.batches()[0], run["mesh"])
    return run["step"].lower(abstract, batch).as_text().count("stablehlo.while")


@pytest.mark.slow
def test_sharded_microbatch_step_matches_one_device(reference):
    """train.microbatches on the 2x2x2 mesh: 2 microbatches of 4 rows each, one row per
    data x fsdp shard, accumulated under the sharded jit (a loop the plain step lacks)."""
    run = setup.run_sharded(setup.MESH, microbatches=2)
    assert _while_loops(run) > _while_loops(setup.run_8_devices())
    _check_run(run, reference)


@pytest.mark.slow
@pytest.mark.parametrize("microbatches", [2, 4])
def test_gradient_accumulation_gives_the_whole_batch_update(reference, microbatches):
    """train.microbatches on one device: the same losses and parameters as one pass over the
    whole batch (float32, same tolerances as sharding: only the order of the sums differs)."""
    run = _one_device(microbatches=microbatches, init=reference["init"])
    assert all(int(m["tokens"]) == setup.BATCH * setup.SEQ for m in run["metrics"])
    _check_run(run, reference)


def test_frozen_decoder_stays_bitwise_and_the_rest_matches_one_device():
    """Retrofitting (decoder frozen) on 2x2x2, only the trainable leaves differentiated, against one
    device differentiating all and masking in the optimizer: every frozen tensor keeps its initial
    bits, every trainable one moves as on one device, and the masked optimizer state is sharded
    like the parameters."""
    mask = setup.trainable_mask()
    run, ref = setup.run_8_devices(frozen_decoder=True), _one_device(frozen_decoder=True)
    frozen = [(path, a, b) for path, a, b, t in _leaves(_final(run), ref["init"], mask) if not t]
    assert len(frozen) == len(jax.tree_util.tree_leaves(mask)) - sum(jax.tree_util.tree_leaves(mask)) > 0
    for path, a, b in frozen:
        np.testing.assert_array_equal(a, b, err_msg=path)
    _check_run(run, ref, mask)
    wi = run["state"].params["encoder"]["layer_1_ffw"]["wi"]
    mu = [x for p, x in jax.tree_util.tree_flatten_with_path(run["state"].opt_state)[0]
          if "mu" in jax.tree_util.keystr(p) and "'encoder']['layer_1_ffw']['wi'" in jax.tree_util.keystr(p)]
    assert mu and all(x.sharding.spec == wi.sharding.spec for x in mu)


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
