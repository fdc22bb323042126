"""`make bench`: every benchmark against its peer or bound, one table, one JSON.

    .venv/bin/python bench/all.py                          # all sections (about 1.5 h on 2 cores)
    .venv/bin/python bench/all.py --only embed retrieval-1m
    .venv/bin/python bench/all.py --reuse                  # keep sections whose JSON is already in --out

Each section is one benchmark script run as its own process (so each starts with a clean
memory high-water mark and no shared JIT state) writing its JSON to ``--out``; this script then
prints one Markdown table, the measured figure of each row beside issue 13's aim, and writes
``--out``/summary.json. Peers run in their own environment (``--peer-python``, made by
``make bench-peer``: torch CPU, retro-pytorch 0.3.9, faiss-cpu), never in ours.

Sections (the script, what it compares):
  train-step     bench/peer_train_step.py   our jitted step vs retro-pytorch's, 4 x 512 and 1 x 2048, f32
  embed          bench/embed.py             MiniLM chunks/s vs its FLOP bound (matmul rate in the same run)
  retrieval-100k bench/retrieval.py         ScaNN vs exact vs faiss IVF-PQ, 100k real MiniLM embeddings
                                            (made once by bench/embed.py --corpus into --data; resumable)
  retrieval-1m   bench/retrieval.py         the same on 1M synthetic clustered vectors
  generate       bench/generate.py          decode tokens/s, key/value cache vs full recompute
  build-db-memory bench/build_db_memory.py  build-db peak RSS, stdlib corpus vs 4x
When docs/bench/peer_train_step_gpu.json exists (bench/peer/gpu_run.sh's run on a lent GPU, kept
in the repository because such a machine is rarely at hand), its rows are shown too, marked as
a recorded run. Prints figures only: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
DEFAULT_PEER = BENCH.parents[1] / "peer-venv" / "bin" / "python"
GPU_RECORD = BENCH.parent / "docs" / "bench" / "peer_train_step_gpu.json"
SECTIONS = ("train-step", "embed", "retrieval-100k", "retrieval-1m", "generate", "build-db-memory")


def commands(args: argparse.Namespace) -> dict[str, list[list[str]]]:
    py, out, peer = sys.executable, args.out, str(args.peer_python)
    emb = str(args.data / "emb100k.npy")
    return {
        "train-step": [[py, f"{BENCH}/peer_train_step.py", "--peer-python", peer, "--json", f"{out}/train-step.json"]],
        "embed": [[py, f"{BENCH}/embed.py", "--n", "4096", "--json", f"{out}/embed.json"]],
        "retrieval-100k": [[py, f"{BENCH}/embed.py", "--corpus", emb, "--n", "100000"],
                           [py, f"{BENCH}/retrieval.py", "--embeddings", emb, "--peer-python", peer,
                            "--json", f"{out}/retrieval-100k.json"]],
        "retrieval-1m": [[py, f"{BENCH}/retrieval.py", "--n", "1000000", "--peer-python", peer,
                          "--json", f"{out}/retrieval-1m.json"]],
        "generate": [[py, f"{BENCH}/generate.py", "--json", f"{out}/generate.json"]],
        "build-db-memory": [[py, f"{BENCH}/build_db_memory.py", "--work", str(args.data / "dbmem"),
                             "--json", f"{out}/build-db-memory.json"]],
    }


def _retrieval_rows(name: str, r: dict, speed_aim: float) -> list[tuple[str, str, str, str]]:
    best, rows = r["best"], []
    scann = next((x for x in r["results"] if x.get("default")), None)
    if scann:
        ok = scann["recall"] >= r["target"] and scann["speedup_vs_exact"] >= speed_aim
        rows.append((name, f"ScaNN (build-db's default) vs exact, {r['rows']:,} x {r['dim']}",
                     f"recall@{r['k']} {scann['recall']:.3f}, {scann['queries_per_s']:,.0f} q/s = "
                     f"{scann['speedup_vs_exact']:.1f}x exact", f"recall >= {r['target']} at >= {speed_aim:g}x: "
                     + ("met" if ok else "MISSED")))
    if best.get("ScaNN") and best.get("faiss"):
        s, f = best["ScaNN"], best["faiss"]
        ratio = s["queries_per_s"] / f["queries_per_s"]
        rows.append((name, f"fastest at recall >= {r['target']}: ScaNN vs faiss IVF-PQ",
                     f"{s['queries_per_s']:,.0f} vs {f['queries_per_s']:,.0f} q/s = {ratio:.2f}x "
                     f"(faiss: {f['method'].removeprefix('faiss ')}, {f['setting']})",
                     "ahead of faiss: " + ("met" if ratio > 1 else "MISSED")))
    elif best.get("ScaNN"):
        rows.append((name, f"fastest at recall >= {r['target']}: ScaNN vs faiss IVF-PQ",
                     f"{best['ScaNN']['queries_per_s']:,.0f} q/s vs faiss: none of its settings reaches {r['target']} "
                     f"(its best recall {max(x['recall'] for x in r['results'] if x['method'].startswith('faiss')):.3f})",
                     "ahead of faiss: met"))
    return rows


def _train_rows(name: str, results: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for r in results["results"]:
        aim = 1.5 if r["seq_len"] == 512 else 2.0
        if r.get("ours_mfu") is not None:
            ours = f"MFU {r['ours_mfu']:.1%} of the {r['dtype']} datasheet peak"
        else:
            ours = f"{r['ours_fraction_of_matmul']:.1%} of the matmul rate measured beside it"
        rows.append((name, f"{r['batch']} x {r['seq_len']} {r['dtype']}: ours vs retro-pytorch tokens/s",
                     f"{r['ours_tokens_per_s']:,.0f} vs {r['peer_tokens_per_s']:,.0f} = {r['ratio']:.2f}x; ours at {ours}",
                     f">= {aim}x: " + ("met" if r["ratio"] >= aim else "MISSED")))
    return rows


def table(results: dict[str, dict]) -> list[tuple[str, str, str, str]]:
    rows = []
    if "train-step" in results:
        rows += _train_rows("train-step", results["train-step"])
    if GPU_RECORD.is_file():  # the lent GPU's run of the same script (bench/peer/gpu_run.sh), kept in docs/
        gpu = json.loads(GPU_RECORD.read_text())
        rows += _train_rows(f"train-step, {gpu['machine']['device_kind']} (recorded run)", gpu)
    if "embed" in results:
        e = results["embed"]
        rows.append(("embed", "MiniLM chunks/s vs the FLOP bound without padding",
                     f"{e['chunks_per_s']:.1f} chunks/s = {e['fraction_of_bound_unpadded']:.1%} of the bound "
                     f"({e['fraction_of_bound_as_laid_out']:.1%} counting padding, {e['padding_overhead']:.1%} padding)",
                     ">= 70%: " + ("met" if e["fraction_of_bound_unpadded"] >= 0.7 else "MISSED")))
    for name, aim in (("retrieval-100k", 5.0), ("retrieval-1m", 10.0)):
        if name in results:
            rows += _retrieval_rows(name, results[name], aim)
    if "generate" in results:
        for c in results["generate"]["contexts"]:
            rows.append(("generate", f"{results['generate']['config']}, context {c['context']}: KV cache vs recompute",
                         f"{c['cached_tokens_per_s']:.1f} vs {c['full_tokens_per_s']:.2f} tokens/s = {c['speedup']:.1f}x",
                         "-"))
    if "build-db-memory" in results:
        b = results["build-db-memory"]["builds"]
        rows.append(("build-db-memory", f"peak RSS, {b[0]['chunks']:,} vs {b[1]['chunks']:,} chunks "
                     f"({b[1]['chunks'] / b[0]['chunks']:.2f}x)", f"{b[0]['peak_rss_mib']:.0f} vs "
                     f"{b[1]['peak_rss_mib']:.0f} MiB ({b[1]['peak_rss_mib'] / b[0]['peak_rss_mib']:.2f}x); anonymous "
                     f"{b[0]['peak_anon_mib']:.0f} vs {b[1]['peak_anon_mib']:.0f} MiB", "-"))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run these sections (default all)")
    p.add_argument("--reuse", action="store_true", help="skip sections whose JSON already exists in --out")
    p.add_argument("--out", type=Path, default=Path("out/bench"), help="JSON files go here (default out/bench)")
    p.add_argument("--data", type=Path, default=Path("out/bench-data"),
                   help="100k embeddings and build-db work folders (default out/bench-data)")
    p.add_argument("--peer-python", type=Path, default=DEFAULT_PEER, help=f"peer environment (default {DEFAULT_PEER})")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.data.mkdir(parents=True, exist_ok=True)
    wanted = args.only or SECTIONS
    if not args.peer_python.is_file() and {"train-step", "retrieval-100k", "retrieval-1m"} & set(wanted):
        sys.exit(f"error: no peer environment at {args.peer_python}; `make bench-peer` makes it")
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    timings = {}
    for name in wanted:
        if args.reuse and (args.out / f"{name}.json").is_file():
            print(f"== {name}: reusing {args.out / name}.json", flush=True)
            continue
        t0 = time.perf_counter()
        for cmd in commands(args)[name]:
            print(f"== {name}: {' '.join(cmd)}", flush=True)
            if subprocess.run(cmd, env=env).returncode:
                sys.exit(f"error: section {name} failed (command above); rerun with --only {name}")
        timings[name] = time.perf_counter() - t0
    results = {n: json.loads((args.out / f"{n}.json").read_text()) for n in SECTIONS
               if (args.out / f"{n}.json").is_file()}
    rows = table(results)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    machine = f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, Python {platform.python_version()}"
    print(f"\nmachine: {machine}\n\n| section | what | measured | aim (issue 13) |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    (args.out / "summary.json").write_text(json.dumps({"machine": machine, "seconds": timings, "rows": [
        dict(zip(("section", "what", "measured", "aim"), r)) for r in rows], "results": results}, indent=1))
    print(f"\nwrote {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
