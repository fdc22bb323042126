"""Benchmark: peak RSS of build-db on the default corpus (stdlib) and on one about 4x larger.

    python bench/build_db_memory.py                   # 1x = stdlib, 4x = stdlib + site-packages (JSONL)
    python bench/build_db_memory.py --scale 2 --work /tmp/dbmem

Each build runs in a fresh subprocess (this script with --child), which reports its own peak
RSS (getrusage ru_maxrss, the kernel's high-water mark), and per stage: wall time, the RSS peak
sampled every 20 ms while the stage ran, and RSS at its end. The 4x corpus is real Python source
(bench/python_corpus.py) written as JSONL into --work.

The embedder is a SMALL RANDOM BERT (hidden 64, 2 layers) with the real all-MiniLM-L6-v2
WordPiece tokenizer, so tokenization is realistic: embedding 4x the stdlib with MiniLM takes hours
on a CPU. What is measured is the pipeline's memory (streaming reads, memmapped chunks and
embeddings, index, neighbours); the embedder's own footprint is a constant on top (MiniLM's
weights are 90 MB). Prints figures only: nothing asserts on time or memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

STAGES = ("tokenizer_stage", "chunks_stage", "embed_stage", "combine_slices", "_index_stage",
          "_neighbours_stage", "_write_manifest")


def write_small_bert(root: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Random BERT weights (config.json, model.safetensors) + the real MiniLM tokenizer.json."""
    from safetensors.numpy import save_file

    from retro_jax.retrieval.bert import default_model_dir
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from _stand_ins import random_hf_weights

    root.mkdir(parents=True, exist_ok=True)
    src = default_model_dir()
    (root / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    d, f, n_pos = hidden, 2 * hidden, 512
    cfg = dict(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=4,
               intermediate_size=f, hidden_act="gelu", layer_norm_eps=1e-12, max_position_embeddings=n_pos,
               type_vocab_size=2, model_type="bert")
    (root / "config.json").write_text(json.dumps(cfg))
    t = random_hf_weights(cfg, np.random.default_rng(seed))
    save_file(t, str(root / "model.safetensors"))
    return root


def _rss() -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes: memmapped pages count as RSS too, but the kernel
    can drop them at will; anonymous memory is what the build really holds."""
    with open("/proc/self/status") as f:
        kib = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("RssAnon", "RssFile")}
    return kib["RssAnon"] * 1024, kib["RssFile"] * 1024


def child(args: argparse.Namespace) -> None:
    """Run one build in this process, timing and sampling RSS per stage; print a JSON line."""
    from retro_jax.retrieval import build

    current = {"anon": 0, "total": 0}

    def reset() -> None:
        anon, file = _rss()
        current.update(anon=anon, total=anon + file)

    def sample() -> None:
        while not stop.wait(0.02):
            anon, file = _rss()
            current.update(anon=max(current["anon"], anon), total=max(current["total"], anon + file))

    stop = threading.Event()
    threading.Thread(target=sample, daemon=True).start()
    stages: list[dict] = []

    def timed(name, fn):
        def wrapper(*a, **kw):
            reset()
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                anon, file = _rss()
                stages.append({"stage": name.strip("_").removesuffix("_stage"), "seconds": time.perf_counter() - t0,
                               "peak_mib": max(current["total"], anon + file) / 2**20,
                               "anon_peak_mib": max(current["anon"], anon) / 2**20,
                               "end_anon_mib": anon / 2**20, "end_file_mib": file / 2**20})
        return wrapper

    for name in STAGES:
        setattr(build, name, timed(name, getattr(build, name)))
    t0 = time.perf_counter()
    manifest = build.build_database(args.corpus or None, args.out, embedder=args.embedder, progress=False,
                                    index_mode=args.index_mode)
    stop.set()
    print(json.dumps({"seconds": time.perf_counter() - t0, "stages": stages, "counts": manifest["counts"],
                      "corpus": manifest["corpus"], "peak_anon_mib": max(st["anon_peak_mib"] for st in stages),
                      "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def start_build(label: str, corpus: list[str], out: Path, bert: Path, index_mode: str) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--child", "--out", str(out), "--embedder", str(bert),
           "--index-mode", index_mode, "--corpus", *corpus]
    print(f"[{label}] {' '.join(cmd)}", flush=True)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_build(label: str, proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"build {label} failed:\n{stderr[-3000:]}")
    res = json.loads(stdout.strip().splitlines()[-1])
    print(f"\n[{label}] {'stage':<12}{'seconds':>9}{'peak RSS':>10}{'peak anon':>11}{'end anon':>10}{'end file':>10}   (MiB)")
    for s in res["stages"]:
        print(f"[{label}] {s['stage']:<12}{s['seconds']:9.1f}{s['peak_mib']:10.0f}{s['anon_peak_mib']:11.0f}"
              f"{s['end_anon_mib']:10.0f}{s['end_file_mib']:10.0f}")
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/retro-dbmem"), help="corpus, BERT and databases go here")
    p.add_argument("--scale", type=float, default=4.0, help="size of the larger corpus, in stdlib corpora")
    p.add_argument("--parallel", action="store_true", help="run both builds at once (faster; times not comparable)")
    p.add_argument("--index-mode", default="auto", choices=("auto", "exact", "scann"),
                   help="exact: memory-mapped brute force, to separate the pipeline's memory from ScaNN's "
                        "in-RAM index (default auto)")
    p.add_argument("--json", type=Path, help="also write the table here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--embedder", help=argparse.SUPPRESS)
    p.add_argument("--corpus", nargs="*", default=[], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    sys.path.insert(0, str(Path(__file__).parent))
    from python_corpus import documents, write_jsonl

    import shutil

    shutil.rmtree(args.work / "db", ignore_errors=True)
    bert = write_small_bert(args.work / "small-bert")
    base_bytes = sum(len(t.encode("utf-8")) for _, t in documents(include_site_packages=False))
    big = args.work / f"python-x{args.scale:g}.jsonl"
    info = write_jsonl(big, int(args.scale * base_bytes))
    print(f"index   : {args.index_mode}")
    print("embedder: SMALL RANDOM BERT (hidden 64, 2 layers) + the real MiniLM WordPiece tokenizer; this measures "
          "the pipeline's memory, the embedder's own footprint is a constant")
    print(f"corpora : stdlib default ({base_bytes / 1e6:.1f} MB); {big} ({info['bytes'] / 1e6:.1f} MB, "
          f"{info['documents']} documents: stdlib + site-packages .py)")
    runs = (("1x", [], base_bytes / 1e6), (f"{args.scale:g}x", [str(big)], info["bytes"] / 1e6))
    procs = []
    for label, corpus, _ in runs:  # --parallel: both at once (peaks are per process; times then share the CPU)
        procs.append(start_build(label, corpus, args.work / "db" / label, bert, args.index_mode))
        if not args.parallel:
            procs[-1] = finish_build(label, procs[-1])
    rows = []
    for (label, _, mb), proc in zip(runs, procs):
        res = proc if isinstance(proc, dict) else finish_build(label, proc)
        c = res["counts"]
        rows.append((label, mb, c["train"]["documents"] + c["validation"]["documents"],
                     c["train"]["chunks"] + c["validation"]["chunks"], res["peak_mib"], res["peak_anon_mib"],
                     res["seconds"]))
    print(f"\n{'corpus':<7}{'MB':>7}{'documents':>11}{'chunks':>10}{'peak RSS MiB':>14}{'peak anon MiB':>15}{'build s':>9}")
    for label, mb, docs, chunks, peak, anon, sec in rows:
        print(f"{label:<7}{mb:7.1f}{docs:11,}{chunks:10,}{peak:14.0f}{anon:15.0f}{sec:9.0f}")
    print(f"ratio {rows[1][0]} / 1x: peak RSS {rows[1][4] / rows[0][4]:.2f}, peak anonymous {rows[1][5] / rows[0][5]:.2f} "
          f"(chunks {rows[1][3] / rows[0][3]:.2f}); peak RSS = getrusage ru_maxrss, includes memmapped file pages")
    if args.json:
        keys = ("corpus", "mb", "documents", "chunks", "peak_rss_mib", "peak_anon_mib", "build_s")
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"index_mode": args.index_mode, "builds": [dict(zip(keys, r)) for r in rows]},
                                        indent=1))


if __name__ == "__main__":
    main()
