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

import json
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np

from retro_jax.config import ModelConfig
from retro_jax.eval import bpb as bpb_lib
from retro_jax.eval import leakage
from retro_jax.retrieval.database import Database, DatabaseMismatchError
from retro_jax.train.checkpoint import restore_params_only
from retro_jax.train.loader import check_database
from retro_jax.train.mesh import MeshError, batch_shards, make_mesh, param_shardings
from retro_jax.train.retrofit import abstract_params

log = logging.getLogger(__name__)

SWEEP_KS = (1, 2, 5, 10)


def read_workdir_config(workdir: str | Path) -> dict[str, Any]:
    """The experiment config a training run wrote to workdir/config.json."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(workdir)!r} has no config.json: is it a retro-jax training workdir?")
    return json.loads(path.read_text())


def eval_settings(config: dict[str, Any]) -> tuple[int, int, int]:
    """(window, stride, batch size) from the config's `eval` section (defaults: the training
    sequence length, half of it, 8)."""
    ev = config.get("eval") or {}
    window = int(ev.get("window") or config.get("train", {}).get("seq_len", 2048))
    stride = int(ev.get("stride") or window // 2)
    return window, stride, int(ev.get("batch_size") or 8)


def _mesh(config: dict[str, Any]) -> jax.sharding.Mesh:
    """The run's mesh if it fits the devices here, else every device on the data axis."""
    try:
        return make_mesh(**dict(config.get("mesh") or {}))
    except (MeshError, TypeError):
        return make_mesh()


def _check(db: Database, cfg: ModelConfig, config: dict[str, Any], workdir: str | Path) -> None:
    """check_database, plus the tokenizer when the run recorded the one it trained with."""
    sha = (config.get("data") or {}).get("tokenizer_sha256")
    try:
        check_database(db, cfg, tokenizer_sha256=sha)
    except DatabaseMismatchError as e:
        raise DatabaseMismatchError(f"model in {str(workdir)!r}: {e}") from e


def load_model(workdir: str | Path, mesh: jax.sharding.Mesh) -> tuple[dict[str, Any], ModelConfig, Any]:
    """(experiment config, ModelConfig, params of the latest checkpoint laid out on `mesh`)."""
    config = read_workdir_config(workdir)
    cfg = ModelConfig.from_dict(dict(config["model"]))
    seq_len = int(config.get("train", {}).get("seq_len", cfg.chunk_size))
    shardings = param_shardings(cfg, mesh, seq_len)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract_params(cfg, seq_len), shardings)
    return config, cfg, restore_params_only(workdir, target)


def _summary(scores: bpb_lib.Scores, r_C: np.ndarray) -> tuple[float, dict[str, float | None]]:
    return scores.bpb, leakage.bpb_alpha(scores.bits_C, scores.bytes_C, r_C)


def evaluate(workdir: str | Path, db_dir: str | Path, split: str = "validation", neighbours: int | None = None,
             baseline: str | Path | None = None, ks: tuple[int, ...] = SWEEP_KS, out_dir: str | Path | None = None,
             progress: bool = True, write: bool = True) -> dict[str, Any]:
    """Evaluate `workdir` (and `baseline`) on `split` of the database; returns the report dict and,
    with `write`, writes eval_<split>.json and two PNGs into `out_dir` (default: the workdir)."""
    from retro_jax.eval import report as report_lib

    config = read_workdir_config(workdir)
    db = Database.open(db_dir)
    main_cfg = ModelConfig.from_dict(dict(config["model"]))
    _check(db, main_cfg, config, workdir)
    base_config = None
    if baseline is not None:
        base_config = read_workdir_config(baseline)
        _check(db, ModelConfig.from_dict(dict(base_config["model"])), base_config, baseline)
    if neighbours is not None:
        if not main_cfg.is_retro:
            raise ValueError(f"--neighbours {neighbours}: the model in {str(workdir)!r} is a baseline "
                             "(no retrieval)")
        if not 1 <= neighbours <= db.neighbours_stored:
            raise ValueError(f"--neighbours must be in [1, {db.neighbours_stored}] (the neighbours the "
                             f"database stores), got {neighbours}")
    window, stride, batch_size = eval_settings(config)
    mesh = _mesh(config)
    shards = batch_shards(mesh)
    batch_size = -(-batch_size // shards) * shards  # split evenly over data x fsdp
    table = db.tokenizer.token_num_bytes()
    store = db.chunks(split)

    r_C = leakage.overlap_ratios(db, split, progress=progress)

    def score(nll_fn: bpb_lib.NllFn, k: int | None, name: str) -> bpb_lib.Scores:
        s = bpb_lib.score_split(db, split, nll_fn, window, stride, batch_size, k=k, token_num_bytes=table,
                                keep_tokens=False, progress=progress, desc=name)
        log.info("%s: bpb %.4f over %d bytes", name, s.bpb, int(s.bytes_C.sum()))
        return s

    bpb: dict[str, float] = {}
    bpb_alpha: dict[str, dict[str, float | None]] = {}
    models: dict[str, dict[str, Any]] = {}
    sweep: dict[str, dict[str, Any]] = {}
    _, cfg, params = load_model(workdir, mesh)
    nll_fn = bpb_lib.make_nll_fn(cfg, params, mesh)
    any_scores: bpb_lib.Scores | None = None
    if cfg.is_retro:
        k = neighbours or cfg.num_neighbours
        main = any_scores = score(nll_fn, k, f"retro k={k}")
        bpb["retro"], bpb_alpha["retro"] = _summary(main, r_C)
        models["retro"] = {"workdir": str(workdir), "retrieval": True, "neighbours": k}
        off = score(nll_fn, None, "retro retrieval off")
        bpb["retro_off"], bpb_alpha["retro_off"] = _summary(off, r_C)
        models["retro_off"] = {"workdir": str(workdir), "retrieval": False, "neighbours": 0}
        for kk in sorted({min(int(x), db.neighbours_stored) for x in ks if int(x) >= 1}):
            s = main if kk == k else score(nll_fn, kk, f"retro k={kk}")
            b, ba = _summary(s, r_C)
            sweep[str(kk)] = {"bpb": b, "bpb_alpha": ba}
    else:
        any_scores = score(nll_fn, None, "baseline")
        bpb["baseline"], bpb_alpha["baseline"] = _summary(any_scores, r_C)
        models["baseline"] = {"workdir": str(workdir), "retrieval": False, "neighbours": 0}
    del params, nll_fn
    if baseline is not None:
        name = "baseline" if "baseline" not in bpb else "baseline_2"
        _, base_cfg, base_params = load_model(baseline, mesh)
        s = score(bpb_lib.make_nll_fn(base_cfg, base_params, mesh), None, name)
        bpb[name], bpb_alpha[name] = _summary(s, r_C)
        models[name] = {"workdir": str(baseline), "retrieval": False, "neighbours": 0}

    assert any_scores is not None
    doc_ids = np.asarray(store.doc_ids)
    report = {
        "workdir": str(workdir), "db": str(db_dir), "split": split,
        "window": window, "stride": stride, "batch_size": batch_size,
        "models": models, "bpb": bpb, "bpb_alpha": bpb_alpha,
        "alphas": [leakage.alpha_key(a) for a in leakage.ALPHAS],
        "alpha_counts": leakage.alpha_counts(any_scores.bytes_C, any_scores.tokens_C, r_C),
        "neighbour_sweep": sweep,
        "leakage_neighbours": min(leakage.LEAKAGE_NEIGHBOURS, db.neighbours_stored),
        "leakage_histogram": leakage.histogram(r_C),
        "counts": {"documents": int(np.unique(doc_ids).size), **any_scores.counts,
                   "chunk_bytes": int(np.asarray(store.num_bytes, np.int64).sum())},
    }
    if write and jax.process_index() == 0:
        report["files"] = report_lib.write(report, Path(out_dir or workdir))
    return report
