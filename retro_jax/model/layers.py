"""RMSNorm, feed-forward, and multi-head attention with Transformer-XL relative positions.

Every parameter carries logical axis names (`nn.with_logical_partitioning`):
  vocab, embed, heads, kv, mlp.
One rules table (retro_jax/runtime/mesh.py) maps them to mesh axes; without a mesh they are
plain arrays wrapped in `nn.Partitioned` boxes, which `apply` accepts as they are and
`nn.unbox` strips.

Relative attention (Dai et al. 2019, eq. 4, "Transformer-XL"):
  score(i, j) = (q_i + u) . k_j  +  (q_i + v) . W_R R(pos_i - pos_j)
R is a sinusoidal encoding of the signed distance with the query side's model width, and W_R
is a projection of the same size as W_Q (the "relative-position projection" counted in the
paper's parameter totals). Distances are computed from explicit query/key positions, so the
same code serves causal self-attention, the encoder, both cross-attentions, and (later) a
single decode step against a KV cache whose offset is a traced value. The (i, j) distance
matrix is never gathered: the projected table is "skewed" by pad/reshape (Transformer-XL's
relative shift), which costs no gather/scatter on any backend.
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


def skew(p_QxC: jax.Array, k_len: int, shift: int) -> jax.Array:
    """out[..., i, j] = p[..., i, i - j + shift] for i < Q, j < k_len, by pad/reshape only.

    This is Transformer-XL's "relative shift": no gather (and no scatter in the backward
    pass). Entries whose column i - j + shift falls outside [0, C) hold unrelated values and
    must be masked by the caller (the causal upper triangle)."""
    *lead, q, c = p_QxC.shape
    flat = p_QxC.reshape(*lead, q * c)
    o = shift - (k_len - 1)
    front, back = max(0, -o), max(0, o + q)
    flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(front, back)])
    start = front + o
    seg = jax.lax.slice_in_dim(flat, start, start + q * (c + 1), axis=-1)
    return jnp.flip(seg.reshape(*lead, q, c + 1)[..., :k_len], axis=-1)


class RelativeAttention(nn.Module):
    """Multi-head attention of queries x_q over keys/values x_kv with relative positions.

    Positions: query row i sits at q_offset + (i mod q_period), key j at k_offset +
    (j mod k_period) (periods default to the full lengths; they express a stack of
    independent blocks, e.g. the k neighbours merged on one axis in CCA). q_offset may be
    traced (a decode step). `causal=True` (self-attention, q and k the same positions)
    encodes only the distances 0..n-1 that the causal mask lets through.
    mask: bool, broadcastable to [B, H, Q, K]; True = may attend. A query row with no key
    allowed gets a zero output (CCA is then the identity for it).
    """

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    max_wavelength: float = 10_000.0
    zero_init_out: bool = False  # output projection starts at 0: the block starts as the identity

    @nn.compact
    def __call__(self, x_q_BxQxD: jax.Array, x_kv_BxKxE: jax.Array, mask: jax.Array | None, *,
                 q_offset: int | jax.Array = 0, k_offset: int = 0, q_period: int | None = None,
                 k_period: int | None = None, causal: bool = False) -> jax.Array:
        b, q_len, d_q = x_q_BxQxD.shape
        k_len, d_kv = x_kv_BxKxE.shape[1], x_kv_BxKxE.shape[-1]
        qp, kp = q_period or q_len, k_period or k_len
        if q_len % qp or k_len % kp:
            raise ValueError(f"periods ({qp}, {kp}) must divide lengths ({q_len}, {k_len})")
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

        # Content term (q + u) . k.
        logits = jnp.einsum("bqhk,bshk->bhqs", q + (u * scale).astype(dt), k,
                            preferred_element_type=jnp.float32)
        # Position term (q + v) . W_R R(d): every distance d of the table, then skewed so that
        # entry (i, j) holds d = pos(i) - pos(j).
        if causal:
            if qp != kp or not isinstance(q_offset, int) or q_offset != k_offset:
                raise ValueError("causal relative attention needs identical query/key positions")
            base, count, shift = 0, qp, 0
        else:
            base, count, shift = (q_offset - k_offset) - (kp - 1), qp + kp - 1, kp - 1
        r_CxD = sinusoids(base + jnp.arange(count), d_q, self.max_wavelength).astype(dt)
        r_CxHxK = jnp.einsum("cd,dhk->chk", r_CxD, wr.astype(dt))
        pos = jnp.einsum("bqhk,chk->bhqc", q + (v * scale).astype(dt), r_CxHxK,
                         preferred_element_type=jnp.float32)
        pos = pos.reshape(b, h, q_len // qp, qp, count)
        pos = skew(pos, kp, shift).reshape(b, h, q_len, 1, kp)
        logits = (logits.reshape(b, h, q_len, k_len // kp, kp) + pos).reshape(b, h, q_len, k_len)

        if mask is not None:
            logits = jnp.where(mask, logits, _NEG)
        probs = jax.nn.softmax(logits, axis=-1)
        if mask is not None:
            probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)
        out = jnp.einsum("bhqs,bshk->bqhk", probs.astype(dt), val)
        return jnp.einsum("bqhk,hkd->bqd", out, wo.astype(dt))
