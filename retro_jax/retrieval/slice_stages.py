"""The per-slice build-db stages: tokenizer (shared, trained once), chunks, embeddings.

A slice is the documents with doc_id % W == I (`--worker I --num-workers W`); its arrays live in
`DB_DIR/slices/wI-of-W/` until `retro_jax.retrieval.combine` merges them. The choices these
stages make are written down in `retro_jax.retrieval.build`'s docstring.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from retro_jax.data.chunks import ChunkStore, ChunkWriter
from retro_jax.data.corpus import CorpusStats, iter_documents
from retro_jax.data.dedup import NearDuplicateFilter
from retro_jax.data.split import is_validation, sampled
from retro_jax.data.tokenizer import Tokenizer, train_tokenizer
from retro_jax.retrieval import database as dbl
from retro_jax.retrieval.stages import BuildError, Stage, chunk_settings, read_json, write_json

log = logging.getLogger(__name__)

EMBED_BLOCK = 1024
_EMBEDDERS: dict[tuple, Any] = {}


def load_embedder(path: str | None, max_length: int, batch_size: int) -> Any:
    """Embedder.load, cached per process (tests and reruns skip reloading and recompiling)."""
    from retro_jax.retrieval.bert import Embedder

    stamp = None
    if path is not None:
        weights = Path(path) / "model.safetensors"
        stamp = (weights.stat().st_mtime_ns, weights.stat().st_size) if weights.is_file() else None
    key = (None if path is None else os.path.abspath(path), stamp, max_length, batch_size)
    if key not in _EMBEDDERS:
        _EMBEDDERS.clear()
        _EMBEDDERS[key] = Embedder.load(path, max_length=max_length, batch_size=batch_size)
    return _EMBEDDERS[key]


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_stage(root: Path, s: dict[str, Any], given: str | None, worker: int,
                     overwrite: bool, progress: bool) -> Tokenizer:
    target = root / dbl.TOKENIZER_FILE
    stage = Stage(root / "stages" / "tokenizer.json", [target], overwrite, str(root))
    rec = read_json(stage.path) or {}
    have = rec.get("result", {}).get("sha256") if rec.get("complete") else None
    if given is not None:
        tok = Tokenizer.load(given)
        if have == tok.sha256:
            return Tokenizer.load(str(target))
        settings = {"source": "given", "sha256": tok.sha256}
        if stage.start(settings) is None:
            if os.path.abspath(given) != os.path.abspath(target):
                shutil.copyfile(given, str(target) + ".tmp")
                os.replace(str(target) + ".tmp", target)
            stage.finish({"sha256": tok.sha256, "vocab_size": tok.vocab_size})
            log.info("copied tokenizer %s (sha256 %s) to %s", given, tok.sha256[:12], target)
        return Tokenizer.load(str(target))
    if have is not None and rec["settings"].get("source") == "given":
        return Tokenizer.load(str(target))  # built with a given tokenizer: keep using it
    settings = {"source": "trained", **{k: s[k] for k in
                                        ("corpus", "max_documents", "val_fraction", "seed", "vocab_size")}}
    if have is None and worker != 0:
        raise BuildError(
            f"worker {worker} needs the shared tokenizer, and {target} is not complete: run worker 0 "
            f"first (it trains the tokenizer), then pass --tokenizer {target} (or reuse the same --out)")
    if stage.start(settings) is not None:
        return Tokenizer.load(str(target))
    texts = (d.text for d in iter_documents(s["corpus_paths"], s["max_documents"])
             if not is_validation(d.source, s["seed"], s["val_fraction"]))
    tok = train_tokenizer(texts, str(target.with_suffix("")), vocab_size=s["vocab_size"],
                          seed=s["seed"], progress=progress)
    stage.finish({"sha256": tok.sha256, "vocab_size": tok.vocab_size})
    return tok


# ----------------------------------------------------------------------------- chunks


def chunks_stage(sdir: Path, s: dict[str, Any], tok: Tokenizer, worker: int, overwrite: bool,
                  progress: bool) -> dict[str, Any]:
    settings = {**chunk_settings(s), "tokenizer_sha256": tok.sha256, "worker": worker}
    keep = settings.get("sample_documents", 1.0)
    outs = [dbl.chunks_dir(sdir, split) for split in dbl.SPLITS]
    stage = Stage(sdir / "stages" / "chunks.json", outs, overwrite, str(sdir))
    done = stage.start(settings)
    if done is not None:
        return done
    paths, seed, frac, w = s["corpus_paths"], s["seed"], s["val_fraction"], s["num_workers"]
    stats = CorpusStats()
    refs = NearDuplicateFilter() if s["dedup"] else None
    for doc in tqdm(iter_documents(paths, s["max_documents"], stats=stats), desc="documents: split",
                    unit="doc", disable=not progress):
        if refs is not None and is_validation(doc.source, seed, frac) and sampled(doc.source, seed, keep):
            refs.add_reference(doc.doc_id, doc.text)
    # Every document's tokens end with the tokenizer's EOS (module docstring of build.py); a
    # document is kept when its TEXT fills at least one chunk, hence min_tokens m + 1.
    writers = {split: ChunkWriter(str(dbl.chunks_dir(sdir, split)), s["chunk_size"],
                                  token_num_bytes=tok.token_num_bytes(), pad_id=tok.pad_id,
                                  min_tokens=s["chunk_size"] + 1, overwrite=True) for split in dbl.SPLITS}
    near_dups, short = [], []
    bar = tqdm(total=stats.documents, desc=f"chunks (slice {worker}/{w})", unit="doc", disable=not progress)
    for doc in iter_documents(paths, s["max_documents"]):
        bar.update(1)
        if doc.doc_id % w != worker or not sampled(doc.source, seed, keep):
            continue
        split = "validation" if is_validation(doc.source, seed, frac) else "train"
        if split == "train" and refs is not None and refs.is_near_duplicate(doc.text):
            near_dups.append(doc.doc_id)
            continue
        if writers[split].add(doc.doc_id, [*tok.encode(doc.text), tok.eos_id]) == 0:
            short.append(doc.doc_id)
        if s["max_chunks"] and writers["train"].stats.chunks >= s["max_chunks"]:
            log.info("reached --max-chunks %d at document %d; stopping", s["max_chunks"], doc.doc_id)
            break
    bar.close()
    result: dict[str, Any] = {
        "corpus": {"documents_read": stats.documents, "skipped_empty": stats.skipped_empty,
                   "skipped_malformed": stats.skipped_malformed, "decode_errors": stats.decode_errors,
                   "bytes_read": stats.bytes},
        "near_duplicate_doc_ids": near_dups, "short_doc_ids": short,
    }
    for split, writer in writers.items():
        writer.close()
        result[split] = {"num_chunks": writer.stats.chunks,
                         "tokens_sha256": dbl.sha256_file(dbl.chunks_dir(sdir, split) / "tokens.npy")}
    return stage.finish(result)


# ----------------------------------------------------------------------------- embeddings


def _embed_split(store: ChunkStore, tok: Tokenizer, embedder: Any, out: Path, settings: dict[str, Any],
                 block: int, progress: bool) -> None:
    """Fill `out` (float32 [C, D]) block by block; resumable via `out`.progress.json."""
    side = out.with_suffix(".progress.json")
    n, dim = store.num_chunks, embedder.dim
    state = read_json(side)
    if state is None or state["settings"] != settings or not out.is_file():
        state = {"settings": settings, "blocks_done": 0}
        write_json(side, state)
        np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(n, dim)).flush()
    elif state["blocks_done"]:
        log.info("resuming embeddings %s after block %d", out, state["blocks_done"])
    emb = np.lib.format.open_memmap(out, mode="r+")
    num_blocks = -(-n // block)
    bar = tqdm(total=n, initial=min(n, state["blocks_done"] * block), desc=f"embed {out.parent.name}",
               unit="chunk", disable=not progress)
    for b in range(state["blocks_done"], num_blocks):
        b0, b1 = b * block, min(n, (b + 1) * block)
        emb[b0:b1] = embedder.embed([tok.decode(store.chunk_tokens(i)) for i in range(b0, b1)])
        emb.flush()
        state["blocks_done"] = b + 1
        write_json(side, state)
        bar.update(b1 - b0)
    bar.close()
    log.info("wrote embeddings float32 [%d, %d] to %s", n, dim, out)


def embed_stage(sdir: Path, chunks: dict[str, Any], tok: Tokenizer, embedder: Any, path: str | None,
                 block: int, overwrite: bool, progress: bool) -> dict[str, Any]:
    settings = {"embedder": embedder.name, "max_length": embedder.max_length,
                "batch_size": embedder.batch_size, "block": block,
                "tokens_sha256": {split: chunks[split]["tokens_sha256"] for split in dbl.SPLITS}}
    outs = [p for split in dbl.SPLITS for p in
            (dbl.embeddings_path(sdir, split), dbl.embeddings_path(sdir, split).with_suffix(".progress.json"))]
    stage = Stage(sdir / "stages" / "embed.json", outs, overwrite, str(sdir))
    done = stage.start(settings)
    if done is not None:
        return done
    for split in dbl.SPLITS:
        store = ChunkStore.open(str(dbl.chunks_dir(sdir, split)))
        split_settings = {**settings, "split": split}
        _embed_split(store, tok, embedder, dbl.embeddings_path(sdir, split), split_settings, block, progress)
    return stage.finish({"dim": embedder.dim, "name": embedder.name,
                         "path": None if path is None else os.path.abspath(path)})
