"""The RETRO decoder stack (Algorithm 1). A baseline is the same stack with no CCA layers.

Layer i (1-indexed), pre-norm with RMSNorm:
    h = x + ATTN(norm(x))                         causal, Transformer-XL relative positions
    if i in cca_layers:                           RETRO block
        E = ENCODER(neighbours, h)                only at the first CCA layer, then reused
        h = h + CCA(norm(h), E)
    x = h + FFW(norm(h))
The parameter tree of a RETRO model is its baseline's tree plus `encoder` and the
`cca_norm`/`cca` entries of the CCA layers; removing those gives the baseline exactly, and
with retrieval off (neighbours=None) the two compute the same logits. That is what makes
retrofitting possible.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from retro_jax.config import ModelConfig
from retro_jax.model.cca import ChunkedCrossAttention
from retro_jax.model.encoder import Encoder
from retro_jax.model.layers import FeedForward, RelativeAttention, RMSNorm, param


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    has_cca: bool

    def setup(self) -> None:
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        self.attn_norm = RMSNorm(cfg.norm_eps, dt)
        self.attn = RelativeAttention(cfg.num_heads, cfg.head_dim, dtype=dt,
                                      max_wavelength=cfg.max_wavelength)
        if self.has_cca:
            self.cca_norm = RMSNorm(cfg.norm_eps, dt)
            self.cca = ChunkedCrossAttention(cfg)
        self.ffw_norm = RMSNorm(cfg.norm_eps, dt)
        self.ffw = FeedForward(cfg.d_ff, dtype=dt)

    def self_attention(self, x_BxNxD: jax.Array) -> jax.Array:
        n = x_BxNxD.shape[1]
        pos = jnp.arange(n)
        mask = (pos[:, None] >= pos[None, :])[None, None]
        y = self.attn_norm(x_BxNxD)
        return x_BxNxD + self.attn(y, y, mask, causal=True)

    def cross_attention(self, h_BxNxD: jax.Array, e: jax.Array, valid: jax.Array) -> jax.Array:
        return h_BxNxD + self.cca(self.cca_norm(h_BxNxD), e, valid)

    def feed_forward(self, h_BxNxD: jax.Array) -> jax.Array:
        return h_BxNxD + self.ffw(self.ffw_norm(h_BxNxD))


class Retro(nn.Module):
    """`Retro(cfg).apply(variables, tokens, neighbours) -> logits`.

    tokens: int32 [B, N] (any N). neighbours: int32 [B, ceil(N/m), K, 2m] (neighbour chunk +
    continuation; -1 = missing token/slot) or None for retrieval off. logits: float32 [B, N, V].
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxN: jax.Array, neighbours_BxLxKxR: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        m = cfg.chunk_size
        b, n = tokens_BxN.shape
        l = math.ceil(n / m)
        if neighbours_BxLxKxR is not None:
            if not cfg.is_retro:
                raise ValueError(f"{cfg.name} has no CCA layers: pass neighbours=None")
            nb = neighbours_BxLxKxR.shape
            if len(nb) != 4 or nb[0] != b or nb[1] != l or nb[3] != cfg.neighbour_len:
                raise ValueError(f"neighbours must be [B={b}, ceil(N/m)={l}, K, 2m={cfg.neighbour_len}]"
                                 f" for tokens [{b}, {n}]; got {list(nb)}")
        elif cfg.is_retro and self.is_initializing():
            # Create the retrieval parameters even when initialising with retrieval off.
            neighbours_BxLxKxR = -jnp.ones((b, l, cfg.num_neighbours, cfg.neighbour_len), jnp.int32)

        # Pad to whole chunks; padding sits after every real position, so causality hides it.
        tokens_BxNp = jnp.pad(tokens_BxN, ((0, 0), (0, l * m - n)))
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=jnp.float32,
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
                         name="embed")
        x = nn.with_logical_constraint(embed(tokens_BxNp), ("batch", "length", "embed"))

        e = valid = None
        for i in range(1, cfg.num_layers + 1):
            layer = DecoderLayer(cfg, has_cca=i in cfg.cca_layers, name=f"layer_{i}")
            h = layer.self_attention(x)
            if i in cfg.cca_layers and neighbours_BxLxKxR is not None:
                if e is None:
                    e, valid = Encoder(cfg, name="encoder")(
                        neighbours_BxLxKxR, h.reshape(b, l, m, cfg.d_model))
                h = layer.cross_attention(h, e, valid)
            x = nn.with_logical_constraint(layer.feed_forward(h), ("batch", "length", "embed"))

        x = RMSNorm(cfg.norm_eps, dt, name="final_norm")(x)
        unembed = param(self, "unembed", nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                        (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))
        # A 2-D matmul: XLA:CPU runs it (and its transposes in the backward pass) markedly
        # faster than the equivalent 3-D einsum.
        x = x[:, :n].reshape(b * n, cfg.d_model)
        logits = jnp.dot(x, unembed.astype(dt), preferred_element_type=jnp.float32)
        return logits.reshape(b, n, cfg.vocab_size)
