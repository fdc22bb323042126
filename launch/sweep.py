"""Launch a sweep (model presets x database sizes x seeds) on this machine, SLURM, or a TPU slice.

    python launch/sweep.py --sweep configs/sweeps/db_size.py [--out DIR]
                           [--backend local|slurm|tpu-pod] [--parallel P] [--dry-run]

The sweep file is data (launch/spec.py says what it holds). Runs already complete (their
done.json) are skipped; interrupted ones resume from their checkpoints; failed ones run again.
Each run is `python launch/sweep.py --sweep FILE --out DIR --run RUN_ID`, which trains, evaluates
beside its baseline and exports (launch/execute.py); the backends only decide where that runs
(launch/backends.py). Then `python launch/report.py DIR` gathers the table and the plot.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `launch` importable
    sys.path.insert(0, str(ROOT))

from launch import backends  # noqa: E402
from launch.execute import ensure_database, execute, status  # noqa: E402
from launch.spec import SPEC_FILE, Sweep, SweepError, load_sweep  # noqa: E402


def run_argv(sweep: Sweep, run_id: str, python: str, script: str = str(Path(__file__).resolve())) -> list[str]:
    """The command line that runs one run of the sweep (absolute paths: it may run elsewhere)."""
    return [python, script, "--sweep", str(Path(sweep.file).resolve()), "--out", str(sweep.out.resolve()),
            "--run", run_id, "--no-progress"]  # its log is a file: metric lines, not bars


def launch(sweep: Sweep, backend: str = "local", parallel: int = 1, dry_run: bool = False,
           slurm: dict | None = None, tpu: dict | None = None, python: str | None = None,
           echo=print) -> dict[str, str]:
    """Run or submit every run that is not complete; returns {run id: status before launching}."""
    if backend not in backends.BACKENDS:
        raise SweepError(f"--backend must be one of {backends.BACKENDS}, got {backend!r}")
    if not dry_run and not Path(sweep.file).is_file():
        raise SweepError(f"sweep {sweep.name!r} has no sweep file ({sweep.file}): its runs load it from one")
    runs = sweep.runs()
    before = {r.id: status(sweep, r) for r in runs}
    pending = [r for r in runs if before[r.id] != "done"]
    echo(f"sweep {sweep.name}: {len(runs)} runs ({len(sweep.models)} models x {len(sweep.db_chunks)} database sizes "
         f"x {len(sweep.seeds)} seeds, and a baseline per model and seed); {len(runs) - len(pending)} complete, "
         f"{len(pending)} to run, in {sweep.out}")
    if not dry_run:
        sweep.out.mkdir(parents=True, exist_ok=True)
        (sweep.out / SPEC_FILE).write_text(json.dumps(sweep.to_json(), indent=2))
    if not pending:
        return before
    groups = [[r for r in pending if r.kind == "baseline"], [r for r in pending if r.kind == "retro"]]
    groups = [g for g in groups if g]
    if backend == "local":
        if not dry_run:
            ensure_database(sweep)  # once, here, with a progress bar (runs then find it complete)
        py = python or backends.python()
        jobs = [[backends.Job(r.id, run_argv(sweep, r.id, py), sweep.run_dir(r) / "log.txt") for r in g]
                for g in groups]
        codes = backends.run_local(jobs, parallel, dry_run, echo)
        failed = [k for k, v in codes.items() if v]
        if failed:
            echo(f"{len(failed)} run(s) failed: " + ", ".join(failed))
    elif backend == "slurm":
        given = {**sweep.slurm, **(slurm or {})}
        py = python or given.pop("python", None) or backends.python()  # the runs' interpreter, not sbatch's
        settings = backends.SlurmSettings.from_dict(given)
        folder = sweep.out / "slurm"
        scripts = [(f"{g[0].kind}.sbatch",
                    backends.sbatch_script(f"{sweep.name}-{g[0].kind}", [run_argv(sweep, r.id, py) for r in g],
                                           settings, Path.cwd(), (folder / "logs").resolve(),
                                           parallel if parallel > 1 else None))
                   for g in groups]
        if not dry_run:
            (folder / "logs").mkdir(parents=True, exist_ok=True)
        backends.submit_slurm(scripts, folder, dry_run, echo)
    else:
        settings = backends.TpuSettings.from_dict({**sweep.tpu, **(tpu or {})})
        if parallel != 1:
            raise SweepError("--backend tpu-pod runs one run at a time on the whole slice: --parallel must be 1")
        jobs = [backends.Job(r.id, [python or settings.python, "launch/sweep.py", "--sweep", sweep.file,
                                    "--out", str(sweep.out), "--run", r.id, "--no-progress"],
                             sweep.run_dir(r) / "log.txt")
                for g in groups for r in g]
        backends.run_tpu_pod(jobs, settings, dry_run, echo)
    return before


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launch/sweep.py", description=__doc__.split("\n\n")[0],
                                epilog="Report: python launch/report.py OUT_DIR")
    p.add_argument("--sweep", required=True, help="sweep file (configs/sweeps/NAME.py)")
    p.add_argument("--out", help="sweep folder (default: the sweep's 'out', else out/sweeps/NAME)")
    p.add_argument("--backend", default="local", choices=backends.BACKENDS, help="where runs execute (default local)")
    p.add_argument("--parallel", type=int, default=1,
                   help="runs at a time (local), array tasks at a time (slurm); default 1")
    p.add_argument("--dry-run", action="store_true", help="print what would run or be submitted; run nothing")
    p.add_argument("--python", help="Python for the runs (default: this one; tpu-pod: python3 on the hosts)")
    p.add_argument("--run", metavar="RUN_ID", help="execute this one run here (what every backend runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (with --run)")
    backends.add_cluster_flags(p, "slurm (override the sweep's 'slurm' settings)",
                               "tpu-pod (override the sweep's 'tpu' settings)")
    args = p.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep, args.out)
        if args.run:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
            result = execute(sweep, sweep.run(args.run), progress=not args.no_progress)
            print(json.dumps({k: result.get(k) for k in ("id", "bpb", "bpb_alpha", "seconds")}))
            return 0
        slurm, tpu = backends.cluster_flags(args)
        launch(sweep, args.backend, args.parallel, args.dry_run, slurm, tpu, args.python)
    except (SweepError, ValueError, RuntimeError, OSError) as e:
        print(f"launch/sweep.py: error: {e}", file=sys.stderr)
        return 2
    if not args.dry_run and args.backend == "local":
        left = [r.id for r in sweep.runs() if status(sweep, r) != "done"]
        print(f"{len(sweep.runs()) - len(left)} of {len(sweep.runs())} runs complete"
              + (f"; not complete: {', '.join(left)}" if left else "")
              + f"\nreport: python launch/report.py {sweep.out}")
        return 1 if left else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
