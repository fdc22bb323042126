"""The sharding layout a user relies on: a golden table of partition specs for the tiny RETRO
on a data x fsdp x tensor = 2 x 2 x 2 mesh, written by hand from the rules, and clear errors
for meshes, batches and parameters that do not divide."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from retro_jax.config import ModelConfig
from retro_jax.model import Retro
from retro_jax.runtime import mesh as mesh_lib
from retro_jax.runtime import state as state_lib
from retro_jax.runtime.mesh import MeshError

CFG = ModelConfig.from_preset("tiny").replace(vocab_size=512)
DF = ("data", "fsdp")

# Per parameter kind: (logical axes in the model, mesh spec the rules must give it).
# Rules: vocab/heads/mlp -> tensor, embed -> fsdp, kv -> unsharded.
GOLDEN = {
    ("embedding", 2): P("tensor", "fsdp"),          # (vocab, embed): decoder and encoder tables
    ("unembed", 2): P("fsdp", "tensor"),            # (embed, vocab)
    ("wq", 3): P("fsdp", "tensor", None),           # (embed, heads, kv)
    ("wk", 3): P("fsdp", "tensor", None),
    ("wv", 3): P("fsdp", "tensor", None),
    ("wr", 3): P("fsdp", "tensor", None),           # relative-position projection
    ("wo", 3): P("tensor", None, "fsdp"),           # attention output (heads, kv, embed)
    ("wi", 2): P("fsdp", "tensor"),                 # feed-forward in (embed, mlp)
    ("wo", 2): P("tensor", "fsdp"),                 # feed-forward out (mlp, embed)
    ("u_bias", 2): P("tensor", None),               # (heads, kv)
    ("v_bias", 2): P("tensor", None),
    ("scale", 1): P("fsdp"),                        # RMSNorm (embed,)
}


@pytest.fixture(scope="module")
def mesh():
    return mesh_lib.make_mesh(2, 2, 2)


def test_golden_partition_specs(mesh):
    shardings = state_lib.param_shardings(CFG, mesh)
    tokens = jnp.zeros((1, 128), jnp.int32)
    abstract = jax.eval_shape(lambda: nn.unbox(Retro(CFG).init(jax.random.key(0), tokens))["params"])
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    seen = set()
    for (path, leaf), sharding in zip(flat, jax.tree_util.tree_leaves(shardings)):
        name = path[-1].key
        kind = (name, leaf.ndim)
        assert kind in GOLDEN, f"parameter {jax.tree_util.keystr(path)} has no golden spec"
        assert sharding.spec == GOLDEN[kind], jax.tree_util.keystr(path)
        # The shard each device holds: every sharded dimension halves on this mesh.
        want = tuple(d // (2 if ax else 1) for d, ax in zip(leaf.shape, tuple(GOLDEN[kind]) + (None,) * 3))
        assert sharding.shard_shape(leaf.shape) == want, jax.tree_util.keystr(path)
        seen.add(kind)
    assert seen == set(GOLDEN)  # every kind occurs in the tiny RETRO (encoder, CCA included)
    # The big matrices really are split 4 ways (fsdp x tensor) on 8 devices, replicated over data.
    emb = shardings["embed"]["embedding"]
    assert np.prod(emb.shard_shape((CFG.vocab_size, CFG.d_model))) * 4 == CFG.vocab_size * CFG.d_model


def test_activation_rules_keep_fsdp_on_the_batch():
    """Activations (batch, length, embed) put fsdp on the batch, not on embed (used once)."""
    rules = mesh_lib.LOGICAL_AXIS_RULES
    assert nn.logical_to_mesh_axes(("batch", "length", "embed"), rules) == P(DF, None, None)
    assert nn.logical_to_mesh_axes(("batch", "length", "mlp"), rules) == P(DF, None, "tensor")


def test_make_mesh_shapes():
    assert dict(mesh_lib.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(mesh_lib.make_mesh(-1, 2, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(mesh_lib.make_mesh(1, -1, 2).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    one = mesh_lib.make_mesh(devices=jax.devices()[:1])
    assert one.devices.size == 1


@pytest.mark.parametrize("shape, match", [
    ((3, 1, 1), "3 devices, but there are 8"),
    ((-1, 3, 1), "not divisible"),
    ((-1, -1, 1), "at most one -1"),
    ((0, 1, 1), "positive"),
])
def test_bad_mesh_is_a_clear_error(shape, match):
    with pytest.raises(MeshError, match=match):
        mesh_lib.make_mesh(*shape)


def test_batch_must_divide_data_times_fsdp(mesh):
    mesh_lib.check_batch(8, mesh)
    with pytest.raises(MeshError, match=r"global batch 6 .* data x fsdp = 2 x 2 = 4"):
        mesh_lib.check_batch(6, mesh)
    bad = {"tokens": np.zeros((6, 128), np.int32)}
    with pytest.raises(MeshError, match="global batch 6"):
        mesh_lib.global_batch(bad, mesh)


def test_parameter_that_does_not_divide_is_a_clear_error(mesh):
    cfg = CFG.replace(num_heads=3)  # heads -> tensor (2)
    with pytest.raises(MeshError, match=r"layer_1.*attn.* of shape \(3, .*not divisible by tensor = 2"):
        state_lib.param_shardings(cfg, mesh)


def test_global_batch_is_split_over_data_and_fsdp(mesh):
    local = {"tokens": np.arange(8 * 4, dtype=np.int32).reshape(8, 4)}
    assert mesh_lib.local_batch_slice(8, mesh) == slice(0, 8)  # one process holds every row
    arr = mesh_lib.global_batch(local, mesh)["tokens"]
    assert arr.sharding.spec == P(DF)
    assert {s.data.shape for s in arr.addressable_shards} == {(2, 4)}
    np.testing.assert_array_equal(np.asarray(arr), local["tokens"])
