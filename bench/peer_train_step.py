"""Training step side by side: retro-jax against lucidrains' retro-pytorch 0.3.9, same model, same run.

One script, run by OUR environment's python. It measures our jitted step (forward, backward,
global-norm clipping, AdamW) in this process and the peer's eager step (`RETRO(...)(seq,
retrieved, return_loss=True)`, `backward()`, `clip_grad_norm_`, `torch.optim.AdamW`) in a
subprocess started with the peer environment's python (`--peer-python`, with `--peer-path DIR`
prepended to its PYTHONPATH). Runs alternate ours / peer / ours / peer (`--reps` each, `--steps`
steps per run, after warm-up), so load that drifts over time hits both alike. Reported: tokens/s
of each (median over runs), the ratio ours/peer (median of the per-run paired ratios), and:
  * on CPU, our "fraction of matmul ceiling": model FLOP/s (analytic count,
    retro_jax.model.count.flops_per_token) over the dense matmul rate of this dtype measured in
    the same run, right before each of our runs (median of the per-run fractions). Not MFU;
  * on GPU (`--device gpu`), our MFU against the datasheet dense peak of the dtype (H100 SXM:
    bf16 989, tf32 494.7, f32 66.9 TFLOP/s); the measured matmul rate is printed beside it.

The model (issue 13): d 256, 6 decoder layers, CCA in layers 3 and 6, encoder 256 wide x 2
layers, attention width 256, FFW 4 x d, vocab 8192, 2 neighbours of 2 x 64 tokens per 64-token
chunk, AdamW (lr 2e-4, betas 0.9 / 0.95, weight decay 0.1), clip 1.0.
Shapes: A = batch 4 x 512 tokens, B = batch 1 x 2048 (the paper's sequence length); S = 1 x 512
(`--quick`, a smoke run of the machinery only).
dtypes: f32 (strict: JAX matmul precision "highest", torch TF32 off), tf32 (GPU only: both
allowed TF32 matmuls), bf16 (ours: ModelConfig.dtype="bfloat16"; peer: torch.autocast bf16;
both keep float32 parameters and optimizer state).

What differs between the two models (what retro-pytorch 0.3.9's constructor allows):
  * Heads: RETRO(heads=...) is ignored (it is not passed on; Encoder and Decoder always use 8
    heads), so the issue's 4 x 64 cannot be had. With dim_head=64 the peer's attention is 512
    wide, twice ours, and does twice the attention projection work. By default both models
    use 8 heads x 32 (`--heads 8x32`): the same width (256), the same attention FLOPs. With
    `--heads 4x64` ours runs the issue's layout and the peer 8 x 32 (same width);
    `--peer-dim-head 64` reproduces a user passing heads=4, dim_head=64.
  * Positions: the peer adds learned absolute position embeddings (max_seq_len 2048) and
    applies rotary embeddings to min(dim_head, 32) dims of q and k; ours uses Transformer-XL
    relative positions (sinusoids projected by W_R, u/v biases, the skew), as the paper does.
    These cost ours extra matmuls (the position logits over every distance: about as many
    FLOPs again as the content logits) that rotary does not, so at equal widths ours does more
    FLOPs per step; our fraction of the ceiling / MFU counts them (flops_per_token).
  * Embeddings: the peer shares one token table between decoder input and encoder and its
    logits layer has a bias; ours has separate decoder and encoder tables and no bias.
  * Biases: the peer's attention output and FFW layers have biases; its encoder ends with a
    256 x 256 projection (output_dim); its CCA has learned null key/value slots.
  * Norms: both pre-norm RMSNorm (peer eps 1e-8, ours 1e-6). Encoder cross-attention to the
    chunk: layer 1 only in both (peer enc_cross_attn_layers=(1,); its default is every layer).
  * Weight decay: ours decays every parameter (optax.adamw), the peer's AdamW too here (its
    get_optimizer helper would exempt vectors; same cost). Dropout 0 in both.
  * The peer computes the full causal N x N self-attention and masks it; ours does with
    `--attention dense`; with auto (the default) or blocked, ours skips the blocks above the
    causal diagonal (retro_jax/model/blocked_attention.py). The fraction of the ceiling is printed
    twice: with the full N x N count (count.py's default, what the dense path computes) and with
    only the causal pairs (`flops_per_token(..., causal_pairs=True)`, the work that needs doing).
  * The peer imports faiss and autofaiss at import time (retro_pytorch.retrieval); neither is
    on the step path, so the worker puts empty stand-in modules in their place.
Parameter counts of both (total and without token/position embeddings and logits) are printed.

    .venv/bin/python bench/peer_train_step.py [--shapes A,B] [--dtype f32] [--reps 3] [--steps N]
        [--device cpu|gpu] [--peer-python /work/peer-venv/bin/python] [--peer-path DIR]
        [--heads 8x32] [--peer-dim-head D] [--attention auto|dense|blocked] [--attention-block T]
        [--peer-env KEY=VALUE] [--json OUT] [--quick]

Steps per run: 3 on CPU. The first step after the other side ran is slow (up to about 1 s more
at 4 x 512, seen on ours right after the peer's step, not after the matmul probe or after an
idle pause); with one step per run that penalty made ours read 470 tok/s at 4 x 512 where it
runs 640 back to back. Three steps per run spread it over both sides alike.

Run it on an idle machine: under CPU contention torch's spinning OpenMP threads slow down far
more than XLA's (see the warning it prints), which would flatter our ratio.

The peer environment (never the project's requirements): bench/peer/requirements.txt.
On a GPU machine: bench/peer/gpu_run.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"A": (4, 512), "B": (1, 2048), "S": (1, 512)}  # S: the --quick smoke shape
MODEL = dict(vocab=8192, d=256, layers=6, cca_layers=(3, 6), enc_d=256, enc_layers=2, ff_mult=4,
             chunk=64, neighbours=2, max_seq_len=2048)
OPT = dict(lr=2e-4, b1=0.9, b2=0.95, weight_decay=0.1, clip=1.0)
PEER_HEADS = 8  # retro-pytorch 0.3.9 hard-wires 8 heads (RETRO's `heads` argument is not passed on)
DTYPES = ("f32", "tf32", "bf16")
PRECISION = {"f32": "highest", "tf32": "tensorfloat32", "bf16": "default"}  # JAX's matmul precision on GPU
# Datasheet dense peaks (FLOP/s) by dtype, by device_kind substring (the first match wins).
PEAKS = [("H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "f32": 51.2e12}),
         ("H100", {"bf16": 989e12, "tf32": 494.7e12, "f32": 66.9e12}),
         ("H200", {"bf16": 989e12, "tf32": 494.7e12, "f32": 66.9e12}),
         ("A100", {"bf16": 312e12, "tf32": 156e12, "f32": 19.5e12})]
TAG = "@@peer "  # the worker's protocol lines on stdout start with this; anything else is passed on


# ---------------------------------------------------------------------------------------------
# The peer worker: runs under the peer's python (torch, retro_pytorch, einops; no jax).

def _peer_import():
    import types

    # retro_pytorch/__init__ imports its retrieval module, which imports faiss and autofaiss at
    # module level; the model never calls them. Stand-ins keep them off the step path.
    for name in ("faiss", "autofaiss"):
        stub = types.ModuleType(name)
        stub.__doc__ = "stand-in from bench/peer_train_step.py: not on the training-step path"
        stub.build_index = None
        sys.modules[name] = stub
    import importlib.metadata

    import retro_pytorch
    from retro_pytorch.retro_pytorch import RETRO
    try:
        version = importlib.metadata.version("retro-pytorch")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return RETRO, version, str(Path(retro_pytorch.__file__).parent)


def _peer_build(spec: dict) -> dict:
    import torch

    RETRO, version, where = _peer_import()
    dev = torch.device("cuda" if spec["device"] == "gpu" else "cpu")
    if spec["device"] == "gpu":
        if not torch.cuda.is_available():
            raise SystemExit("peer: --device gpu but torch sees no CUDA device")
        # f32 strict or TF32 allowed (the model has no convolutions, so cuDNN's flag is moot).
        torch.set_float32_matmul_precision("high" if spec["dtype"] == "tf32" else "highest")
    torch.manual_seed(0)
    m = MODEL
    model = RETRO(num_tokens=m["vocab"], max_seq_len=m["max_seq_len"], enc_dim=m["enc_d"],
                  enc_depth=m["enc_layers"], enc_cross_attn_layers=(1,), dec_depth=m["layers"],
                  dec_cross_attn_layers=m["cca_layers"], heads=PEER_HEADS, dec_dim=m["d"],
                  dim_head=spec["peer_dim_head"], chunk_size=m["chunk"]).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=OPT["lr"], betas=(OPT["b1"], OPT["b2"]),
                            weight_decay=OPT["weight_decay"])
    b, n = spec["batch"], spec["seq"]
    g = torch.Generator().manual_seed(0)  # token 0 is the peer's padding id: draw from 1..V-1
    seq = torch.randint(1, m["vocab"], (b, n + 1), generator=g).to(dev)
    retrieved = torch.randint(1, m["vocab"], (b, n // m["chunk"], m["neighbours"], 2 * m["chunk"]),
                              generator=g).to(dev)
    autocast = spec["dtype"] == "bf16"
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(seq, retrieved, return_loss=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPT["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    embedding = ("token_emb", "pos_emb", "to_logits")
    total = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for name, p in model.named_parameters() if name.split(".")[0] in embedding)
    attn = model.decoder.layers[0][0].fn
    t0 = time.perf_counter()
    for _ in range(spec["warmup"]):
        loss = step()
    sync()
    info = {"params_total": total, "params_non_embedding": total - emb, "heads": attn.heads,
            "dim_head": attn.to_q.out_features // attn.heads, "torch": torch.__version__,
            "retro_pytorch": version, "retro_pytorch_path": where, "threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name() if dev.type == "cuda" else platform.machine(),
            "warmup_s": time.perf_counter() - t0, "loss": loss.item()}
    return {"info": info, "step": step, "sync": sync}


def peer_worker() -> None:
    """Line protocol on stdin/stdout: `build JSON` -> info; `run N` -> seconds for N steps; `quit`."""
    current = None
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "build":
            current = None
            current = _peer_build(json.loads(arg))
            reply = current["info"]
        elif cmd == "run":
            current["sync"]()
            t0 = time.perf_counter()
            for _ in range(int(arg)):
                loss = current["step"]()
            current["sync"]()
            reply = {"seconds": time.perf_counter() - t0, "loss": loss.item()}
        elif cmd == "quit":
            return
        else:
            reply = {"error": f"unknown command {cmd!r}"}
        print(TAG + json.dumps(reply), flush=True)


class Peer:
    """The peer worker subprocess, driven line by line."""

    def __init__(self, python: str, path: str | None, extra_env: dict[str, str]):
        env = dict(os.environ, **extra_env)
        if path:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(path).resolve()), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--worker"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def ask(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        for out in self.proc.stdout:
            if out.startswith(TAG):
                reply = json.loads(out[len(TAG):])
                if "error" in reply:
                    raise RuntimeError(f"peer: {reply['error']}")
                return reply
            sys.stderr.write("peer| " + out)
        raise RuntimeError(f"the peer worker exited (code {self.proc.wait()}); its stderr is above")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask("quit")
            except (RuntimeError, BrokenPipeError):
                pass
            self.proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------
# Our side (this process).

def our_config(heads: tuple[int, int], dtype: str, attention: str = "auto", block: int = 128):
    from retro_jax.config import ModelConfig

    m, (h, dh) = MODEL, heads
    return ModelConfig(name="peer-match", vocab_size=m["vocab"], d_model=m["d"], num_layers=m["layers"],
                       num_heads=h, head_dim=dh, d_ff=m["ff_mult"] * m["d"], chunk_size=m["chunk"],
                       num_neighbours=m["neighbours"], cca_layers=m["cca_layers"], enc_d_model=m["enc_d"],
                       enc_num_layers=m["enc_layers"], enc_num_heads=h, enc_head_dim=dh,
                       enc_d_ff=m["ff_mult"] * m["enc_d"], enc_cross_layers=(1,),
                       dtype="bfloat16" if dtype == "bf16" else "float32", attention=attention,
                       attention_block=block)


def build_ours(cfg, batch: int, seq: int, warmup: int) -> dict:
    import jax
    import jax.numpy as jnp

    from retro_jax.model import init_params
    from retro_jax.model.count import flops_per_token, param_counts
    from retro_jax.runtime.state import TrainState
    from retro_jax.train.step import make_optimizer, train_step

    sys.path.insert(0, str(ROOT / "tests"))
    from _stand_ins import random_batch

    opt = make_optimizer(OPT["lr"], weight_decay=OPT["weight_decay"], clip_norm=OPT["clip"],
                         b1=OPT["b1"], b2=OPT["b2"])
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(opt.init)(params))
    data = {k: jnp.asarray(v) for k, v in random_batch(cfg, batch, seq).items()}
    t0 = time.perf_counter()
    compiled = jax.jit(lambda s, b: train_step(s, b, cfg=cfg, optimizer=opt),
                       donate_argnums=0).lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def run(steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            holder["state"], metrics = compiled(holder["state"], data)
        jax.block_until_ready((holder["state"], metrics))  # the last update too, not just the loss
        holder["loss"] = float(metrics["loss"])
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    run(warmup)
    counts = param_counts(cfg)
    return {"run": run, "holder": holder, "compile_s": compile_s, "warmup_s": time.perf_counter() - t0,
            "flops_per_step": flops_per_token(cfg, seq) * batch * seq,
            "causal_flops_per_step": flops_per_token(cfg, seq, causal_pairs=True) * batch * seq,
            "params_total": counts.total, "params_non_embedding": counts.non_embedding}


def matmul_probe(dtype: str, gpu: bool):
    """(run, flops): a jitted dense matmul of this run's dtype, timed like a step (synchronised)."""
    import jax
    import jax.numpy as jnp

    n, reps = (8192, 20) if gpu else (3072, 1)
    dt = jnp.bfloat16 if dtype == "bf16" else jnp.float32
    a = jax.random.normal(jax.random.key(0), (n, n), dt)
    b = jax.random.normal(jax.random.key(1), (n, n), dt)

    @jax.jit
    def f(a, b):  # reps chained products: one dispatch, no host round trips between them
        c = a
        for _ in range(reps):
            c = (c @ b) * jnp.asarray(n ** -0.5, dt)  # keeps |c| near 1
        return c

    def run() -> float:
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        return time.perf_counter() - t0

    run()
    return run, 2 * n ** 3 * reps


def peak_flops(device_kind: str, dtype: str) -> float:
    return next((p[dtype] for k, p in PEAKS if k in device_kind), float("nan"))


# ---------------------------------------------------------------------------------------------

def bench_one(shape: str, dtype: str, args, peer: Peer, device) -> dict:
    import jax

    batch, seq = SHAPES[shape]
    gpu = args.device == "gpu"
    if gpu:  # f32 strict, or TF32 allowed: the same choice in both frameworks; bf16 as it comes
        jax.config.update("jax_default_matmul_precision", PRECISION[dtype])
    cfg = our_config(args.heads, dtype, args.attention, args.attention_block)
    ours = build_ours(cfg, batch, seq, args.warmup)
    print(f"  ours: compiled in {ours['compile_s']:.0f} s, warm-up {ours['warmup_s']:.1f} s", flush=True)
    spec = dict(device=args.device, dtype=dtype, batch=batch, seq=seq, warmup=args.warmup,
                peer_dim_head=args.peer_dim_head)
    pinfo = peer.ask("build " + json.dumps(spec))
    print(f"  peer: torch {pinfo['torch']}, retro-pytorch {pinfo['retro_pytorch']} ({pinfo['heads']} heads x "
          f"{pinfo['dim_head']}), {pinfo['threads']} threads, warm-up {pinfo['warmup_s']:.1f} s", flush=True)
    probe, probe_flops = matmul_probe(dtype, gpu)
    tokens = batch * seq * args.steps
    rows = []
    for rep in range(args.reps):  # ours / peer / ours / peer ...
        ceiling = probe_flops / probe()
        t_ours = ours["run"](args.steps)
        t_peer = peer.ask(f"run {args.steps}")["seconds"]
        rows.append({"ours_s": t_ours, "peer_s": t_peer, "ours_tokens_per_s": tokens / t_ours,
                     "peer_tokens_per_s": tokens / t_peer, "ratio": t_peer / t_ours, "matmul_flop_s": ceiling,
                     "ours_fraction_of_matmul": ours["flops_per_step"] * args.steps / t_ours / ceiling,
                     "ours_fraction_of_matmul_causal": ours["causal_flops_per_step"] * args.steps / t_ours / ceiling,
                     "load_average": os.getloadavg()[0]})
        print(f"  rep {rep + 1}: ours {tokens / t_ours:,.0f} tok/s, peer {tokens / t_peer:,.0f} tok/s, "
              f"ratio {t_peer / t_ours:.2f}, matmul {ceiling / 1e9:,.0f} GFLOP/s", flush=True)
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    ours_tps = med("ours_tokens_per_s")
    peak = peak_flops(device.device_kind, dtype) if gpu else float("nan")
    mfu = ours["flops_per_step"] * ours_tps / (batch * seq) / peak
    return {"shape": shape, "batch": batch, "seq_len": seq, "dtype": dtype, "steps_per_run": args.steps,
            "reps": args.reps, "ours_tokens_per_s": ours_tps, "peer_tokens_per_s": med("peer_tokens_per_s"),
            "ratio": med("ratio"), "matmul_flop_s": med("matmul_flop_s"),
            "ours_fraction_of_matmul": med("ours_fraction_of_matmul"),
            "ours_fraction_of_matmul_causal": med("ours_fraction_of_matmul_causal"),
            "peak_flop_s": None if peak != peak else peak, "ours_mfu": None if mfu != mfu else mfu,
            "ours_model_flops_per_step": ours["flops_per_step"], "ours_compile_s": ours["compile_s"],
            "ours_params_total": ours["params_total"], "ours_params_non_embedding": ours["params_non_embedding"],
            "ours_heads": f"{args.heads[0]}x{args.heads[1]}", "ours_loss": ours["holder"]["loss"],
            "ours_attention": f"{args.attention} (block {args.attention_block})",
            "peer": pinfo, "runs": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shapes", default="A,B", help="A = 4 x 512, B = 1 x 2048, S = 1 x 512 (comma list)")
    ap.add_argument("--dtype", default="f32", help=f"comma list of {', '.join(DTYPES)} (tf32: GPU only)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    ap.add_argument("--reps", type=int, default=3, help="alternating runs of each (default 3)")
    ap.add_argument("--steps", type=int, help="steps per run (default: CPU 3, GPU 20)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default: CPU 1, GPU 5)")
    ap.add_argument("--heads", default="8x32", help="our heads x head_dim (the peer always has 8 heads)")
    ap.add_argument("--peer-dim-head", type=int, help="default: our attention width / 8")
    ap.add_argument("--attention", default="auto", help="our model.attention: auto (default, what a "
                    "user gets), dense, blocked")
    ap.add_argument("--attention-block", type=int, default=128, help="our model.attention_block")
    ap.add_argument("--peer-python", default="/work/peer-venv/bin/python")
    ap.add_argument("--peer-path", help="a folder prepended to the peer's PYTHONPATH (an unpacked retro_pytorch)")
    ap.add_argument("--peer-env", action="append", default=[], metavar="KEY=VALUE",
                    help="set in the peer's environment (repeatable), e.g. OMP_WAIT_POLICY=PASSIVE")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--quick", action="store_true", help="smoke run: shape S (1 x 512), 2 runs of 1 step each")
    args = ap.parse_args()
    if args.worker:
        return peer_worker()
    gpu = args.device == "gpu"
    if args.quick:
        args.shapes, args.reps, args.steps = "S", 2, args.steps or 1
    args.steps = args.steps or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    h, _, dh = args.heads.partition("x")
    args.heads = (int(h), int(dh))
    width = args.heads[0] * args.heads[1]
    if width != MODEL["d"]:
        print(f"note: attention width {width} is not d = {MODEL['d']}", file=sys.stderr)
    args.peer_dim_head = args.peer_dim_head or width // PEER_HEADS
    dtypes = args.dtype.split(",")
    shapes = args.shapes.split(",")
    if bad := [d for d in dtypes if d not in DTYPES or (d == "tf32" and not gpu)]:
        ap.error(f"--dtype {bad}: choose from {DTYPES} (tf32 with --device gpu only)")
    if bad := [s for s in shapes if s not in SHAPES]:
        ap.error(f"--shapes {bad}: choose from {list(SHAPES)}")

    # Both frameworks share the GPU: JAX must not reserve 75% of it up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if not gpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(ROOT))
    import jax

    device = jax.devices()[0]
    if gpu and device.platform != "gpu":
        raise SystemExit(f"--device gpu but JAX's first device is {device.platform}")
    load0 = os.getloadavg()[0]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {device.platform} ({device.device_kind}), "
          f"jax {jax.__version__}; load average {load0:.1f}", flush=True)
    if not gpu and load0 > 0.5 * os.cpu_count():
        print(f"WARNING: this machine is busy (load average {load0:.1f} on {os.cpu_count()} cores). torch's "
              "OpenMP threads spin while they wait and collapse when other processes take their cores (10-20x "
              "slower steps seen), far more than XLA's: the ratio would flatter ours. Rerun on an idle machine "
              "(or see what --peer-env OMP_WAIT_POLICY=PASSIVE changes).", file=sys.stderr, flush=True)
    results, t_start = [], time.perf_counter()
    peer = Peer(args.peer_python, args.peer_path, dict(kv.split("=", 1) for kv in args.peer_env))
    try:
        for shape in shapes:
            for dtype in dtypes:
                print(f"shape {shape} ({SHAPES[shape][0]} x {SHAPES[shape][1]}), {dtype}:", flush=True)
                results.append(bench_one(shape, dtype, args, peer, device))
    finally:
        peer.close()
    wall = time.perf_counter() - t_start
    p = results[0]["peer"]
    print(f"\nours: retro-jax (jax {jax.__version__}), {results[0]['ours_heads']} heads, "
          f"attention {results[0]['ours_attention']}, "
          f"{results[0]['ours_params_total'] / 1e6:.2f}M params ({results[0]['ours_params_non_embedding'] / 1e6:.2f}M "
          f"non-embedding); peer: retro-pytorch {p['retro_pytorch']} (torch {p['torch']}), {p['heads']}x{p['dim_head']} "
          f"heads, {p['params_total'] / 1e6:.2f}M params ({p['params_non_embedding'] / 1e6:.2f}M non-embedding)")
    what = "MFU (datasheet peak)" if gpu else "fraction of matmul ceiling"
    print(f"\n| shape | dtype | ours tokens/s | peer tokens/s | ours / peer | ours {what} "
          f"(full N x N / causal pairs only) | measured matmul TFLOP/s |\n|---|---|---|---|---|---|---|")
    for r in results:
        frac = r["ours_mfu"] if gpu else r["ours_fraction_of_matmul"]
        frac = "n/a (unknown device)" if frac is None else f"{100 * frac:.1f}%"
        if not gpu:
            frac += f" / {100 * r['ours_fraction_of_matmul_causal']:.1f}%"
        print(f"| {r['batch']} x {r['seq_len']} | {r['dtype']} | {r['ours_tokens_per_s']:,.0f} | "
              f"{r['peer_tokens_per_s']:,.0f} | {r['ratio']:.2f}x | {frac} | "
              f"{r['matmul_flop_s'] / 1e12:.3g} |")
    print(f"\n{args.reps} alternating runs of {args.steps} steps each; medians. Wall {wall:.0f} s, "
          f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}.")
    if args.json:
        out = {"machine": {"arch": platform.machine(), "cores": os.cpu_count(), "platform": device.platform,
                           "device_kind": device.device_kind, "jax": jax.__version__,
                           "load_average_start": load0, "load_average_end": os.getloadavg()[0]},
               "device": args.device, "peer_env": args.peer_env, "model": MODEL, "optimizer": OPT, "wall_s": wall,
               "results": results}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
