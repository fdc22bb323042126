"""The paper's models on one accelerator: bfloat16 train step of retro-172m and baseline-132m.

For each config: the jitted forward + backward + AdamW step (bf16 compute, f32 params and
optimizer state, the project's own `train_step`) at sequence 2048 and the largest batch from
`--batches` whose compiled step fits the device's memory (XLA's memory analysis, checked before
running). Reports step time, tokens/s, model FLOP/s (analytic count, retro_jax.model.count,
attention over the full score matrix as computed) and MFU against the chip's datasheet dense
bf16 peak. XLA's own FLOP count of the compiled step is printed beside the analytic one.

    python bench/gpu_train_step.py [--configs retro-172m,baseline-132m] [--seq-len 2048]
                                   [--batches 16,8,4,2,1] [--steps 10] [--json OUT.json]
                                   [--scan-layers] [--remat-policy none|dots|full]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.config import model_config
from retro_jax.model import init_params
from retro_jax.model.count import flops_per_token
from retro_jax.runtime.state import TrainState
from retro_jax.train.step import make_optimizer, train_step

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _stand_ins import random_batch  # noqa: E402

# Datasheet dense (no sparsity) bf16 peaks, FLOP/s, by device_kind substring.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "TPU v5p": 459e12,
             "TPU v5 lite": 197e12, "TPU v4": 275e12}


def peak_flops(device) -> float:
    kind = device.device_kind
    return next((v for k, v in PEAK_BF16.items() if k in kind), float("nan"))


def compile_step(cfg, batch: int, seq: int):
    """(compiled step, state, data, XLA flops, bytes needed) for one batch size."""
    opt = make_optimizer(2e-4)
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(opt.init)(params))
    data = {k: jnp.asarray(v) for k, v in random_batch(cfg, batch, seq).items()}
    step = jax.jit(lambda s, b: train_step(s, b, cfg=cfg, optimizer=opt), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    need = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes) if mem is not None else 0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return compiled, state, data, float((cost or {}).get("flops", float("nan"))), need, compile_s


def bench(name: str, seq: int, batches: list[int], steps: int, device, **model: Any) -> dict:
    cfg = model_config(name).replace(dtype="bfloat16", **model)
    capacity = (device.memory_stats() or {}).get("bytes_limit", float("inf"))
    for batch in batches:
        compiled, state, data, xla_flops, need, compile_s = compile_step(cfg, batch, seq)
        if need <= 0.95 * capacity:
            break
        print(f"{name}: batch {batch} needs {need / 2**30:.1f} GiB of {capacity / 2**30:.1f}; trying smaller",
              flush=True)
        del compiled, state, data
    holder = {"state": state}

    def run():
        holder["state"], m = compiled(holder["state"], data)
        return m

    float(run()["loss"])  # warm-up
    times, loss = [], float("nan")
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = float(run()["loss"])  # blocks on the step
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    tokens = batch * seq
    model_flops = flops_per_token(cfg, seq) * tokens
    return {"config": name, "dtype": cfg.dtype, "scan_layers": cfg.scan_layers, "remat_policy": cfg.remat_policy,
            "batch": batch, "seq_len": seq, "step_s": t,
            "tokens_per_s": tokens / t, "model_flops_per_step": model_flops, "xla_flops_per_step": xla_flops,
            "model_flop_s": model_flops / t, "peak_flop_s": peak_flops(device),
            "mfu": model_flops / t / peak_flops(device), "memory_gib": need / 2**30,
            "compile_s": compile_s, "loss": loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="retro-172m,baseline-132m")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batches", default="16,8,4,2,1", help="batch sizes to try, largest first")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--scan-layers", action="store_true", help="scanned decoder layers (model.scan_layers)")
    ap.add_argument("--remat-policy", default="none", choices=("none", "dots", "full"))
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, bf16 peak "
          f"{peak_flops(device) / 1e12:.0f} TFLOP/s (datasheet, dense)\n", flush=True)
    rows = []
    print(f"layers: {'scanned' if args.scan_layers else 'unrolled'}, remat {args.remat_policy}")
    print("| config | batch x seq | step (ms) | tokens/s | model TFLOP/step | XLA TFLOP/step | TFLOP/s | MFU | "
          "memory (GiB) | compile (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for name in args.configs.split(","):
        r = bench(name, args.seq_len, [int(b) for b in args.batches.split(",")], args.steps, device,
                  scan_layers=args.scan_layers, remat_policy=args.remat_policy)
        rows.append(r)
        print(f"| {name} | {r['batch']}x{r['seq_len']} | {r['step_s'] * 1e3:.0f} | {r['tokens_per_s']:,.0f} | "
              f"{r['model_flops_per_step'] / 1e12:.2f} | {r['xla_flops_per_step'] / 1e12:.2f} | "
              f"{r['model_flop_s'] / 1e12:.1f} | {100 * r['mfu']:.1f}% | {r['memory_gib']:.1f} | "
              f"{r['compile_s']:.0f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device.device_kind, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
