"""build-db: corpus -> tokenizer -> chunks -> embeddings -> (combine) -> index -> neighbours -> manifest.

Every stage records its settings and result in `DB_DIR/stages/NAME.json` (slice stages in
`DB_DIR/slices/wI-of-W/stages/`); a complete stage with the same settings is skipped, an
incomplete one is redone (embeddings and neighbours resume block by block), and a stage whose
settings differ is an error naming the setting, unless `overwrite=True` (then that stage and,
through their recorded inputs, every later one are rebuilt).

Stages and the choices written down here:
* tokenizer (shared): SentencePiece trained on the TRAINING-split documents (the hash split of
  `retro_jax.data.split`; validation text never shapes the vocabulary). Near-duplicate removal is
  not applied to this sample. Or a given model (`tokenizer=`), copied into DB_DIR.
* chunks (per slice): pass 1 streams the whole corpus and MinHashes every validation document;
  pass 2 streams it again and, for the slice's documents (doc_id % W == I), sends validation
  documents to validation chunks and training documents that are not near-duplicates to train
  chunks. Every document's tokens end with the tokenizer's EOS id (settings `document_end: eos`),
  so the chunk holding a document's end carries it: the model learns where documents end and
  generation's stop-at-EOS can fire; EOS decodes to no text and counts 0 bytes (bits-per-byte
  scores predicting it at no byte cost), and a chunk of EOS alone (a document that filled its
  last chunk) embeds the empty text. Documents whose text is shorter than one chunk are skipped
  and counted (a neighbour needs a full chunk). With `max_chunks`, reading stops after the
  training document that reaches it.
  With `sample_documents` = p < 1, each document (of either split) is kept with probability p,
  by a seeded hash of its source: a small database drawn from the whole corpus, not from
  whatever folder sorts first (the same documents on every machine and every worker).
* embed (per slice): chunk text (decoded) through the frozen BERT, in fixed blocks of
  `embed_block` chunks written into a preallocated .npy memmap; a sidecar records finished
  blocks, so a killed run resumes to byte-identical arrays.
* combine: merges the slices in doc_id order (re-applying `max_chunks` globally), so W workers
  give the database one worker would. Runs when the last slice finishes, or with `combine=True`.
* index, neighbours (>= 10 per chunk for evaluation; same-document chunks excluded), manifest.

Scale-out order: worker 0 (or a first run) trains DB_DIR/tokenizer.model; then every worker
`--worker I --num-workers W` (same --out, or `--tokenizer DB_DIR/tokenizer.model`); the last one
to finish combines (or run `--combine`).

Code: stage records in `stages`, the slice stages in `slice_stages`, the merge in `combine`;
this module drives them and runs index, neighbours and manifest.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from retro_jax.data.chunks import ChunkStore
from retro_jax.data.corpus import CorpusError
from retro_jax.data.tokenizer import Tokenizer
from retro_jax.retrieval import database as dbl
from retro_jax.retrieval.combine import combine_slices, take_lock
from retro_jax.retrieval.index import IndexConfig, ShardedIndex
from retro_jax.retrieval.neighbours import compute_neighbours, distances_path, progress_path
from retro_jax.retrieval.slice_stages import EMBED_BLOCK, chunks_stage, embed_stage, load_embedder, tokenizer_stage
from retro_jax.retrieval.stages import (DOCUMENT_END, BuildError, Stage, chunk_settings, diff_settings,
                                        read_json, slice_dir, write_json)

__all__ = ["BuildError", "build_database", "load_embedder"]

log = logging.getLogger(__name__)

NEIGHBOUR_BATCH = 4096
COMBINE_KEYS = ("num_workers", "shards", "index_mode", "neighbours_stored")


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("jax", "flax", "scann", "sentencepiece", "tokenizers", "numpy", "retro-jax"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# ----------------------------------------------------------------------------- index + neighbours


def _index_stage(root: Path, s: dict[str, Any], combined: dict[str, Any], overwrite: bool,
                 progress: bool) -> dict[str, Any]:
    settings = {"shards": s["shards"], "index_mode": s["index_mode"],
                "embeddings_sha256": combined["checksums"]["train/embeddings.npy"]}
    stage = Stage(root / "stages" / "index.json", [root / "index"], overwrite, str(root))
    done = stage.start(settings)
    if done is not None:
        return done
    emb = np.load(dbl.embeddings_path(root, "train"), mmap_mode="r", allow_pickle=False)
    if s["shards"] > emb.shape[0]:
        raise BuildError(f"--shards {s['shards']} is more than the {emb.shape[0]} database chunks")
    index = ShardedIndex.build(emb, root / "index", IndexConfig(mode=s["index_mode"]), s["shards"],
                               progress=progress)
    shards = [{"start": m["start"], "end": m["end"], **m["config"]} for m in index.meta["shards"]]
    return stage.finish({"shards": shards, "size": index.size, "dim": index.dim,
                         "index_json_sha256": dbl.sha256_file(root / "index" / "index.json")})


def _neighbours_stage(root: Path, s: dict[str, Any], index_result: dict[str, Any], sums: dict[str, str],
                      overwrite: bool, progress: bool) -> dict[str, Any]:
    k = s["neighbours_stored"]
    settings = {"k": k, "batch_size": NEIGHBOUR_BATCH, "index": index_result["index_json_sha256"],
                "inputs_sha256": sums}
    outs = [p for split in dbl.SPLITS for n in (dbl.neighbours_path(root, split),)
            for p in (n, distances_path(n), progress_path(n))]
    stage = Stage(root / "stages" / "neighbours.json", outs, overwrite, str(root))
    done = stage.start(settings)
    if done is not None:
        return done
    index = ShardedIndex.load(root / "index")
    train_docs = ChunkStore.open(str(dbl.chunks_dir(root, "train"))).doc_ids
    for split in dbl.SPLITS:
        docs = ChunkStore.open(str(dbl.chunks_dir(root, split))).doc_ids
        emb = np.load(dbl.embeddings_path(root, split), mmap_mode="r", allow_pickle=False)
        out = dbl.neighbours_path(root, split)
        if emb.shape[0] == 0:  # no validation documents: empty arrays, not an error
            np.save(out, np.zeros((0, k), np.int64))
            np.save(distances_path(out), np.zeros((0, k), np.float32))
            continue
        compute_neighbours(index, emb, docs, train_docs, k, out, batch_size=NEIGHBOUR_BATCH, progress=progress)
    return stage.finish({"k": k})


# ----------------------------------------------------------------------------- driver


def _settings(corpus: list[str] | None, **kw: Any) -> dict[str, Any]:
    paths = None if corpus is None else [os.path.abspath(os.fspath(p)) for p in corpus]
    return {"corpus": paths or "<stdlib>", "corpus_paths": paths, **kw}


def _check_out(root: Path, overwrite: bool) -> None:
    if root.exists() and not root.is_dir():
        raise BuildError(f"--out {str(root)!r} exists and is not a folder")
    ours = {"stages", "slices", dbl.MANIFEST}
    if root.is_dir() and not overwrite and not ours & {p.name for p in root.iterdir()}:
        if any(root.iterdir()):
            raise BuildError(f"--out {str(root)!r} is not empty and holds no retro-jax database; "
                             "choose a new or empty folder (or pass --overwrite to build into it)")


def build_database(
    corpus: list[str] | None, out: str, *, val_fraction: float = 0.05, seed: int = 0, dedup: bool = True,
    vocab_size: int = 8192, tokenizer: str | None = None, chunk_size: int = 64, embedder: str | None = None,
    embed_batch_size: int = 64, max_length: int = 128, shards: int = 1, index_mode: str = "auto",
    neighbours_stored: int = 10, max_documents: int | None = None, max_chunks: int | None = None,
    sample_documents: float = 1.0, worker: int = 0, num_workers: int = 1, combine: bool = False,
    overwrite: bool = False, progress: bool = True, embed_block: int = EMBED_BLOCK,
) -> dict[str, Any] | None:
    """Build (or resume) the retrieval database in `out`; returns its manifest.

    Returns None when this worker's slice is done but other slices are not yet (the last
    worker, or `combine=True`, combines). See the module docstring for the stages.
    """
    if not 0 <= worker < num_workers:
        raise BuildError(f"--worker must be in [0, --num-workers={num_workers}), got {worker}")
    for name, value, low in (("chunk_size", chunk_size, 1), ("shards", shards, 1), ("neighbours", neighbours_stored, 1),
                             ("max_chunks", max_chunks or 1, 1), ("max_documents", max_documents or 1, 1),
                             ("embed_batch_size", embed_batch_size, 1), ("embed_block", embed_block, 1)):
        if value < low:
            raise BuildError(f"{name} must be >= {low}, got {value}")
    if not 0.0 <= val_fraction < 1.0:
        raise BuildError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not 0.0 < sample_documents <= 1.0:
        raise BuildError(f"--sample-documents must be in (0, 1], got {sample_documents}")
    if index_mode not in ("auto", "exact", "scann"):
        raise BuildError(f"--index-mode must be auto, exact or scann, got {index_mode!r}")
    if neighbours_stored < 10:
        log.warning("storing %d neighbours per chunk; evaluation (leakage filter) wants 10", neighbours_stored)
    missing = [p for p in corpus or [] if not os.path.exists(p)]
    if missing:
        raise CorpusError(f"corpus path does not exist: {os.fspath(missing[0])!r}")
    root = Path(out)
    _check_out(root, overwrite)
    s = _settings(corpus, max_documents=max_documents, val_fraction=val_fraction, seed=seed, dedup=dedup,
                  vocab_size=vocab_size, chunk_size=chunk_size, max_chunks=max_chunks, num_workers=num_workers,
                  shards=shards, index_mode=index_mode, neighbours_stored=neighbours_stored,
                  document_end=DOCUMENT_END)
    if sample_documents < 1.0:  # recorded only when used, so databases built before it still match
        s["sample_documents"] = float(sample_documents)
    emb = None if combine else load_embedder(embedder, max_length, embed_batch_size)
    s["embedder_path"] = embedder
    if emb is not None:
        s |= {"embedder": emb.name, "max_length": max_length, "embed_batch_size": embed_batch_size,
              "embed_block": embed_block}
    manifest = read_json(root / dbl.MANIFEST)
    if manifest is not None:
        keys = COMBINE_KEYS if combine else [k for k in s if k not in ("corpus_paths", "embedder_path")]
        if tokenizer is not None or manifest["tokenizer"]["source"] == "given":
            keys = [k for k in keys if k != "vocab_size"]
        diff = diff_settings({k: manifest["settings"].get(k) for k in keys}, {k: s[k] for k in keys})
        if tokenizer is not None and Tokenizer.load(tokenizer).sha256 != manifest["tokenizer"]["sha256"]:
            diff.append(f"tokenizer: built with sha256 {manifest['tokenizer']['sha256'][:16]}, "
                        f"--tokenizer {tokenizer} has sha256 {Tokenizer.load(tokenizer).sha256[:16]}")
        if not diff:
            log.info("database %s is already complete", root)
            return manifest
        if not overwrite:
            raise BuildError(f"{str(root)!r} holds a different database ({'; '.join(diff)}); "
                             "pass --overwrite to rebuild what changed, or choose another --out")
        (root / dbl.MANIFEST).unlink()
    (root / "stages").mkdir(parents=True, exist_ok=True)
    if not combine:
        tok = tokenizer_stage(root, s, tokenizer, worker, overwrite, progress)
        if _combined_already(root, s, tok, tokenizer is not None, overwrite):
            return _combine_and_finish(root, s, combine, overwrite, progress)
        sdir = slice_dir(root, worker, num_workers)
        chunks = chunks_stage(sdir, s, tok, worker, overwrite, progress)
        embed_stage(sdir, chunks, tok, emb, embedder, embed_block, overwrite, progress)
        log.info("slice %d of %d complete in %s", worker, num_workers, sdir)
    return _combine_and_finish(root, s, combine, overwrite, progress)


def _combined_already(root: Path, s: dict[str, Any], tok: Tokenizer, given: bool, overwrite: bool) -> bool:
    """True if the slices were already merged with these settings (they may be deleted by now)."""
    path = root / "stages" / "combine.json"
    rec = read_json(path) or {}
    if not rec.get("complete"):
        return False
    old = {**rec["result"]["settings"], "tokenizer_sha256": rec["result"].get("tokenizer_sha256")}
    # chunk_settings' keys too: a merge recorded before a chunk setting existed (document_end) differs
    new = {**{k: s.get(k) for k in set(old) | set(chunk_settings(s))}, "tokenizer_sha256": tok.sha256}
    if given or read_json(root / "stages" / "tokenizer.json")["settings"]["source"] == "given":
        old.pop("vocab_size"), new.pop("vocab_size")
    diff = diff_settings(old, new)
    if diff and not overwrite:
        raise BuildError(f"{str(root)!r} holds a database built with other settings ({'; '.join(diff)}); "
                         "pass --overwrite to rebuild what changed, or choose another --out")
    if diff:
        path.unlink()
    return not diff


def _combine_and_finish(root: Path, s: dict[str, Any], explicit: bool, overwrite: bool,
                        progress: bool) -> dict[str, Any] | None:
    w = s["num_workers"]
    dirs = [slice_dir(root, i, w) for i in range(w)]
    pending = [i for i, d in enumerate(dirs)
               if not all((read_json(d / "stages" / f"{n}.json") or {}).get("complete") for n in ("chunks", "embed"))]
    if pending and not (read_json(root / "stages" / "combine.json") or {}).get("complete"):
        msg = f"slices {pending} of {w} are not complete yet (run build-db --worker I --num-workers {w})"
        if explicit:
            raise BuildError(f"cannot combine {str(root)!r}: {msg}")
        log.info("%s; the last worker to finish combines", msg)
        return None
    lock = root / "combine.lock"
    if not take_lock(lock):
        if explicit:
            raise BuildError(f"{lock} exists: another process is combining (delete it if that process died)")
        log.info("another worker holds %s and is combining", lock)
        return None
    try:
        slice_settings, combined = combine_slices(root, dirs, overwrite, progress)
        s = {**slice_settings, **{k: s[k] for k in COMBINE_KEYS}}
        index_result = _index_stage(root, s, combined, overwrite, progress)
        _neighbours_stage(root, s, index_result, combined["checksums"], overwrite, progress)
        manifest = _write_manifest(root, s, combined, index_result)
    finally:
        lock.unlink(missing_ok=True)
    shutil.rmtree(root / "slices", ignore_errors=True)  # merged into the database; no longer needed
    return manifest


def _write_manifest(root: Path, s: dict[str, Any], combined: dict[str, Any], index: dict[str, Any]) -> dict[str, Any]:
    tok = Tokenizer.load(str(root / dbl.TOKENIZER_FILE))
    stages = {p.stem: read_json(p) for p in sorted((root / "stages").glob("*.json"))}
    manifest = {
        "format": dbl.FORMAT, "version": dbl.FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {k: v for k, v in s.items() if k not in ("corpus_paths", "embedder_path")}
        | {"tokenizer_sha256": tok.sha256},
        "chunk_size": s["chunk_size"], "neighbours_stored": s["neighbours_stored"],
        "counts": combined["counts"], "corpus": combined["corpus"],
        "tokenizer": {"file": dbl.TOKENIZER_FILE, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                      "source": stages["tokenizer"]["settings"]["source"]},
        "embedder": combined["embedder"],
        "index": {"shards": index["shards"], "size": index["size"], "dim": index["dim"],
                  "requested_mode": s["index_mode"]},
        "stages": stages, "versions": versions(),
        "checksums": dbl.checksums(root),
    }
    write_json(root / dbl.MANIFEST, manifest)
    c = combined["counts"]
    log.info("wrote database manifest %s: %d train chunks (%d documents), %d validation chunks, %d neighbours each",
             root / dbl.MANIFEST, c["train"]["chunks"], c["train"]["documents"], c["validation"]["chunks"],
             s["neighbours_stored"])
    return manifest
