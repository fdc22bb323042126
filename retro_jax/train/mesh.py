"""The device mesh, the one table of logical-axis rules, sharded init and global batches.

Mesh axes (outermost first):
  data    pure data parallelism: parameters replicated, batch split
  fsdp    ZeRO-3 / FSDP: batch split AND parameters + optimizer state split (along `embed`)
  tensor  Megatron-style tensor parallelism: vocab, heads and the feed-forward width split

Every parameter of the model names its dimensions (vocab, embed, heads, kv, mlp) and every
constrained activation names batch/length/embed/mlp; `LOGICAL_AXIS_RULES` maps those names to
mesh axes. Flax assigns a mesh axis at most once per array, in rule order, so an activation
(batch, length, embed) puts fsdp on batch and leaves embed whole, while a parameter
(embed, mlp) puts fsdp on embed.

All shape errors (mesh vs device count, batch vs data*fsdp, a parameter dimension vs its mesh
axes) raise `MeshError` with a readable message before anything is compiled.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from retro_jax.config import ModelConfig
from retro_jax.model.retro import Retro
from retro_jax.train.step import TrainState

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# The one table. Order matters: `batch` comes first so that activations take fsdp for the
# batch and leave `embed` unsharded; parameters have no batch dimension, so `embed` gets fsdp.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("kv", None),
    ("length", None),
)


class MeshError(ValueError):
    """A mesh, batch or parameter shape that cannot be laid out on the devices."""


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types over `devices` (default: all, all processes).

    One of the sizes may be -1: it takes whatever the others leave."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    fill = [k for k, v in sizes.items() if v == -1]
    bad = [f"{k}={v}" for k, v in sizes.items() if v == 0 or v < -1]
    if bad or len(fill) > 1:
        raise MeshError(f"mesh sizes must be positive (at most one -1 = fill); got {sizes}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if n % fixed:
            raise MeshError(f"mesh {sizes}: {n} devices are not divisible by the fixed axes' "
                            f"product {fixed}")
        sizes[fill[0]] = n // fixed
    shape = tuple(sizes[a] for a in MESH_AXES)
    if math.prod(shape) != n:
        raise MeshError(f"mesh data x fsdp x tensor = {' x '.join(map(str, shape))} = "
                        f"{math.prod(shape)} devices, but there are {n}")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch is split: data * fsdp."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(global_batch: int, mesh: Mesh) -> None:
    """The global batch must split evenly over data * fsdp."""
    shards = batch_shards(mesh)
    if global_batch <= 0 or global_batch % shards:
        raise MeshError(f"global batch {global_batch} does not divide across data x fsdp = "
                        f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {shards} shards; use a "
                        f"multiple of {shards}")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data and fsdp, every other dimension whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def local_batch_slice(global_batch: int, mesh: Mesh) -> slice:
    """The rows of the global batch that this process's devices hold (what its loader reads)."""
    check_batch(global_batch, mesh)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    rows = sorted({(idx[0].start or 0, idx[0].stop or global_batch) for idx in index_map.values()})
    start, stop = rows[0][0], rows[-1][1]
    if sum(b - a for a, b in rows) != stop - start:
        raise MeshError(f"this process's batch rows {rows} are not contiguous")
    return slice(start, stop)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays (batch split over data x fsdp) from THIS process's rows of the batch.

    With one process `local_batch` is the whole batch; with several, each passes the rows
    `local_batch_slice(global_batch_size, mesh)` names."""
    sharding = batch_sharding(mesh)
    sizes = {k: np.shape(v)[0] for k, v in local_batch.items()}
    if len(set(sizes.values())) != 1:
        raise MeshError(f"batch arrays disagree on the batch size: {sizes}")
    n_local = next(iter(sizes.values()))
    check_batch(n_local * jax.process_count(), mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


# -- parameters and optimizer state ------------------------------------------------------

def _abstract_boxed_params(cfg: ModelConfig, seq_len: int) -> Any:
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.eval_shape(lambda t: Retro(cfg).init(jax.random.key(0), t, None), tokens)["params"]


def logical_param_specs(cfg: ModelConfig, seq_len: int | None = None) -> Any:
    """The parameter tree with each leaf's logical PartitionSpec, e.g. P('embed', 'mlp')."""
    return nn.get_partition_spec(_abstract_boxed_params(cfg, seq_len or cfg.chunk_size))


def param_specs(cfg: ModelConfig, seq_len: int | None = None) -> Any:
    """The parameter tree with each leaf's mesh PartitionSpec under `LOGICAL_AXIS_RULES`."""
    return nn.logical_to_mesh(logical_param_specs(cfg, seq_len), LOGICAL_AXIS_RULES)


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


def param_shardings(cfg: ModelConfig, mesh: Mesh, seq_len: int | None = None) -> Any:
    """NamedShardings of the (unboxed) parameter tree; MeshError if a dimension does not divide."""
    boxed = _abstract_boxed_params(cfg, seq_len or cfg.chunk_size)
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), LOGICAL_AXIS_RULES)
    abstract = nn.unbox(boxed)
    for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(abstract)[0],
                                  jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        _check_divisible(jax.tree_util.keystr(path), leaf.shape, spec, mesh)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, P))


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


def _init_fn(cfg: ModelConfig, optimizer: optax.GradientTransformation, seq_len: int):
    def init(rng: jax.Array) -> TrainState:
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        params = nn.unbox(Retro(cfg).init(rng, tokens, None))["params"]
        return TrainState.create(params, optimizer)
    return init


def state_shardings(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                    seq_len: int | None = None) -> TrainState:
    """A TrainState of NamedShardings: params by the rules, optimizer state like its params."""
    seq_len = seq_len or cfg.chunk_size
    p_sh = param_shardings(cfg, mesh, seq_len)
    abstract = jax.eval_shape(_init_fn(cfg, optimizer, seq_len), jax.random.key(0))
    opt_sh = mirror_shardings(abstract.opt_state, abstract.params, p_sh, mesh)
    rep = replicated(mesh)
    return TrainState(step=rep, params=p_sh, opt_state=opt_sh, skipped=rep, bad_in_a_row=rep)


def sharded_init(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                 rng: jax.Array, seq_len: int | None = None) -> tuple[TrainState, TrainState]:
    """(TrainState of plain sharded jax.Arrays, its shardings), each array born on its shards.

    The parameters equal `retro_jax.model.init_params(cfg, rng, seq_len)`."""
    seq_len = seq_len or cfg.chunk_size
    shardings = state_shardings(cfg, optimizer, mesh, seq_len)
    init = _init_fn(cfg, optimizer, seq_len)
    # The key travels as a numpy constant: valid on every process of a multi-host mesh.
    impl, key_data = jax.random.key_impl(rng), np.asarray(jax.random.key_data(rng))
    state = jax.jit(lambda: init(jax.random.wrap_key_data(key_data, impl=impl)),
                    out_shardings=shardings)()
    return state, shardings
