"""Sweeps: declared as data, deterministic run folders, what each backend would run or submit,
a real 2-run sweep on this machine (skip when complete, resume when interrupted), the report."""

from __future__ import annotations

import json
import os
import shlex
import stat

import pytest
from _db_helpers import shared

from launch import backends
from launch import report as report_lib
from launch import run as run_lib
from launch import sweep as sweep_lib
from launch.execute import FAILED, RunError, execute, status
from launch.spec import SweepError, from_dict, load_sweep

# The test database's chunk size (32) and a small model, as tests/test_eval_run.py.
MODEL = ["model.vocab_size=512", "model.chunk_size=32", "model.d_model=64", "model.num_layers=2",
         "model.cca_layers=(2,)", "model.num_heads=2", "model.d_ff=128", "model.enc_d_model=32",
         "model.enc_num_heads=2", "model.enc_head_dim=16", "model.enc_d_ff=64", "model.enc_num_layers=1"]
RUN = ["train.seq_len=64", "train.batch_size=8", "train.warmup_steps=1", "train.log_every=1",
       "train.checkpoint_every=2", "eval.window=64", "eval.stride=32", "eval.batch_size=8"]


def _spec(db: str, **changes) -> dict:
    d = dict(name="t", database=dict(path=db, build=None), db_chunks=[40, "all"],
             models=[dict(name="m", config="tiny", overrides=MODEL)], seeds=[0, 1], steps=2, overrides=RUN)
    return d | changes


def test_runs_are_declared_data_with_deterministic_folders(tmp_path):
    s = from_dict(_spec("db"), out=str(tmp_path))
    runs = s.runs()
    assert [r.kind for r in runs] == ["baseline"] * 2 + ["retro"] * 4  # baselines first: evaluations need them
    assert [r.id for r in runs] == [r.id for r in from_dict(_spec("db"), out=str(tmp_path / "x")).runs()]
    assert len({r.id for r in runs}) == len(runs)
    assert [r.size_label for r in runs[2:]] == ["db40", "db40", "dball", "dball"]
    assert s.baseline_for(runs[3]) == runs[1]
    changed = from_dict(_spec("db", steps=3), out=str(tmp_path)).runs()
    assert not {r.id for r in runs} & {r.id for r in changed}  # another budget: other folders
    assert from_dict(_spec("db", db_chunks=["all", 5, 5]), out="o").db_chunks == [5, None]
    for bad, match in ((dict(db_chunks=[0]), "db_chunks"), (dict(seeds=[1, 1]), "seeds"), (dict(colour=1), "unknown"),
                       (dict(models=["tiny", "tiny"]), "distinct"), (dict(subset=dict(mode="random")), "subset")):
        with pytest.raises(SweepError, match=match):
            from_dict(_spec("db", **bad))
    example = load_sweep("configs/sweeps/db_size.py")
    assert len(example.models) == 2 and len(example.db_chunks) >= 3 and len(example.seeds) == 2


def test_dry_runs_print_what_each_backend_runs_and_write_nothing(tmp_path):
    s = from_dict(_spec("db"), out=str(tmp_path / "sweep"))
    lines: list[str] = []
    sweep_lib.launch(s, "local", dry_run=True, echo=lines.append)
    commands = [shlex.split(x.split("  > ")[0]) for x in lines[1:]]
    assert [c[c.index("--run") + 1] for c in commands] == [r.id for r in s.runs()]
    assert all(c[1].endswith("launch/sweep.py") and c[c.index("--out") + 1] == str((tmp_path / "sweep").resolve())
               for c in commands)

    lines.clear()
    sweep_lib.launch(s, "slurm", parallel=2, dry_run=True, echo=lines.append,
                     slurm=dict(nodes=2, gpus_per_node=8, partition="gpu", python="/opt/venv/bin/python"))
    text = "\n".join(lines)
    assert text.count("srun --kill-on-bad-exit=1 /opt/venv/bin/python ") == 6  # the runs' interpreter
    assert "#SBATCH --array=0-1%2" in text and "#SBATCH --array=0-3%2" in text  # 2 baselines, then 4 RETRO runs
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=1" in text and "--gpus-per-node=8" in text
    assert text.count("srun --kill-on-bad-exit=1") == 6
    assert "--dependency=afterany:<job id of baseline.sbatch>" in text
    assert not (tmp_path / "sweep").exists()

    lines.clear()
    sweep_lib.launch(s, "tpu-pod", dry_run=True, echo=lines.append, tpu=dict(name="v5p", zone="us-east5-a"))
    for line, run in zip(lines[1:], s.runs()):
        argv = shlex.split(line)
        assert argv[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "v5p", "--zone=us-east5-a"]
        assert "--worker=all" in argv and f"--run {run.id}" in argv[-1] and "RETRO_DISTRIBUTED=auto" in argv[-1]
    with pytest.raises(ValueError, match="zone"):
        sweep_lib.launch(s, "tpu-pod", dry_run=True, echo=lines.append, tpu=dict(name="v5p"))

    lines.clear()  # one training run, as the README starts retro-7.5b on a v5p slice
    assert run_lib.main(["--backend", "tpu-pod", "--tpu", "v5p-128", "--zone", "z", "--dry-run", "--", "train",
                         "--config", "retro-7.5b", "--db", "DB", "--workdir", "W", "--config.mesh.fsdp=64"]) == 0


def test_slurm_submission_chains_the_arrays(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"  # records its arguments, answers job ids like `sbatch --parsable`
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\nwc -l < {tmp_path}/calls | tr -d " "\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    s = from_dict(_spec("db"), file=__file__, out=str(tmp_path / "sweep"))  # (not loaded: only submitted)
    sweep_lib.launch(s, "slurm", echo=lambda _: None)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0].endswith("baseline.sbatch") and "--dependency" not in calls[0]
    assert "--dependency=afterany:1" in calls[1] and calls[1].endswith("retro.sbatch")
    assert (tmp_path / "sweep" / "slurm" / "retro.sbatch").read_text().count("srun") == 4


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """A real sweep of 2 runs (one baseline, one RETRO on a database subset) on this machine."""
    db = str(shared(tmp_path_factory)["db"])
    root = tmp_path_factory.mktemp("sweep")
    file = root / "small.py"  # the runs (subprocesses) load the sweep from its file
    file.write_text(f"def get_sweep():\n    return {_spec(db, db_chunks=[40], seeds=[0])!r}\n")
    s = load_sweep(file, str(root / "out"))
    lines: list[str] = []
    sweep_lib.launch(s, "local", echo=lines.append)
    return s, lines


@pytest.mark.slow
def test_a_local_sweep_runs_skips_and_resumes(ran, tmp_path):
    s, lines = ran
    base, retro = s.runs()
    assert [status(s, r) for r in (base, retro)] == ["done", "done"], lines
    done = json.loads((s.run_dir(retro) / "done.json").read_text())
    assert done["database"]["chunks"] == 40 and set(done["bpb"]) == {"retro", "retro_off", "baseline"}
    assert (s.run_dir(retro) / "export" / "config.json").is_file()
    assert json.loads((s.subset_dir(40) / "manifest.json").read_text())["subset"]["chunks"] == 40

    lines.clear()  # complete: nothing runs
    sweep_lib.launch(s, "local", echo=lines.append)
    assert "2 complete, 0 to run" in lines[0] and len(lines) == 1

    metrics = (s.run_dir(retro) / "train" / "metrics.jsonl").read_text()
    (s.run_dir(retro) / "done.json").unlink()  # interrupted after training: resumes, does not retrain
    lines.clear()
    sweep_lib.launch(s, "local", echo=lines.append)
    assert "1 complete, 1 to run" in lines[0] and status(s, retro) == "done"
    assert (s.run_dir(retro) / "train" / "metrics.jsonl").read_text() == metrics


@pytest.mark.slow
def test_report_tables_and_plots_and_names_what_is_missing(ran, tmp_path, capsys):
    s, _ = ran
    g = report_lib.gather(s.out)
    (row,) = g["rows"]
    done = json.loads((s.run_dir(s.runs()[1]) / "done.json").read_text())
    assert row["db_chunks"] == 40 and row["retro_bpb"] == done["bpb"]["retro"] and g["problems"] == []
    assert row["retro_minus_baseline"] == pytest.approx(done["bpb"]["retro"] - done["bpb"]["baseline"])
    assert report_lib.main([str(s.out), "--out", str(tmp_path / "r")]) == 0
    for name in ("report.md", "report.csv", "runs.csv", "report.json", "report.png"):
        assert (tmp_path / "r" / name).stat().st_size > 0
    spec = json.loads((s.out / "sweep.json").read_text())
    spec["runs"].append({"id": "m-db40-seed7-00000000", "kind": "retro", "model": "m", "chunks": 40, "seed": 7})
    other = tmp_path / "other"
    other.mkdir()
    (other / "sweep.json").write_text(json.dumps(spec))
    (other / "runs").symlink_to(s.out / "runs")
    assert report_lib.main([str(other)]) == 1
    assert "m-db40-seed7-00000000: missing" in capsys.readouterr().out


def test_a_run_whose_baseline_failed_fails_at_once(tmp_path):
    s = from_dict(_spec(str(tmp_path / "no-db")), out=str(tmp_path / "sweep"))
    base, _, retro = s.runs()[0], s.runs()[1], s.runs()[2]
    s.run_dir(base).mkdir(parents=True)
    (s.run_dir(base) / FAILED).write_text(json.dumps({"error": "boom"}))
    with pytest.raises(RunError, match="baseline .* failed"):
        execute(s, retro)
    assert "baseline" in json.loads((s.run_dir(retro) / FAILED).read_text())["error"]
    with pytest.raises(RunError, match="build-db"):  # its baseline: no database and no build settings
        execute(s, base)
