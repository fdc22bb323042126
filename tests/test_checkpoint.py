"""Checkpointer: bitwise round trips, async saves, keep-last-N, resharding on restore, refusals."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from _damage import damage
from retro_jax.runtime.checkpoint import (Checkpointer, NoCheckpointError, NonFiniteStateError,
                                         UnreadableCheckpointError, restore_params_only)
from retro_jax.runtime.state import TrainState

AXES = ("data", "fsdp", "tensor")
OPT = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))


def mesh_of(shape: tuple[int, int, int]) -> Mesh:
    n = int(np.prod(shape))
    devices = np.asarray(jax.devices()[:n]).reshape(shape)
    return Mesh(devices, AXES, axis_types=(AxisType.Auto,) * 3)


def specs(params: dict) -> dict:
    """Shard the big matrices over fsdp x tensor, replicate the vector."""
    return {"embed_VxD": P("fsdp", "tensor"), "mlp": {"w_DxF": P("tensor", "fsdp")}, "scale_D": P()}


def make_state(mesh: Mesh, seed: int = 0) -> TrainState:
    """A TrainState with non-trivial params and AdamW moments, sharded on `mesh`."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = {"embed_VxD": jax.random.normal(k1, (16, 8)), "mlp": {"w_DxF": jax.random.normal(k2, (8, 12))},
              "scale_D": jax.random.normal(k3, (8,))}
    opt_state = OPT.init(params)
    grads = jax.tree.map(lambda x: jnp.sin(x) * 0.1, params)
    updates, opt_state = OPT.update(grads, opt_state, params)
    state = TrainState(step=jnp.asarray(7, jnp.int32), params=optax.apply_updates(params, updates),
                       opt_state=opt_state)
    return jax.device_put(state, shardings_for(state, mesh))


def shardings_for(state: TrainState, mesh: Mesh):
    """NamedShardings for the whole state: params' specs reused for the Adam moments."""
    spec = specs(state.params)

    def leaf_spec(path, leaf):
        for key in reversed(path):  # innermost dict key naming a param
            name = getattr(key, "key", None)
            if name in ("embed_VxD", "scale_D"):
                return NamedSharding(mesh, spec[name])
            if name == "w_DxF":
                return NamedSharding(mesh, spec["mlp"]["w_DxF"])
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(leaf_spec, state)


def abstract_of(state: TrainState, mesh: Mesh):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings_for(state, mesh))


def assert_bitwise_equal(a, b) -> None:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


DATA = {"epoch": 1, "position": 3, "seed": 5}
CONFIG = {"model": {"name": "tiny", "d_model": 8}, "train": {"lr": 2e-4, "steps": [1, 2]}}


def test_round_trip_is_bitwise_and_brings_back_data_state_and_config(tmp_path):
    mesh = mesh_of((2, 2, 2))
    state = make_state(mesh)
    with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(NoCheckpointError, match="no complete checkpoint"):
            ckpt.restore(None, abstract_of(state, mesh))
        expected = jax.device_get(state)
        assert ckpt.save(7, state, DATA, CONFIG)  # async: returns once the arrays are copied
        for leaf in jax.tree.leaves(state):  # as a donating train step would do next
            leaf.delete()
        ckpt.wait()
        assert ckpt.latest_step() == 7
    with Checkpointer(tmp_path) as again:  # a fresh process would do this
        restored, data, config = again.restore(None, abstract_of(state, mesh))
    assert isinstance(restored, TrainState)
    assert_bitwise_equal(restored, expected)
    assert data == DATA and config == CONFIG


def test_interval_and_keep_last_n(tmp_path):
    mesh = mesh_of((1, 1, 1))
    state = make_state(mesh)
    with Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=3) as ckpt:
        started = [s for s in range(1, 11) if ckpt.save(s, state, {"position": s}, CONFIG)]
        assert started == [3, 6, 9]
        assert ckpt.save(10, state, {"position": 10}, CONFIG, force=True)  # e.g. the final step
        ckpt.wait()
        assert ckpt.all_steps() == [9, 10]
        _, data, _ = ckpt.restore(9, abstract_of(state, mesh))
        assert data == {"position": 9}
        with pytest.raises(NoCheckpointError, match="no checkpoint 3"):
            ckpt.restore(3, abstract_of(state, mesh))


@pytest.mark.parametrize("target", [(1, 1, 1), (8, 1, 1)])
def test_restore_reshards_onto_another_mesh(tmp_path, target):
    src = mesh_of((2, 2, 2))
    state = make_state(src)
    assert len(state.params["embed_VxD"].sharding.device_set) == 8
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(7, state, DATA, CONFIG, force=True)
    dst = mesh_of(target)
    abstract = abstract_of(state, dst)
    with Checkpointer(tmp_path) as ckpt:
        restored, _, _ = ckpt.restore(7, abstract)
    assert_bitwise_equal(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
        assert got.sharding == want.sharding
        assert len(got.sharding.device_set) == int(np.prod(target))


def test_params_only_restore_reads_just_the_params(tmp_path):
    src = mesh_of((2, 2, 2))
    state = make_state(src)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(7, state, DATA, CONFIG, force=True)
    dst = mesh_of((1, 1, 1))
    abstract_params = abstract_of(state, dst).params
    params = restore_params_only(tmp_path, abstract_params)
    assert_bitwise_equal(params, state.params)
    assert all(x.sharding == a.sharding for x, a in zip(jax.tree.leaves(params), jax.tree.leaves(abstract_params)))
    with pytest.raises(NoCheckpointError):
        restore_params_only(tmp_path / "empty", abstract_params)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_non_finite_state_is_never_written(tmp_path, bad):
    mesh = mesh_of((2, 2, 2))
    state = make_state(mesh)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, DATA, CONFIG, force=True)
        poisoned = state.replace(params={**state.params, "mlp": {"w_DxF": state.params["mlp"]["w_DxF"].at[3, 5].set(bad)}})
        with pytest.raises(NonFiniteStateError, match=r"refusing to write checkpoint 2.*w_DxF.*last good checkpoint is 1"):
            ckpt.save(2, poisoned, DATA, CONFIG, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [1]
    assert not (tmp_path / "checkpoints" / "2").exists()
    json.dumps(DATA)  # data state is plain JSON


@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_an_unreadable_step_is_named_set_aside_and_the_one_before_restored(tmp_path, how, capsys):
    mesh = mesh_of((2, 2, 2))
    states = {s: make_state(mesh, seed=s) for s in (3, 6)}
    with Checkpointer(tmp_path) as ckpt:
        for s, state in states.items():
            ckpt.save(s, state, {"position": s}, CONFIG, force=True)
    damage(tmp_path, 6, how)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(UnreadableCheckpointError, match=r"^checkpoint 6 in .* is unreadable: \S") as e:
            ckpt.restore(6, abstract_of(states[6], mesh))
        assert len(str(e.value).splitlines()) == 1 and "TensorStore" not in str(e.value)
        step, restored, data, _ = ckpt.restore_newest_readable(abstract_of(states[3], mesh))
        assert (step, data) == (3, {"position": 3}) and ckpt.all_steps() == [3]
        assert_bitwise_equal(restored, states[3])
        assert ckpt.save(6, states[6], {"position": 6}, CONFIG, force=True)  # step 6 can be written again
    out = capsys.readouterr().out
    assert "checkpoint 6" in out and "unreadable" in out and "resuming from checkpoint 3" in out
    assert (tmp_path / "checkpoints_unreadable" / "6").is_dir()


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    mesh = mesh_of((1, 1, 1))
    state = make_state(mesh)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(4, state, DATA, CONFIG, force=True)
    damage(tmp_path, 4, "truncated")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(UnreadableCheckpointError, match="checkpoint 4 .* never starts from scratch"):
            ckpt.restore_newest_readable(abstract_of(state, mesh))
        assert ckpt.all_steps() == [4]  # nothing moved
    with pytest.raises(UnreadableCheckpointError, match=r"^checkpoint 4 in .* is unreadable"):
        restore_params_only(tmp_path, abstract_of(state, mesh).params)
