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

With cfg.scan_layers the layers after scan_start run under nn.scan in blocks of scan_period
identical layers (see ModelConfig.layer_groups; model/layout.py converts the parameter layouts),
and cfg.remat_policy rematerialises every layer but the one that runs the encoder.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from retro_jax.config import ModelConfig
from retro_jax.model.cca import ChunkedCrossAttention
from retro_jax.model.encoder import Encoder
from retro_jax.model.layers import FeedForward, RMSNorm, param
from retro_jax.model.relative_attention import RelativeAttention


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    has_cca: bool

    def setup(self) -> None:
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        self.attn_norm = RMSNorm(cfg.norm_eps, dt)
        self.attn = RelativeAttention(cfg.num_heads, cfg.head_dim, dtype=dt,
                                      max_wavelength=cfg.max_wavelength, attention=cfg.attention,
                                      block=cfg.attention_block)
        if self.has_cca:
            self.cca_norm = RMSNorm(cfg.norm_eps, dt)
            self.cca = ChunkedCrossAttention(cfg)
        self.ffw_norm = RMSNorm(cfg.norm_eps, dt)
        self.ffw = FeedForward(cfg.d_ff, dtype=dt)

    def self_attention(self, x_BxNxD: jax.Array) -> jax.Array:
        y = self.attn_norm(x_BxNxD)
        return x_BxNxD + self.attn(y, y, causal=True)

    def cross_attention(self, h_BxNxD: jax.Array, e: jax.Array, valid: jax.Array) -> jax.Array:
        return h_BxNxD + self.cca(self.cca_norm(h_BxNxD), e, valid)

    def feed_forward(self, h_BxNxD: jax.Array) -> jax.Array:
        return h_BxNxD + self.ffw(self.ffw_norm(h_BxNxD))

    def __call__(self, x_BxNxD: jax.Array, e: jax.Array | None, valid: jax.Array | None) -> jax.Array:
        """The whole layer, for layers that do not run the encoder (e: its output, or None)."""
        h = self.self_attention(x_BxNxD)
        if self.has_cca and e is not None:
            h = self.cross_attention(h, e, valid)
        return nn.with_logical_constraint(self.feed_forward(h), ("batch", "length", "embed"))


REMAT_POLICIES = {"dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                  "full": jax.checkpoint_policies.nothing_saveable}


def remat(module: type[nn.Module], cfg: ModelConfig) -> type[nn.Module]:
    """`module` rematerialised under cfg.remat_policy (unchanged for `none`)."""
    if cfg.remat_policy == "none":
        return module
    return nn.remat(module, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)


class Block(nn.Module):
    """scan_period consecutive decoder layers: the body of the scan over the repeating blocks."""

    cfg: ModelConfig
    cca_offsets: tuple[int, ...]  # 1-indexed positions in the block that hold CCA

    @nn.compact
    def __call__(self, x_BxNxD: jax.Array, e: jax.Array | None, valid: jax.Array | None):
        for a in range(1, self.cfg.scan_period + 1):
            x_BxNxD = DecoderLayer(self.cfg, has_cca=a in self.cca_offsets, name=f"layer_{a}")(x_BxNxD, e, valid)
        return x_BxNxD, None


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
        first, n_blocks, last = cfg.layer_groups
        blocks = nn.scan(  # the repeating blocks, parameters stacked on a leading `layers` axis
            remat(Block, cfg), variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast), length=n_blocks, metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, tuple(a for a in range(1, cfg.scan_period + 1) if cfg.scan_start + a in cfg.cca_layers),
          name="blocks") if n_blocks else None
        for i in (*first, *last):
            if blocks is not None and last and i == last[0]:  # the scanned blocks come between the two runs
                x = blocks(x, e, valid)[0]
            if e is None and i in cfg.cca_layers and neighbours_BxLxKxR is not None:  # runs the encoder
                layer = DecoderLayer(cfg, has_cca=True, name=f"layer_{i}")
                h = layer.self_attention(x)
                e, valid = Encoder(cfg, name="encoder")(neighbours_BxLxKxR, h.reshape(b, l, m, cfg.d_model))
                x = nn.with_logical_constraint(layer.feed_forward(layer.cross_attention(h, e, valid)),
                                               ("batch", "length", "embed"))
            else:
                x = remat(DecoderLayer, cfg)(cfg, has_cca=i in cfg.cca_layers, name=f"layer_{i}")(x, e, valid)
        if blocks is not None and not last:
            x = blocks(x, e, valid)[0]

        x = RMSNorm(cfg.norm_eps, dt, name="final_norm")(x)
        unembed = param(self, "unembed", nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                        (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))
        # A 2-D matmul: XLA:CPU runs it (and its transposes in the backward pass) markedly
        # faster than the equivalent 3-D einsum.
        x = x[:, :n].reshape(b * n, cfg.d_model)
        logits = jnp.dot(x, unembed.astype(dt), preferred_element_type=jnp.float32)
        return logits.reshape(b, n, cfg.vocab_size)
