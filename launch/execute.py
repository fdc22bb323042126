"""One run of a sweep, in this process: database subset -> train -> eval -> export -> done.json.

Every backend runs the same thing on its machines: `python launch/sweep.py --sweep FILE --out OUT
--run RUN_ID` (one process per host; a multi-host run's processes find each other through the
cluster's environment, retro_jax/runtime/distributed.py). A run's folder holds

  run.json      its settings (what the folder name's hash covers)
  train/        the training workdir (checkpoints, metrics.jsonl, TensorBoard); a rerun resumes it
  eval_validation.json (+ two PNGs)   RETRO runs: bpb on/off, the baseline, bpb(alpha), k sweep
  export/       safetensors + JSON config (when the sweep exports; written by process 0, moved
                into place whole)
  done.json     written LAST: the run is complete and a rerun of the sweep skips it
  failed.json   the error, when the run failed (removed when it is run again)
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any

from launch.spec import Run, Sweep

DONE, FAILED = "done.json", "failed.json"
WAIT_POLL_S = 10.0


class RunError(RuntimeError):
    """A run cannot go on (its baseline failed, a subset is held by a dead process...)."""


def _write(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # never another writer's temp file
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def status(sweep: Sweep, run: Run) -> str:
    """"done", "failed", "started" (a folder without a marker: interrupted or running) or "missing"."""
    d = sweep.run_dir(run)
    if (d / DONE).is_file():
        return "done"
    if (d / FAILED).is_file():
        return "failed"
    return "started" if d.is_dir() else "missing"


def _once(out: Path, make: Any, timeout_s: float) -> Path:
    """Run `make` (which builds the database `out`, or checks and returns at once when it is
    complete with the same settings) under `out.lock`, so that of several processes asking at
    once one builds and the others wait, then find it complete."""
    from retro_jax.retrieval.combine import take_lock

    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.with_name(out.name + ".lock")
    start = time.monotonic()
    while True:
        if take_lock(lock):
            try:
                make()
            finally:
                lock.unlink(missing_ok=True)
            break
        if time.monotonic() - start > timeout_s:
            raise RunError(f"waited {timeout_s:.0f} s for {lock} (held by {lock.read_text()!r}); delete it if "
                           "that process is gone")
        time.sleep(WAIT_POLL_S)
    return out


def ensure_database(sweep: Sweep, progress: bool = True, timeout_s: float = 24 * 3600) -> Path:
    """The sweep's full database, built with its `build` settings if it is not complete yet."""
    from retro_jax.retrieval.database import MANIFEST

    path = Path(sweep.database["path"])
    build = sweep.database.get("build")
    if (path / MANIFEST).is_file() or build is None:
        if not (path / MANIFEST).is_file():
            raise RunError(f"the sweep's database {str(path)!r} is not a complete database and the sweep "
                           "gives no 'build' settings: run retro-jax build-db first")
        return path

    def make() -> None:
        from retro_jax.retrieval.build import build_database

        build_database(build.get("corpus"), str(path), progress=progress,
                       **{k: v for k, v in build.items() if k != "corpus"})

    return _once(path, make, timeout_s)


def database_for(sweep: Sweep, run: Run, progress: bool = False, timeout_s: float = 6 * 3600) -> Path:
    """The database a run trains and evaluates with: the whole one, or its subset of `run.chunks`."""
    from retro_jax.retrieval.database import Database
    from retro_jax.retrieval.subset import subset_database

    full = ensure_database(sweep, progress)
    if run.chunks is None:
        return full
    total = Database.open(full).manifest["counts"]["train"]["chunks"]
    if run.chunks > total:
        raise RunError(f"database size {run.chunks} is more than the {total} train chunks of {str(full)!r}")
    out = sweep.subset_dir(run.chunks)
    return _once(out, lambda: subset_database(full, out, run.chunks, mode=sweep.subset["mode"],
                                              seed=sweep.subset["seed"], progress=progress), timeout_s)


def run_config(sweep: Sweep, run: Run) -> Any:
    """The run's experiment config: its model's config, the sweep's overrides, steps and seed."""
    from retro_jax.config import baseline_of, load_config

    config = load_config(run.model.config, [*sweep.overrides, *run.model.overrides, f"train.steps={sweep.steps}",
                                            f"train.seed={run.seed}"])
    if run.kind == "baseline":
        if not config.model.cca_layers:
            return config
        config = baseline_of(config, f"{config.model.name}-baseline")
    elif not config.model.cca_layers:
        raise RunError(f"model {run.model.name!r} ({run.model.config}) has no CCA layers: a sweep's models "
                       "are RETRO configs (their baselines are derived)")
    return config


def _wait_for(sweep: Sweep, run: Run, timeout_s: float) -> Path:
    start = time.monotonic()
    while (state := status(sweep, run)) != "done":
        if state == "failed":
            raise RunError(f"its baseline {run.id} failed: see {sweep.run_dir(run) / FAILED}")
        if time.monotonic() - start > timeout_s:
            raise RunError(f"its baseline {run.id} did not finish within {timeout_s:.0f} s")
        time.sleep(WAIT_POLL_S)
    return sweep.run_dir(run) / "train"


def execute(sweep: Sweep, run: Run, progress: bool = False, baseline_timeout_s: float = 24 * 3600) -> dict[str, Any]:
    """Run (or resume, or skip when complete) one run; returns what done.json holds.

    A multi-host run calls it in every process (the cluster's environment joins them, before
    anything touches a device); process 0 writes the run's files and its export."""
    import jax

    from retro_jax.eval.run import evaluate
    from retro_jax.infer.export import export
    from retro_jax.retrieval.database import Database
    from retro_jax.runtime import distributed
    from retro_jax.train.loop import train

    d = sweep.run_dir(run)
    if (d / DONE).is_file():
        return json.loads((d / DONE).read_text())
    distributed.maybe_initialize()  # no-op for one process; a subset build may already use jax
    lead = jax.process_index() == 0
    d.mkdir(parents=True, exist_ok=True)
    if lead:
        (d / FAILED).unlink(missing_ok=True)
        _write(d / "run.json", {"id": run.id, "sweep": sweep.name, **run.settings})
    t0 = time.time()
    try:
        base_run = sweep.baseline_for(run) if run.kind == "retro" else None
        if base_run is not None and status(sweep, base_run) == "failed":  # before any work
            raise RunError(f"its baseline {base_run.id} failed: see {sweep.run_dir(base_run) / FAILED}")
        db = database_for(sweep, run, progress)
        config = run_config(sweep, run)
        last = train(config, str(db), str(d / "train"), progress=progress)
        result: dict[str, Any] = {"id": run.id, "kind": run.kind, "model": run.model.name, "seed": run.seed,
                                  "chunks": run.chunks, "train": last}
        manifest = Database.open(db).manifest
        sub = manifest.get("subset")
        result["database"] = {"path": str(db), "chunks": sub["chunks"] if sub else manifest["counts"]["train"]["chunks"],
                              "tokens": sub["tokens"] if sub else manifest["counts"]["train"]["tokens"]}
        if run.kind == "retro":
            base = _wait_for(sweep, base_run, baseline_timeout_s)
            report = evaluate(str(d / "train"), str(db), baseline=str(base), out_dir=str(d), progress=progress,
                              ks=tuple(sweep.neighbour_sweep))
            result |= {k: report[k] for k in ("bpb", "bpb_alpha", "loss_per_token", "alpha_counts",
                                               "neighbour_sweep")}
        if sweep.export:  # every process reads, process 0 writes; a rerun replaces an earlier export
            export(str(d / "train"), str(d / "export"), overwrite=True)
            result["export"] = str(d / "export")
        result["seconds"] = round(time.time() - t0, 1)
        if lead:
            _write(d / DONE, result)
        return result
    except BaseException as e:
        if lead:
            _write(d / FAILED, {"id": run.id, "error": f"{type(e).__name__}: {e}", "host": socket.gethostname(),
                                "traceback": traceback.format_exc()[-4000:]})
        raise
