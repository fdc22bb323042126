"""Throughput of the real sharded training loop (data pipeline included) on 1 and 8 CPU devices.

Runs `retro-jax train` on a database (default: the quickstart's) for a few steps in fresh
processes, one with 1 CPU device and one with 8 fake CPU devices sharing the same cores (mesh
data x fsdp x tensor = 2 x 2 x 2), and reports tokens/s and MFU from metrics.jsonl (MFU is
against the dense f32 matmul rate the loop measures on this machine). The first logged window
(compilation) is dropped.

    .venv/bin/python bench/train_loop.py [--db out/quickstart/db] [--steps 30] [--config tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

RUNS = {"1 device": (1, ["mesh.data=1"]), "8 devices (2x2x2)": (8, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])}


def run(db: str, config: str, steps: int, devices: int, overrides: list[str], log_every: int) -> dict:
    with tempfile.TemporaryDirectory() as work:
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        cmd = [sys.executable, "-m", "retro_jax.cli", "train", "--config", config, "--db", db,
               "--workdir", work, "--steps", str(steps), "--log-every", str(log_every),
               "--checkpoint-every", str(10 * steps), "--no-progress",
               *[f"--config.{o}" for o in overrides]]
        subprocess.run(cmd + ["--config.train.warmup_steps=2"], env=env, check=True, stdout=subprocess.DEVNULL)
        rows = [json.loads(ln) for ln in (Path(work) / "metrics.jsonl").read_text().splitlines()][1:]
    return {"tokens_per_s": float(np.median([r["tokens_per_s"] for r in rows])),
            "mfu": float(np.median([r["mfu"] for r in rows])), "windows": len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", default="out/quickstart/db")
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    if not Path(args.db, "manifest.json").exists():
        sys.exit(f"no database at {args.db}: run `make quickstart` (or retro-jax build-db) first")
    print(f"{args.config}, batch {args.batch_size} x 256 tokens, {args.steps} steps, database {args.db}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}\n")
    print("| devices | tokens/s | MFU |\n|---|---|---|")
    for label, (n, mesh) in RUNS.items():
        r = run(args.db, args.config, args.steps, n, mesh + [f"train.batch_size={args.batch_size}"],
                args.log_every)
        print(f"| {label} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
