"""Shared fixtures for the database tests: a tiny generated corpus, a tiny random BERT, one build."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from retro_jax.data.split import is_validation
from _stand_ins import random_hf_weights

SEED, VAL_FRACTION = 0, 0.2
WORDS = [f"{a}{b}{c}" for a in "bdfgklmnprst" for b in "aeiou" for c in "nrstl"][:240]
# Small and fast: SentencePiece vocab 400, 64-token blocks -> several embedding blocks.
BUILD = dict(val_fraction=VAL_FRACTION, seed=SEED, vocab_size=400, chunk_size=32, embed_batch_size=16,
             max_length=64, index_mode="exact", neighbours_stored=10, progress=False, embed_block=64)
_CACHE: dict[str, Any] = {}


def write_corpus(root: Path, n_docs: int = 36, seed: int = 0, min_validation: int = 3) -> list[Path]:
    """At least n_docs .txt documents of random words (each doc draws from its own topic of words),
    more if needed for `min_validation` of them to hash into the validation split."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    d = 0
    while d < n_docs or len(validation_paths(paths)) < min_validation:  # the split hashes the path
        topic = rng.choice(len(WORDS), 30, replace=False)
        lines = [" ".join(WORDS[w] for w in rng.choice(topic, rng.integers(4, 12)))
                 for _ in range(rng.integers(8, 40))]
        path = root / f"doc{d:03d}.txt"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
        d += 1
    return paths


def validation_paths(paths: list[Path]) -> list[Path]:
    return [p for p in paths if is_validation(str(p), SEED, VAL_FRACTION)]


def write_wordpiece_tokenizer(root: Path, words) -> dict[str, int]:
    """A BERT-style WordPiece tokenizer.json over `words` (plus the special tokens); its vocab."""
    root.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(root / "tokenizer.json"))
    return vocab


def write_tiny_bert(root: Path, seed: int = 0) -> Path:
    """A random 2-layer BERT (config.json, model.safetensors, WordPiece tokenizer.json) over WORDS."""
    vocab = write_wordpiece_tokenizer(root, WORDS)
    d, f, n_pos = 32, 48, 128
    cfg = dict(vocab_size=len(vocab), hidden_size=d, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=f, hidden_act="gelu", layer_norm_eps=1e-12,
               max_position_embeddings=n_pos, type_vocab_size=2, model_type="bert")
    (root / "config.json").write_text(json.dumps(cfg))
    t = random_hf_weights(cfg, np.random.default_rng(seed))
    save_file(t, str(root / "model.safetensors"))
    return root


def shared(tmp_path_factory: Any) -> dict[str, Any]:
    """One corpus, one BERT and one complete single-worker build, shared by the whole session."""
    if not _CACHE:
        from retro_jax.retrieval.build import build_database

        base = tmp_path_factory.mktemp("dbshared")
        corpus = write_corpus(base / "corpus")
        bert = write_tiny_bert(base / "bert")
        out = base / "db"
        manifest = build_database([str(base / "corpus")], str(out), embedder=str(bert), **BUILD)
        _CACHE.update(base=base, corpus_dir=base / "corpus", corpus=corpus, bert=bert, db=out, manifest=manifest)
    return _CACHE


def npy_files(root: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every .npy and .model file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.suffix in (".npy", ".model")}
