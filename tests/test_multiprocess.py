"""Multi-process start-up: `maybe_initialize` is a no-op for one process and names what a
multi-process run lacks; clusters are detected from their environment. (Two processes x 4 devices
training like one process x 8 devices, killed and resumed, is tests/test_train.py's
test_two_processes_killed_mid_run_resume_to_the_same_losses.)"""

import pytest

from retro_jax.runtime import distributed

CLUSTER_ENV = ("RETRO_DISTRIBUTED", "RETRO_COORDINATOR", "RETRO_NUM_PROCESSES", "RETRO_PROCESS_ID",
               "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def test_single_process_is_a_no_op(monkeypatch):
    for k in CLUSTER_ENV:
        monkeypatch.delenv(k, raising=False)
    assert distributed.maybe_initialize() == (0, 1)
    assert distributed.maybe_initialize(num_processes=1) == (0, 1)


def test_missing_multiprocess_settings_are_named(monkeypatch):
    for k in CLUSTER_ENV:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="missing: RETRO_COORDINATOR, RETRO_PROCESS_ID"):
        distributed.maybe_initialize(num_processes=2)
    monkeypatch.setenv("RETRO_COORDINATOR", "localhost:1")
    with pytest.raises(ValueError, match="process_id 5 outside 0..1"):
        distributed.maybe_initialize(num_processes=2, process_id=5)


def test_cluster_detection(monkeypatch):
    for k in CLUSTER_ENV:
        monkeypatch.delenv(k, raising=False)
    assert distributed.detected_cluster() is None
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.detected_cluster() is None
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.detected_cluster() == "slurm"
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv("RETRO_DISTRIBUTED", "auto")  # what launch/'s tpu-pod backend sets on every host
    assert distributed.detected_cluster() == "auto"
