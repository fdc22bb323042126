"""`retro-jax plan`: compile the complete training step ahead of time for a slice and say whether
it fits, before anyone rents the slice.

The step is the project's own sharded train step (forward, backward, AdamW update; the config's
mesh, shardings and compute dtype), lowered on abstract arrays (nothing is allocated) for the
devices of a topology, compiled, and read back: per-device bytes of arguments (params +
optimizer state + batch), temporaries and outputs from XLA's memory analysis, XLA's FLOPs, the
compile time. Step time, tokens/s and the days for the paper's token budget follow from the
analytic FLOP count at an assumed MFU.

Topologies are named as Cloud TPU names slices: `v4-32`, `v5p-128` count TensorCores (two per
chip: v5p-128 is 64 chips), `v5e-256` counts chips. TPU slices are compiled for through
`jax.experimental.topologies.get_topology_desc` with `libtpu` installed (`pip install
'retro-jax[tpu]'`; on a machine without a TPU it warns about TPU_ACCELERATOR_TYPE, harmlessly).
`cpu:N` uses N CPU devices of this process (always available; what the tests use).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import psutil

from retro_jax.config import model_config
from retro_jax.model import attention_mode
from retro_jax.model.count import flops_per_token
from retro_jax.runtime.mesh import batch_sharding, check_batch, make_mesh
from retro_jax.runtime.state import abstract_state, state_shardings, with_shardings
from retro_jax.train.step import make_sharded_train_step, optimizer_from_config

PAPER_TOKENS = 419.4e9  # the paper's training budget (§C.1)


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation: cores per chip (1 where Cloud TPU names count chips), HBM per chip, the
    datasheet dense bf16 peak per chip, and the grid dimensions of its slices."""

    cores_per_chip: int
    hbm_bytes: int
    peak_bf16: float
    dims: int


CHIPS = {"v4": Chip(2, 32 * 2**30, 275e12, 3), "v5p": Chip(2, 95 * 2**30, 459e12, 3),
         "v5e": Chip(1, 16 * 2**30, 197e12, 2)}


def chip_grid(chips: int, dims: int) -> str:
    """The near-cubic (or near-square) grid Cloud TPU gives a slice of `chips` chips: 4x4x4, 2x2x1
    (a dimension of 1 goes last), 16x16."""
    if chips & (chips - 1):
        raise ValueError(f"a slice has a power-of-two number of chips, not {chips}")
    grid = [1] * dims
    for i in range(int(math.log2(chips))):  # double the smallest dimension, last first
        j = min(range(dims), key=lambda d: (grid[d], -d))
        grid[j] *= 2
    return "x".join(map(str, sorted(grid, key=lambda g: (g == 1, g))))


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    devices: list
    hbm_bytes: float  # per device
    peak_flops: float  # per device, dense bf16 (NaN for CPU)


def topology(name: str) -> Topology:
    """The devices of a named slice (`v5p-128`, `v5e-256`, `v4-32`) or of `cpu:N`; ValueError for an
    unknown name or a slice this machine cannot compile for."""
    if m := re.fullmatch(r"cpu:(\d+)", name):
        n, have = int(m.group(1)), jax.devices("cpu")
        if not 1 <= n <= len(have):
            raise ValueError(f"--topology {name}: this process has {len(have)} CPU devices (the retro-jax plan "
                             "verb starts with as many as it asks for)")
        return Topology(name, have[:n], psutil.virtual_memory().total / n, float("nan"))
    m = re.fullmatch(r"(v4|v5p|v5e)-(\d+)", name)
    if not m:
        raise ValueError(f"unknown topology {name!r}: use a Cloud TPU slice name (v4-32, v5p-128, v5e-256, ...) "
                         "or cpu:N")
    chip, count = CHIPS[m.group(1)], int(m.group(2))
    if count % chip.cores_per_chip:
        raise ValueError(f"{name}: {m.group(1)} slice names count TensorCores, {chip.cores_per_chip} per chip")
    grid = chip_grid(count // chip.cores_per_chip, chip.dims)
    try:
        from jax.experimental import topologies

        # v4 and v5p run their two TensorCores per chip as one device (megacore), as on Cloud TPU;
        # libtpu's default for v4 is one device per core.
        chip_config = {"chip_config_name": "megacore"} if m.group(1) == "v4" else {}
        devices = topologies.get_topology_desc(f"{m.group(1)}:{grid}", platform="tpu", **chip_config).devices
    except Exception as e:  # noqa: BLE001 - no libtpu, or a grid it does not know
        raise ValueError(f"cannot compile for {name} ({m.group(1)}:{grid}) here: {str(e).splitlines()[0][:200]}; "
                         "install the TPU compiler with pip install 'retro-jax[tpu]'") from None
    return Topology(name, list(devices), chip.hbm_bytes, chip.peak_bf16)


def plan(config: ml_collections.ConfigDict, topology_name: str, mfu: float = 0.5) -> dict[str, Any]:
    """Compile the train step of `config` (its batch, seq_len, mesh, dtype) for a topology; the
    report has at least fits, devices, hbm_bytes_per_device, bytes_per_device {arguments, temp,
    total}, flops_per_step and compile_seconds. Every setting is checked before compiling."""
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {mfu}")
    cfg = model_config(config)
    topo = topology(topology_name)
    platform, kind = topo.devices[0].platform, topo.devices[0].device_kind
    attention_mode.check(cfg.attention, cfg.attention_block, platform, kind)  # one line, before compiling
    with attention_mode.compile_for(platform, kind):  # TPU slices are traced and compiled on a CPU host
        return _plan(config, cfg, topo, topology_name, mfu)


def _plan(config: ml_collections.ConfigDict, cfg: Any, topo: "Topology", topology_name: str,
          mfu: float) -> dict[str, Any]:
    tc = config.train
    mesh = make_mesh(**dict(config.mesh), devices=topo.devices)
    check_batch(tc.batch_size // tc.microbatches, mesh)  # every microbatch splits over data x fsdp
    if tc.seq_len % cfg.chunk_size:
        raise ValueError(f"train.seq_len {tc.seq_len} must be a multiple of the chunk size {cfg.chunk_size}")
    optimizer, schedule = optimizer_from_config(tc)
    shardings = state_shardings(cfg, optimizer, mesh)  # MeshError if a parameter does not divide
    state = with_shardings(abstract_state(cfg, optimizer), shardings)
    b, n, sh = tc.batch_size, tc.seq_len, batch_sharding(mesh)
    batch = {"tokens": jax.ShapeDtypeStruct((b, n), jnp.int32, sharding=sh),
             "targets": jax.ShapeDtypeStruct((b, n), jnp.int32, sharding=sh),
             "loss_mask": jax.ShapeDtypeStruct((b, n), jnp.float32, sharding=sh)}
    if cfg.is_retro and tc.retrieval:
        batch["neighbours"] = jax.ShapeDtypeStruct((b, n // cfg.chunk_size, cfg.num_neighbours, cfg.neighbour_len),
                                                   jnp.int32, sharding=sh)
    step = make_sharded_train_step(cfg, optimizer, mesh, shardings, schedule, tc.microbatches)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    args, temp = int(mem.argument_size_in_bytes), int(mem.temp_size_in_bytes)
    out = int(mem.output_size_in_bytes) - int(mem.alias_size_in_bytes)  # the donated state is reused
    total = args + temp + out
    devices = len(topo.devices)
    model_flops = flops_per_token(cfg, n, num_neighbours=cfg.num_neighbours) * b * n
    step_s = model_flops / (mfu * topo.peak_flops * devices)
    return {
        "config": cfg.name, "topology": topology_name, "devices": devices,
        "mesh": dict(mesh.shape), "batch": b, "seq_len": n, "dtype": cfg.dtype,
        "fits": bool(total <= topo.hbm_bytes), "hbm_bytes_per_device": topo.hbm_bytes,
        "bytes_per_device": {"arguments": args, "temp": temp, "output": out, "total": total},
        "flops_per_step": float(cost.get("flops", float("nan"))) * devices,
        "model_flops_per_step": model_flops, "compile_seconds": compile_s, "assumed_mfu": mfu,
        "step_seconds": step_s, "tokens_per_second": b * n / step_s,
        "days_for_paper_tokens": PAPER_TOKENS / (b * n / step_s) / 86400,
    }


def markdown(report: dict[str, Any]) -> str:
    """The plan as a few lines for the terminal."""
    gib = 2**30
    by = report["bytes_per_device"]
    lines = [f"{report['config']} on {report['topology']} ({report['devices']} devices, mesh "
             f"{'x'.join(str(v) for v in report['mesh'].values())} = data x fsdp x tensor), batch "
             f"{report['batch']} x {report['seq_len']}, {report['dtype']} compute",
             f"per device: arguments {by['arguments'] / gib:.2f} GiB + temporaries {by['temp'] / gib:.2f} GiB + "
             f"outputs {by['output'] / gib:.2f} GiB = {by['total'] / gib:.2f} GiB of "
             f"{report['hbm_bytes_per_device'] / gib:.1f} GiB: {'FITS' if report['fits'] else 'DOES NOT FIT'}",
             f"XLA FLOPs per step {report['flops_per_step']:.3e} (analytic {report['model_flops_per_step']:.3e}); "
             f"compiled in {report['compile_seconds']:.1f} s"]
    if math.isfinite(report["step_seconds"]):
        lines.append(f"at {100 * report['assumed_mfu']:.0f}% MFU: {report['step_seconds']:.2f} s/step, "
                     f"{report['tokens_per_second']:,.0f} tokens/s, {report['days_for_paper_tokens']:.1f} days for "
                     f"the paper's {PAPER_TOKENS / 1e9:.1f}B tokens")
    return "\n".join(lines)
