"""A sweep as data: models x database sizes x seeds, expanded into runs with deterministic folders.

A sweep file (`configs/sweeps/NAME.py`) defines `get_sweep()` returning a dict:

  name       the sweep's name (default: the file's stem)
  out        folder of the whole sweep (default out/sweeps/NAME; `--out` overrides)
  database   {"path": DB_DIR, "build": {build-db keyword arguments} or None}: the one database
             every size is a subset of; built once by the launcher when `build` is given and the
             folder is not a complete database yet
  db_chunks  database sizes in train chunks; "all" is the whole database
  subset     {"mode": "documents" | "prefix", "seed": 0}: which chunks a size keeps
             (retro_jax/retrieval/subset.py; nested across sizes)
  models     list of a preset name / config file, or {"name", "config", "overrides"}
  seeds      list of ints
  steps      training steps of every run
  overrides  --config overrides applied to every run (e.g. "train.batch_size=16")
  export     export every run's parameters (default True)
  neighbour_sweep  neighbour counts k to evaluate besides the model's own (default [], as
             `retro-jax eval` does: [1, 2, 5, 10])
  slurm      {"partition", "account", "time", "nodes", "gpus_per_node", "cpus_per_task", "python",
             "setup"}: defaults for --backend slurm (flags override)
  tpu        {"name", "zone", "project", "repo", "python", "setup"}: defaults for --backend tpu-pod

Runs: one baseline per model and seed (its training tokens do not depend on the database size:
every train chunk is training data at every size), and one RETRO run per model, size and seed,
evaluated beside its model's baseline of the same seed on the same database subset (so the
leakage filter r(C) is the same for both). A run's folder is
`OUT/runs/<model>-<db<chunks>|dball|baseline>-seed<s>-<hash8>`, where the hash covers every
declared setting that shapes the run; change one and the run gets a new folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

KEYS = {"name", "out", "database", "db_chunks", "subset", "models", "seeds", "steps", "overrides", "export",
        "neighbour_sweep", "slurm", "tpu"}
SPEC_FILE = "sweep.json"  # the expanded sweep, written into OUT by the launcher (the report reads it)


class SweepError(ValueError):
    """A sweep file that cannot be run as written."""


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    config: str
    overrides: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Run:
    kind: str  # "retro" or "baseline"
    model: Model
    chunks: int | None  # database size in train chunks; None: the whole database (baselines: None)
    seed: int
    settings: dict[str, Any] = dataclasses.field(hash=False, compare=False)

    @property
    def size_label(self) -> str:
        return "baseline" if self.kind == "baseline" else "dball" if self.chunks is None else f"db{self.chunks}"

    @property
    def id(self) -> str:
        digest = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.model.name}-{self.size_label}-seed{self.seed}-{digest}"


@dataclasses.dataclass
class Sweep:
    name: str
    file: str
    out: Path
    database: dict[str, Any]
    db_chunks: list[int | None]
    subset: dict[str, Any]
    models: list[Model]
    seeds: list[int]
    steps: int
    overrides: list[str]
    export: bool = True
    neighbour_sweep: list[int] = dataclasses.field(default_factory=list)
    slurm: dict[str, Any] = dataclasses.field(default_factory=dict)
    tpu: dict[str, Any] = dataclasses.field(default_factory=dict)

    # ---- runs
    def _settings(self, kind: str, model: Model, chunks: int | None, seed: int) -> dict[str, Any]:
        db = {"path": str(self.database["path"]), "build": self.database.get("build")}  # as declared: the
        # same id on every host, whatever its working directory
        out = {"kind": kind, "config": model.config, "model_overrides": list(model.overrides),
               "overrides": list(self.overrides), "steps": self.steps, "seed": seed, "database": db}
        if kind == "retro" and self.neighbour_sweep:
            out["neighbour_sweep"] = self.neighbour_sweep
        if kind == "retro":
            out |= {"chunks": chunks, "subset": self.subset if chunks is not None else None}
        return out

    def runs(self) -> list[Run]:
        """Every run, baselines first (RETRO evaluations need them), in a fixed order."""
        base = [Run("baseline", m, None, s, self._settings("baseline", m, None, s))
                for m in self.models for s in self.seeds]
        retro = [Run("retro", m, c, s, self._settings("retro", m, c, s))
                 for m in self.models for c in self.db_chunks for s in self.seeds]
        return base + retro

    def run(self, run_id: str) -> Run:
        for r in self.runs():
            if r.id == run_id:
                return r
        raise SweepError(f"no run {run_id!r} in sweep {self.name!r} ({self.file}); "
                         f"its runs: {', '.join(r.id for r in self.runs())}")

    def baseline_for(self, run: Run) -> Run:
        return next(r for r in self.runs() if r.kind == "baseline" and r.model == run.model and r.seed == run.seed)

    def run_dir(self, run: Run) -> Path:
        return self.out / "runs" / run.id

    def subset_dir(self, chunks: int) -> Path:
        mode = self.subset.get("mode", "documents")
        seed = f"-seed{self.subset.get('seed', 0)}" if mode == "documents" else ""
        return self.out / "databases" / f"{mode}{seed}-{chunks}"

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        d["runs"] = [{"id": r.id, "kind": r.kind, "model": r.model.name, "chunks": r.chunks, "seed": r.seed}
                     for r in self.runs()]
        return d


def _model(entry: Any) -> Model:
    if isinstance(entry, str):
        return Model(Path(entry).stem.replace("_", "-") if entry.endswith(".py") else entry, entry)
    if isinstance(entry, dict) and set(entry) <= {"name", "config", "overrides"} and "config" in entry:
        return Model(entry.get("name", entry["config"]), entry["config"], tuple(entry.get("overrides", ())))
    raise SweepError(f"a model is a preset name, a config file, or {{'name', 'config', 'overrides'}}; got {entry!r}")


def _sizes(values: Any) -> list[int | None]:
    if not isinstance(values, (list, tuple)) or not values:
        raise SweepError(f"db_chunks must be a non-empty list of chunk counts (or 'all'), got {values!r}")
    out: list[int | None] = []
    for v in values:
        if v == "all":
            v = None
        elif not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SweepError(f"db_chunks: {v!r} is not a positive number of chunks or 'all'")
        if v not in out:
            out.append(v)
    return sorted(out, key=lambda c: float("inf") if c is None else c)


def from_dict(d: dict[str, Any], file: str = "<dict>", out: str | None = None) -> Sweep:
    """Check a sweep dict and build the Sweep (see the module docstring for the keys)."""
    unknown = set(d) - KEYS
    if unknown:
        raise SweepError(f"{file}: unknown sweep keys {sorted(unknown)}; known: {sorted(KEYS)}")
    missing = {"database", "db_chunks", "models", "seeds", "steps"} - set(d)
    if missing:
        raise SweepError(f"{file}: the sweep needs {sorted(missing)}")
    database = d["database"]
    if not isinstance(database, dict) or "path" not in database or set(database) - {"path", "build"}:
        raise SweepError(f"{file}: database must be {{'path': DB_DIR, 'build': {{...}} or None}}")
    subset = dict(d.get("subset") or {"mode": "documents", "seed": 0})
    if subset.get("mode", "documents") not in ("documents", "prefix") or set(subset) - {"mode", "seed"}:
        raise SweepError(f"{file}: subset must be {{'mode': 'documents' | 'prefix', 'seed': int}}")
    subset.setdefault("mode", "documents")
    subset.setdefault("seed", 0)
    models = [_model(m) for m in d["models"]]
    if not models or len({m.name for m in models}) != len(models):
        raise SweepError(f"{file}: models must be a non-empty list with distinct names")
    seeds = list(d["seeds"])
    if not seeds or any(not isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise SweepError(f"{file}: seeds must be distinct integers, got {seeds!r}")
    if not isinstance(d["steps"], int) or d["steps"] < 1:
        raise SweepError(f"{file}: steps must be a positive integer, got {d['steps']!r}")
    name = d.get("name") or Path(file).stem
    return Sweep(name=name, file=file, out=Path(out or d.get("out") or f"out/sweeps/{name}"), database=dict(database),
                 db_chunks=_sizes(d["db_chunks"]), subset=subset, models=models, seeds=seeds, steps=d["steps"],
                 overrides=list(d.get("overrides", [])), export=bool(d.get("export", True)),
                 neighbour_sweep=[int(k) for k in d.get("neighbour_sweep", [])],
                 slurm=dict(d.get("slurm") or {}), tpu=dict(d.get("tpu") or {}))


def load_sweep(path: str | Path, out: str | None = None) -> Sweep:
    """Load `get_sweep()` from a sweep file."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"{path} defines no get_sweep()")
    return from_dict(module.get_sweep(), str(path), out)
