"""Multi-head attention with Transformer-XL relative positions (Dai et al. 2019, eq. 4).

  score(i, j) = (q_i + u) . k_j  +  (q_i + v) . W_R R(pos_i - pos_j)
R is a sinusoidal encoding of the signed distance with the query side's model width, and W_R
is a projection of the same size as W_Q (the "relative-position projection" counted in the
paper's parameter totals). Distances are computed from explicit query/key positions, so the
same code serves causal self-attention, the encoder, both cross-attentions, and CCA. The (i, j)
distance matrix is never gathered: the projected table is "skewed" by pad/reshape
(Transformer-XL's relative shift), which costs no gather/scatter on any backend.

After the projections, the scores, softmax and weighted sum are computed by the mode in
`model.attention` (attention_mode.py): `dense_relative_attention` below, the blocked pure-JAX
version (blocked_attention.py) or a Pallas kernel; all compute the same function.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from retro_jax.model import attention_mode
from retro_jax.model.blocked_attention import blocked_relative_attention, distance_span
from retro_jax.model.layers import _NEG, Dtype, _kernel_init, param, sinusoids, skew


def dense_relative_attention(q_BxQxHxDh, k_BxKxHxDh, v_BxKxHxDh, u_HxDh, vbias_HxDh, r_CxHxDh, *,
                             causal: bool = False, key_valid_BxK: jax.Array | None = None,
                             q_period: int | None = None, k_period: int | None = None) -> jax.Array:
    """The whole [B, H, Q, K] score matrix at once; arguments as blocked_relative_attention's
    (q, u, vbias scaled by Dh^-0.5; r the projected table of distance_span's distances)."""
    b, q_len, h, _ = q_BxQxHxDh.shape
    k_len = k_BxKxHxDh.shape[1]
    qp, kp = q_period or q_len, k_period or k_len
    dt = q_BxQxHxDh.dtype
    logits = jnp.einsum("bqhk,bshk->bhqs", q_BxQxHxDh + u_HxDh, k_BxKxHxDh,
                        preferred_element_type=jnp.float32)
    # Position term: every distance of the table, then skewed so that entry (i, j) holds
    # d = pos(i) - pos(j) (causal: the table starts at distance 0; else at the smallest).
    count = r_CxHxDh.shape[0]
    pos = jnp.einsum("bqhk,chk->bhqc", q_BxQxHxDh + vbias_HxDh, r_CxHxDh,
                     preferred_element_type=jnp.float32)
    pos = pos.reshape(b, h, q_len // qp, qp, count)
    pos = skew(pos, kp, 0 if causal else kp - 1).reshape(b, h, q_len, 1, kp)
    logits = (logits.reshape(b, h, q_len, k_len // kp, kp) + pos).reshape(b, h, q_len, k_len)
    mask = None
    if causal:
        i = jnp.arange(q_len)
        mask = (i[:, None] >= i[None, :])[None, None]
    if key_valid_BxK is not None:
        kv = key_valid_BxK.astype(bool)[:, None, None, :]
        mask = kv if mask is None else mask & kv
    if mask is not None:
        logits = jnp.where(mask, logits, _NEG)
    probs = jax.nn.softmax(logits, axis=-1)
    if mask is not None:  # a query with no key allowed gets a zero output
        probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)
    return jnp.einsum("bhqs,bshk->bqhk", probs.astype(dt), v_BxKxHxDh)


def _pallas(platform: str):
    """The Pallas kernel for `platform` (or the one RETRO_JAX_PALLAS_INTERPRET names) and
    whether to interpret it."""
    kernel = attention_mode.interpret_kernel()
    interpret = platform not in ("tpu", "gpu")
    which = kernel if interpret else platform
    if which == "tpu":
        from retro_jax.model.pallas_attention_tpu import relative_attention_tpu as fn
    else:
        from retro_jax.model.pallas_attention_gpu import relative_attention_gpu as fn
    return fn, interpret


def _per_device(kernel, q, k, v, u, w, r, *, key_valid_BxK):
    """Attention is independent per batch row and head, so under a mesh it runs in shard_map over
    the batch (data x fsdp) and head (tensor) axes, each device on its own rows and heads: a
    Pallas kernel is one program per device, which XLA's partitioner cannot split, and the blocked
    path's strips merge heads and batch into one axis, which it can split only by gathering. The gradients of u, v and r, replicated over the batch axes, are
    summed over them by shard_map's transpose."""
    b = q.shape[0]
    if key_valid_BxK is None:
        key_valid_BxK = jnp.ones((b, k.shape[1]), bool)
    key_valid_BxK = jnp.broadcast_to(key_valid_BxK.astype(bool), (b, k.shape[1]))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v, u, w, r, key_valid_BxK=key_valid_BxK)
    rows = nn.logical_to_mesh_axes(("batch", None, "heads", None))
    heads = nn.logical_to_mesh_axes(("heads", None))
    table = nn.logical_to_mesh_axes((None, "heads", None))
    valid = nn.logical_to_mesh_axes(("batch", None))

    def local(q, k, v, u, w, r, valid):
        return kernel(q, k, v, u, w, r, key_valid_BxK=valid)

    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, heads, heads, table, valid),
                         out_specs=rows, check_vma=False)(q, k, v, u, w, r, key_valid_BxK)


class RelativeAttention(nn.Module):
    """Multi-head attention of queries x_q over keys/values x_kv with relative positions.

    Positions: query row i sits at q_offset + (i mod q_period), key j at k_offset +
    (j mod k_period) (periods default to the full lengths; they express a stack of
    independent blocks, e.g. the k neighbours merged on one axis in CCA). `causal=True`
    (self-attention, q and k the same positions) encodes only the distances 0..n-1 that the
    causal mask lets through. key_valid: bool [B, K], True = may be attended. A query row with no
    key allowed gets a zero output (CCA is then the identity for it).
    attention / block: model.attention and model.attention_block (attention_mode.py).
    """

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    max_wavelength: float = 10_000.0
    zero_init_out: bool = False  # output projection starts at 0: the block starts as the identity
    attention: str = "dense"
    block: int = 128

    @nn.compact
    def __call__(self, x_q_BxQxD: jax.Array, x_kv_BxKxE: jax.Array,
                 key_valid_BxK: jax.Array | None = None, *, q_offset: int = 0, k_offset: int = 0,
                 q_period: int | None = None, k_period: int | None = None,
                 causal: bool = False) -> jax.Array:
        _, q_len, d_q = x_q_BxQxD.shape
        k_len, d_kv = x_kv_BxKxE.shape[1], x_kv_BxKxE.shape[-1]
        qp, kp = q_period or q_len, k_period or k_len
        if q_len % qp or k_len % kp:
            raise ValueError(f"periods ({qp}, {kp}) must divide lengths ({q_len}, {k_len})")
        if causal and (qp != kp or q_offset != k_offset):
            raise ValueError("causal relative attention needs identical query/key positions")
        h, dh = self.num_heads, self.head_dim
        dt = self.dtype
        wq = param(self, "wq", _kernel_init(0, (1, 2)), (d_q, h, dh), ("embed", "heads", "kv"))
        wk = param(self, "wk", _kernel_init(0, (1, 2)), (d_kv, h, dh), ("embed", "heads", "kv"))
        wv = param(self, "wv", _kernel_init(0, (1, 2)), (d_kv, h, dh), ("embed", "heads", "kv"))
        wo_init = nn.initializers.zeros if self.zero_init_out else _kernel_init((0, 1), 2)
        wo = param(self, "wo", wo_init, (h, dh, d_q), ("heads", "kv", "embed"))
        wr = param(self, "wr", _kernel_init(0, (1, 2)), (d_q, h, dh), ("embed", "heads", "kv"))
        u = param(self, "u_bias", nn.initializers.zeros, (h, dh), ("heads", "kv"))
        v = param(self, "v_bias", nn.initializers.zeros, (h, dh), ("heads", "kv"))

        scale = dh ** -0.5
        q = jnp.einsum("bqd,dhk->bqhk", x_q_BxQxD, (wq * scale).astype(dt))
        k = jnp.einsum("bsd,dhk->bshk", x_kv_BxKxE, wk.astype(dt))
        val = jnp.einsum("bsd,dhk->bshk", x_kv_BxKxE, wv.astype(dt))
        r_base, count = distance_span(q_len, k_len, q_offset=q_offset, k_offset=k_offset,
                                      q_period=qp, k_period=kp, causal=causal)
        r_CxD = sinusoids(r_base + jnp.arange(count), d_q, self.max_wavelength).astype(dt)
        r_CxHxK = jnp.einsum("cd,dhk->chk", r_CxD, wr.astype(dt))
        args = (q, k, val, (u * scale).astype(dt), (v * scale).astype(dt), r_CxHxK)

        on = attention_mode.platform()
        attention_mode.check(self.attention, self.block)  # this platform and its device kind
        how = attention_mode.resolve(self.attention, causal=causal, k_len=k_len)
        if how == "dense":
            out = dense_relative_attention(*args, causal=causal, key_valid_BxK=key_valid_BxK,
                                           q_period=qp, k_period=kp)
        else:
            # A block never straddles two periods (the k neighbours in CCA, the encoder's
            # neighbours in its cross-attention): it shrinks to the period when longer.
            layout = dict(r_base=r_base, causal=causal,
                          q_offset=q_offset, k_offset=k_offset, q_period=qp, k_period=kp,
                          block_q=min(self.block, qp), block_k=min(self.block, kp))
            if how == "blocked":
                fn = functools.partial(blocked_relative_attention, **layout)
            else:
                kernel, interpret = _pallas(on)
                fn = functools.partial(kernel, **layout, interpret=interpret)
            out = _per_device(fn, *args, key_valid_BxK=key_valid_BxK)
        return jnp.einsum("bqhk,hkd->bqd", out, wo.astype(dt))
