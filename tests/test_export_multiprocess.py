"""Export inside a multi-host run: one run of a sweep (`launch/sweep.py --run`, launch/execute.py's
train -> export) as 2 processes x 4 CPU devices (gloo, a localhost coordinator), its parameters
sharded across both processes. Exactly one export folder appears, load_exported reads it, and it
holds the tensors a 1-process export of the same checkpoint holds; d_model 68 does not divide the
8 devices, which every export must not mind. When process 0 cannot write, every process fails
(none waits for ever, none writes instead) and nothing appears."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from _db_helpers import shared
from launch.spec import load_sweep
from retro_jax.infer.export import export, flatten, load_exported

pytestmark = pytest.mark.xdist_group("processes")  # one multi-process test at a time (see conftest)

ROOT = Path(__file__).resolve().parent.parent
# d_model 68 is not a multiple of 8 (nor of 6); scanned layers 3-4 (export unstacks them).
MODEL = ["model.vocab_size=512", "model.chunk_size=32", "model.d_model=68", "model.num_layers=4",
         "model.cca_layers=(2,4)", "model.num_heads=2", "model.d_ff=128", "model.enc_d_model=32",
         "model.enc_num_heads=2", "model.enc_head_dim=16", "model.enc_d_ff=64", "model.enc_num_layers=1",
         "model.scan_layers=True", "model.scan_start=2", "model.scan_period=2"]
# fsdp and tensor each span both processes' devices: no process holds a whole parameter.
RUN = ["train.seq_len=64", "train.batch_size=8", "train.warmup_steps=1", "train.log_every=1",
       "train.checkpoint_every=2", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> dict:
    """The sweep's baseline run (train 2 steps, then export), executed by 2 processes x 4 devices."""
    db = str(shared(tmp_path_factory)["db"])
    root = tmp_path_factory.mktemp("export2p")
    spec = dict(name="x", database=dict(path=db, build=None), db_chunks=["all"],
                models=[dict(name="m", config="tiny", overrides=MODEL)], seeds=[0], steps=2, overrides=RUN)
    file = root / "sweep.py"
    file.write_text(f"def get_sweep():\n    return {spec!r}\n")
    sweep = load_sweep(file, str(root / "out"))
    run = sweep.runs()[0]
    env = _env(_free_port())
    argv = [sys.executable, str(ROOT / "launch" / "sweep.py"), "--sweep", str(file), "--out", str(sweep.out),
            "--run", run.id, "--no-progress"]
    procs = [subprocess.Popen(argv, env=dict(env, RETRO_PROCESS_ID=str(i)), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    return {"dir": sweep.run_dir(run), "outs": [json.loads(out.splitlines()[-1]) for out in _finish(procs)],
            "run": run}


def _finish(procs: list[subprocess.Popen], timeout_s: float = 600) -> list[str]:
    """The stdout of each process, all of which must exit 0 (the others are killed when one fails)."""
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout_s)
            assert p.returncode == 0, err[-4000:]
            outs.append(out.strip())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def _env(port: int) -> dict[str, str]:
    """2 processes x 4 CPU devices, joined by a coordinator on localhost:`port`."""
    return dict(os.environ, JAX_PLATFORMS="cpu", RETRO_COORDINATOR=f"localhost:{port}", RETRO_NUM_PROCESSES="2",
                XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")


@pytest.mark.slow
def test_one_process_exports_a_model_whose_width_does_not_divide_the_devices(two_process_run, tmp_path):
    train = two_process_run["dir"] / "train"
    out = export(train, tmp_path / "one")
    cfg, params = load_exported(out)
    assert cfg.d_model == 68 and cfg.d_model % jax.device_count() and jax.device_count() == 8
    assert flatten(params)["embed.embedding"].shape == (cfg.vocab_size, 68)


@pytest.mark.slow
def test_two_processes_write_one_export_equal_to_a_one_process_export(two_process_run, tmp_path):
    d = two_process_run["dir"]
    assert [o["id"] for o in two_process_run["outs"]] == [two_process_run["run"].id] * 2  # both returned
    done = json.loads((d / "done.json").read_text())
    assert done["export"] == str(d / "export")
    # exactly one export folder, nothing left beside it (no temp or replaced folders)
    assert sorted(p.name for p in d.iterdir() if "export" in p.name or p.name.startswith(".")) == ["export"]
    assert sorted(p.name for p in (d / "export").iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                                "tokenizer.model"]
    cfg2, p2 = load_exported(d / "export")
    assert cfg2.d_model == 68

    # one process with all 8 devices exports the same checkpoint to the same tensors and config
    one = export(d / "train", tmp_path / "one")
    cfg1, p1 = load_exported(one)
    assert cfg1 == cfg2
    f1, f2 = flatten(p1), flatten(p2)
    assert sorted(f1) == sorted(f2)
    for name in f1:
        assert f1[name].dtype == f2[name].dtype and np.array_equal(np.asarray(f1[name]), np.asarray(f2[name])), name
    assert json.loads((one / "config.json").read_text()) == json.loads((d / "export" / "config.json").read_text())
    assert (one / "tokenizer.model").read_bytes() == (d / "export" / "tokenizer.model").read_bytes()


# Every process calls export; process 0's write fails (a full disk), and then the other must raise too
# (not wait for ever, not write the folder itself).
FAILING = """
import sys
from retro_jax.runtime import distributed
distributed.maybe_initialize()
import jax, safetensors.numpy
from retro_jax.infer.export import export
if jax.process_index() == 0:
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    safetensors.numpy.save_file = disk_full
try:
    export(sys.argv[1], sys.argv[2])
    print("exported")
except Exception as e:
    print(f"{type(e).__name__}: {e}")
"""


@pytest.mark.slow
def test_when_process_0_cannot_write_every_process_fails_and_nothing_appears(two_process_run, tmp_path):
    out = tmp_path / "export"
    env = _env(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", FAILING, str(two_process_run["dir"] / "train"), str(out)],
                              env=dict(env, RETRO_PROCESS_ID=str(i)), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    said = [out.splitlines()[-1] for out in _finish(procs, timeout_s=300)]
    assert said[0] == "OSError: [Errno 28] No space left on device", said
    assert said[1].startswith("ExportError: writing") and "failed on process 0" in said[1], said
    assert list(tmp_path.iterdir()) == []  # no export, no temp folder
