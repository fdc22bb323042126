"""End-to-end training on a tiny generated database: exact resume after SIGKILL, retrofitting,
divergence handling, metrics files, and the clear errors raised before anything compiles."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from _damage import damage
from _db_helpers import shared
from retro_jax.cli import main as cli_main
from retro_jax.config import ModelConfig, apply_overrides, load_config
from retro_jax.eval.run import make_validator
from retro_jax.model import abstract_params
from retro_jax.model.retro import Retro
from retro_jax.retrieval.database import Database
from retro_jax.runtime.checkpoint import restore_params_only
from retro_jax.train import retrofit
from retro_jax.train.loop import TrainingError, train

# A small model over the test database (chunk 32, SentencePiece vocab 400).
MODEL = ["model.vocab_size=512", "model.chunk_size=32", "model.d_model=64", "model.num_layers=2",
         "model.cca_layers=(2,)", "model.num_heads=2", "model.d_ff=128", "model.enc_d_model=32",
         "model.enc_num_heads=2", "model.enc_head_dim=16", "model.enc_d_ff=64", "model.enc_num_layers=1"]
TRAIN = ["train.seq_len=128", "train.batch_size=4", "train.warmup_steps=2", "train.log_every=1",
         "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def config(*extra: str, preset: str = "tiny"):
    baseline = ["model.cca_layers=()"] if preset.endswith("baseline") else []
    return apply_overrides(load_config(preset), MODEL + list(extra) + baseline + TRAIN)


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> str:
    return str(shared(tmp_path_factory)["db"])


def _params(workdir: Path, cfg_overrides=()) -> dict:
    cfg = ModelConfig.from_dict(dict(config(*cfg_overrides).model))
    return restore_params_only(workdir, abstract_params(cfg))


def _losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


# Scanned and rematerialised: 4 layers, CCA in 2 and 4, layers 1-2 unrolled and one scanned block.
SCAN = ["model.num_layers=4", "model.cca_layers=(2,4)", "model.scan_layers=True", "model.remat_policy=full"]


def _cli(db: str, workdir: Path, steps: int) -> list[str]:
    """The `retro-jax train` command of the kill-and-resume tests: scanned, rematerialised layers."""
    return [sys.executable, "-m", "retro_jax.cli", "train", "--config", "tiny", "--db", db,
            "--workdir", str(workdir), "--steps", str(steps), "--checkpoint-every", "3", "--no-progress",
            *[f"--config.{o}" for o in MODEL + TRAIN + SCAN]]


STEPS = 10
ENV_8 = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
             JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def uninterrupted(db, tmp_path_factory) -> Path:
    """STEPS steps of `retro-jax train` in one process with 8 devices (2x2x2), never interrupted."""
    ref = tmp_path_factory.mktemp("uninterrupted") / "w"
    subprocess.run(_cli(db, ref, STEPS), env=ENV_8, check=True, capture_output=True, timeout=300)
    return ref


def _wait_for_lines(path: Path, n: int, procs: list, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_then_same_command_resumes_bit_for_bit(db, tmp_path, uninterrupted):
    env, steps, ref = ENV_8, STEPS, uninterrupted

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli(db, run, steps), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_lines(run / "metrics.jsonl", 5, [proc])  # kill once step 5 is logged
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(_losses(run)) < steps, "the run finished before it could be killed"
    subprocess.run(_cli(db, run, steps), env=env, check=True, capture_output=True, timeout=300)

    assert _losses(run) == _losses(ref)  # every logged loss, bitwise (JSON floats round-trip)
    a, b = _params(ref, SCAN), _params(run, SCAN)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
@pytest.mark.parametrize("layers", [[], SCAN], ids=["unrolled", "scanned"])
def test_retrofit_freezes_the_baseline_decoder_and_reproduces_it_with_retrieval_off(db, tmp_path, layers):
    base_dir, retro_dir = tmp_path / "baseline", tmp_path / "retrofit"
    train(config("train.steps=4", "train.lr_max=3e-3", *layers, preset="tiny-baseline"), db, str(base_dir),
          progress=False)
    train(config("train.steps=4", "train.lr_max=3e-3", *layers), db, str(retro_dir), init_from=str(base_dir),
          freeze_decoder=True, progress=False)
    retro_cfg = ModelConfig.from_dict(dict(config(*layers).model))
    base_cfg = ModelConfig.from_dict(dict(config(*layers, preset="tiny-baseline").model))
    base = restore_params_only(base_dir, abstract_params(base_cfg))
    retro = restore_params_only(retro_dir, abstract_params(retro_cfg))
    frozen = retrofit.split_decoder(retro)
    assert jax.tree.structure(frozen) == jax.tree.structure(base)
    for x, y in zip(jax.tree.leaves(frozen), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit for bit after training
    init = retrofit.split_decoder(abstract_params(retro_cfg), keep_retrieval=True)
    assert jax.tree.leaves(init), "the retrofitted model has retrieval weights"
    tokens = np.random.default_rng(0).integers(0, 400, (2, 96), dtype=np.int32)
    off = Retro(retro_cfg).apply({"params": retro}, tokens, None)
    ref = Retro(base_cfg).apply({"params": base}, tokens, None)
    np.testing.assert_array_equal(np.asarray(off), np.asarray(ref))


@pytest.mark.parametrize("log_every,logged", [(1, [0, 0, 0, 1, 2, 3]), (4, [1, 5])])
def test_non_finite_steps_are_skipped_then_training_stops_without_a_bad_checkpoint(db, tmp_path, monkeypatch,
                                                                                   log_every, logged):
    """The device is read at log steps only: the halt comes at the log step ending the window that
    holds the max_bad_steps-th bad step in a row, and names that step (6)."""
    from retro_jax.train import loop

    real_next = loop.TrainLoader.__next__
    calls = {"n": 0}

    def poisoned(self):
        batch = real_next(self)
        calls["n"] += 1
        if calls["n"] > 3:  # from step 4 on, every loss is NaN
            batch = dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.nan))
        return batch

    monkeypatch.setattr(loop.TrainLoader, "__next__", poisoned)
    with pytest.raises(TrainingError, match=r"3 steps in a row had a non-finite loss or gradient \(step 6\)"):
        cfg = config("train.steps=20", "train.max_bad_steps=3", "train.checkpoint_every=3")
        cfg.train.log_every = log_every  # (TRAIN, applied last, sets 1)
        train(cfg, db, str(tmp_path / "w"), progress=False)
    rows = [json.loads(ln) for ln in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == logged
    params = _params(tmp_path / "w")  # the newest checkpoint (step 3) is the last good state
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_metrics_jsonl_and_tensorboard_are_written(db, tmp_path):
    cfg = config("train.steps=3", "train.eval_every=3", "train.eval_batches=2")
    out = train(cfg, db, str(tmp_path / "w"), progress=False, validate=make_validator(cfg, Database.open(db)))
    rows = [json.loads(ln) for ln in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "bits_per_token", "lr", "grad_norm", "skipped_steps", "tokens_per_s", "mfu"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert "val_loss" in rows[-1] and "val_bpb" in rows[-1] and out["step"] == 3
    # The window rule's counts so far: every chunk of every sequence, K slots each.
    per_step = cfg.train.batch_size * cfg.train.seq_len // cfg.model.chunk_size * cfg.model.num_neighbours
    assert [r["window_slots"] for r in rows] == [per_step * r["step"] for r in rows]
    assert all(0 <= r["window_dropped"] <= r["window_slots"] for r in rows)
    assert list((tmp_path / "w" / "tb").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("extra,message", [
    (["--config.train.stepz=3"], "unknown config key"),
    (["--config.mesh.data=3"], "devices"),
    (["--config.train.batch_size=6"], "batch"),
    (["--config.model.chunk_size=64", "--config.train.seq_len=128"], "chunk"),
])
def test_bad_input_is_a_clear_message_before_compiling(db, tmp_path, capsys, extra, message):
    argv = ["train", "--config", "tiny", "--db", db, "--workdir", str(tmp_path / "w"),
            *[f"--config.{o}" for o in MODEL + TRAIN], *extra]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_of_the_current_step_and_exits_cleanly(db, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
             JAX_PLATFORMS="cpu")
    run = tmp_path / "w"
    proc = subprocess.Popen(_cli(db, run, 1000), env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        m = run / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped by signal" in out
    last = max(_losses(run))
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == last  # the step it stopped at is checkpointed, not only the last interval one


def _train_argv(db: str, workdir: Path) -> list[str]:
    return ["train", "--config", "tiny", "--db", db, "--workdir", str(workdir), "--steps", "6",
            "--checkpoint-every", "3", "--no-progress", *[f"--config.{o}" for o in MODEL + TRAIN]]


@pytest.fixture(scope="module")
def six_steps(db, tmp_path_factory) -> Path:
    """A workdir trained for 6 steps, checkpoints 3 and 6; tests damage copies of it."""
    workdir = tmp_path_factory.mktemp("six") / "w"
    assert cli_main(_train_argv(db, workdir)) == 0
    return workdir


@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_a_damaged_newest_checkpoint_is_named_and_the_run_resumes_from_the_one_before(db, six_steps, tmp_path,
                                                                                      capsys, how):
    shutil.copytree(six_steps, tmp_path / "w")
    argv = _train_argv(db, tmp_path / "w")
    first = _losses(tmp_path / "w")
    damage(tmp_path / "w", 6, how)
    capsys.readouterr()
    assert cli_main(argv) == 0  # the same command
    out, err = capsys.readouterr()
    assert "checkpoint 6 in" in out and "is unreadable: " in out and "resuming from checkpoint 3" in out
    assert "Traceback" not in out + err and "tensorstore_spec" not in out
    # Step 6 was moved aside, so a new checkpoint 6 means steps 4-6 were trained again ...
    assert (tmp_path / "w" / "checkpoints_unreadable" / "6").is_dir()
    assert sorted(p.name for p in (tmp_path / "w" / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
    lines = (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2, 3, 4, 5, 6]  # (their old lines replaced)
    assert _losses(tmp_path / "w") == first  # ... to the same losses, bit for bit


def test_a_workdir_whose_checkpoints_are_all_unreadable_never_starts_from_scratch(db, six_steps, tmp_path, capsys):
    shutil.copytree(six_steps, tmp_path / "w")
    damage(tmp_path / "w", 3, "truncated")
    damage(tmp_path / "w", 6, "truncated")
    capsys.readouterr()
    assert cli_main(_train_argv(db, tmp_path / "w")) == 2
    err = capsys.readouterr().err
    assert "checkpoint 6 in" in err and "([3, 6])" in err and "never starts from scratch" in err
    assert "Traceback" not in err
    assert len((tmp_path / "w" / "metrics.jsonl").read_text().splitlines()) == 6  # nothing was retrained


def _two_processes(db: str, workdir: Path, port: int) -> list[subprocess.Popen]:
    """`retro-jax train` as 2 processes x 4 CPU devices (gloo, a localhost coordinator): one 2x2x2 mesh."""
    env = dict(ENV_8, XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
    return [subprocess.Popen([*_cli(db, workdir, STEPS), "--coordinator", f"localhost:{port}", "--num-processes", "2",
                              "--process-id", str(i)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True) for i in range(2)]


def _finish(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]


@pytest.mark.slow
@pytest.mark.xdist_group("processes")  # never beside another multi-process test (see conftest)
def test_two_processes_killed_mid_run_resume_to_the_same_losses(db, tmp_path, uninterrupted):
    """The whole `retro-jax train` (scanned, rematerialised layers) on 2 processes x 4 devices, both
    writing checkpoints through Orbax:
    SIGKILL both mid-run, restart both with the same command, and every logged loss equals an
    uninterrupted 2-process run's, bit for bit, and the 1-process 8-device run's to float32 rounding."""
    import socket

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("localhost", 0))
            return sock.getsockname()[1]

    ref, run = tmp_path / "two", tmp_path / "killed"
    _finish(_two_processes(db, ref, free_port()))
    procs = _two_processes(db, run, free_port())
    _wait_for_lines(run / "metrics.jsonl", 5, procs)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert max(_losses(run)) < STEPS, "the run finished before it could be killed"
    _finish(_two_processes(db, run, free_port()))
    assert _losses(run) == _losses(ref)  # bit for bit
    # One process with 8 devices reduces in another order than gloo across two: equal to float32
    # rounding (measured: the first 7 steps bitwise, then within 1e-7 relative).
    one = _losses(uninterrupted)
    assert sorted(_losses(run)) == sorted(one)
    np.testing.assert_allclose([_losses(run)[s] for s in sorted(one)], [one[s] for s in sorted(one)], rtol=1e-6)
