"""Export -> load_exported round trips exactly and refuses damaged folders; generation decodes
what the full forward pass would, reads the neighbours of completed chunks, and refuses a database
built with another tokenizer."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.flax import load_file, save_file

from _db_helpers import shared
from retro_jax.cli import main as cli_main
from retro_jax.config import apply_overrides, load_config, model_config
from retro_jax.infer.export import ExportError, export, load_exported
from retro_jax.infer.generate import Generator
from retro_jax.model import abstract_params
from retro_jax.model.layout import unstack_layers
from retro_jax.model.retro import Retro
from retro_jax.retrieval.database import DatabaseMismatchError
from retro_jax.runtime.checkpoint import restore_params_only
from retro_jax.train.loop import train

# A small RETRO over the test database (chunk 32), 4 layers with the last two under nn.scan,
# trained sharded over 8 fake devices (2x2x2): export must unstack and gather.
OVERRIDES = ["model.vocab_size=512", "model.chunk_size=32", "model.d_model=64", "model.num_layers=4",
             "model.cca_layers=(2,4)", "model.num_heads=2", "model.d_ff=128", "model.enc_d_model=32",
             "model.enc_num_heads=2", "model.enc_head_dim=16", "model.enc_d_ff=64", "model.enc_num_layers=1",
             "model.scan_layers=True", "model.scan_start=2", "model.scan_period=2",
             "train.seq_len=128", "train.batch_size=4", "train.warmup_steps=2", "train.steps=3",
             "train.checkpoint_every=3", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    db = str(shared(tmp_path_factory)["db"])
    workdir = tmp_path_factory.mktemp("infer") / "w"
    config = apply_overrides(load_config("tiny"), OVERRIDES)
    train(config, db, str(workdir), progress=False)
    out = export(workdir, workdir.parent / "export")
    return {"db": db, "workdir": workdir, "export": out, "cfg": model_config(config)}


def test_export_round_trip_is_exact_and_unrolled(trained):
    cfg = trained["cfg"]
    restored = unstack_layers(jax.device_get(restore_params_only(trained["workdir"], abstract_params(cfg))), cfg)
    loaded_cfg, loaded = load_exported(trained["export"])
    assert loaded_cfg == dataclasses.replace(cfg, scan_layers=False)
    assert "blocks" not in loaded and {"layer_3", "layer_4"} <= set(loaded)
    assert jax.tree.structure(loaded) == jax.tree.structure(restored)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(restored)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    # the exported (unrolled) params compute what the trained (scanned) model computes
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 70), dtype=np.int32)
    np.testing.assert_allclose(np.asarray(Retro(loaded_cfg).apply({"params": loaded}, tokens)),
                               np.asarray(Retro(cfg).apply({"params": jax.device_get(
                                   restore_params_only(trained["workdir"], abstract_params(cfg)))}, tokens)),
                               atol=1e-5, rtol=1e-5)
    meta = json.loads((trained["export"] / "config.json").read_text())
    assert meta["step"] == 3 and meta["database"]["tokenizer_sha256"]
    assert (trained["export"] / "tokenizer.model").is_file() and (trained["export"] / "README.md").is_file()


def test_bfloat16_export_is_the_cast_of_the_float32_one(trained, tmp_path):
    out = export(trained["workdir"], tmp_path / "bf16", dtype="bfloat16")
    _, p32 = load_exported(trained["export"])
    _, p16 = load_exported(out)
    for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p16)):
        assert str(b.dtype) == "bfloat16" and np.array_equal(np.asarray(a.astype(b.dtype)), np.asarray(b))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_damaged_or_mismatched_exports_are_refused_with_a_clear_error(trained, tmp_path):
    src = trained["export"]
    cut = _copy(src, tmp_path / "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ExportError, match="truncated"):
        load_exported(cut)

    renamed = _copy(src, tmp_path / "renamed")
    t = load_file(str(renamed / "model.safetensors"))
    t["layer_1.attn.wq_renamed"] = t.pop("layer_1.attn.wq")
    save_file(t, str(renamed / "model.safetensors"))
    with pytest.raises(ExportError, match=r"missing tensors \['layer_1.attn.wq'\].*unexpected.*wq_renamed"):
        load_exported(renamed)

    extra = _copy(src, tmp_path / "extra")
    t = load_file(str(extra / "model.safetensors"))
    t["layer_9.attn.wq"] = t["layer_1.attn.wq"]
    save_file(t, str(extra / "model.safetensors"))
    with pytest.raises(ExportError, match="unexpected tensors.*layer_9"):
        load_exported(extra)

    wider = _copy(src, tmp_path / "wider")
    meta = json.loads((wider / "config.json").read_text())
    meta["model"]["d_ff"] = 256
    (wider / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match=r"ffw.wi is float32\[64, 128\], the config needs float32\[64, 256\]"):
        load_exported(wider)

    unfinished = _copy(src, tmp_path / "unfinished")
    (unfinished / "config.json").unlink()
    with pytest.raises(ExportError, match="no config.json"):
        load_exported(unfinished)


def test_loading_never_unpickles(trained, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("pickle used on the load path")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    load_exported(trained["export"])


@pytest.fixture(scope="module")
def generator(trained) -> Generator:
    return Generator(trained["export"], trained["db"])


def _full_forward_argmax(gen: Generator, tokens: list[int]) -> np.ndarray:
    """Greedy next tokens of the full forward pass over `tokens`, the neighbours of each chunk retrieved
    by the same retriever (the last, partial chunk's are never read by the positions scored)."""
    m = gen.cfg.chunk_size
    seq = np.array(tokens, np.int32)
    full = len(seq) // m
    nb = np.full((1, -(-len(seq) // m), gen.cfg.num_neighbours, gen.cfg.neighbour_len), -1, np.int32)
    if full:
        nb[0, :full] = gen.retriever.neighbours_for_chunks(seq[:full * m].reshape(full, m), gen.cfg.num_neighbours)
    logits = Retro(gen.cfg).apply({"params": gen.params}, seq[None], nb)
    return np.asarray(logits[0, :, :gen.tokenizer.vocab_size].argmax(-1))


def test_greedy_generation_is_what_the_full_forward_pass_predicts_with_the_neighbours_read(generator):
    prompt = "The river rose through the night and by morning the"  # not a multiple of 32 tokens
    compiled = generator._step._cache_size()
    out = generator.generate([prompt], max_new_tokens=80, temperature=0, show_neighbours=True)[0]
    # one compiled step for ordinary positions and one for chunk boundaries, not one per token
    assert generator._step._cache_size() - compiled <= 2
    compiled = generator._step._cache_size()
    again = generator.generate([prompt], max_new_tokens=80, temperature=0)[0]
    assert generator._step._cache_size() == compiled
    assert out.tokens == again.tokens and len(out.tokens) > 0  # greedy is deterministic
    p = generator.tokenizer.encode(prompt)
    seq = p + out.tokens
    predicted = _full_forward_argmax(generator, seq)
    assert predicted[len(p) - 1:len(seq) - 1].tolist() == out.tokens
    m = generator.cfg.chunk_size
    # a chunk's neighbours are read from its last position on: positions m-1, 2m-1, ... of the sequence
    # (the last position, whose logits nothing needs, is never run)
    assert [r["position"] for r in out.neighbours] == [u * m + m - 1 for u in range((len(seq) - 1) // m)]
    assert all(len(r["neighbours"]) == generator.cfg.num_neighbours for r in out.neighbours)
    assert out.neighbours[0]["chunk_text"] == generator.tokenizer.decode(seq[:m])


def test_a_batch_of_ragged_prompts_gives_each_prompt_what_it_gets_alone(generator):
    prompts = ["A short one", "A much longer prompt that runs past the first chunk boundary of thirty-two "
               "tokens, so that its own neighbours are retrieved while the short one is already generating"]
    together = generator.generate(prompts, max_new_tokens=40, temperature=0)
    for p, t in zip(prompts, together):
        assert t.tokens == generator.generate([p], max_new_tokens=40, temperature=0)[0].tokens


def test_sampling_depends_on_the_seed_and_is_reproducible(generator):
    run = lambda seed: generator.generate(["Once"], max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.9,  # noqa
                                          seed=seed)[0].tokens
    assert run(1) == run(1) and run(1) != run(2)


def test_a_database_built_with_another_tokenizer_is_refused(trained, tmp_path):
    other = _copy(trained["export"], tmp_path / "other")
    meta = json.loads((other / "config.json").read_text())
    meta["tokenizer"]["sha256"] = "0" * 64  # the model was trained with another tokenizer
    (other / "config.json").write_text(json.dumps(meta))
    with pytest.raises(DatabaseMismatchError, match="tokenizer mismatch"):
        Generator(other, trained["db"])


def test_cli_export_and_generate(trained, tmp_path, capsys):
    out = tmp_path / "cli_export"
    assert cli_main(["export", "--workdir", str(trained["workdir"]), "--out", str(out), "--step", "3"]) == 0
    assert "exported step 3" in capsys.readouterr().out
    assert cli_main(["generate", "--model", str(out), "--db", trained["db"], "--prompt", "The river",
                     "--max-new-tokens", "40", "--temperature", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["generations"]) == 1 and report["generations"][0]["neighbours"]
    assert cli_main(["generate", "--model", str(out), "--prompt", "x"]) == 2  # retrieval needs --db
    assert "--db" in capsys.readouterr().err


# -- where an export is written ----------------------------------------------------------------

def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_an_existing_export_is_refused_without_overwrite_and_replaced_whole_with_it(trained, tmp_path):
    out = export(trained["workdir"], tmp_path / "e")
    before = _files(out)
    with pytest.raises(FileExistsError, match="exists: pass --overwrite"):
        export(trained["workdir"], out, dtype="bfloat16")
    assert _files(out) == before
    export(trained["workdir"], out, dtype="bfloat16", overwrite=True)
    cfg, params = load_exported(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]  # no temp or replaced folder left beside it
    # a folder that is not an export is never replaced, even with overwrite; an empty one is used
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an export folder"):
        export(trained["workdir"], tmp_path / "notes", overwrite=True)
    assert _files(tmp_path / "notes") == {"todo.txt": b"mine"}
    (tmp_path / "empty").mkdir()
    load_exported(export(trained["workdir"], tmp_path / "empty"))


def test_a_failed_export_leaves_the_previous_one_whole_and_nothing_beside_it(trained, tmp_path, monkeypatch):
    import socket
    import subprocess
    import sys

    import safetensors.numpy

    out = export(trained["workdir"], tmp_path / "e")
    before = _files(out)
    # a side folder of an export that was killed (its process is gone) is cleared by the next export
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".e.tmp-{socket.gethostname()}-{int(dead.stdout)}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export(trained["workdir"], out, overwrite=True)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]
    # killed between moving the old export aside and moving the new one in: the old one is put back
    out.rename(tmp_path / f".e.old-{socket.gethostname()}-{int(dead.stdout)}")
    with pytest.raises(OSError, match="No space left"):
        export(trained["workdir"], out, overwrite=True)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]
    load_exported(out)


def _workdir_copy(trained, dst: Path, tokenizer: bytes | None | str = "keep", db: str | None = None) -> Path:
    """A copy of the trained workdir: its tokenizer.model kept, removed (None) or replaced (bytes);
    its recorded database moved to `db`."""
    w = shutil.copytree(trained["workdir"], dst)
    if tokenizer is None:
        (w / "tokenizer.model").unlink()
    elif isinstance(tokenizer, bytes):
        (w / "tokenizer.model").write_bytes(tokenizer)
    if db is not None:
        sections = json.loads((w / "config.json").read_text())
        sections["data"]["db"] = db
        (w / "config.json").write_text(json.dumps(sections))
    return w


def test_the_tokenizer_travels_with_the_workdir_and_older_workdirs_use_the_database(trained, tmp_path, capsys):
    db_tokenizer = (Path(trained["db"]) / "tokenizer.model").read_bytes()
    _, weights = load_exported(trained["export"])
    assert (trained["workdir"] / "tokenizer.model").read_bytes() == db_tokenizer  # copied at train time
    # the database moved away: the workdir's copy is exported
    moved = export(_workdir_copy(trained, tmp_path / "moved", db=str(tmp_path / "gone")), tmp_path / "e1")
    assert (moved / "tokenizer.model").read_bytes() == db_tokenizer
    _, params = load_exported(moved)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(params),
                                                                          jax.tree.leaves(weights)))
    # an older workdir (no copy): the database's
    old = export(_workdir_copy(trained, tmp_path / "old", tokenizer=None), tmp_path / "e2")
    assert (old / "tokenizer.model").read_bytes() == db_tokenizer
    # neither: one line saying where the tokenizer should be; nothing written
    neither = _workdir_copy(trained, tmp_path / "neither", tokenizer=None, db=str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match=r"no tokenizer to export: neither .*neither/tokenizer.model"):
        export(neither, tmp_path / "e3")
    assert not (tmp_path / "e3").exists()
    assert cli_main(["export", "--workdir", str(neither), "--out", str(tmp_path / "e3")]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tokenizer to export" in err and "Traceback" not in err
    # a tokenizer other than the one the run recorded is never exported
    wrong = _workdir_copy(trained, tmp_path / "wrong", tokenizer=b"not it", db=str(tmp_path / "gone"))
    with pytest.raises(ExportError, match="the run recorded tokenizer sha256"):
        export(wrong, tmp_path / "e4")
