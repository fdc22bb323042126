"""The device mesh, the one table of logical-axis rules, and global batches.

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

import functools
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

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
    ("layers", None),  # the stacked axis of scanned layers: every device holds every layer's shard
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


def mesh_from_config(mesh_config: Mapping[str, int], fallback: bool = False) -> Mesh:
    """The mesh of a config's `mesh` section; with `fallback`, every device on the data axis when
    that mesh does not fit the devices here (evaluating a run trained on another machine)."""
    try:
        return make_mesh(**dict(mesh_config))
    except MeshError:
        if not fallback:
            raise
        return make_mesh()


def on_mesh(jitted: Callable, mesh: Mesh) -> Callable:
    """`jitted`, called (and traced, and `.lower`ed) with the mesh set and the logical-axis rules active."""

    @functools.wraps(jitted)
    def call(*args):
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            return jitted(*args)

    def lower(*args):
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            return jitted.lower(*args)

    call.lower = lower
    return call


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


