"""Train-step throughput and model FLOPs utilisation (MFU) on this machine.

Measures, side by side in one run:
  * the dense float32 matmul ceiling (FLOP/s of a jitted 3072^2 matmul),
  * a jitted forward + backward + AdamW step of the `tiny` preset and of a mid-sized config,
    in tokens/s, model FLOP/s (analytic count, retro_jax.model.count) and MFU against that ceiling.
Shared machines are noisy, so the ceiling and the step are timed alternately, rep by rep, and
MFU is the median of the per-rep ratios.
XLA's own FLOP count of the compiled step is printed too, as a cross-check of the analytic count.

    .venv/bin/python bench/train_step.py [--steps 5] [--configs tiny,mid] [--json]
    .venv/bin/python bench/train_step.py --loop [--db out/quickstart/db]

`--loop` measures the real sharded training loop instead (data pipeline included) on 1 and 8
CPU devices: see bench/train_loop.py, which it runs.

`--modes` times the attention computations alone instead (forward + backward of the scores,
softmax and weighted sum after the projections, as model.attention chooses them): dense
against blocked at each block size, for causal self-attention at N = 128 .. 2048 and for the
model's small windows (the peer-bench model: 8 heads x 32, batch 4 x 512 tokens, chunks of 64,
2 neighbours of 128): the table model.attention=auto is set by.

    .venv/bin/python bench/train_step.py --modes [--blocks 64,128,256] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.config import ModelConfig
from retro_jax.model import init_params
from retro_jax.model.count import flops_per_token
from retro_jax.runtime.state import TrainState
from retro_jax.train.step import make_optimizer, train_step

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stand_ins import random_batch  # noqa: E402

# A mid-sized RETRO: matmuls big enough to approach the CPU's matmul ceiling, small enough to
# step in seconds on 2 cores. Same structure as the paper's models (CCA every 2nd layer here).
MID = ModelConfig(name="mid", vocab_size=8192, d_model=1024, num_layers=4, num_heads=8, head_dim=128,
                  d_ff=4096, cca_layers=(2, 4), enc_d_model=512, enc_num_layers=2, enc_num_heads=4,
                  enc_head_dim=128, enc_d_ff=2048)
SHAPES = {"tiny": (ModelConfig.from_preset("tiny"), 8, 256), "mid": (MID, 4, 512),
          "mid-baseline": (MID.baseline(), 4, 512)}


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def matmul_probe(n: int = 3072):
    """A jitted dense f32 matmul: returns (run, flops) for the ceiling measurement."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    run = lambda: f(a, b).block_until_ready()  # noqa: E731
    run()
    return run, 2 * n ** 3


def bench_config(name: str, steps: int) -> dict:
    cfg, batch, seq = SHAPES[name]
    params = init_params(cfg, jax.random.key(0))
    opt = make_optimizer(2e-4)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params))
    data = {k: jnp.asarray(v) for k, v in random_batch(cfg, batch, seq).items()}
    step = jax.jit(lambda s, b: train_step(s, b, cfg=cfg, optimizer=opt), donate_argnums=0)
    compiled = step.lower(state, data).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    holder = {"state": state}

    def run():
        holder["state"], m = compiled(holder["state"], data)
        m["loss"].block_until_ready()

    run()  # warm up
    mm_run, mm_flops = matmul_probe()
    tokens = batch * seq
    model_flops = flops_per_token(cfg, seq) * tokens
    step_t, ceil, mfu = [], [], []
    for _ in range(steps):  # alternate: the ratio is robust to load that varies over time
        c = mm_flops / _once(mm_run)
        t = _once(run)
        step_t.append(t), ceil.append(c), mfu.append(model_flops / t / c)
    t = float(np.median(step_t))
    return {"config": name, "batch": batch, "seq_len": seq, "step_s": t, "tokens_per_s": tokens / t,
            "model_flops_per_step": model_flops, "xla_flops_per_step": xla_flops,
            "model_flop_s": model_flops / t, "matmul_flop_s": float(np.median(ceil)),
            "mfu": float(np.median(mfu))}


def attention_modes(blocks: list[int], steps: int) -> None:
    """Best-of-`steps` CPU time of value_and_grad of each computation; one row per call shape."""
    from timing import best_of

    from retro_jax.model.blocked_attention import blocked_relative_attention, distance_span
    from retro_jax.model.relative_attention import dense_relative_attention

    h, dh = 8, 32
    cases = [(f"causal self N={n}", 2048 // n, n, n, dict(causal=True)) for n in (128, 256, 512, 1024, 2048)]
    cases += [("encoder self 128 x 128", 64, 128, 128, {}),  # 4 x 512 tokens: 8 chunks x 2 neighbours
              ("CCA 64 x 2 x 128", 32, 64, 256, dict(q_offset=63, k_period=128)),
              ("encoder cross 2 x 128 x 64", 32, 256, 64, dict(q_period=128))]
    print("| attention | batch | dense (ms) | " + " | ".join(f"blocked {t} (ms)" for t in blocks) + " |")
    print("|---|---|---|" + "---|" * len(blocks))
    rng = np.random.default_rng(0)
    for name, b, q_len, k_len, pos in cases:
        r_base, count = distance_span(q_len, k_len, **pos)
        f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
        args = (f(b, q_len, h, dh) * dh ** -0.5, f(b, k_len, h, dh), f(b, k_len, h, dh), f(h, dh), f(h, dh),
                f(count, h, dh))
        ct = f(b, q_len, h, dh)
        valid = None if pos.get("causal") else jnp.asarray(rng.random((b, k_len)) > 0.1)
        periods = dict(q_period=pos.get("q_period"), k_period=pos.get("k_period"))
        runs = {"dense": lambda *a: dense_relative_attention(*a, causal=bool(pos.get("causal")),
                                                             key_valid_BxK=valid, **periods)}
        for t in blocks:
            tq, tk = min(t, pos.get("q_period") or q_len), min(t, pos.get("k_period") or k_len)
            runs[t] = lambda *a, tq=tq, tk=tk: blocked_relative_attention(
                *a, r_base=r_base, key_valid_BxK=valid, block_q=tq, block_k=tk, **pos)
        ms = {}
        for key, fn in runs.items():
            grad = jax.jit(jax.value_and_grad(lambda *a, fn=fn: jnp.sum(fn(*a) * ct), argnums=range(6)))

            def once(grad=grad):
                c0 = time.process_time()
                jax.block_until_ready(grad(*args))
                return time.process_time() - c0

            ms[key] = 1e3 * min(once() for _ in range(steps + 1))  # the first call compiles
        print(f"| {name} | {b} | {ms['dense']:.0f} | " + " | ".join(f"{ms[t]:.0f}" for t in blocks) + " |",
              flush=True)
    print(f"\nCPU seconds (process time: steadier than wall time on a shared machine), best of {steps}; "
          f"load average {os.getloadavg()[0]:.1f}.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--configs", default="tiny,mid,mid-baseline")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--loop", action="store_true", help="the real sharded loop on 1 and 8 devices")
    ap.add_argument("--modes", action="store_true", help="the attention computations alone: dense vs blocked")
    ap.add_argument("--blocks", default="64,128,256", help="block sizes for --modes")
    args, rest = ap.parse_known_args()
    if args.modes:
        return attention_modes([int(t) for t in args.blocks.split(",")], args.steps)
    if args.loop:
        import subprocess
        import sys
        from pathlib import Path

        script = Path(__file__).with_name("train_loop.py")
        raise SystemExit(subprocess.call([sys.executable, str(script), *rest]))
    dev = jax.devices()[0]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {dev.platform} ({dev.device_kind}), "
          f"jax {jax.__version__}; load average {os.getloadavg()[0]:.1f}\n")
    rows = []
    print("| config | batch x seq | step (ms) | tokens/s | model GFLOP/step | XLA GFLOP/step | GFLOP/s "
          "| f32 matmul GFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        r = bench_config(name, args.steps)
        rows.append(r)
        print(f"| {name} | {r['batch']}x{r['seq_len']} | {r['step_s'] * 1e3:.0f} | {r['tokens_per_s']:,.0f} | "
              f"{r['model_flops_per_step'] / 1e9:.1f} | {r['xla_flops_per_step'] / 1e9:.1f} | "
              f"{r['model_flop_s'] / 1e9:.1f} | {r['matmul_flop_s'] / 1e9:.0f} | {100 * r['mfu']:.0f}% |",
              flush=True)
    if args.json:
        print(json.dumps({"results": rows}))


if __name__ == "__main__":
    main()
