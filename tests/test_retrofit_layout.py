"""Retrofitting across parameter layouts: a scanned RETRO from an unrolled baseline, an unrolled
RETRO from a scanned one, and scanned with other scan blocks. The baseline is read in its own
layout and converted exactly: every decoder layer's weights land where the RETRO runs that layer,
and with retrieval off the retrofitted model computes the baseline's logits."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from retro_jax.config import ModelConfig, model_config, write_workdir_config
from retro_jax.model import abstract_params
from retro_jax.model.retro import Retro
from retro_jax.runtime.checkpoint import Checkpointer, restore_params_only
from retro_jax.runtime.mesh import mesh_from_config
from retro_jax.runtime.state import sharded_init
from retro_jax.train import retrofit
from retro_jax.train.step import optimizer_from_config
from test_train import config

FOUR = ["model.num_layers=4"]
UNROLLED = [*FOUR, "model.cca_layers=(2,4)"]
SCANNED = [*UNROLLED, "model.scan_layers=True"]  # the tiny preset's blocks: layers 1-2 unrolled, 3-4 scanned
ALL_SCANNED = [*FOUR, "model.scan_layers=True", "model.scan_start=1", "model.scan_period=1"]  # 3 blocks of 1


def _layers(decoder: dict, cfg: ModelConfig) -> dict:
    """{layer number: its weights} of a decoder tree in `cfg`'s layout (the layout's definition:
    block j's `layer_a` holds layer scan_start + j*scan_period + a on its leading axis)."""
    lead, blocks, trail = cfg.layer_groups
    out = {i: decoder[f"layer_{i}"] for i in (*lead, *trail)}
    for j in range(blocks):
        for a in range(1, cfg.scan_period + 1):
            stacked = decoder["blocks"][f"layer_{a}"]
            out[cfg.scan_start + j * cfg.scan_period + a] = jax.tree.map(lambda x, j=j: x[j], stacked)
    assert sorted(out) == list(range(1, cfg.num_layers + 1))
    return out


def _write_baseline(workdir: Path, layers: list[str]) -> tuple[ModelConfig, dict]:
    """A baseline workdir holding one checkpoint of freshly initialised params (seed 7, not the
    RETRO's 0, so a decoder left unconverted would show)."""
    conf = config(*layers, preset="tiny-baseline")
    cfg = model_config(conf)
    state, _ = sharded_init(cfg, optimizer_from_config(conf.train)[0], mesh_from_config(conf.mesh),
                            jax.random.key(7))
    with Checkpointer(workdir) as ckpt:
        ckpt.save(1, state, {"epoch": 0}, conf.to_dict(), force=True)
    write_workdir_config(workdir, conf)
    return cfg, jax.device_get(state.params)


def _logits(cfg: ModelConfig, params: dict) -> np.ndarray:
    tokens = np.random.default_rng(0).integers(0, 400, (2, 96), dtype=np.int32)
    return np.asarray(Retro(cfg).apply({"params": params}, tokens, None))


@pytest.mark.parametrize("base_layers,retro_layers", [(FOUR, SCANNED), (SCANNED, UNROLLED), (ALL_SCANNED, SCANNED)],
                         ids=["unrolled-to-scanned", "scanned-to-unrolled", "other-scan-blocks"])
def test_a_baseline_in_another_layout_is_converted_exactly(tmp_path, base_layers, retro_layers):
    base_cfg, base = _write_baseline(tmp_path / "baseline", base_layers)
    conf = config(*retro_layers)
    cfg = model_config(conf)
    assert retrofit._layout(cfg) != retrofit._layout(base_cfg)
    mask = retrofit.trainable_mask(abstract_params(cfg))
    mesh = mesh_from_config(conf.mesh)
    state, shardings = sharded_init(cfg, optimizer_from_config(conf.train, mask)[0], mesh, jax.random.key(0))
    fresh = jax.device_get(state.params)
    params = jax.device_get(retrofit.init_from_baseline(state, shardings.params, cfg, tmp_path / "baseline",
                                                        mesh).params)

    got, want = _layers(retrofit.split_decoder(params), cfg), _layers(base, base_cfg)
    for i in want:
        assert jax.tree.structure(got[i]) == jax.tree.structure(want[i]), i
        for x, y in zip(jax.tree.leaves(got[i]), jax.tree.leaves(want[i])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for key in set(base) - {k for k in base if k.startswith("layer_") or k == "blocks"}:  # embeddings, norm
        for x, y in zip(jax.tree.leaves(params[key]), jax.tree.leaves(base[key])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(retrofit.split_decoder(params, keep_retrieval=True)),
                    jax.tree.leaves(retrofit.split_decoder(fresh, keep_retrieval=True))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # the retrieval weights: untouched

    ref = _logits(base_cfg, base)
    assert not np.allclose(_logits(cfg, fresh), ref, atol=1e-3)  # an unconverted decoder would differ
    np.testing.assert_allclose(_logits(cfg, params), ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> str:
    from _db_helpers import shared
    return str(shared(tmp_path_factory)["db"])


@pytest.mark.slow
def test_train_retrofits_a_scanned_retro_from_an_unrolled_baseline_and_keeps_it_frozen(db, tmp_path):
    """The `train` path (--init-from, --freeze-decoder): 3 steps later the scanned RETRO's decoder
    is still the unrolled baseline's, layer by layer."""
    from retro_jax.train.loop import train

    base_cfg, base = _write_baseline(tmp_path / "baseline", FOUR)
    conf = config("train.steps=3", *SCANNED)
    train(conf, db, str(tmp_path / "retro"), init_from=str(tmp_path / "baseline"), freeze_decoder=True,
          progress=False)
    cfg = model_config(conf)
    params = jax.device_get(restore_params_only(tmp_path / "retro", abstract_params(cfg)))
    got, want = _layers(retrofit.split_decoder(params), cfg), _layers(base, base_cfg)
    for i in want:
        for x, y in zip(jax.tree.leaves(got[i]), jax.tree.leaves(want[i])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
