"""Parameter counts (by abstract evaluation, nothing allocated) and training FLOPs per token.

Categories, as in the paper's Table 2: token embeddings (decoder input, output projection and
the encoder's own table) are excluded from the headline count; `retrieval` is everything a
baseline lacks (the encoder and the CCA blocks).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from retro_jax.config import ModelConfig
from retro_jax.model import abstract_params

EMBEDDING_NAMES = ("embed", "unembed")


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    total: int
    embedding: int
    non_embedding: int
    retrieval: int  # encoder + CCA (norms included); zero for a baseline

    def as_json(self) -> dict[str, int]:
        return {"params_total": self.total, "params_embedding": self.embedding,
                "params_non_embedding": self.non_embedding, "params_retrieval": self.retrieval}


def is_retrieval_path(path: tuple[str, ...]) -> bool:
    return path[0] == "encoder" or any(p in ("cca", "cca_norm") for p in path)


def is_embedding_path(path: tuple[str, ...]) -> bool:
    return any(p in EMBEDDING_NAMES for p in path)


def param_counts(cfg: ModelConfig) -> ParamCounts:
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]
    total = emb = ret = 0
    for keypath, leaf in flat:
        path = tuple(getattr(k, "key", str(k)) for k in keypath)
        size = int(np.prod(leaf.shape))
        total += size
        emb += size if is_embedding_path(path) else 0
        ret += size if is_retrieval_path(path) and not is_embedding_path(path) else 0
    return ParamCounts(total=total, embedding=emb, non_embedding=total - emb, retrieval=ret)


def _attention_flops(q_width: int, kv_width: int, attn: int, n_q: int, n_k: int,
                     n_rel: int, kv_rows: float | None = None, score_share: float = 1.0) -> float:
    """Forward FLOPs of one RelativeAttention call with n_q queries (per call).

    Counts what the code computes: q/o projections on the queries, k/v on kv_rows rows,
    the projected relative table (n_rel distances), content and position logits, and the
    weighted sum of values.
    """
    kv_rows = n_k if kv_rows is None else kv_rows
    proj = 2 * n_q * q_width * attn * 2 + 2 * kv_rows * kv_width * attn * 2 + 2 * n_rel * q_width * attn
    scores = 2 * n_q * n_k * attn * 2 + 2 * n_q * n_rel * attn
    return proj + score_share * scores


def flops_per_token(cfg: ModelConfig, seq_len: int = 2048, num_neighbours: int | None = None,
                    training: bool = True, causal_pairs: bool = False) -> float:
    """Model FLOPs per decoder token (matmuls only; x3 for forward+backward when training).

    Attention is counted over the full (unmasked) score matrix, as model.attention=dense computes
    it; with causal_pairs the decoder's causal self-attention counts only the n(n+1)/2 query-key
    pairs (and distances) the mask lets through, the work that needs doing (blocked computes
    that plus the upper halves of its diagonal blocks).
    The encoder runs on K*r neighbour tokens per chunk of m tokens.
    """
    n, m, d, a = seq_len, cfg.chunk_size, cfg.d_model, cfg.attn_width
    k = cfg.num_neighbours if num_neighbours is None else num_neighbours
    r = cfg.neighbour_len
    chunks = math.ceil(n / m)
    per_seq = 0.0
    for i in range(1, cfg.num_layers + 1):
        per_seq += _attention_flops(d, d, a, n, n, n, score_share=(n + 1) / (2 * n) if causal_pairs else 1.0)
        per_seq += 2 * n * 2 * d * cfg.d_ff
        if i in cfg.cca_layers:  # per attending chunk: m queries over k*r keys
            per_seq += chunks * _attention_flops(d, cfg.enc_d_model, a, m, k * r, m + r - 1)
    if cfg.is_retro:
        de, ae = cfg.enc_d_model, cfg.enc_attn_width
        nb = chunks * k  # neighbours per sequence
        for i in range(1, cfg.enc_num_layers + 1):
            per_seq += nb * _attention_flops(de, de, ae, r, r, 2 * r - 1)
            per_seq += nb * 2 * r * 2 * de * cfg.enc_d_ff
            if i in cfg.enc_cross_layers:  # k*r queries per chunk over the chunk's m rows
                per_seq += chunks * _attention_flops(de, d, ae, k * r, m, r + m - 1)
    per_seq += 2 * n * d * cfg.vocab_size  # output logits
    forward = per_seq / n
    return 3 * forward if training else forward
