"""The neighbour encoder: bidirectional, relative positions, its own token embeddings.

Each retrieved neighbour [N, F] (r = 2m tokens) is encoded independently. In the encoder
layers listed in `enc_cross_layers` (the paper: layer 1) every neighbour token also
cross-attends to the decoder activations of the chunk it was retrieved for, taken right
after the self-attention of the first CCA layer (Algorithm 1); the decoder runs the encoder
once there and reuses its output in every later CCA layer.

Tokens equal to -1 are missing (an empty neighbour slot, or the padding past a document's
end): they are masked as keys here and in CCA.

Cross-attention positions (our reading of §B.1.2): neighbour token j attends to chunk token i
with the signed distance j - i, N being aligned with the chunk.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from retro_jax.config import ModelConfig
from retro_jax.model.layers import FeedForward, RMSNorm
from retro_jax.model.relative_attention import RelativeAttention


class Encoder(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, neighbours_BxLxKxR: jax.Array,
                 h_BxLxMxD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns (encoded neighbours [B, L, K, R, E], valid-token mask [B, L, K, R])."""
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        b, l, k, r = neighbours_BxLxKxR.shape
        m, d = h_BxLxMxD.shape[2], h_BxLxMxD.shape[3]
        valid = neighbours_BxLxKxR >= 0
        tokens = jnp.where(valid, neighbours_BxLxKxR, 0)
        embed = nn.Embed(cfg.vocab_size, cfg.enc_d_model, dtype=dt, param_dtype=jnp.float32,
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
                         name="embed")
        x = embed(tokens).reshape(b * l * k, r, cfg.enc_d_model)
        valid_BLKxR = valid.reshape(b * l * k, r)
        # The chunk activations every neighbour of that chunk attends to (shared, not copied).
        cond_BLxMxD = RMSNorm(cfg.norm_eps, dt, name="chunk_norm")(h_BxLxMxD).reshape(b * l, m, d)

        def attention(name: str) -> RelativeAttention:
            return RelativeAttention(cfg.enc_num_heads, cfg.enc_head_dim, dtype=dt,
                                     max_wavelength=cfg.max_wavelength, attention=cfg.attention,
                                     block=cfg.attention_block, name=name)

        for i in range(1, cfg.enc_num_layers + 1):
            y = RMSNorm(cfg.norm_eps, dt, name=f"layer_{i}_attn_norm")(x)
            x = x + attention(f"layer_{i}_attn")(y, y, valid_BLKxR)
            if i in cfg.enc_cross_layers:
                y = RMSNorm(cfg.norm_eps, dt, name=f"layer_{i}_cross_norm")(x)
                y = y.reshape(b * l, k * r, cfg.enc_d_model)
                ca = attention(f"layer_{i}_cross_attn")(y, cond_BLxMxD, None, q_period=r)
                x = x + ca.reshape(b * l * k, r, cfg.enc_d_model)
            y = RMSNorm(cfg.norm_eps, dt, name=f"layer_{i}_ffw_norm")(x)
            x = x + FeedForward(cfg.enc_d_ff, dtype=dt, name=f"layer_{i}_ffw")(y)
        x = RMSNorm(cfg.norm_eps, dt, name="final_norm")(x)
        return x.reshape(b, l, k, r, cfg.enc_d_model), valid
