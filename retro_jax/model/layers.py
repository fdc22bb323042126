"""RMSNorm, feed-forward, and the relative-position pieces attention is built from.

Every parameter carries logical axis names (`nn.with_logical_partitioning`):
  vocab, embed, heads, kv, mlp.
One rules table (retro_jax/runtime/mesh.py) maps them to mesh axes; without a mesh they are
plain arrays wrapped in `nn.Partitioned` boxes, which `apply` accepts as they are and
`nn.unbox` strips.

sinusoids and skew are the two pieces of Transformer-XL's relative positions; the attention
itself is relative_attention.py.
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
