"""Document ends carry EOS: build-db ends every document's tokens with the tokenizer's EOS id, the
training loader makes it a counted target, bits-per-byte scores it at 0 bytes, and generation
stops at the first EOS a row samples (the other rows go on)."""

from __future__ import annotations

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _db_helpers import BUILD, shared

from retro_jax.config import ModelConfig
from retro_jax.eval.bpb import documents, score_split
from retro_jax.infer.generate import Generator
from retro_jax.model import init_params
from retro_jax.retrieval.build import BuildError, build_database
from retro_jax.retrieval.database import Database
from retro_jax.train.loader import make_batch


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return shared(tmp_path_factory)


@pytest.fixture(scope="module")
def db(base) -> Database:
    return Database.open(base["db"])


def test_every_document_ends_with_one_eos_that_decodes_to_nothing(base, db):
    eos = db.tokenizer.eos_id
    assert db.manifest["settings"]["document_end"] == "eos"
    seen = 0
    for split in ("train", "validation"):
        store = db.chunks(split)
        for doc in documents(store):
            text = base["corpus"][doc.doc_id].read_text()
            assert doc.tokens[-1] == eos and eos not in doc.tokens[:-1].tolist()
            assert db.tokenizer.decode(doc.tokens) == text
            # the chunks' byte counts are the text's: EOS costs 0 bytes
            assert int(np.sum(store.num_bytes[doc.first_chunk:doc.end_chunk])) == len(text.encode("utf-8"))
            seen += 1
    assert seen == len(np.unique(db.train.doc_ids)) + len(np.unique(db.validation.doc_ids)) > 0


def test_a_database_built_before_eos_is_refused_then_rebuilt_with_overwrite(base, tmp_path):
    out = tmp_path / "db"
    shutil.copytree(base["db"], out)
    for rel, keys in (("manifest.json", ["settings"]), ("stages/combine.json", ["result", "settings"])):
        rec = json.loads((out / rel).read_text())
        node = rec
        for key in keys:
            node = node[key]
        del node["document_end"]  # what a database built before document ends carried EOS records
        (out / rel).write_text(json.dumps(rec))
    args = ([str(base["corpus_dir"])], str(out))
    with pytest.raises(BuildError, match="document_end: built with None, this run asks for 'eos'"):
        build_database(*args, embedder=str(base["bert"]), **BUILD)
    manifest = build_database(*args, embedder=str(base["bert"]), overwrite=True, **BUILD)
    # rebuilt, not the old merge reused (that one recorded no document_end)
    assert manifest["settings"]["document_end"] == "eos"
    assert json.loads((out / "stages/combine.json").read_text())["result"]["settings"]["document_end"] == "eos"


def test_the_loader_trains_every_eos_target_and_nothing_across_it(db):
    eos, m = db.tokenizer.eos_id, db.chunk_size
    seq_len = 4 * m
    starts = np.arange(db.train.num_chunks // 4) * 4
    batch = make_batch(db, "train", starts, seq_len, num_neighbours=1, retrieval=False)
    tokens, targets, mask = batch["tokens"], batch["targets"], batch["loss_mask"]
    real_input = tokens != db.chunks("train").pad_id
    eos_targets = (targets == eos) & real_input
    assert eos_targets.sum() >= 5  # document ends inside the windows
    assert np.all(mask[eos_targets] == 1)  # predicting the end of a document is trained
    assert np.all(mask[tokens == eos] == 0)  # nothing is predicted from one document into the next


def test_bits_per_byte_scores_eos_at_zero_bytes(base, db):
    store = db.chunks("validation")
    docs = list(documents(store))

    def one_nat(tokens, targets, neighbours):
        return np.ones(tokens.shape, np.float32)

    scores = score_split(db, "validation", one_nat, window=2 * db.chunk_size, stride=db.chunk_size, batch_size=4)
    table = db.tokenizer.token_num_bytes()
    # every target but each document's first token is scored once, its EOS among them ...
    assert int(scores.tokens_C.sum()) == sum(len(d.tokens) - 1 for d in docs)
    assert math.isclose(float(scores.bits_C.sum()), scores.tokens_C.sum() / math.log(2), rel_tol=1e-9)
    # ... and the bytes are the text's, less each first token's: EOS adds none
    text_bytes = sum(len(base["corpus"][d.doc_id].read_bytes()) for d in docs)
    assert int(scores.bytes_C.sum()) == text_bytes - sum(int(table[d.tokens[0]]) for d in docs)
    ends = {(d.end_chunk - 1, len(d.tokens) - 1) for d in docs}
    at_end = np.array([(c, p) in ends for c, p in zip(scores.chunk.tolist(), scores.position.tolist())])
    assert at_end.sum() == len(docs) and np.all(scores.num_bytes[at_end] == 0)


def _forcing_eos(step, eos: int, rows: list[int], at: int):
    """The decode step `step`, with `rows` putting all their mass on EOS at position `at`."""

    def forced(params, tables, cache, token, t, nb):
        logits, cache = step(params, tables, cache, token, t, nb)
        if int(t) == at:
            logits = logits.at[jnp.asarray(rows), eos].set(1e9)
        return logits, cache

    return forced


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generation_stops_at_the_first_eos_a_row_samples(db, temperature):
    tok = db.tokenizer
    cfg = ModelConfig(name="g", vocab_size=512, d_model=32, num_layers=2, num_heads=2, head_dim=16, d_ff=64,
                      chunk_size=db.chunk_size, cca_layers=())
    gen = Generator.from_params(cfg, init_params(cfg, jax.random.key(0)), tok)
    prompts, n = ["nal bel sor", "kin mat ret sul pen dor"], 12
    lens = [len(tok.encode(p)) for p in prompts]
    ref = gen.generate(prompts, max_new_tokens=n, temperature=temperature, seed=3)
    assert [len(r.tokens) for r in ref] == [n, n] and all(tok.eos_id not in r.tokens for r in ref)
    full_steps = gen.timings["steps"]

    step = gen._step
    gen._step = _forcing_eos(step, tok.eos_id, [0], at=lens[0] + 3)  # row 0's 5th new token is EOS
    out = gen.generate(prompts, max_new_tokens=n, temperature=temperature, seed=3)
    assert out[0].tokens == ref[0].tokens[:4] and out[0].text == tok.decode(ref[0].tokens[:4])
    assert out[1].tokens == ref[1].tokens  # the other row is not cut
    assert gen.timings["steps"] == lens[1] + n - 1  # decoding runs until row 1 has its last token

    gen._step = _forcing_eos(step, tok.eos_id, [0, 1], at=max(lens) + 1)  # both rows end: decoding stops early
    out = gen.generate(prompts, max_new_tokens=n, temperature=temperature, seed=3)
    cut = [max(lens) + 2 - lens[i] for i in range(2)]  # EOS lands at position max(lens) + 2
    assert [o.tokens for o in out] == [ref[i].tokens[:cut[i]] for i in range(2)]
    assert gen.timings["steps"] == max(lens) + 2 < full_steps
