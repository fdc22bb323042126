"""The two parameter layouts of the decoder and the exact conversion between them.

Unrolled (scan_layers off): one subtree per decoder layer, `layer_1` .. `layer_L`.
Scanned (scan_layers on): `layer_i` for the unrolled leading and trailing layers, and `blocks`,
whose `layer_a` (a = 1..scan_period) holds the parameters of decoder layers
scan_start + j*scan_period + a stacked on a leading axis (j = 0..blocks-1).
Everything else (embeddings, encoder, final norm) is the same in both. Export writes the
unrolled layout, so a file never depends on how the layers were run.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from retro_jax.config import ModelConfig


def _block_layers(cfg: ModelConfig) -> dict[tuple[int, int], int]:
    """(block j, position a) -> decoder layer number, for the scanned blocks."""
    _, n, _ = cfg.layer_groups
    s, p = cfg.scan_start, cfg.scan_period
    return {(j, a): s + j * p + a for j in range(n) for a in range(1, p + 1)}


def unstack_layers(params: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """Scanned-layout params (of a model with scan_layers on) in the unrolled layout."""
    out = {k: v for k, v in params.items() if k != "blocks"}
    for (j, a), layer in _block_layers(cfg).items():
        out[f"layer_{layer}"] = jax.tree.map(lambda x: x[j], params["blocks"][f"layer_{a}"])
    return out


def stack_layers(params: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """Unrolled-layout params in the scanned layout of `cfg` (scan_layers on)."""
    blocks = _block_layers(cfg)
    out = {k: v for k, v in params.items() if k not in {f"layer_{i}" for i in blocks.values()}}
    n = cfg.layer_groups[1]
    if n:
        out["blocks"] = {f"layer_{a}": jax.tree.map(lambda *xs: jnp.stack(xs),
                                                    *[params[f"layer_{blocks[j, a]}"] for j in range(n)])
                         for a in range(1, cfg.scan_period + 1)}
    return out
