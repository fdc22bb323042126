"""Combine: merge the slices' chunks and embeddings into DB_DIR in doc_id order.

Re-applies `max_chunks` globally, so W workers give the database one worker would; streams one
document run at a time from the slices' memmaps into the merged arrays. The combine lock keeps
two finishing workers from merging at once (a lock left by a dead process is taken over).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from retro_jax.data.chunks import ChunkStore, ChunkWriter
from retro_jax.data.processes import process_alive
from retro_jax.data.tokenizer import Tokenizer
from retro_jax.retrieval import database as dbl
from retro_jax.retrieval.stages import BuildError, Stage, chunk_settings, diff_settings, read_json

log = logging.getLogger(__name__)


def take_lock(lock: Path) -> bool:
    """Create `lock` exclusively (content host:pid); a lock left by a dead process on this host is taken over."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            host, _, pid = lock.read_text().rpartition(":")
            if host != socket.gethostname() or not pid.isdigit() or process_alive(int(pid)):
                return False
            log.warning("removing stale %s left by dead process %s", lock, pid)
            lock.unlink(missing_ok=True)
            continue
        os.write(fd, f"{socket.gethostname()}:{os.getpid()}".encode())
        os.close(fd)
        return True
    return False


def _doc_runs(doc_ids: np.ndarray, block: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """(doc ids, start rows) of each document's contiguous run of chunks, read block by block."""
    docs, starts, prev = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], None
    for b0 in range(0, len(doc_ids), block):
        d = np.asarray(doc_ids[b0:b0 + block])
        new = np.ones(len(d), bool)
        new[1:] = d[1:] != d[:-1]
        new[0] = d[0] != prev
        idx = np.flatnonzero(new)
        docs.append(d[idx].astype(np.int64))
        starts.append(idx.astype(np.int64) + b0)
        prev = d[-1]
    return np.concatenate(docs), np.concatenate(starts)


def _plan(stores: list[ChunkStore]) -> np.ndarray:
    """int64 [R, 4] rows (doc, slice, start, end), sorted by doc: how to merge the slices."""
    rows = [np.zeros((0, 4), np.int64)]
    for i, store in enumerate(stores):
        docs, starts = _doc_runs(store.doc_ids)
        ends = np.append(starts[1:], store.num_chunks)[:len(starts)]
        rows.append(np.stack([docs, np.full_like(docs, i), starts, ends], 1))
    plan = np.concatenate(rows)
    return plan[np.argsort(plan[:, 0], kind="stable")]


def combine_slices(root: Path, dirs: list[Path], overwrite: bool, progress: bool
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge slice chunks and embeddings into DB_DIR/{train,validation} in doc_id order.

    Returns (the slices' build settings, {counts, corpus, embedder, checksums})."""
    recs = [{n: read_json(d / "stages" / f"{n}.json") for n in ("chunks", "embed")} for d in dirs]
    stage = Stage(root / "stages" / "combine.json", [root / s for s in dbl.SPLITS], overwrite, str(root))
    rec = read_json(stage.path) or {}
    if rec.get("complete") and not all(r["chunks"] for r in recs):  # slices deleted after a combine
        return rec["result"]["settings"], rec["result"]
    if not all(r["chunks"] and r["embed"] for r in recs):
        raise BuildError(f"cannot combine {str(root)!r}: some of its {len(dirs)} slices are missing")
    base = {k: v for k, v in recs[0]["chunks"]["settings"].items() if k != "worker"}
    for i, r in enumerate(recs):
        diff = diff_settings(base, {k: v for k, v in r["chunks"]["settings"].items() if k != "worker"})
        diff += diff_settings({k: v for k, v in recs[0]["embed"]["settings"].items() if k != "tokens_sha256"},
                              {k: v for k, v in r["embed"]["settings"].items() if k != "tokens_sha256"})
        if diff:
            raise BuildError(f"slice {i} was built with other settings than slice 0 ({'; '.join(diff)})")
    done = stage.start({"num_workers": len(dirs), "slices": [r["embed"]["settings"]["tokens_sha256"] for r in recs]})
    if done is not None:
        return done["settings"], done
    e = recs[0]["embed"]
    tok_rec = read_json(root / "stages" / "tokenizer.json")
    settings = chunk_settings(base)
    settings |= {"vocab_size": tok_rec["settings"].get("vocab_size"), "embedder": e["settings"]["embedder"],
                 "max_length": e["settings"]["max_length"], "embed_batch_size": e["settings"]["batch_size"],
                 "embed_block": e["settings"]["block"]}
    plans = {sp: _plan([ChunkStore.open(str(dbl.chunks_dir(d, sp))) for d in dirs]) for sp in dbl.SPLITS}
    train = plans["train"]
    cutoff = np.iinfo(np.int64).max
    if base["max_chunks"]:
        reach = np.flatnonzero(np.cumsum(train[:, 3] - train[:, 2]) >= base["max_chunks"])
        cutoff = int(train[reach[0], 0]) if reach.size else cutoff
    plans = {"train": train[train[:, 0] <= cutoff], "validation": plans["validation"][plans["validation"][:, 0] < cutoff]}
    corpus = dict(recs[0]["chunks"]["result"]["corpus"])
    for key, name in (("near_duplicates_removed", "near_duplicate_doc_ids"), ("skipped_short", "short_doc_ids")):
        corpus[key] = sum(int(np.sum(np.asarray(r["chunks"]["result"][name], np.int64) <= cutoff)) for r in recs)
    if len(plans["train"]) == 0:
        raise BuildError(
            f"no training chunks: {corpus['documents_read']} documents read, {corpus['skipped_empty']} empty, "
            f"{corpus['skipped_short']} shorter than one chunk ({base['chunk_size']} tokens), "
            f"{corpus['near_duplicates_removed']} near-duplicates of validation documents; "
            "give a larger corpus or a smaller --val-fraction")
    tok = Tokenizer.load(str(root / dbl.TOKENIZER_FILE))
    m, dim, counts, sums = base["chunk_size"], int(e["result"]["dim"]), {}, {}
    for split, plan in plans.items():
        stores = [ChunkStore.open(str(dbl.chunks_dir(d, split))) for d in dirs]
        embs = [np.load(dbl.embeddings_path(d, split), mmap_mode="r", allow_pickle=False) for d in dirs]
        writer = ChunkWriter(str(dbl.chunks_dir(root, split)), m, token_num_bytes=tok.token_num_bytes(),
                             pad_id=tok.pad_id, overwrite=True)
        total = int(np.sum(plan[:, 3] - plan[:, 2]))
        out = np.lib.format.open_memmap(dbl.embeddings_path(root, split), mode="w+", dtype=np.float32,
                                        shape=(total, dim))
        offset = 0
        for doc, i, start, end in tqdm(plan.tolist(), desc=f"combine {split}", unit="doc", disable=not progress):
            n_tokens = (end - start - 1) * m + int(stores[i].lengths[end - 1])
            writer.add(doc, np.asarray(stores[i].tokens[start:end]).reshape(-1)[:n_tokens])
            out[offset:offset + end - start] = embs[i][start:end]
            offset += end - start
        out.flush()
        del out
        writer.close()
        merged = ChunkStore.open(str(dbl.chunks_dir(root, split)))
        counts[split] = {"documents": writer.stats.documents, "chunks": writer.stats.chunks,
                         "tokens": writer.stats.tokens, "bytes": int(np.sum(merged.num_bytes, dtype=np.int64))}
        for rel in (f"{split}/embeddings.npy", f"{split}/chunks/tokens.npy"):
            sums[rel] = dbl.sha256_file(root / rel)
    if counts["validation"]["chunks"] == 0:
        log.warning("no validation chunks (val_fraction %s): the database has no evaluation queries",
                    base["val_fraction"])
    embedder = {"name": e["settings"]["embedder"], "path": e["result"]["path"], "dim": dim,
                "max_length": e["settings"]["max_length"]}
    log.info("combined %d slice(s) into %s: %s", len(dirs), root, counts)
    return settings, stage.finish({"settings": settings, "tokenizer_sha256": tok.sha256, "counts": counts, "corpus": corpus,
                                   "embedder": embedder, "checksums": sums})
