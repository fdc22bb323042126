"""Stand-ins for tests and benchmarks (bench/ puts tests/ on its path): random batches of the right
shapes and random BERT weights."""

from __future__ import annotations

from typing import Any

import numpy as np


def random_batch(cfg: Any, batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens and neighbours of the right shapes for a ModelConfig `cfg`."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, cfg.vocab_size, (batch, seq_len + 1), dtype=np.int32)
    out = {"tokens": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": np.ones((batch, seq_len), np.float32)}
    if cfg.is_retro:
        chunks = -(-seq_len // cfg.chunk_size)
        out["neighbours"] = rng.integers(0, cfg.vocab_size, (batch, chunks, cfg.num_neighbours, cfg.neighbour_len),
                                         dtype=np.int32)
    return out


def random_hf_weights(cfg: dict[str, Any], rng: np.random.Generator, std: float = 0.3) -> dict[str, np.ndarray]:
    """Random BertModel weights with Hugging Face names and torch's Linear layout ([out, in]).

    A stand-in checkpoint (with `cfg` as its config.json) for tests and memory benchmarks,
    where the real model would be too slow; `hf_to_flax` loads it like any other."""
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    r = lambda *shape: rng.normal(0, std, shape).astype(np.float32)  # noqa: E731
    t = {"embeddings.word_embeddings.weight": r(cfg["vocab_size"], d),
         "embeddings.position_embeddings.weight": r(cfg["max_position_embeddings"], d),
         "embeddings.token_type_embeddings.weight": r(cfg["type_vocab_size"], d),
         "embeddings.LayerNorm.weight": 1 + r(d), "embeddings.LayerNorm.bias": r(d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            t[p + n + ".weight"], t[p + n + ".bias"] = r(d, d), r(d)
        t[p + "intermediate.dense.weight"], t[p + "intermediate.dense.bias"] = r(f, d), r(f)
        t[p + "output.dense.weight"], t[p + "output.dense.bias"] = r(d, f), r(d)
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + n + ".weight"], t[p + n + ".bias"] = 1 + r(d), r(d)
    return t
