"""Multi-process start-up: `jax.distributed.initialize` once, when launched as several processes.

Where the coordinator, process count and process id come from, first match wins:
  1. arguments (the CLI's --coordinator / --num-processes / --process-id flags);
  2. our environment variables
       RETRO_COORDINATOR      host:port of process 0's coordinator service
       RETRO_NUM_PROCESSES    number of processes
       RETRO_PROCESS_ID       this process's id, 0 .. RETRO_NUM_PROCESSES-1
     (JAX_COORDINATOR_ADDRESS is read by jax itself and may stand in for RETRO_COORDINATOR);
  3. a cluster that jax recognises on its own, detected here by
       SLURM     SLURM_NTASKS > 1 (jax reads SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_PROCID, ...)
       Open MPI  OMPI_COMM_WORLD_SIZE > 1 (mpirun)
       Cloud TPU / GKE multi-host  TPU_WORKER_HOSTNAMES with several hosts, or
                 MEGASCALE_COORDINATOR_ADDRESS
     in which case jax.distributed.initialize() is called without arguments and jax fills
     in the rest (JAX_COORDINATOR_PORT overrides the port it picks);
  4. RETRO_DISTRIBUTED=auto (set by launch/'s tpu-pod backend on every host of a slice):
     the same call without arguments, for environments jax detects but these variables miss.
Otherwise (one process) nothing happens. On CPU, cross-process collectives use gloo.
"""

from __future__ import annotations

import os

import jax

_ENV = ("RETRO_COORDINATOR", "RETRO_NUM_PROCESSES", "RETRO_PROCESS_ID")


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def detected_cluster() -> str | None:
    """The multi-process cluster jax can configure itself from, or None."""
    if (_int_env("SLURM_NTASKS") or 1) > 1:
        return "slurm"
    if (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "ompi"
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    if os.environ.get("RETRO_DISTRIBUTED") == "auto":
        return "auto"
    return None


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> tuple[int, int]:
    """Initialise jax's distributed runtime if this is one of several processes.

    Returns (process_id, process_count). Safe to call more than once, and a no-op for a
    single process. Must run before anything touches a jax device."""
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    coordinator = coordinator or os.environ.get("RETRO_COORDINATOR") or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _int_env("RETRO_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int_env("RETRO_PROCESS_ID")
    explicit = num_processes is not None and num_processes > 1
    cluster = None if explicit else detected_cluster()
    if not explicit and cluster is None:
        if num_processes not in (None, 1) or (process_id or 0) != 0:
            raise ValueError(f"num_processes={num_processes}, process_id={process_id}: not a valid "
                             "single-process setting")
        return 0, 1
    if explicit:
        missing = [n for n, v in zip(_ENV, (coordinator, num_processes, process_id)) if v is None]
        if missing:
            raise ValueError(f"a {num_processes}-process run needs the coordinator address, process "
                             f"count and process id; missing: {', '.join(missing)} (flags or env)")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id {process_id} outside 0..{num_processes - 1}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        jax.distributed.initialize()
    return jax.process_index(), jax.process_count()
