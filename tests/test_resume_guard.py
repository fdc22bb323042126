"""Resume guard rails: a resumed run refuses another database (unless --allow-db-change) and a
database built with another tokenizer, keeps its learning-rate schedule when --steps grows, and
the workdir carries the database's tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from _db_helpers import shared
from retro_jax.cli import main as cli_main
from retro_jax.config import read_workdir_config
from retro_jax.retrieval.database import MANIFEST, TOKENIZER_FILE, Database
from retro_jax.retrieval.digest import sha256_file
from retro_jax.retrieval.subset import subset_database
from test_train import MODEL, TRAIN

N = 3  # steps of the first run; the resume extends it to 2N


@pytest.fixture(scope="module")
def subsets(tmp_path_factory) -> tuple[str, str]:
    """Two db-subsets of the shared database, same size (half its train chunks), other seeds:
    the same chunks to train on, other neighbours (a sweep's situation)."""
    parent = shared(tmp_path_factory)["db"]
    n = len(Database.open(parent).train) // 2
    base = tmp_path_factory.mktemp("subsets")
    a, b = base / "s0", base / "s1"
    subset_database(parent, a, chunks=n, seed=0, progress=False)
    subset_database(parent, b, chunks=n, seed=1, progress=False)
    assert not np.array_equal(Database.open(a).neighbours("train"), Database.open(b).neighbours("train"))
    return str(a), str(b)


def _argv(db: str, workdir: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "--config", "tiny", "--db", db, "--workdir", str(workdir), "--steps", str(steps),
            "--checkpoint-every", str(N), "--no-progress", *[f"--config.{o}" for o in MODEL + TRAIN], *extra]


def _rows(workdir: Path) -> dict[int, dict]:
    rows = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


@pytest.fixture(scope="module")
def first_run(subsets, tmp_path_factory) -> Path:
    """N steps on subset s0, checkpoint N; tests resume copies of it."""
    workdir = tmp_path_factory.mktemp("first") / "w"
    assert cli_main(_argv(subsets[0], workdir, N)) == 0
    return workdir


def _copy(src: Path, tmp_path: Path) -> Path:
    shutil.copytree(src, tmp_path / "w")
    return tmp_path / "w"


def test_the_run_records_its_database_and_carries_its_tokenizer(subsets, first_run):
    db = Database.open(subsets[0])
    data = read_workdir_config(first_run).data
    assert data.manifest_sha256 == sha256_file(Path(subsets[0]) / MANIFEST)
    assert data.tokenizer_sha256 == db.tokenizer_sha256
    assert sha256_file(first_run / TOKENIZER_FILE) == db.tokenizer_sha256
    assert read_workdir_config(first_run).train.decay_steps == N  # the horizon the run fixed


def test_resume_on_another_database_of_the_same_size_is_refused_in_one_line(subsets, first_run, tmp_path, capsys):
    work = _copy(first_run, tmp_path)
    saved, now = (sha256_file(Path(d) / MANIFEST) for d in subsets)
    capsys.readouterr()
    assert cli_main(_argv(subsets[1], work, 2 * N)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert saved[:16] in err and now[:16] in err and "--allow-db-change" in err
    assert max(_rows(work)) == N  # nothing was trained


def test_allow_db_change_continues_on_the_other_database(subsets, first_run, tmp_path):
    work = _copy(first_run, tmp_path)
    assert cli_main(_argv(subsets[1], work, N + 1, "--allow-db-change")) == 0
    assert max(_rows(work)) == N + 1
    assert read_workdir_config(work).data.manifest_sha256 == sha256_file(Path(subsets[1]) / MANIFEST)


def test_resume_on_a_database_with_another_tokenizer_is_refused_even_when_db_changes_are_allowed(
        subsets, first_run, tmp_path, capsys):
    work = _copy(first_run, tmp_path)
    other = tmp_path / "other_tokenizer"
    shutil.copytree(subsets[0], other)
    (other / TOKENIZER_FILE).write_bytes((other / TOKENIZER_FILE).read_bytes() + b"\0")  # another model file
    manifest = json.loads((other / MANIFEST).read_text())
    manifest["tokenizer"]["sha256"] = sha256_file(other / TOKENIZER_FILE)
    manifest["checksums"][TOKENIZER_FILE] = manifest["tokenizer"]["sha256"]
    (other / MANIFEST).write_text(json.dumps(manifest))
    capsys.readouterr()
    assert cli_main(_argv(str(other), work, 2 * N, "--allow-db-change")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokenizer" in err
    assert Database.open(subsets[0]).tokenizer_sha256[:16] in err and manifest["tokenizer"]["sha256"][:16] in err
    assert max(_rows(work)) == N


def test_extending_steps_on_resume_keeps_the_schedule(subsets, first_run, tmp_path):
    """N steps then resumed with --steps 2N: every step's learning rate (and loss) equals an
    uninterrupted 2N-step run whose decay is fixed at N, and after N it stays at the final rate."""
    work = _copy(first_run, tmp_path)
    assert cli_main(_argv(subsets[0], work, 2 * N)) == 0
    ref = tmp_path / "uninterrupted"
    assert cli_main(_argv(subsets[0], ref, 2 * N, f"--config.train.decay_steps={N}")) == 0
    got, want = _rows(work), _rows(ref)
    assert sorted(got) == sorted(want) == list(range(1, 2 * N + 1))
    assert [got[s]["lr"] for s in got] == [want[s]["lr"] for s in got]
    assert [got[s]["loss"] for s in got] == [want[s]["loss"] for s in got]
    tc = read_workdir_config(work).train
    final = tc.lr_final_ratio * tc.lr_max
    np.testing.assert_allclose([got[s]["lr"] for s in range(N + 1, 2 * N + 1)], final, rtol=1e-6)
    assert got[N]["lr"] > final * (1 + 1e-3)  # the cosine was still decaying at step N


def test_a_resume_asking_for_another_horizon_is_refused(subsets, first_run, tmp_path, capsys):
    work = _copy(first_run, tmp_path)
    capsys.readouterr()
    assert cli_main(_argv(subsets[0], work, 2 * N, f"--config.train.decay_steps={2 * N}")) == 1
    err = capsys.readouterr().err
    assert "train.decay_steps" in err and f"over {N} steps" in err


def test_a_workdir_from_before_decay_steps_keeps_decaying_over_its_own_steps(subsets, first_run, tmp_path):
    """A config.json written before train.decay_steps existed: the run decayed over its train.steps
    (N), so a resume with --steps 2N holds the final rate after N instead of rising again."""
    work = _copy(first_run, tmp_path)
    path = work / "config.json"
    old = json.loads(path.read_text())
    del old["train"]["decay_steps"]
    path.write_text(json.dumps(old))
    before = _rows(work)
    assert cli_main(_argv(subsets[0], work, 2 * N)) == 0
    got = _rows(work)
    assert [got[s]["lr"] for s in range(1, N + 1)] == [before[s]["lr"] for s in range(1, N + 1)]
    tc = read_workdir_config(work).train
    assert tc.decay_steps == N  # recorded now
    np.testing.assert_allclose([got[s]["lr"] for s in range(N + 1, 2 * N + 1)], tc.lr_final_ratio * tc.lr_max,
                               rtol=1e-6)
