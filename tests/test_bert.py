"""The frozen BERT embedder: matches PyTorch, loads any BERT checkpoint, batch-independent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from scipy.special import erf
from _db_helpers import write_wordpiece_tokenizer

from retro_jax.retrieval.bert import BertCheckpointError, Embedder
from _stand_ins import random_hf_weights

REFERENCE = Path(__file__).parent / "data" / "bert_reference.json"
TINY = dict(vocab_size=0, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, hidden_act="gelu", layer_norm_eps=1e-12,
            max_position_embeddings=128, type_vocab_size=2, model_type="bert")
WORDS = ("the cat sat on a mat def return for in range x y = ( ) : , . ##s ##ing "
         "retrieval chunk token neighbour").split()
TEXTS = ["the cat sat on the mat", "def f(x): return x", "a", "",
         "retrieval chunk token neighbour " * 20, "cats sitting on mats, in range(x)"]


# ---------------------------------------------------------------- a tiny BERT checkpoint


def _hf_tensors(cfg: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random HF-named BertModel weights (torch Linear layout [out, in]) plus an unused head."""
    t = random_hf_weights(cfg, rng)
    d = cfg["hidden_size"]
    t["pooler.dense.weight"] = rng.normal(0, 0.3, (d, d)).astype(np.float32)  # unused head: ignored
    t["pooler.dense.bias"] = rng.normal(0, 0.3, (d,)).astype(np.float32)
    return t


def write_tiny_bert(root: Path, seed: int = 0, prefix: str = "bert.") -> dict[str, np.ndarray]:
    """Write config.json, model.safetensors and tokenizer.json of a random tiny BERT."""
    vocab = write_wordpiece_tokenizer(root, WORDS)
    cfg = dict(TINY, vocab_size=len(vocab))
    (root / "config.json").write_text(json.dumps(cfg))
    tensors = _hf_tensors(cfg, np.random.default_rng(seed))
    stored = {prefix + k: v for k, v in tensors.items()}
    stored[prefix + "embeddings.position_ids"] = np.arange(128, dtype=np.int64)[None]
    save_file(stored, str(root / "model.safetensors"))
    return tensors


def numpy_bert_mean(t: dict[str, np.ndarray], ids: list[int], eps: float = 1e-12) -> np.ndarray:
    """Independent float64 BertModel forward on one unpadded text, mean-pooled."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    ln = lambda x, p: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) \
        * t[p + ".weight"] + t[p + ".bias"]  # noqa: E731
    lin = lambda x, p: x @ t[p + ".weight"].T + t[p + ".bias"]  # noqa: E731
    x = ln(t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"]
           [:len(ids)] + t["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
    heads, d = TINY["num_attention_heads"], TINY["hidden_size"]
    for i in range(TINY["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (lin(x, p + "attention.self." + n).reshape(len(ids), heads, -1).transpose(1, 0, 2)
                   for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 2, 1) / np.sqrt(d // heads)
        a = np.exp(s - s.max(-1, keepdims=True))
        ctx = ((a / a.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(len(ids), d)
        x = ln(x + lin(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        h = lin(x, p + "intermediate.dense")
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
        x = ln(x + lin(h, p + "output.dense"), p + "output.LayerNorm")
    return x.mean(0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("tiny_bert")
    return root, write_tiny_bert(root)


@pytest.fixture(scope="module")
def minilm() -> Embedder:
    return Embedder.load(batch_size=8)


# ---------------------------------------------------------------- the real model vs PyTorch


def test_default_model_matches_pytorch_reference(minilm):
    """Max abs diff < 1e-4 and cosine > 0.9999 vs transformers AutoModel + mean pooling."""
    ref = json.loads(REFERENCE.read_text(encoding="utf-8"))
    assert minilm.name.endswith(ref["model_sha256"][:16]), "reference made from another checkpoint"
    assert [len(ids) for ids, _ in minilm.tokenize(ref["sentences"])] == ref["num_tokens"]
    want = np.array(ref["vectors"], np.float32)
    got = minilm.embed(ref["sentences"])
    assert got.shape == want.shape == (len(ref["sentences"]), minilm.dim) and got.dtype == np.float32
    assert np.abs(got - want).max() < 1e-4
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.9999
    alone = minilm.embed([ref["sentences"][0]])  # other rows, other padded length
    np.testing.assert_allclose(alone[0], got[0], atol=1e-5)


def test_flops_per_token_matches_xla_cost_analysis(minilm):
    """The analytic count is what a FLOP bound uses; XLA's count of the compiled forward agrees."""
    ids = jnp.zeros((8, 64), jnp.int32)
    cost = minilm._forward.lower(minilm.params, ids, ids, ids).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert cost["flops"] == pytest.approx(minilm.flops_per_token(64) * 8 * 64, rel=0.1)


# ---------------------------------------------------------------- any BERT checkpoint


def test_tiny_checkpoint_matches_numpy_forward(tiny):
    root, tensors = tiny
    emb = Embedder.load(root, max_length=16, batch_size=4)
    assert emb.dim == TINY["hidden_size"]
    got = emb.embed(TEXTS, progress=True)
    for text, vec in zip(TEXTS, got):
        ids = emb.tokenizer.encode(text).ids
        assert len(ids) <= 16
        np.testing.assert_allclose(vec, numpy_bert_mean(tensors, ids), atol=2e-5, err_msg=text)
    normed = Embedder.load(root, max_length=16, batch_size=4, normalize=True).embed(TEXTS)
    np.testing.assert_allclose(normed, got / np.linalg.norm(got, axis=1, keepdims=True), atol=1e-6)


def test_embedding_independent_of_batch_mates_and_batch_size(tiny):
    root, _ = tiny
    emb = Embedder.load(root, max_length=32, batch_size=64)
    base = emb.embed(TEXTS)
    perm = np.random.default_rng(1).permutation(len(TEXTS))
    np.testing.assert_allclose(emb.embed([TEXTS[i] for i in perm]), base[perm], atol=1e-5)
    for bs in (1, 3):
        np.testing.assert_allclose(Embedder.load(root, max_length=32, batch_size=bs).embed(TEXTS),
                                   base, atol=1e-5)
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(emb.embed([text])[0], base[i], atol=1e-5)
    assert emb.embed([]).shape == (0, emb.dim)


def test_layout_batches_every_text_once_sorted_and_padded_to_8(tiny):
    """What `embed` computes is what the embedding benchmark counts: each text once, batches of
    similar length, each padded to less than 8 tokens above its longest text."""
    root, _ = tiny
    emb = Embedder.load(root, max_length=32, batch_size=3)
    lengths = [len(ids) for ids, _ in emb.tokenize(TEXTS)]
    batches = emb.layout(lengths)
    order = np.concatenate([idx for _, idx in batches])
    assert sorted(order.tolist()) == list(range(len(TEXTS)))
    assert [lengths[i] for i in order] == sorted(lengths)
    assert len({len(idx) for _, idx in batches[:-1]}) <= 1  # full batches, then the rest
    for padded, idx in batches:
        longest = max(lengths[i] for i in idx)
        assert padded == min(-(-longest // 8) * 8, 32)  # the next multiple of 8, at most max_length
    done, useful = emb.work_flops(lengths)
    assert done > useful == sum(t * emb.flops_per_token(t) for t in lengths)


def test_name_identifies_weights(tiny, tmp_path):
    root, _ = tiny
    first = Embedder.load(root).name
    assert Embedder.load(root).name == first
    write_tiny_bert(tmp_path / root.name, seed=1)
    assert Embedder.load(tmp_path / root.name).name != first


def test_data_parallel_matches_single_device(tiny, tmp_path):
    """Sharding the batch axis over a 1-D device mesh does not change the vectors.

    This process and a subprocess use different device counts (one of them is 1), so the
    sharded and the unsharded path are compared whatever conftest configured.
    """
    root, _ = tiny
    here = Embedder.load(root, max_length=32, batch_size=3).embed(TEXTS)
    other = 1 if len(jax.local_devices()) > 1 else 2
    out = tmp_path / "other.npy"
    script = textwrap.dedent(f"""
        import jax, json, numpy as np
        jax.config.update("jax_num_cpu_devices", {other})
        from retro_jax.retrieval.bert import Embedder
        assert len(jax.local_devices()) == {other}
        emb = Embedder.load({str(root)!r}, max_length=32, batch_size=3)
        np.save({str(out)!r}, emb.embed(json.loads({json.dumps(json.dumps(TEXTS))})))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    np.testing.assert_allclose(np.load(out, allow_pickle=False), here, atol=1e-5)


# ---------------------------------------------------------------- clear errors


def test_missing_path_is_a_clear_error(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="config.json, model.safetensors, tokenizer.json"):
        Embedder.load(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(FileNotFoundError, match="lacks.*model.safetensors"):
        Embedder.load(partial)
    with pytest.raises(ValueError, match="max_length"):
        Embedder.load(tiny[0], max_length=129)
    with pytest.raises(TypeError, match="list of str"):
        Embedder.load(tiny[0]).embed("a single string")


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop("bert.encoder.layer.1.output.dense.bias"), "lacks 1 BERT weights"),
    (lambda t: t.update({"bert.encoder.layer.0.adapter.weight": np.zeros(3, np.float32)}),
     "does not use"),
    (lambda t: t.update({"bert.encoder.layer.0.intermediate.dense.weight":
                         np.zeros((32, 48), np.float32)}), "shape"),
])
def test_bad_weights_are_a_clear_error(tiny, tmp_path, edit, match):
    root, _ = tiny
    tensors = load_file(str(root / "model.safetensors"))
    edit(tensors)
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((root / name).read_bytes())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(BertCheckpointError, match=match):
        Embedder.load(tmp_path)
