"""`retro-jax plan`: the training step compiled ahead of time for a topology, on abstract arrays.
What it reports is what the sharded state really occupies; bad settings fail before compiling."""

from __future__ import annotations

import importlib.util
import json

import jax
import numpy as np
import pytest

from retro_jax.cli import main as cli_main
from retro_jax.config import load_config, model_config
from retro_jax.runtime.mesh import make_mesh
from retro_jax.runtime.state import abstract_state, state_shardings
from retro_jax.train.plan import chip_grid, plan, topology
from retro_jax.train.step import optimizer_from_config

SMALL = ["model.num_layers=2", "model.cca_layers=(2,)", "model.enc_num_layers=1", "model.vocab_size=512",
         "train.batch_size=8", "train.seq_len=128", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def test_plan_reports_the_bytes_the_sharded_state_and_batch_occupy():
    config = load_config("tiny", SMALL)
    report = plan(config, "cpu:8")
    assert {"fits", "devices", "hbm_bytes_per_device", "bytes_per_device", "flops_per_step",
            "compile_seconds"} <= set(report)
    assert report["devices"] == 8 and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and report["fits"]
    by = report["bytes_per_device"]
    assert by["total"] == by["arguments"] + by["temp"] + by["output"] and by["temp"] > 0

    # Every argument's shard on device 0: params and AdamW moments by the rules, the batch split 4 ways.
    cfg, mesh = model_config(config), make_mesh(2, 2, 2, devices=jax.devices()[:8])
    optimizer, _ = optimizer_from_config(config.train)
    shardings = state_shardings(cfg, optimizer, mesh)
    state = abstract_state(cfg, optimizer)
    want = sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
               for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)))
    want += (8 // 4) * 128 * 4 * 3 + (8 // 4) * (128 // 64) * 2 * 128 * 4  # tokens, targets, mask; neighbours
    assert by["arguments"] == want
    # XLA's FLOP count of the whole step agrees with the analytic count (as on one device), which
    # counts what the dense attention computes (blocked adds its backward's recomputed tiles).
    config.model.attention = "dense"
    dense = plan(config, "cpu:8")
    assert 0.8 < dense["flops_per_step"] / dense["model_flops_per_step"] < 1.2


@pytest.mark.slow
def test_microbatches_and_rematerialised_scanned_layers_cut_the_memory_plan_reports():
    """The same step, batch and mesh: gradient accumulation and full remat need fewer temporaries."""
    base = ["model.num_layers=6", "model.cca_layers=(2,4,6)", "train.batch_size=16", "train.seq_len=256",
            "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "model.vocab_size=512"]
    temp = {name: plan(load_config("tiny", base + extra), "cpu:8")["bytes_per_device"]["temp"]
            for name, extra in [("plain", []), ("microbatches", ["train.microbatches=4"]),
                                ("scan+remat", ["model.scan_layers=True", "model.remat_policy=full"])]}
    assert temp["microbatches"] < temp["plain"] and temp["scan+remat"] < temp["plain"], temp


@pytest.mark.parametrize("argv,message", [
    (["--topology", "cpu:8", "--config.mesh.data=3"], "devices"),
    (["--topology", "cpu:4", "--batch", "6", "--config.mesh.data=2", "--config.mesh.fsdp=2"], "batch 6"),
    (["--topology", "v9-8"], "unknown topology"),
    (["--topology", "v5p-6"], "power-of-two"),
    (["--topology", "cpu:64"], "CPU devices"),
])
def test_bad_settings_are_one_line_before_anything_compiles(argv, message, capsys):
    assert len(jax.devices()) == 8  # the backend is up: cpu:64 cannot get more devices in this process
    assert cli_main(["plan", "--config", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cloud_tpu_names_map_to_their_chip_grids():
    assert [chip_grid(c, 3) for c in (4, 8, 64, 128)] == ["2x2x1", "2x2x2", "4x4x4", "4x4x8"]
    assert [chip_grid(c, 2) for c in (4, 8, 256)] == ["2x2", "2x4", "16x16"]


def test_the_json_verb_prints_one_object(capsys):
    assert cli_main(["plan", "--config", "tiny", "--topology", "cpu:4", "--json",
                     *[f"--config.{o}" for o in SMALL[:-3]], "--config.mesh.data=4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["devices"] == 4 and out["bytes_per_device"]["arguments"] > 0


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the TPU compiler) not installed")
def test_a_tpu_slice_compiles_here_without_a_tpu():
    report = plan(load_config("tiny", ["mesh.data=1", "mesh.fsdp=4"]), "v5p-8")
    assert report["devices"] == 4 and report["fits"] and topology("v5p-8").hbm_bytes == 95 * 2**30
