"""The model's state on a mesh: the train state, its shardings, sharded init, and restoring from a
workdir at any step onto any mesh.

Every tree here starts from `retro_jax.model.abstract_variables` (the one abstract parameter
tree): the logical axis names its boxes carry become mesh shardings under `LOGICAL_AXIS_RULES`,
and the optimizer state takes the sharding of the parameter it mirrors.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from retro_jax.config import ModelConfig
from retro_jax.model import abstract_params, abstract_variables, init_params
from retro_jax.runtime.checkpoint import restore_params_only
from retro_jax.runtime.mesh import LOGICAL_AXIS_RULES, MeshError, replicated


def _zero() -> jax.Array:
    return jnp.zeros((), jnp.int32)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # batches consumed
    params: Any
    opt_state: Any
    skipped: jax.Array = dataclasses.field(default_factory=_zero)  # non-finite steps, in all
    bad_in_a_row: jax.Array = dataclasses.field(default_factory=_zero)  # ... since the last good one

    @classmethod
    def create(cls, params: Any, optimizer: optax.GradientTransformation) -> "TrainState":
        return cls(step=_zero(), params=params, opt_state=optimizer.init(params))


# -- shardings -------------------------------------------------------------------------------

def _check_divisible(path: str, shape: tuple[int, ...], spec: P, mesh: Mesh) -> None:
    for dim, axes in zip(shape, tuple(spec)):
        if axes is None:
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        ways = math.prod(mesh.shape[a] for a in names)
        if dim % ways:
            raise MeshError(f"parameter {path} of shape {shape} cannot be sharded as {spec}: "
                            f"dimension {dim} is not divisible by {'x'.join(names)} = {ways}; "
                            f"change the mesh or the model size")


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Any:
    """NamedShardings of the (unboxed) parameter tree: each parameter's logical axis names mapped to
    mesh axes by `LOGICAL_AXIS_RULES`; MeshError if a dimension does not divide."""
    specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_variables(cfg))["params"], LOGICAL_AXIS_RULES)
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    abstract = abstract_params(cfg)
    for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(abstract)[0],
                                  jax.tree_util.tree_leaves(specs, is_leaf=is_spec)):
        _check_divisible(jax.tree_util.keystr(path), leaf.shape, spec, mesh)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec)


def mirror_shardings(tree: Any, params: Any, shardings: Any, mesh: Mesh) -> Any:
    """Shardings for `tree` (e.g. an abstract optimizer state): a leaf whose key path ends with
    a parameter's path and has that parameter's shape (Adam's mu/nu, masked or not) gets the
    parameter's sharding; everything else (step counts, scalars) is replicated."""
    by_path = {}
    for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                jax.tree_util.tree_leaves(shardings)):
        by_path[tuple(map(str, path))] = (tuple(leaf.shape), sh)

    def pick(path, leaf):
        keys = tuple(map(str, path))
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree)


def abstract_state(cfg: ModelConfig, optimizer: optax.GradientTransformation) -> TrainState:
    """The TrainState as ShapeDtypeStructs (nothing allocated), from the one abstract parameter tree."""
    return jax.eval_shape(lambda p: TrainState.create(p, optimizer), abstract_params(cfg))


def state_shardings(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """A TrainState of NamedShardings: params by the rules, optimizer state like its params."""
    state, p_sh, rep = abstract_state(cfg, optimizer), param_shardings(cfg, mesh), replicated(mesh)
    opt_state = mirror_shardings(state.opt_state, state.params, p_sh, mesh)
    return TrainState(step=rep, params=p_sh, opt_state=opt_state, skipped=rep, bad_in_a_row=rep)


def with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or structs) carrying `shardings`: a restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def sharded_init(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                 rng: jax.Array) -> tuple[TrainState, TrainState]:
    """(TrainState of plain sharded jax.Arrays, its shardings), each array born on its shards.

    The parameters equal `retro_jax.model.init_params(cfg, rng)`."""
    shardings = state_shardings(cfg, optimizer, mesh)
    # The key travels as a numpy constant: valid on every process of a multi-host mesh.
    impl, key_data = jax.random.key_impl(rng), np.asarray(jax.random.key_data(rng))
    state = jax.jit(lambda: TrainState.create(init_params(cfg, jax.random.wrap_key_data(key_data, impl=impl)),
                                              optimizer), out_shardings=shardings)()
    return state, shardings


# -- restore ---------------------------------------------------------------------------------

def restore_params(workdir: str | Path, cfg: ModelConfig, mesh: Mesh, step: int | None = None) -> Any:
    """The params of checkpoint `step` (None: the newest) of `workdir`, laid out on `mesh` (any
    shape: restore reshards). Only the params are read, not the optimizer state. An unreadable
    checkpoint raises UnreadableCheckpointError naming the step."""
    return restore_params_only(workdir, with_shardings(abstract_params(cfg), param_shardings(cfg, mesh)), step)


def restore_params_to_host(workdir: str | Path, cfg: ModelConfig, step: int | None = None) -> Any:
    """The params of checkpoint `step` (None: the newest) of `workdir` as whole host numpy arrays,
    on no device and no mesh, so no dimension has to divide any device count (what export needs).
    In a multi-process run every process must call it (Orbax coordinates the reads); each gets the
    whole tree."""
    # Zero-stride placeholders carry only shape and dtype: Orbax restores np.ndarray for them.
    target = jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), abstract_params(cfg))
    return restore_params_only(workdir, target, step)
