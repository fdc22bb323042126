"""Launch one `retro-jax` command (a training run, most often) on this machine, SLURM or a TPU slice.

    python launch/run.py --backend tpu-pod --tpu NAME --zone ZONE [--dry-run] -- \\
        train --config retro-7.5b --db DB_DIR --workdir WORKDIR --config.mesh.fsdp=64 ...
    python launch/run.py --backend slurm --nodes 4 --gpus-per-node 8 [--dry-run] -- train ...

Everything after `--` is the retro-jax command line, run as `python -m retro_jax.cli ...` by
one process per host (SLURM: one per node under srun; TPU: every host of the slice through
`gcloud compute tpus tpu-vm ssh --worker=all`); the processes find each other from the
cluster's environment (retro_jax/runtime/distributed.py). The same backends run sweeps
(launch/sweep.py); see launch/backends.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from launch import backends  # noqa: E402


def launch(command: list[str], backend: str, dry_run: bool = False, name: str = "retro-jax",
           slurm: dict | None = None, tpu: dict | None = None, python: str | None = None, echo=print) -> int:
    """Run or submit `retro-jax COMMAND...`; returns an exit code (0 on a dry run or a submission)."""
    if not command:
        raise ValueError("give the retro-jax command after --, e.g. -- train --config tiny --db DB --workdir W")
    if backend == "local":
        codes = backends.run_local([[backends.Job(name, [python or backends.python(), "-m", "retro_jax.cli",
                                                         *command])]], 1, dry_run, echo)
        return codes.get(name, 0)
    if backend == "slurm":
        settings = backends.SlurmSettings.from_dict(slurm or {})
        argv = [python or backends.python(), "-m", "retro_jax.cli", *command]
        script = backends.sbatch_script(name, [argv], settings, Path.cwd(), Path("slurm-logs").resolve())
        backends.submit_slurm([(f"{name}.sbatch", script)], Path("slurm-logs").resolve(), dry_run, echo)
        return 0
    if backend == "tpu-pod":
        settings = backends.TpuSettings.from_dict(tpu or {})
        codes = backends.run_tpu_pod([backends.Job(name, [python or settings.python, "-m", "retro_jax.cli",
                                                          *command])], settings, dry_run, echo)
        return codes.get(name, 0)
    raise ValueError(f"--backend must be one of {backends.BACKENDS}, got {backend!r}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="launch/run.py", description=__doc__.split("\n\n")[0],
                                usage="launch/run.py --backend B [options] -- RETRO_JAX_COMMAND ...")
    p.add_argument("--backend", default="local", choices=backends.BACKENDS)
    p.add_argument("--dry-run", action="store_true", help="print what would run or be submitted; run nothing")
    p.add_argument("--name", default="retro-jax", help="job name (default retro-jax)")
    p.add_argument("--python", help="Python on the machines (default: this one; tpu-pod: python3)")
    backends.add_cluster_flags(p)
    args = p.parse_args(own)
    slurm, tpu = backends.cluster_flags(args)
    try:
        return launch(command, args.backend, args.dry_run, args.name, slurm, tpu, args.python)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"launch/run.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
