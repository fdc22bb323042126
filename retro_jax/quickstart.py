"""`retro-jax quickstart` (the main job of `make quickstart`), end to end on 2 CPU cores:

  1. build a retrieval database from the embedded default corpus (this Python's standard
     library), limited to a few thousand chunks so it finishes in minutes;
  2. train a tiny RETRO and a tiny baseline with the same token budget;
  3. evaluate both on the validation documents with `retro-jax eval` (bits-per-byte with
     retrieval on and off, the baseline beside them, leakage-filtered bpb(alpha)),
  4. and say plainly whether retrieval paid off: the paired differences, against the
     seed-to-seed spread measured at this budget by `bench/retrieval_payoff.py`.
Every artefact lands under one folder (`--out`): db/, retro/, baseline/, quickstart.json.
Rerunning resumes or skips whatever is already complete (the evaluation too, when both
models and the database are the ones it evaluated).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from retro_jax.config import PAPER_PARAMS_M, load_config, presets
from retro_jax.retrieval.database import sha256_file
from retro_jax.runtime.checkpoint import checkpoint_steps
from retro_jax.model.count import flops_per_token, param_counts

# Sized for a few minutes per stage on 2 CPU cores: the first 5,000 training chunks in reading
# order. A 10% document sample of the whole library (`build-db --sample-documents 0.1`) was tried
# and measured: retrieval helped less there (docs/retrieval_payoff.md).
DB_SETTINGS = dict(max_chunks=5000, val_fraction=0.1, seed=0)
STEPS = 150  # warm-up: the first tenth
# Standard deviation over seeds of the paired differences at the defaults above (the
# zero-init/prefix row of docs/retrieval_payoff.md; `python bench/retrieval_payoff.py`).
PAYOFF_SPREAD = {"seeds": 3, "on_minus_off": 0.0008, "on_minus_baseline": 0.0024}
TRAIN_OVERRIDES = ["train.batch_size=16", "train.seq_len=256", "train.lr_max=2e-3",
                   "train.checkpoint_every=50", "train.eval_every=0", "mesh.data=-1"]


def preset_table() -> str:
    """Markdown table of the presets: shapes, non-embedding/retrieval params, paper's Table 2."""
    rows = ["| preset | d_model | d_ff | heads x head | layers | CCA layers | params (M) | "
            "retrieval (M) | paper (M) | train GFLOPs/token |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, cfg in presets().items():
        c = param_counts(cfg)
        paper = PAPER_PARAMS_M.get(name)
        rows.append(
            f"| {name} | {cfg.d_model} | {cfg.d_ff} | {cfg.num_heads}x{cfg.head_dim} | {cfg.num_layers} | "
            f"{','.join(map(str, cfg.cca_layers)) or '-'} | {c.non_embedding / 1e6:,.1f} | "
            f"{c.retrieval / 1e6:,.1f} | {paper if paper else '-'} | {flops_per_token(cfg) / 1e9:.2f} |")
    return "\n".join(rows)


def train_overrides(steps: int) -> list[str]:
    """The quickstart's training settings for a run of `steps` steps (warm-up: the first tenth)."""
    return TRAIN_OVERRIDES + [f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
                              f"train.log_every={min(10, steps)}"]


def payoff_verdict(report: dict, default_budget: bool) -> dict:
    """The paired differences of this run and, at the default budget, whether they exceed the
    seed-to-seed spread that `bench/retrieval_payoff.py` measured for them (PAYOFF_SPREAD)."""
    bpb, alpha = report["bpb"], report["bpb_alpha"]
    diffs = {"on_minus_off": bpb["retro"] - bpb["retro_off"], "on_minus_baseline": bpb["retro"] - bpb["baseline"],
             "on_minus_off_alpha_0.125": _diff(alpha["retro"]["0.125"], alpha["retro_off"]["0.125"]),
             "on_minus_baseline_alpha_0.125": _diff(alpha["retro"]["0.125"], alpha["baseline"]["0.125"])}
    fmt = lambda x: "-" if x is None else f"{x:+.4f}"  # noqa: E731
    lines = [f"retrieval on - off: {fmt(diffs['on_minus_off'])} bpb; on - baseline: {fmt(diffs['on_minus_baseline'])} "
             f"bpb. On the chunks with r(C) <= 0.125 (no 8-token overlap with a neighbour): on - off "
             f"{fmt(diffs['on_minus_off_alpha_0.125'])}, on - baseline {fmt(diffs['on_minus_baseline_alpha_0.125'])} bpb"]
    paid = None
    if default_budget:
        spread = PAYOFF_SPREAD
        beats = {k: diffs[k] < -spread[k] for k in ("on_minus_off", "on_minus_baseline")}
        paid = all(beats.values())
        lines.append(
            f"seed-to-seed spread (standard deviation over {spread['seeds']} seeds, bench/retrieval_payoff.py): "
            f"{spread['on_minus_off']:.4f} (on - off), {spread['on_minus_baseline']:.4f} (on - baseline); "
            f"on beats off by more than it: {'yes' if beats['on_minus_off'] else 'no'}; "
            f"on beats the baseline by more than it: {'yes' if beats['on_minus_baseline'] else 'no'}")
        lines.append(
            "RETRIEVAL PAID OFF: on beats off and the baseline by more than the spread" if paid else
            f"RETRIEVAL DID NOT PAY OFF at this budget ({STEPS} steps): on does not beat both off and the "
            "baseline by more than the spread. docs/retrieval_payoff.md says why (the tiny model has not yet "
            "learned to find the next token in a neighbour that is not aligned with its chunk) and what it takes.")
    return {**diffs, "paid_off": paid, "text": "\n".join(lines)}


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _banner(text: str) -> None:
    print(f"\n== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def run(out: str = "out/quickstart", steps: int | None = None, max_chunks: int | None = None,
        val_fraction: float | None = None) -> dict:
    from retro_jax.eval.report import markdown_table
    from retro_jax.eval.run import check_split, evaluate
    from retro_jax.retrieval.build import build_database
    from retro_jax.retrieval.database import Database
    from retro_jax.train.loop import train

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    print("RETRO presets (parameters exclude token embeddings, as in the paper's Table 2)\n")
    print(preset_table())

    _banner("1/3 database: the standard library of this Python, chunked, embedded, indexed")
    t0 = time.perf_counter()
    settings = dict(DB_SETTINGS, max_chunks=max_chunks or DB_SETTINGS["max_chunks"],
                    val_fraction=DB_SETTINGS["val_fraction"] if val_fraction is None else val_fraction)
    # The folder is the quickstart's own: a database left by an older version (other settings)
    # is rebuilt where it differs; one with the same settings is reused as it is.
    build_database(None, str(root / "db"), overwrite=True, **settings)
    timings["build_db_s"] = time.perf_counter() - t0
    db = Database.open(root / "db")
    print(json.dumps({"splits": db.info()["splits"]}))
    check_split(db, "validation")  # before any training

    steps = steps or STEPS
    overrides = train_overrides(steps)
    for name, preset in (("retro", "tiny"), ("baseline", "tiny-baseline")):
        _banner(f"2/3 train a tiny {name} ({preset}), same token budget")
        t0 = time.perf_counter()
        train(load_config(preset, overrides), str(root / "db"), str(root / name))
        timings[f"train_{name}_s"] = time.perf_counter() - t0

    _banner("3/3 evaluation: bits-per-byte with retrieval on/off and the baseline, leakage-filtered (§2.6)")
    t0 = time.perf_counter()
    evaluated = {"db_manifest_sha256": sha256_file(root / "db" / "manifest.json"),
                 **{f"{name}_step": (checkpoint_steps(root / name) or [None])[-1] for name in ("retro", "baseline")}}
    previous = json.loads((root / "quickstart.json").read_text()) if (root / "quickstart.json").is_file() else {}
    report_path = root / "retro" / "eval_validation.json"
    if previous.get("evaluated") == evaluated and report_path.is_file():
        print("the same models on the same database were evaluated already: the report is reused")
        report = json.loads(report_path.read_text())
        timings = dict(previous.get("timings_s", {}), **timings)
    else:
        report = evaluate(str(root / "retro"), str(root / "db"), baseline=str(root / "baseline"))
        timings["eval_s"] = time.perf_counter() - t0
    print(markdown_table(report))
    print("report and plots: " + ", ".join(report.get("files", {}).values()))
    default_budget = steps == STEPS and max_chunks is None and settings["val_fraction"] == DB_SETTINGS["val_fraction"]
    verdict = payoff_verdict(report, default_budget)
    print("\n" + verdict["text"])
    summary = {"bpb": report["bpb"], "bpb_alpha": report["bpb_alpha"], "loss_per_token": report["loss_per_token"],
               "payoff": verdict, "evaluated": evaluated, "timings_s": timings, "out": str(root)}
    (root / "quickstart.json").write_text(json.dumps(summary, indent=2))
    print(f"\nartefacts under {root}/: db/, retro/, baseline/ (checkpoints, metrics.jsonl, tb/, eval report), "
          "quickstart.json")
    return summary
