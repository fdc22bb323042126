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
  chunks. Documents shorter than one chunk are skipped and counted (a neighbour needs a full
  chunk). With `max_chunks`, reading stops after the training document that reaches it.
* embed (per slice): chunk text (decoded) through the frozen BERT, in fixed blocks of
  `embed_block` chunks written into a preallocated .npy memmap; a sidecar records finished
  blocks, so a killed run resumes to byte-identical arrays.
* combine: merges the slices in doc_id order (re-applying `max_chunks` globally), so W workers
  give the database one worker would. Runs when the last slice finishes, or with `combine=True`.
* index, neighbours (>= 10 per chunk for evaluation; same-document chunks excluded), manifest.

Scale-out order: worker 0 (or a first run) trains DB_DIR/tokenizer.model; then every worker
`--worker I --num-workers W` (same --out, or `--tokenizer DB_DIR/tokenizer.model`); the last one
to finish combines (or run `--combine`).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from retro_jax.data.chunks import ChunkStore, ChunkWriter
from retro_jax.data.corpus import CorpusError, CorpusStats, iter_documents
from retro_jax.data.dedup import NearDuplicateFilter
from retro_jax.data.split import is_validation
from retro_jax.data.tokenizer import Tokenizer, train_tokenizer
from retro_jax.retrieval import database as dbl
from retro_jax.retrieval.index import IndexConfig, ShardedIndex
from retro_jax.retrieval.neighbours import compute_neighbours, distances_path, progress_path

log = logging.getLogger(__name__)

EMBED_BLOCK = 1024
NEIGHBOUR_BATCH = 4096
COMBINE_KEYS = ("num_workers", "shards", "index_mode", "neighbours_stored")
_EMBEDDERS: dict[tuple, Any] = {}


class BuildError(ValueError):
    """Bad build input, or an output folder holding a different database."""


class EmbeddingInterrupted(RuntimeError):
    """Raised on purpose by `stop_after_embed_blocks` (simulates a kill; the build resumes)."""


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Atomic write (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def diff_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One 'key: built with X, this run asks for Y' line per differing setting."""
    return [f"{k}: built with {old.get(k)!r}, this run asks for {new.get(k)!r}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


class Stage:
    """A stage's record file: {settings, complete, result}; see the module docstring."""

    def __init__(self, path: Path, outputs: list[Path], overwrite: bool, where: str) -> None:
        self.path, self.outputs, self.overwrite, self.where = path, outputs, overwrite, where

    def start(self, settings: dict[str, Any]) -> dict[str, Any] | None:
        """The recorded result if complete with these settings; else prepare a (re)run, None."""
        rec = read_json(self.path)
        if rec is not None:
            diff = diff_settings(rec["settings"], settings)
            if diff and not self.overwrite:
                raise BuildError(f"{self.where}: stage {self.path.stem} differs ({'; '.join(diff)}); "
                                 "pass --overwrite to rebuild it, or choose another --out")
            if not diff and rec.get("complete"):
                return rec["result"]
            if diff:
                log.warning("rebuilding stage %s (%s)", self.path.stem, "; ".join(diff))
                for out in self.outputs:
                    shutil.rmtree(out) if out.is_dir() else out.unlink(missing_ok=True)
                rec = None
        if rec is None:
            write_json(self.path, {"settings": settings, "complete": False})
        self.settings = settings
        return None

    def finish(self, result: dict[str, Any]) -> dict[str, Any]:
        write_json(self.path, {"settings": self.settings, "complete": True, "result": result})
        return result


def slice_dir(root: Path, worker: int, num_workers: int) -> Path:
    return root / "slices" / f"w{worker}-of-{num_workers}"


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


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("jax", "flax", "scann", "sentencepiece", "tokenizers", "numpy", "retro-jax"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# ----------------------------------------------------------------------------- tokenizer


def _tokenizer_stage(root: Path, s: dict[str, Any], given: str | None, worker: int,
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


def _chunks_stage(sdir: Path, s: dict[str, Any], tok: Tokenizer, worker: int, overwrite: bool,
                  progress: bool) -> dict[str, Any]:
    settings = {**{k: s[k] for k in ("corpus", "max_documents", "val_fraction", "seed", "dedup",
                                     "chunk_size", "max_chunks", "num_workers")},
                "tokenizer_sha256": tok.sha256, "worker": worker}
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
        if refs is not None and is_validation(doc.source, seed, frac):
            refs.add_reference(doc.doc_id, doc.text)
    writers = {split: ChunkWriter(str(dbl.chunks_dir(sdir, split)), s["chunk_size"],
                                  token_num_bytes=tok.token_num_bytes(), pad_id=tok.pad_id,
                                  min_tokens=s["chunk_size"], overwrite=True) for split in dbl.SPLITS}
    near_dups, short = [], []
    bar = tqdm(total=stats.documents, desc=f"chunks (slice {worker}/{w})", unit="doc", disable=not progress)
    for doc in iter_documents(paths, s["max_documents"]):
        bar.update(1)
        if doc.doc_id % w != worker:
            continue
        split = "validation" if is_validation(doc.source, seed, frac) else "train"
        if split == "train" and refs is not None and refs.is_near_duplicate(doc.text):
            near_dups.append(doc.doc_id)
            continue
        if writers[split].add(doc.doc_id, tok.encode(doc.text)) == 0:
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
                 block: int, progress: bool, budget: list[int | None]) -> None:
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
        if budget[0] is not None and budget[0] <= 0:
            bar.close()
            raise EmbeddingInterrupted(f"stopped on request before block {b} of {out}")
        b0, b1 = b * block, min(n, (b + 1) * block)
        emb[b0:b1] = embedder.embed([tok.decode(store.chunk_tokens(i)) for i in range(b0, b1)])
        emb.flush()
        state["blocks_done"] = b + 1
        write_json(side, state)
        bar.update(b1 - b0)
        if budget[0] is not None:
            budget[0] -= 1
    bar.close()
    log.info("wrote embeddings float32 [%d, %d] to %s", n, dim, out)


def _embed_stage(sdir: Path, chunks: dict[str, Any], tok: Tokenizer, embedder: Any, path: str | None,
                 block: int, overwrite: bool, progress: bool, stop_after: int | None) -> dict[str, Any]:
    settings = {"embedder": embedder.name, "max_length": embedder.max_length,
                "batch_size": embedder.batch_size, "block": block,
                "tokens_sha256": {split: chunks[split]["tokens_sha256"] for split in dbl.SPLITS}}
    outs = [p for split in dbl.SPLITS for p in
            (dbl.embeddings_path(sdir, split), dbl.embeddings_path(sdir, split).with_suffix(".progress.json"))]
    stage = Stage(sdir / "stages" / "embed.json", outs, overwrite, str(sdir))
    done = stage.start(settings)
    if done is not None:
        return done
    budget = [stop_after]
    for split in dbl.SPLITS:
        store = ChunkStore.open(str(dbl.chunks_dir(sdir, split)))
        split_settings = {**settings, "split": split}
        _embed_split(store, tok, embedder, dbl.embeddings_path(sdir, split), split_settings, block, progress, budget)
    return stage.finish({"dim": embedder.dim, "name": embedder.name,
                         "path": None if path is None else os.path.abspath(path)})


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
    worker: int = 0, num_workers: int = 1, combine: bool = False, overwrite: bool = False,
    progress: bool = True, embed_block: int = EMBED_BLOCK, stop_after_embed_blocks: int | None = None,
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
                  shards=shards, index_mode=index_mode, neighbours_stored=neighbours_stored)
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
        tok = _tokenizer_stage(root, s, tokenizer, worker, overwrite, progress)
        if _combined_already(root, s, tok, tokenizer is not None, overwrite):
            return _combine_and_finish(root, s, combine, overwrite, progress)
        sdir = slice_dir(root, worker, num_workers)
        chunks = _chunks_stage(sdir, s, tok, worker, overwrite, progress)
        _embed_stage(sdir, chunks, tok, emb, embedder, embed_block, overwrite, progress, stop_after_embed_blocks)
        log.info("slice %d of %d complete in %s", worker, num_workers, sdir)
    return _combine_and_finish(root, s, combine, overwrite, progress)


def _combined_already(root: Path, s: dict[str, Any], tok: Tokenizer, given: bool, overwrite: bool) -> bool:
    """True if the slices were already merged with these settings (they may be deleted by now)."""
    path = root / "stages" / "combine.json"
    rec = read_json(path) or {}
    if not rec.get("complete"):
        return False
    old = {**rec["result"]["settings"], "tokenizer_sha256": rec["result"].get("tokenizer_sha256")}
    new = {**{k: s.get(k) for k in old}, "tokenizer_sha256": tok.sha256}
    if given or read_json(root / "stages" / "tokenizer.json")["settings"]["source"] == "given":
        old.pop("vocab_size"), new.pop("vocab_size")
    diff = diff_settings(old, new)
    if diff and not overwrite:
        raise BuildError(f"{str(root)!r} holds a database built with other settings ({'; '.join(diff)}); "
                         "pass --overwrite to rebuild what changed, or choose another --out")
    if diff:
        path.unlink()
    return not diff


def _take_lock(lock: Path) -> bool:
    """Create `lock` exclusively (content host:pid); a lock left by a dead process on this host is taken over."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            host, _, pid = lock.read_text().rpartition(":")
            if host != socket.gethostname() or not pid.isdigit() or _alive(int(pid)):
                return False
            log.warning("removing stale %s left by dead process %s", lock, pid)
            lock.unlink(missing_ok=True)
            continue
        os.write(fd, f"{socket.gethostname()}:{os.getpid()}".encode())
        os.close(fd)
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    if not _take_lock(lock):
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


# ----------------------------------------------------------------------------- combine


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
    settings = {k: base[k] for k in ("corpus", "max_documents", "val_fraction", "seed", "dedup", "chunk_size",
                                     "max_chunks", "num_workers")}
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
