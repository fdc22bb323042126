"""Generate text from an exported model, retrieving neighbours live at every chunk boundary.

    gen = Generator("export/", "db/")                      # what `retro-jax generate` calls
    gen = Generator.from_params(cfg, params, tokenizer)    # parameters in memory, retrieval off
    out = gen.generate(["The quick brown fox"], max_new_tokens=64, temperature=0)
    out[0].text, out[0].neighbours

Decoding runs the cached step of model/decode.py, jitted once (one compiled step for ordinary
positions and one for chunk boundaries, whatever the number of tokens). Rules:

- Every prompt is its own sequence starting at position 0, as documents were in training (no
  BOS token). The prompts of a batch advance together, one position per step: a row whose prompt
  is longer than the shortest one is fed its own prompt tokens until they run out, then samples;
  so the rule for any prompt length, a multiple of 64 or not, is that the tokens are those of the
  prompt followed by the continuation, and chunks are the 64-token blocks of that sequence.
- At position t = u*m + m-1 chunk u of every row is complete (prompt or generated tokens): it is
  decoded to text, embedded with the database's frozen BERT, its neighbours are searched in the
  database's index and passed to the step, which encodes them once; positions u*m + m-1 ..
  u*m + 2m-2 read them through CCA, exactly as in training. The first m-1 positions read none.
- Retrieval searches the whole database: if the prompt's own text (or a near copy) is in it, the
  model can read its continuation from the neighbours. That is leakage, not generalisation
  (see `retro-jax eval`): `show_neighbours` shows what each chunk read.
- Tokens are drawn from the tokenizer's vocabulary only (a model's vocab_size may be larger).
- Each row gets max_new_tokens new tokens, fewer if it samples the tokenizer's EOS (which ends it;
  the other rows go on). build-db ends every document with EOS, so a model trained on such a
  database learns to emit it where a document ends (one trained on a database built before that,
  whose manifest records no `document_end`, never saw it and runs to max_new_tokens).
- temperature 0 is greedy (argmax) and deterministic; otherwise softmax sampling at that
  temperature, restricted to the top_k most likely tokens (0: all) and to the smallest set whose
  probability reaches top_p (1: all), from a PRNG key of `seed`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.data.tokenizer import Tokenizer
from retro_jax.infer.export import TOKENIZER, load_exported, read_export_config
from retro_jax.model.decode import decode_step, init_cache, position_tables


@dataclasses.dataclass
class Generation:
    prompt: str
    text: str  # the continuation only
    tokens: list[int]  # its token ids
    neighbours: list[dict[str, Any]]  # per chunk read: {"chunk", "position", "chunk_text", "neighbours": [text]}


def sample(logits_BxV: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Next tokens [B] from logits: argmax at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_desc = -jnp.sort(-logits, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1)
        # the smallest prefix whose mass reaches top_p: keep tokens at least as likely as its last
        cutoff = jnp.take_along_axis(sorted_desc, jnp.sum(cum < top_p, axis=-1, keepdims=True), axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class Generator:
    """An exported model, its tokenizer and (for retrieval) a database, ready to generate."""

    def __init__(self, model_dir: str | Path, db_dir: str | Path | None = None, *, neighbours: int | None = None,
                 retrieval: bool = True, retriever: Any = None) -> None:
        meta = read_export_config(model_dir)
        cfg, params = load_exported(model_dir)
        tokenizer = Tokenizer.load(str(Path(model_dir) / TOKENIZER))
        if neighbours is not None:
            if neighbours < 1:
                raise ValueError(f"--neighbours must be >= 1, got {neighbours}")
            cfg = dataclasses.replace(cfg, num_neighbours=neighbours)
        if retrieval and cfg.is_retro:
            from retro_jax.retrieval.database import Database, Retriever

            if db_dir is None:
                raise ValueError(f"{cfg.name} retrieves: give the database (--db) or turn retrieval off")
            db = Database.open(db_dir)
            db.check_model(cfg, tokenizer_sha256=meta["tokenizer"]["sha256"])
            retriever = retriever or Retriever(db)
        self._setup(cfg, params, tokenizer, retriever if retrieval and cfg.is_retro else None)

    @classmethod
    def from_params(cls, cfg: Any, params: Any, tokenizer: Tokenizer, retriever: Any = None) -> "Generator":
        """A generator over parameters in memory (no export folder read, no database checked);
        retrieval is on when `retriever` is given and the model has CCA layers."""
        self = cls.__new__(cls)
        self._setup(cfg, params, tokenizer, retriever if cfg.is_retro else None)
        return self

    def _setup(self, cfg: Any, params: Any, tokenizer: Tokenizer, retriever: Any) -> None:
        self.cfg, self.tokenizer, self.retriever = cfg, tokenizer, retriever
        self.retrieval = retriever is not None
        self.params = jax.device_put(params)
        self._step = jax.jit(functools.partial(decode_step, cfg=cfg, retrieval=self.retrieval), donate_argnums=2)
        self._sample = jax.jit(sample, static_argnums=(2, 3, 4))
        self._tables: dict[int, Any] = {}
        self.timings: dict[str, float] = {}

    def tables(self, max_len: int) -> Any:
        if max_len not in self._tables:
            self._tables = {max_len: jax.jit(position_tables, static_argnums=(1, 2))(self.params, self.cfg, max_len)}
        return self._tables[max_len]

    def _neighbours(self, chunks_BxM: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.retriever.neighbours_for_chunks(chunks_BxM, self.cfg.num_neighbours)
        self.timings["retrieval_s"] = self.timings.get("retrieval_s", 0.0) + time.perf_counter() - t0
        return out

    def generate(self, prompts: list[str], max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, show_neighbours: bool = False,
                 progress: bool = False) -> list[Generation]:
        """One Generation per prompt (see the module docstring for the rules)."""
        if not prompts:
            raise ValueError("no prompts")
        if max_new_tokens < 1 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
            raise ValueError("need max_new_tokens >= 1, temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
        encoded = [self.tokenizer.encode(p) for p in prompts]
        if any(not e for e in encoded):
            raise ValueError("every prompt needs at least one token")
        cfg, m = self.cfg, self.cfg.chunk_size
        b, lens = len(prompts), np.array([len(e) for e in encoded])
        total = int(lens.max()) + max_new_tokens
        seq = np.zeros((b, total), np.int32)
        for i, e in enumerate(encoded):
            seq[i, :len(e)] = e
        cache = init_cache(cfg, b, total, self.retrieval)
        tables, key = self.tables(total), jax.random.key(seed)
        done = np.zeros(b, bool)
        eos = self.tokenizer.eos_id
        read: list[list[dict[str, Any]]] = [[] for _ in range(b)]
        self.timings = {"retrieval_s": 0.0, "steps": 0}
        t_start = time.perf_counter()
        steps = range(total - 1)
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="generate", unit="tok")
        for t in steps:
            nb = None
            if self.retrieval and t % m == m - 1:
                nb = self._neighbours(seq[:, t - m + 1:t + 1])
                if show_neighbours:
                    self._record(read, seq, nb, t)
            logits, cache = self._step(self.params, tables, cache, jnp.asarray(seq[:, t:t + 1]), jnp.int32(t), nb)
            nxt = np.asarray(self._sample(logits[:, :self.tokenizer.vocab_size], jax.random.fold_in(key, t),
                                          float(temperature), int(top_k),
                                          float(top_p)))
            gen = (t + 1 >= lens) & (t + 1 < lens + max_new_tokens) & ~done
            seq[gen, t + 1] = nxt[gen]
            done |= gen & (nxt == eos)
            if (done | (t + 1 >= lens + max_new_tokens - 1)).all():  # every row has its last token
                break
        self.timings.update(total_s=time.perf_counter() - t_start, steps=t + 1)
        out = []
        for i, p in enumerate(prompts):
            new = seq[i, lens[i]:lens[i] + max_new_tokens].tolist()
            if eos in new:
                new = new[:new.index(eos)]
            out.append(Generation(p, self.tokenizer.decode(new), new, read[i]))
        return out

    def _record(self, read: list[list[dict[str, Any]]], seq: np.ndarray, nb: np.ndarray, t: int) -> None:
        m = self.cfg.chunk_size
        for i in range(len(read)):
            read[i].append({"chunk": t // m, "position": t, "chunk_text": self.tokenizer.decode(seq[i, t - m + 1:t + 1]),
                            "neighbours": [self.tokenizer.decode([x for x in row if x >= 0]) for row in nb[i]]})
