"""2 processes x 4 CPU devices (gloo collectives, a localhost coordinator), each loading only its
half of every global batch, train exactly like 1 process x 8 devices on the same 2x2x2 mesh:
same losses (rtol 1e-5) and the same final parameter norm. A hang fails after TIMEOUT_S.
Also: `maybe_initialize` is a no-op for one process and names what a multi-process run lacks."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

import _train_setup as setup
from retro_jax.train import distributed

TIMEOUT_S = 240  # generous for 2 busy cores; a healthy run takes well under a minute unloaded
WORKER = pathlib.Path(__file__).with_name("_train_setup.py")
CLUSTER_ENV = ("RETRO_COORDINATOR", "RETRO_NUM_PROCESSES", "RETRO_PROCESS_ID", "JAX_COORDINATOR_ADDRESS",
               "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process():
    coordinator = f"localhost:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_ENV and k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), coordinator, "2", str(i), "4"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        reference = setup.run_8_devices()  # this process, 8 devices, while the workers run
        outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"worker failed ({p.returncode}):\n{err[-3000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        np.testing.assert_allclose(r["losses"], reference["losses"], rtol=1e-5)
        np.testing.assert_allclose(r["param_norm"], reference["param_norm"], rtol=1e-5)
    assert [r["rows"] for r in results] == [[0, setup.BATCH // 2], [setup.BATCH // 2, setup.BATCH]]
    assert [r["losses"] for r in results[1:]] == [results[0]["losses"]]  # replicated metrics agree


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
