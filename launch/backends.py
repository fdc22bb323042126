"""Where runs execute: this machine, a SLURM cluster, or every host of a Cloud TPU slice.

Each backend takes ready command lines (argv lists) and hands them to an existing engine;
none schedules anything itself:
* local:   subprocesses, P at a time, in the order given, each logging to its own file;
* slurm:   an sbatch job array per group of runs (`--array=0-N%P`), each task running its
           command under `srun` with one process per node (jax.distributed reads the SLURM
           environment), a later group depending on the earlier one (`afterany`: a RETRO run
           whose baseline failed fails at once with that reason instead of waiting forever);
* tpu-pod: `gcloud compute tpus tpu-vm ssh NAME --worker=all --command ...`, one run at a
           time on the whole slice (every host runs the same command; RETRO_DISTRIBUTED=auto
           lets jax find the other hosts itself).
`dry_run=True` prints (and returns) exactly what would run or be submitted, and runs nothing.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

BACKENDS = ("local", "slurm", "tpu-pod")


@dataclass
class Job:
    """One command to run: a name (for logs and arrays), its argv, and where its output goes."""
    name: str
    argv: list[str]
    log: Path | None = None


# ----------------------------------------------------------------------------- local


def run_local(groups: list[list[Job]], parallel: int = 1, dry_run: bool = False,
              echo: Callable[[str], None] = print, env: dict[str, str] | None = None) -> dict[str, int]:
    """Run every job, `parallel` at a time, group after group; returns {name: exit code}."""
    if parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {parallel}")
    jobs = [j for g in groups for j in g]
    if dry_run:
        for j in jobs:
            echo(f"{shlex.join(j.argv)}" + (f"  > {j.log} 2>&1" if j.log else ""))
        return {}
    codes: dict[str, int] = {}
    total, t0 = len(jobs), time.time()

    def one(i: int, job: Job) -> None:
        echo(f"[{i + 1}/{total}] start {job.name}")
        started = time.time()
        if job.log is not None:
            job.log.parent.mkdir(parents=True, exist_ok=True)
            with open(job.log, "ab") as f:
                code = subprocess.call(job.argv, stdout=f, stderr=subprocess.STDOUT, env=env)
        else:
            code = subprocess.call(job.argv, env=env)
        codes[job.name] = code
        what = "done" if code == 0 else f"FAILED (exit {code}; log {job.log})"
        echo(f"[{len(codes)}/{total}] {what} {job.name} in {time.time() - started:.0f} s "
             f"({time.time() - t0:.0f} s so far)")

    offset = 0
    for group in groups:  # a group starts when the previous one has finished
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            list(pool.map(lambda ij: one(*ij), enumerate(group, offset)))
        offset += len(group)
    return codes


def _settings(cls: Any, d: dict[str, Any], what: str) -> Any:
    """A settings dataclass from a dict, naming any key it does not have."""
    known = set(cls.__dataclass_fields__)
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {what} settings {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)


def add_cluster_flags(parser: Any, slurm_title: str = "slurm", tpu_title: str = "tpu-pod") -> None:
    """The --partition/--account/--time/--nodes/--gpus-per-node and --tpu/--zone/--project/--repo
    flags that launch/sweep.py and launch/run.py share (read back with `cluster_flags`)."""
    s = parser.add_argument_group(slurm_title)
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--time", help="wall-clock limit per job, e.g. 24:00:00")
    s.add_argument("--nodes", type=int, help="nodes per job (one process per node)")
    s.add_argument("--gpus-per-node", type=int)
    t = parser.add_argument_group(tpu_title)
    t.add_argument("--tpu", help="TPU VM (slice) name")
    t.add_argument("--zone")
    t.add_argument("--project")
    t.add_argument("--repo", help="the repository's folder on every host (default ~/retro-jax)")


def cluster_flags(args: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(slurm settings, tpu settings) given on the command line by `add_cluster_flags`' flags."""
    slurm = {k: getattr(args, k) for k in ("partition", "account", "time", "nodes", "gpus_per_node")}
    tpu = {"name": args.tpu, "zone": args.zone, "project": args.project, "repo": args.repo}
    return ({k: v for k, v in slurm.items() if v is not None}, {k: v for k, v in tpu.items() if v is not None})


# ----------------------------------------------------------------------------- slurm


@dataclass
class SlurmSettings:
    partition: str | None = None
    account: str | None = None
    time: str = "24:00:00"
    nodes: int = 1
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    setup: list[str] = field(default_factory=list)  # shell lines before the run (module load, venv)
    extra: list[str] = field(default_factory=list)  # more "#SBATCH ..." options, e.g. "--qos=high"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SlurmSettings:
        return _settings(cls, d, "slurm")


def sbatch_script(name: str, commands: list[list[str]], settings: SlurmSettings, workdir: Path,
                  log_dir: Path, parallel: int | None = None) -> str:
    """An sbatch script: a job array of len(commands) tasks (at most `parallel` at once), task i
    running commands[i] under srun, one process per node."""
    n = len(commands)
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --nodes={settings.nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --time={settings.time}",
             f"#SBATCH --output={log_dir}/" + ("%x-%A_%a.out" if n > 1 or parallel else "%x-%j.out")]
    if n > 1 or parallel:
        lines.append(f"#SBATCH --array=0-{n - 1}" + (f"%{parallel}" if parallel else ""))
    for key, value in (("partition", settings.partition), ("account", settings.account),
                       ("gpus-per-node", settings.gpus_per_node), ("cpus-per-task", settings.cpus_per_task)):
        if value is not None:
            lines.append(f"#SBATCH --{key}={value}")
    lines += [f"#SBATCH {x}" for x in settings.extra]
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(workdir))}", *settings.setup]
    if n == 1:
        lines.append(f"srun --kill-on-bad-exit=1 {shlex.join(commands[0])}")
    else:
        lines.append("case \"$SLURM_ARRAY_TASK_ID\" in")
        lines += [f"  {i}) srun --kill-on-bad-exit=1 {shlex.join(c)} ;;" for i, c in enumerate(commands)]
        lines += ["  *) echo \"no task $SLURM_ARRAY_TASK_ID\" >&2; exit 2 ;;", "esac"]
    return "\n".join(lines) + "\n"


def submit_slurm(scripts: list[tuple[str, str]], folder: Path, dry_run: bool = False,
                 echo: Callable[[str], None] = print, sbatch: str = "sbatch") -> list[str]:
    """Write each (file name, script) into `folder` and submit them in order, each depending on
    the one before (afterany); returns the job ids (the printed commands on a dry run)."""
    ids: list[str] = []
    for i, (file, text) in enumerate(scripts):
        path = folder / file
        argv = [sbatch, "--parsable"]
        if ids:
            argv.append(f"--dependency=afterany:{ids[-1]}")
        argv.append(str(path))
        if dry_run:  # nothing written, nothing submitted
            echo(f"# {path}\n{text}")
            echo(shlex.join(argv))
            ids.append(f"<job id of {file}>")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        try:
            out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()
        except FileNotFoundError:
            raise RuntimeError(f"{sbatch} is not on PATH: run this on a SLURM login node (or use --dry-run)") from None
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"{shlex.join(argv)} failed: {e.stderr.strip()}") from None
        ids.append(out.split(";")[0])
        echo(f"submitted {path.name}: job {ids[-1]}")
    return ids


# ----------------------------------------------------------------------------- tpu-pod


@dataclass
class TpuSettings:
    name: str | None = None  # the TPU VM (slice) name
    zone: str | None = None
    project: str | None = None
    repo: str = "~/retro-jax"  # the checkout on every host
    python: str = "python3"
    setup: list[str] = field(default_factory=list)  # shell lines before the run on every host
    gcloud: str = "gcloud"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TpuSettings:
        return _settings(cls, d, "tpu")


def gcloud_ssh(settings: TpuSettings, command: list[str]) -> list[str]:
    """The gcloud command line that runs `command` on every host of the slice."""
    if not settings.name or not settings.zone:
        raise ValueError("--backend tpu-pod needs the TPU name and zone (--tpu NAME --zone ZONE, or the sweep's "
                         "'tpu' settings)")
    remote = " && ".join([f"cd {settings.repo}", *settings.setup,
                          "RETRO_DISTRIBUTED=auto " + shlex.join(command)])
    argv = [settings.gcloud, "compute", "tpus", "tpu-vm", "ssh", settings.name, f"--zone={settings.zone}"]
    if settings.project:
        argv.append(f"--project={settings.project}")
    return argv + ["--worker=all", f"--command={remote}"]


def run_tpu_pod(jobs: list[Job], settings: TpuSettings, dry_run: bool = False,
                echo: Callable[[str], None] = print) -> dict[str, int]:
    """Run each job on every host of the slice, one after another; returns {name: exit code}."""
    lines = [Job(j.name, gcloud_ssh(settings, j.argv), j.log) for j in jobs]
    if dry_run:
        for j in lines:
            echo(shlex.join(j.argv))
        return {}
    if shutil.which(settings.gcloud) is None:
        raise RuntimeError(f"{settings.gcloud} is not on PATH: install the Google Cloud CLI (or use --dry-run)")
    return run_local([lines], parallel=1, echo=echo)


def python() -> str:
    """The Python running this launcher (what local runs use)."""
    return sys.executable
