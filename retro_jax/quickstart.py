"""`retro-jax quickstart` (the main job of `make quickstart`), end to end on 2 CPU cores:

  1. build a retrieval database from the embedded default corpus (this Python's standard
     library), limited to a few thousand chunks so it finishes in minutes;
  2. train a tiny RETRO and a tiny baseline with the same token budget;
  3. print their validation loss side by side.
Every artefact lands under one folder (`--out`): db/, retro/, baseline/, quickstart.json.
Rerunning resumes or skips whatever is already complete.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from retro_jax.config import PRESETS, apply_overrides, load_config
from retro_jax.model.count import flops_per_token, param_counts

# Sized for a few minutes per stage on 2 CPU cores.
DB_SETTINGS = dict(max_chunks=5000, val_fraction=0.1, seed=0)
TRAIN_OVERRIDES = ["train.steps=150", "train.batch_size=16", "train.seq_len=256", "train.warmup_steps=15",
                   "train.lr_max=2e-3", "train.log_every=10", "train.checkpoint_every=50",
                   "train.eval_every=0", "mesh.data=-1"]


def preset_table() -> str:
    """Markdown table of the presets: shapes, non-embedding/retrieval params, paper's Table 2."""
    from retro_jax.config import PAPER_PARAMS_M

    rows = ["| preset | d_model | d_ff | heads x head | layers | CCA layers | params (M) | "
            "retrieval (M) | paper (M) | train GFLOPs/token |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, cfg in PRESETS.items():
        c = param_counts(cfg)
        paper = PAPER_PARAMS_M.get(name)
        rows.append(
            f"| {name} | {cfg.d_model} | {cfg.d_ff} | {cfg.num_heads}x{cfg.head_dim} | {cfg.num_layers} | "
            f"{','.join(map(str, cfg.cca_layers)) or '-'} | {c.non_embedding / 1e6:,.1f} | "
            f"{c.retrieval / 1e6:,.1f} | {paper if paper else '-'} | {flops_per_token(cfg) / 1e9:.2f} |")
    return "\n".join(rows)


def random_batch(cfg, batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens and neighbours of the right shapes (for smoke runs and benchmarks)."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, cfg.vocab_size, (batch, seq_len + 1), dtype=np.int32)
    out = {"tokens": toks[:, :-1], "targets": toks[:, 1:],
           "loss_mask": np.ones((batch, seq_len), np.float32)}
    if cfg.is_retro:
        l = -(-seq_len // cfg.chunk_size)
        out["neighbours"] = rng.integers(0, cfg.vocab_size, (batch, l, cfg.num_neighbours, cfg.neighbour_len),
                                         dtype=np.int32)
    return out


def _banner(text: str) -> None:
    print(f"\n== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def run(out: str = "out/quickstart", steps: int | None = None, max_chunks: int | None = None) -> dict:
    from retro_jax.retrieval.build import build_database
    from retro_jax.retrieval.database import Database
    from retro_jax.train.loop import evaluate_workdir, train

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    print("RETRO presets (parameters exclude token embeddings, as in the paper's Table 2)\n")
    print(preset_table())

    _banner("1/3 database: the standard library of this Python, chunked, embedded, indexed")
    t0 = time.perf_counter()
    settings = dict(DB_SETTINGS, max_chunks=max_chunks or DB_SETTINGS["max_chunks"])
    build_database(None, str(root / "db"), **settings)
    timings["build_db_s"] = time.perf_counter() - t0
    info = Database.open(root / "db").info()
    print(json.dumps({k: info[k] for k in ("splits",) if k in info}, indent=None))

    results = {}
    overrides = TRAIN_OVERRIDES + ([f"train.steps={steps}"] if steps else [])
    for name, preset in (("retro", "tiny"), ("baseline", "tiny-baseline")):
        _banner(f"2/3 train a tiny {name} ({preset}), same token budget")
        t0 = time.perf_counter()
        config = apply_overrides(load_config(preset), overrides)
        train(config, str(root / "db"), str(root / name))
        timings[f"train_{name}_s"] = time.perf_counter() - t0
        results[name] = evaluate_workdir(str(root / name), str(root / "db"))

    _banner("3/3 validation loss (whole validation split, same sequences for both)")
    retro_off = results["retro"].pop("retrieval_off", None)
    print("| model | val loss (nats/token) | bits/token | tokens |")
    print("|---|---|---|---|")
    rows = [("tiny RETRO, retrieval on", results["retro"]), ("tiny RETRO, retrieval off", retro_off),
            ("tiny baseline", results["baseline"])]
    for label, r in rows:
        if r:
            print(f"| {label} | {r['val_loss']:.4f} | {r['val_bits_per_token']:.4f} | {int(r['val_tokens']):,} |")
    _banner("evaluation: bits-per-byte with retrieval on/off and the baseline, leakage-filtered (§2.6)")
    from retro_jax.eval.report import markdown_table
    from retro_jax.eval.run import evaluate

    t0 = time.perf_counter()
    report = evaluate(str(root / "retro"), str(root / "db"), baseline=str(root / "baseline"))
    timings["eval_s"] = time.perf_counter() - t0
    print(markdown_table(report))
    files = report.get("files", [])
    print("report and plots: " + ", ".join(map(str, files.values() if isinstance(files, dict) else files)))
    summary = {"validation": {label: r for label, r in rows if r}, "bpb": report["bpb"],
               "timings_s": timings, "out": str(root)}
    (root / "quickstart.json").write_text(json.dumps(summary, indent=2))
    print(f"\nartefacts under {root}/: db/, retro/, baseline/ (checkpoints, metrics.jsonl, tb/), quickstart.json")
    return summary
