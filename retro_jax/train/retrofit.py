"""Retrofitting (paper §4.2): start a RETRO model from a trained baseline's decoder, optionally
frozen, and train only the retrieval weights (encoder and CCA).

A RETRO parameter tree is its baseline's tree plus `encoder` and the CCA entries, so the
baseline's params drop into place unchanged; with retrieval off the retrofitted model computes
the baseline's logits exactly, and frozen weights get zero updates (bit-identical). A baseline
whose layers ran in the other layout (scanned vs unrolled, or another scan_start/scan_period) is
read in its own layout and converted exactly (`retro_jax.model.layout`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from retro_jax.config import ModelConfig, model_config, read_workdir_config
from retro_jax.model.count import is_retrieval_path
from retro_jax.model import abstract_params
from retro_jax.model.layout import stack_layers, unstack_layers
from retro_jax.runtime.checkpoint import restore_params_only
from retro_jax.runtime.state import param_shardings, with_shardings

DECODER_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "head_dim", "d_ff", "norm_eps",
                  "max_wavelength")


def _path(keypath) -> tuple[str, ...]:
    return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in keypath)


def trainable_mask(params: Any) -> Any:
    """True for the retrieval weights (encoder, CCA), False for the decoder."""
    return jax.tree_util.tree_map_with_path(lambda kp, _: is_retrieval_path(_path(kp)), params)


def split_decoder(params: Any, keep_retrieval: bool = False) -> dict:
    """The nested dict of the decoder (baseline) leaves, or of the retrieval leaves."""
    out: dict = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = _path(keypath)
        if is_retrieval_path(path) == keep_retrieval:
            node = out
            for p in path[:-1]:
                node = node.setdefault(p, {})
            node[path[-1]] = leaf
    return out


def merge(params: Any, decoder: dict) -> Any:
    """`params` with every decoder leaf replaced by the one in `decoder`."""
    def pick(keypath, leaf):
        path = _path(keypath)
        if is_retrieval_path(path):
            return leaf
        node = decoder
        for p in path:
            node = node[p]
        return node
    return jax.tree_util.tree_map_with_path(pick, params)


def check_baseline(cfg: ModelConfig, baseline_workdir: str | Path) -> None:
    """The baseline run's decoder must have this model's decoder shape (clear error otherwise)."""
    base = model_config(read_workdir_config(baseline_workdir))
    diffs = [f"{k}: baseline {getattr(base, k)!r} vs this model {getattr(cfg, k)!r}"
             for k in DECODER_FIELDS if getattr(base, k) != getattr(cfg, k)]
    if diffs:
        raise ValueError("the baseline's decoder does not match this model's: " + "; ".join(diffs))


def _layout(cfg: ModelConfig) -> tuple[int, ...]:
    """What decides the decoder's parameter tree: the scanned blocks (none: every layer unrolled)."""
    _, blocks, _ = cfg.layer_groups
    return (blocks, cfg.scan_start, cfg.scan_period) if blocks else (0,)


def init_from_baseline(state: Any, param_shardings_: Any, cfg: ModelConfig, baseline_workdir: str | Path,
                       mesh: jax.sharding.Mesh | None = None) -> Any:
    """`state` with its decoder params replaced by the baseline's latest checkpoint (resharded).

    A baseline in another layer layout is restored in its own layout on `mesh` (required then)
    and converted to this model's."""
    check_baseline(cfg, baseline_workdir)
    target = split_decoder(with_shardings(state.params, param_shardings_))
    base = model_config(read_workdir_config(baseline_workdir))
    if _layout(base) == _layout(cfg):
        decoder = restore_params_only(baseline_workdir, target)
    else:
        if mesh is None:
            raise ValueError("the baseline's layers are laid out differently (scan_layers); converting needs the mesh")
        own = split_decoder(with_shardings(abstract_params(base), param_shardings(base, mesh)))
        restored = restore_params_only(baseline_workdir, own)

        def convert(tree: dict) -> dict:
            unrolled = unstack_layers(tree, base) if _layout(base) != (0,) else tree
            return stack_layers(unrolled, cfg) if _layout(cfg) != (0,) else unrolled

        decoder = jax.jit(convert, out_shardings=jax.tree.map(lambda t: t.sharding, target))(restored)
    return state.replace(params=merge(state.params, decoder))
