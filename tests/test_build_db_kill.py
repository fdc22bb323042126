"""build-db killed with SIGKILL in the middle of embedding resumes, with the same command, to a
database whose every array is byte-identical to an uninterrupted build."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _db_helpers import BUILD, npy_files, shared


def _cmd(base: dict, out: Path) -> list[str]:
    return [sys.executable, "-m", "retro_jax.cli", "build-db", "--corpus", str(base["corpus_dir"]),
            "--out", str(out), "--embedder", str(base["bert"]), "--vocab-size", str(BUILD["vocab_size"]),
            "--chunk-size", str(BUILD["chunk_size"]), "--max-length", str(BUILD["max_length"]),
            "--val-fraction", str(BUILD["val_fraction"]), "--seed", str(BUILD["seed"]),
            "--index-mode", "exact", "--embed-batch-size", "2", "--no-progress"]


def test_sigkill_mid_embedding_then_same_command_gives_identical_arrays(tmp_path_factory, tmp_path):
    base = shared(tmp_path_factory)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    ref, out = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_cmd(base, ref), env=env, check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen(_cmd(base, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    embeddings = out / "slices" / "w0-of-1" / "train" / "embeddings.npy"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not embeddings.exists():
        time.sleep(0.01)
    time.sleep(0.5)  # well inside the embedding stage (batches of 2 chunks)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert embeddings.exists() and not (out / "manifest.json").exists(), "not killed mid-embedding"

    subprocess.run(_cmd(base, out), env=env, check=True, capture_output=True, timeout=300)
    want, got = npy_files(ref), npy_files(out)
    assert want.keys() == got.keys() and len(want) >= 12
    assert [k for k in want if want[k] != got[k]] == []
