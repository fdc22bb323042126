"""RMSNorm, feed-forward, and multi-head attention with Transformer-XL relative positions.

Every parameter carries logical axis names (`nn.with_logical_partitioning`):
  vocab, embed, heads, kv, mlp.
One rules table (retro_jax/train/mesh.py) maps them to mesh axes; without a mesh they are
plain arrays wrapped in `nn.Partitioned` boxes, which `apply` accepts as they are and
`nn.unbox` strips.

Relative attention (Dai et al. 2019, eq. 4, "Transformer-XL"):
  score(i, j) = (q_i + u) . k_j  +  (q_i + v) . W_R R(pos_i - pos_j)
R is a sinusoidal encoding of the signed distance with the query side's model width, and W_R
is a projection of the same size as W_Q (the "relative-position projection" counted in the
paper's parameter totals). Distances are computed from explicit query/key positions, so the
same code serves causal self-attention, the encoder, both cross-attentions, and (later) a
single decode step against a KV cache whose offset is a traced value.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype
_NEG = -1e30  # finite "minus infinity": a fully masked row stays NaN-free


def _kernel_init(in_axis: int | Sequence[int], out_axis: int | Sequence[int]):
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=in_axis, out_axis=out_axis)


def param(module: nn.Module, name: str, init, shape: tuple[int, ...], axes: tuple[str | None, ...]):
    """A float32 parameter with logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (no bias, no mean subtraction), computed in float32."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        scale = param(self, "scale", nn.initializers.ones, (x_BxLxD.shape[-1],), ("embed",))
        x = x_BxLxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * scale).astype(self.dtype)


class FeedForward(nn.Module):
    """Two matrices with a GELU between them (GPT-2 style)."""

    d_ff: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        d = x_BxLxD.shape[-1]
        wi = param(self, "wi", _kernel_init(0, 1), (d, self.d_ff), ("embed", "mlp"))
        wo = param(self, "wo", _kernel_init(0, 1), (self.d_ff, d), ("mlp", "embed"))
        h_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, wi.astype(self.dtype))
        h_BxLxF = nn.with_logical_constraint(nn.gelu(h_BxLxF), ("batch", "length", "mlp"))
        return jnp.einsum("blf,fd->bld", h_BxLxF, wo.astype(self.dtype))


def sinusoids(positions_P: jax.Array, dim: int, max_wavelength: float = 10_000.0) -> jax.Array:
    """Transformer-XL's sinusoidal encoding of (possibly negative) positions: [P, dim], float32."""
    half = dim // 2
    inv_freq = 1.0 / (max_wavelength ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions_P.astype(jnp.float32)[:, None] * inv_freq[None, :]
    enc = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if dim % 2:
        enc = jnp.pad(enc, ((0, 0), (0, 1)))
    return enc


class RelativeAttention(nn.Module):
    """Multi-head attention of queries x_q over keys/values x_kv with relative positions.

    Positions are given per axis (shared across the batch): q_pos [Q], k_pos [K], both int.
    Relative encodings are computed for the `rel_count` distances rel_base, rel_base+1, ...;
    every unmasked q_pos[i] - k_pos[j] must fall in that range (the callers derive it from
    their static layout; rel_base may be traced, e.g. a decode step's offset).
    mask: bool, broadcastable to [B, H, Q, K]; True = may attend. A query row with no key
    allowed gets a zero output (CCA is then the identity for it).
    """

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    max_wavelength: float = 10_000.0

    @nn.compact
    def __call__(self, x_q_BxQxD: jax.Array, x_kv_BxKxE: jax.Array, q_pos_Q: jax.Array,
                 k_pos_K: jax.Array, mask: jax.Array | None, rel_base: int | jax.Array,
                 rel_count: int) -> jax.Array:
        d_q, d_kv = x_q_BxQxD.shape[-1], x_kv_BxKxE.shape[-1]
        h, dh = self.num_heads, self.head_dim
        dt = self.dtype
        wq = param(self, "wq", _kernel_init(0, (1, 2)), (d_q, h, dh), ("embed", "heads", "kv"))
        wk = param(self, "wk", _kernel_init(0, (1, 2)), (d_kv, h, dh), ("embed", "heads", "kv"))
        wv = param(self, "wv", _kernel_init(0, (1, 2)), (d_kv, h, dh), ("embed", "heads", "kv"))
        wo = param(self, "wo", _kernel_init((0, 1), 2), (h, dh, d_q), ("heads", "kv", "embed"))
        wr = param(self, "wr", _kernel_init(0, (1, 2)), (d_q, h, dh), ("embed", "heads", "kv"))
        u = param(self, "u_bias", nn.initializers.zeros, (h, dh), ("heads", "kv"))
        v = param(self, "v_bias", nn.initializers.zeros, (h, dh), ("heads", "kv"))

        q = jnp.einsum("bqd,dhk->bqhk", x_q_BxQxD, wq.astype(dt))
        k = jnp.einsum("bsd,dhk->bshk", x_kv_BxKxE, wk.astype(dt))
        val = jnp.einsum("bsd,dhk->bshk", x_kv_BxKxE, wv.astype(dt))
        q = q * jnp.asarray(dh ** -0.5, dt)

        # Content term (q + u) . k.
        logits = jnp.einsum("bqhk,bshk->bhqs", q + u.astype(dt) * dh ** -0.5, k,
                            preferred_element_type=jnp.float32)
        # Position term (q + v) . W_R R(d) for every distance in the table, then gathered.
        distances_C = rel_base + jnp.arange(rel_count)
        r_CxD = sinusoids(distances_C, d_q, self.max_wavelength).astype(dt)
        r_CxHxK = jnp.einsum("cd,dhk->chk", r_CxD, wr.astype(dt))
        pos_BxHxQxC = jnp.einsum("bqhk,chk->bhqc", q + v.astype(dt) * dh ** -0.5, r_CxHxK,
                                 preferred_element_type=jnp.float32)
        # Clipped: entries outside the table are masked (e.g. negative distances when causal).
        idx_QxK = jnp.clip((q_pos_Q[:, None] - k_pos_K[None, :]) - rel_base, 0, rel_count - 1)
        idx = jnp.broadcast_to(idx_QxK, pos_BxHxQxC.shape[:-1] + idx_QxK.shape[-1:])
        logits = logits + jnp.take_along_axis(pos_BxHxQxC, idx, axis=-1)

        if mask is not None:
            logits = jnp.where(mask, logits, _NEG)
        probs = jax.nn.softmax(logits, axis=-1)
        if mask is not None:
            probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)
        out = jnp.einsum("bhqs,bshk->bqhk", probs.astype(dt), val)
        return jnp.einsum("bqhk,hkd->bqd", out, wo.astype(dt))
