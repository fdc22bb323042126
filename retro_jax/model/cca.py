"""Chunked cross-attention (CCA), RETRO Section 2.4 / Listing 1. The m-1 shift lives here only.

The decoder activations H (length n = l*m) are split into l attending chunks
    H+_u = (h_{u*m+m-1}, ..., h_{(u+1)*m+m-2})        (0-indexed)
i.e. the LAST token of chunk u and the first m-1 tokens of chunk u+1; H+_u attends to E_u, the
encoded neighbours of chunk u, with the neighbour and time axes merged (k*r keys). Positions
0..m-2 attend to nothing: CCA is the identity there (a zero residual). Consequently the logits
at position t depend on the neighbours of chunk u only if t >= u*m + m-1. (The last attending
chunk has a single real row, position n-1; its other rows fall past the sequence and are cut.)

Relative positions (paper §B.1.2; the paper leaves the exact offsets open, this is our reading):
the retrieved neighbour [N, F] is laid over the sequence with N aligned to chunk u and its
continuation F to chunk u+1, so neighbour token j sits at offset j from the start of chunk u,
and the query row i of H+_u sits at offset m-1+i. The signed distance is (m-1+i) - j, in
[m-r, 2m-2] for r = 2m, encoded exactly as in self-attention.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from retro_jax.config import ModelConfig
from retro_jax.model.relative_attention import RelativeAttention


class ChunkedCrossAttention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_BxNxD: jax.Array, e_BxLxKxRxE: jax.Array,
                 valid_BxLxKxR: jax.Array) -> jax.Array:
        """h: normed decoder activations, N = L*m. Returns the CCA output [B, N, D] (no residual)."""
        cfg = self.cfg
        m = cfg.chunk_size
        b, n, d = h_BxNxD.shape
        _, l, k, r, e_dim = e_BxLxKxRxE.shape
        if n != l * m:
            raise ValueError(f"CCA needs N = L*m; got N={n}, L={l}, m={m}")
        # Shift left by m-1 and pad at the end: row u*m + i of the shifted sequence is
        # position u*m + m-1 + i, so reshaping into chunks gives the attending chunks H+_u.
        shifted_BxNxD = jnp.pad(h_BxNxD[:, m - 1:], ((0, 0), (0, m - 1), (0, 0)))
        q_BLxMxD = shifted_BxNxD.reshape(b * l, m, d)
        kv_BLxKRxE = e_BxLxKxRxE.reshape(b * l, k * r, e_dim)
        valid_BLxKR = valid_BxLxKxR.reshape(b * l, k * r)
        # Query row i at offset m-1+i from chunk u's start; neighbour token j at offset j (the
        # k neighbours are independent blocks of r keys each).
        out_BLxMxD = RelativeAttention(
            cfg.num_heads, cfg.head_dim, dtype=jnp.dtype(cfg.dtype),
            max_wavelength=cfg.max_wavelength, zero_init_out=cfg.cca_zero_init,
            attention=cfg.attention, block=cfg.attention_block, name="attn",
        )(q_BLxMxD, kv_BLxKRxE, valid_BLxKR, q_offset=m - 1, k_offset=0, k_period=r)
        out_BxNxD = out_BLxMxD.reshape(b, n, d)
        # Shift back: pad m-1 at the front (identity on positions 0..m-2) and cut to N.
        return jnp.pad(out_BxNxD, ((0, 0), (m - 1, 0), (0, 0)))[:, :n]
