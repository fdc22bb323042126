"""`retro-jax eval` end to end on tiny trained workdirs (RETRO and baseline), through its argparse
verb: the report's columns, numbers that agree with each other (tests/_report_checks.py: bpb is
the token loss over the counted bytes, bpb(alpha) and its counts grow with alpha to the whole
split), counts that match the database, the table showing exactly those numbers, and both PNGs;
plus the clear error for a model whose chunk size or tokenizer is not the database's."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

pytest.register_assert_rewrite("_report_checks")  # its failures name the values

from _damage import damage
from _db_helpers import shared
from _report_checks import assert_numbers_hold, assert_table_shows
from retro_jax.config import ModelConfig, apply_overrides, load_config
from retro_jax.eval import report
from retro_jax.eval import run as eval_run
from retro_jax.eval.run import evaluate
from retro_jax.model import abstract_params
from retro_jax.retrieval.database import Database, DatabaseMismatchError
from retro_jax.runtime.checkpoint import Checkpointer, restore_params_only
from retro_jax.train import retrofit
from retro_jax.train.loop import train

# As tests/test_train.py: a small model over the test database (chunk 32, vocab 400).
MODEL = ["model.vocab_size=512", "model.chunk_size=32", "model.d_model=64", "model.num_layers=2",
         "model.cca_layers=(2,)", "model.num_heads=2", "model.d_ff=128", "model.enc_d_model=32",
         "model.enc_num_heads=2", "model.enc_head_dim=16", "model.enc_d_ff=64", "model.enc_num_layers=1"]
RUN = ["train.seq_len=64", "train.batch_size=8", "train.warmup_steps=1", "train.log_every=1", "train.steps=2",
       "eval.window=64", "eval.stride=32", "eval.batch_size=8"]


def _config(preset: str = "tiny", *extra: str):
    baseline = ["model.cca_layers=()"] if preset.endswith("baseline") else []
    return apply_overrides(load_config(preset), MODEL + baseline + RUN + list(extra))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    """A RETRO trained 2 steps, and as baseline a workdir holding its decoder (a retrofit's
    baseline): with retrieval off the two compute the same logits."""
    db = str(shared(tmp_path_factory)["db"])
    root = tmp_path_factory.mktemp("evalruns")
    train(_config("tiny"), db, str(root / "retro"), progress=False)
    cfg = ModelConfig.from_dict(dict(_config("tiny").model))
    params = restore_params_only(root / "retro", abstract_params(cfg))
    base = _config("tiny-baseline")
    (root / "baseline").mkdir()
    (root / "baseline" / "config.json").write_text(json.dumps(base.to_dict()))
    with Checkpointer(root / "baseline") as ckpt:
        ckpt.save(2, {"params": retrofit.split_decoder(params)}, {}, base.to_dict(), force=True)
    return {"db": db, "retro": str(root / "retro"), "baseline": str(root / "baseline")}


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="retro-jax")
    eval_run.register(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_eval_verb_reports_every_model_and_writes_plots(runs, capsys):
    argv = ["eval", "--workdir", runs["retro"], "--db", runs["db"], "--baseline", runs["baseline"], "--json"]
    assert _cli(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert_numbers_hold(out, ("retro", "retro_off", "baseline"))
    assert out["alphas"] == ["0", "0.125", "0.25", "0.5", "0.75", "1"]
    assert all(set(curve) == set(out["alphas"]) for curve in out["bpb_alpha"].values())
    assert out["bpb"]["retro"] != out["bpb"]["retro_off"]  # the neighbours reach the logits
    assert out["bpb"]["baseline"] == pytest.approx(out["bpb"]["retro_off"], rel=1e-6)  # its own decoder
    assert out["models"]["retro"]["neighbours"] == 2
    assert set(out["neighbour_sweep"]) == {"1", "2", "5", "10"}
    assert out["neighbour_sweep"]["2"]["bpb"] == out["bpb"]["retro"]

    store = Database.open(runs["db"]).validation  # every target but each document's first token
    first = np.r_[True, np.asarray(store.doc_ids)[1:] != np.asarray(store.doc_ids)[:-1]]
    table = Database.open(runs["db"]).tokenizer.token_num_bytes()
    assert out["counts"]["tokens"] == int(np.asarray(store.lengths).sum()) - int(first.sum())
    first_bytes = int(table[store.tokens[first, 0]].sum())
    assert out["counts"]["bytes"] == int(np.asarray(store.num_bytes).sum()) - first_bytes
    assert sum(out["leakage_histogram"]["counts"]) == out["counts"]["chunks"] == store.num_chunks
    assert out["alpha_counts"]["1"]["bytes"] == out["counts"]["bytes"]

    files = out["files"]
    assert json.loads(Path(files["json"]).read_text())["bpb"] == out["bpb"]
    for key in ("bpb_alpha_png", "leakage_png"):
        assert Path(files[key]).parent == Path(runs["retro"])
        assert Path(files[key]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_table_shows(report.markdown_table(out), out)  # what `retro-jax eval` prints without --json


def test_a_baseline_workdir_alone_has_no_retrieval_columns(runs, tmp_path):
    out = evaluate(runs["baseline"], runs["db"], out_dir=tmp_path, progress=False)
    assert set(out["bpb"]) == {"baseline"} and out["neighbour_sweep"] == {}
    assert_numbers_hold(out, ("baseline",))
    assert_table_shows(report.markdown_table(out), out)
    assert (tmp_path / "eval_validation_bpb_alpha.png").is_file()


@pytest.mark.parametrize("change,message", [
    ({"model": {"chunk_size": 64}}, "chunk size"),
    ({"data": {"tokenizer_sha256": "0" * 64}}, "tokenizer"),  # when the run recorded its tokenizer
])
def test_a_model_of_another_chunk_size_or_tokenizer_is_refused(tmp_path_factory, tmp_path, change, message):
    db = str(shared(tmp_path_factory)["db"])
    config = _config("tiny").to_dict()
    for section, values in change.items():
        config.setdefault(section, {}).update(values)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DatabaseMismatchError, match=message):
        evaluate(tmp_path, db, progress=False)


@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_eval_names_an_unreadable_checkpoint_and_stops(runs, tmp_path, capsys, how):
    import shutil

    from retro_jax.cli import main as cli_main

    workdir = tmp_path / "retro"
    shutil.copytree(runs["retro"], workdir)
    damage(workdir, 2, how)
    assert cli_main(["eval", "--workdir", str(workdir), "--db", runs["db"], "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("retro-jax eval: error: checkpoint 2 in ") and "is unreadable: " in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (workdir / "checkpoints_unreadable").exists()  # eval never moves a run's files
