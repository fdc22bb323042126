"""`retro-jax eval`: bpb of a trained workdir with retrieval on and off, a baseline next to it,
the leakage-filtered bpb(alpha) of every model, and the neighbour-count sweep.

Models in the report (the keys of `bpb` and `bpb_alpha`):
  retro      the workdir's RETRO model with k neighbours per chunk (k = its num_neighbours
             unless `neighbours` is given)
  retro_off  the same parameters with retrieval off (no neighbours read)
  baseline   the `baseline` workdir, always with retrieval off (if the main workdir is itself a
             baseline it is `baseline` and the extra one `baseline_2`)
r(C) comes from the database's stored neighbours of the split (10 or as many as stored); it is
a property of the evaluation text and the database, so every model is filtered by the same r(C).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from retro_jax.config import ATTENTION_MODES, ModelConfig, model_config, read_workdir_config
from retro_jax.eval import bpb as bpb_lib
from retro_jax.eval import leakage
from retro_jax.eval import report as report_lib
from retro_jax.retrieval.database import Database, DatabaseMismatchError
from retro_jax.runtime.forward import make_nll_fn
from retro_jax.runtime.mesh import batch_shards, mesh_from_config
from retro_jax.runtime.state import restore_params

log = logging.getLogger(__name__)

SWEEP_KS = (1, 2, 5, 10)


def eval_settings(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> tuple[int, int, int]:
    """(window, stride, batch size) of the config's `eval` section, the batch rounded up to split
    evenly over the mesh's data x fsdp axes."""
    shards = batch_shards(mesh)
    return config.eval.window, config.eval.stride, -(-config.eval.batch_size // shards) * shards


def _check(db: Database, config: ml_collections.ConfigDict, workdir: str | Path) -> ModelConfig:
    """The workdir's model, checked against the database (its tokenizer too, when the run recorded it)."""
    cfg = model_config(config)
    try:
        db.check_model(cfg, tokenizer_sha256=config.data.tokenizer_sha256)
    except DatabaseMismatchError as e:
        raise DatabaseMismatchError(f"model in {str(workdir)!r}: {e}") from e
    return cfg


def check_split(db: Database, split: str) -> Any:
    """The split's chunk store; ValueError if it is empty (nothing to evaluate)."""
    store = db.chunks(split)
    if store.num_chunks == 0:
        raise ValueError(f"the {split} split of {str(db.root)!r} is empty: nothing to evaluate; build a "
                         "bigger database (--max-chunks) or use a larger --val-fraction")
    return store


def make_validator(config: ml_collections.ConfigDict, db: Database, split: str = "validation",
                   progress: bool = False) -> Callable[[Any, jax.sharding.Mesh], dict[str, float]]:
    """`validate(params, mesh)`: bits-per-byte over whole documents (the first `train.eval_batches`
    batches of windows; 0 = all), exactly as `retro-jax eval` scores them, and the loss per token."""
    cfg = model_config(config)
    k = cfg.num_neighbours if (cfg.is_retro and config.train.retrieval) else None

    def validate(params: Any, mesh: jax.sharding.Mesh) -> dict[str, float]:
        window, stride, batch_size = eval_settings(config, mesh)
        s = bpb_lib.score_split(db, split, make_nll_fn(cfg, params, mesh), window, stride, batch_size, k=k,
                                keep_tokens=False, progress=progress, desc="validation",
                                max_batches=config.train.eval_batches or None)
        return {"val_bpb": s.bpb, "val_loss": s.loss_per_token, "val_tokens": float(s.tokens_C.sum())}

    return validate


def evaluate(workdir: str | Path, db_dir: str | Path, split: str = "validation", neighbours: int | None = None,
             baseline: str | Path | None = None, ks: tuple[int, ...] = SWEEP_KS, out_dir: str | Path | None = None,
             progress: bool = True, write: bool = True, step: int | None = None,
             attention: str | None = None) -> dict[str, Any]:
    """Evaluate `workdir` (and `baseline`) on `split` of the database; returns the report dict and,
    with `write`, writes eval_<split>.json and two PNGs into `out_dir` (default: the workdir).
    step: the workdir's checkpoint to evaluate (default the newest; the baseline's newest always).
    attention: model.attention for this evaluation (default: the run's; every mode is the same function)."""
    config = read_workdir_config(workdir)
    if attention is not None:
        config.model.attention = attention
    db = Database.open(db_dir)
    cfg = _check(db, config, workdir)
    base_cfg = _check(db, read_workdir_config(baseline), baseline) if baseline is not None else None
    if neighbours is not None:
        if not cfg.is_retro:
            raise ValueError(f"--neighbours {neighbours}: the model in {str(workdir)!r} is a baseline "
                             "(no retrieval)")
        if not 1 <= neighbours <= db.neighbours_stored:
            raise ValueError(f"--neighbours must be in [1, {db.neighbours_stored}] (the neighbours the "
                             f"database stores), got {neighbours}")
    store = check_split(db, split)
    mesh = mesh_from_config(config.mesh, fallback=True)
    window, stride, batch_size = eval_settings(config, mesh)
    table = db.tokenizer.token_num_bytes()
    params = restore_params(workdir, cfg, mesh, step)  # an unreadable checkpoint stops us before any work
    r_C = leakage.overlap_ratios(db, split, progress=progress)

    def score(nll_fn: Callable, k: int | None, name: str) -> bpb_lib.Scores:
        s = bpb_lib.score_split(db, split, nll_fn, window, stride, batch_size, k=k, token_num_bytes=table,
                                keep_tokens=False, progress=progress, desc=name)
        log.info("%s: bpb %.4f over %d bytes", name, s.bpb, int(s.bytes_C.sum()))
        return s

    report: dict[str, Any] = {"bpb": {}, "bpb_alpha": {}, "loss_per_token": {}, "models": {}}

    def record(name: str, scores: bpb_lib.Scores, model_dir: str | Path, k: int) -> bpb_lib.Scores:
        report["bpb"][name] = scores.bpb
        report["bpb_alpha"][name] = leakage.bpb_alpha(scores.bits_C, scores.bytes_C, r_C)
        report["loss_per_token"][name] = scores.loss_per_token
        report["models"][name] = {"workdir": str(model_dir), "retrieval": k > 0, "neighbours": k}
        return scores

    sweep: dict[str, dict[str, Any]] = {}
    nll_fn = make_nll_fn(cfg, params, mesh)
    if cfg.is_retro:
        k = neighbours or cfg.num_neighbours
        any_scores = main = record("retro", score(nll_fn, k, f"retro k={k}"), workdir, k)
        record("retro_off", score(nll_fn, None, "retro retrieval off"), workdir, 0)
        for kk in sorted({min(int(x), db.neighbours_stored) for x in ks if int(x) >= 1}):
            s = main if kk == k else score(nll_fn, kk, f"retro k={kk}")
            sweep[str(kk)] = {"bpb": s.bpb, "bpb_alpha": leakage.bpb_alpha(s.bits_C, s.bytes_C, r_C)}
    else:
        any_scores = record("baseline", score(nll_fn, None, "baseline"), workdir, 0)
    del params, nll_fn
    if baseline is not None:
        name = "baseline" if "baseline" not in report["bpb"] else "baseline_2"
        record(name, score(make_nll_fn(base_cfg, restore_params(baseline, base_cfg, mesh), mesh), None, name),
               baseline, 0)

    doc_ids = np.asarray(store.doc_ids)
    report.update({
        "workdir": str(workdir), "db": str(db_dir), "split": split,
        "window": window, "stride": stride, "batch_size": batch_size,
        "alphas": [leakage.alpha_key(a) for a in leakage.ALPHAS],
        "alpha_counts": leakage.alpha_counts(any_scores.bytes_C, any_scores.tokens_C, r_C),
        "neighbour_sweep": sweep,
        "leakage_neighbours": min(leakage.LEAKAGE_NEIGHBOURS, db.neighbours_stored),
        "leakage_histogram": leakage.histogram(r_C),
        "counts": {"documents": int(np.unique(doc_ids).size), **any_scores.counts,
                   "chunk_bytes": int(np.asarray(store.num_bytes, np.int64).sum())},
    })
    if write and jax.process_index() == 0:
        report["files"] = report_lib.write(report, Path(out_dir or workdir))
    return report


# ------------------------------------------------------------------------------- CLI


def _eval(args: argparse.Namespace) -> int:
    report = evaluate(args.workdir, args.db, split=args.split, neighbours=args.neighbours, baseline=args.baseline,
                      progress=not args.no_progress and not args.json, step=args.step, attention=args.attention)
    if args.json:
        print(json.dumps(report))
    else:
        print(report_lib.markdown_table(report))
        print("wrote " + ", ".join(report.get("files", {}).values()), file=sys.stderr)
    return 0


def register(subparsers: Any) -> None:
    """Add the `eval` verb to an argparse subparsers object."""
    e = subparsers.add_parser(
        "eval", help="bits-per-byte with retrieval on and off, a baseline, and leakage-filtered bpb(alpha)",
        description="Evaluate the latest checkpoint of a workdir on whole documents of a database split "
                    "(sliding windows from the config's eval section), with retrieval on and off, and a "
                    "baseline workdir side by side; bpb(alpha) filters out chunks that overlap the database.")
    e.add_argument("--workdir", required=True, help="training workdir (config.json + checkpoints)")
    e.add_argument("--db", required=True, metavar="DB_DIR", help="the database the model was trained with")
    e.add_argument("--split", default="validation", choices=("validation", "train"),
                   help="split to evaluate (default validation)")
    e.add_argument("--neighbours", type=int, help="neighbours per chunk (default: the model's num_neighbours)")
    e.add_argument("--baseline", metavar="DIR", help="baseline workdir to evaluate side by side")
    e.add_argument("--step", type=int, help="checkpoint step of --workdir to evaluate (default: the newest)")
    e.add_argument("--attention", choices=ATTENTION_MODES,
                   help="model.attention for this evaluation (default: the run's; all compute the same function)")
    e.add_argument("--json", action="store_true", help="print the report as one JSON object")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=_eval)
