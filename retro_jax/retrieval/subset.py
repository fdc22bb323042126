"""Database-size subsets: a built database whose index covers only n of its train chunks.

The paper's database-size ablation (Table 14, Figure 1 middle) varies the retrieval
database and nothing else. `subset_database(DB, OUT, chunks=n)` makes that database
from one built with `build-db`, without re-embedding anything:

* every file of the parent that does not change (tokenizer, chunk stores, embeddings of
  both splits) is hard-linked into OUT (copied where the file system cannot link);
* a new index covers the n selected train chunks (their parent embeddings, gathered);
  it returns parent train-chunk ids, so chunk and continuation tokens stay where they are;
* the neighbours of every train and validation chunk are recomputed against that index,
  with same-document exclusion as in build-db.

Every train chunk of the parent stays training data: the model sees the same tokens at
every database size, and only what it can retrieve changes (as in the paper, where the
training data is fixed and the retrieval database grows). The leakage filter r(C) of a
validation chunk is computed against its neighbours in the subset, as it should be.

Which chunks (`mode`):
* "documents" (default): whole documents in a seeded random order, until n chunks (the
  last document cut to fit). A small database then spans the whole corpus rather than the
  folders that sort first, and subsets with the same seed are nested: the subset of n
  chunks lies inside the subset of any larger n.
* "prefix": the first n train chunks in corpus order (the database a prefix of the corpus
  would have given; nested too).

OUT/manifest.json is written last and records `subset` (parent, its manifest's sha256,
mode, seed, chunks, tokens, documents); a rerun with the same request returns at once,
and an interrupted one resumes its neighbours block by block.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from retro_jax.retrieval import database as dbl
from retro_jax.retrieval.index import IndexConfig, ShardedIndex
from retro_jax.retrieval.neighbours import compute_neighbours, distances_path
from retro_jax.retrieval.stages import BuildError, read_json, write_json

log = logging.getLogger(__name__)

MODES = ("documents", "prefix")
NEIGHBOUR_BATCH = 4096
GATHER_BLOCK = 65_536


def select_rows(doc_ids_C: np.ndarray, n: int, mode: str = "documents", seed: int = 0) -> np.ndarray:
    """Sorted int64 ids of the n train chunks a subset indexes (see the module docstring)."""
    total = len(doc_ids_C)
    if not 1 <= n <= total:
        raise BuildError(f"a subset needs 1 <= chunks <= {total} (the database's train chunks), got {n}")
    if mode not in MODES:
        raise BuildError(f"subset mode must be one of {MODES}, got {mode!r}")
    if mode == "prefix":
        return np.arange(n, dtype=np.int64)
    docs = np.asarray(doc_ids_C)
    by_doc = np.argsort(docs, kind="stable")  # each document's chunks together, in corpus order
    _, counts = np.unique(docs[by_doc], return_counts=True)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    order = np.random.default_rng(seed).permutation(len(counts))
    taken = np.cumsum(counts[order])
    whole = int(np.searchsorted(taken, n, side="right"))  # documents that fit entirely
    parts = [by_doc[starts[d]:starts[d] + counts[d]] for d in order[:whole]]
    short = n - (int(taken[whole - 1]) if whole else 0)
    if short:
        d = order[whole]
        parts.append(by_doc[starts[d]:starts[d] + short])
    return np.sort(np.concatenate(parts)).astype(np.int64)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        if os.path.samefile(src, dst):
            return
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: a copy
        shutil.copy2(src, dst)


def _request(parent: dbl.Database, chunks: int, mode: str, seed: int) -> dict[str, Any]:
    return {"of": str(parent.root.resolve()), "parent_manifest_sha256": dbl.sha256_file(parent.root / dbl.MANIFEST),
            "mode": mode, "seed": seed if mode == "documents" else None, "chunks": int(chunks)}


def subset_database(db_dir: str | os.PathLike[str], out: str | os.PathLike[str], chunks: int,
                    mode: str = "documents", seed: int = 0, overwrite: bool = False,
                    progress: bool = True) -> dict[str, Any]:
    """Make (or reuse) the database `out` that retrieves from `chunks` train chunks of `db_dir`;
    returns its manifest."""
    parent = dbl.Database.open(db_dir)
    root = Path(out)
    if root.resolve() == parent.root.resolve():
        raise BuildError("--out must differ from --db: a subset is a new database folder")
    train = parent.train
    rows = select_rows(train.doc_ids, chunks, mode, seed)
    request = _request(parent, chunks, mode, seed)
    old = read_json(root / dbl.MANIFEST)
    if old is not None:
        same = {k: v for k, v in (old.get("subset") or {}).items() if k in request} == request
        if same:
            log.info("database subset %s is already complete", root)
            return old
        if not overwrite:
            raise BuildError(f"{str(root)!r} holds another database; pass --overwrite or choose another --out")
        (root / dbl.MANIFEST).unlink()
    elif root.is_dir() and any(root.iterdir()) and not (root / "index").is_dir() and not overwrite:
        raise BuildError(f"--out {str(root)!r} is not empty and holds no retro-jax database")
    pm = parent.manifest
    linked = [rel for rel in pm["checksums"] if not rel.startswith("index/")
              and not rel.split("/")[-1].startswith("neighbours.")]
    for rel in linked:
        _link(parent.root / rel, root / rel)

    emb = parent.embeddings("train")
    gathered = root / "index.rows.tmp.npy"  # the selected keys, block by block (memmap-sized)
    keys = np.lib.format.open_memmap(gathered, mode="w+", dtype=np.float32, shape=(len(rows), emb.shape[1]))
    for r0 in range(0, len(rows), GATHER_BLOCK):
        keys[r0:r0 + GATHER_BLOCK] = emb[rows[r0:r0 + GATHER_BLOCK]]
    keys.flush()
    shards = min(len(pm["index"]["shards"]), len(rows))
    index = ShardedIndex.build(keys, root / "index", IndexConfig(mode=pm["index"]["requested_mode"]), shards,
                               progress=progress, row_ids=rows, num_ids=len(train))
    del keys
    gathered.unlink()

    k = parent.neighbours_stored
    for split in dbl.SPLITS:
        path = dbl.neighbours_path(root, split)
        q = parent.embeddings(split)
        if q.shape[0] == 0:
            np.save(path, np.zeros((0, k), np.int64))
            np.save(distances_path(path), np.zeros((0, k), np.float32))
            continue
        compute_neighbours(index, q, parent.chunks(split).doc_ids, train.doc_ids, k, path,
                           batch_size=NEIGHBOUR_BATCH, progress=progress)

    sums = {rel: pm["checksums"][rel] for rel in linked}
    sums |= {rel: dbl.sha256_file(root / rel) for rel in dbl.data_files(root) if rel not in sums}
    selected_docs = np.unique(np.asarray(train.doc_ids)[rows])
    manifest = dict(pm)
    manifest |= {
        "index": {"shards": [{"start": m["start"], "end": m["end"], **m["config"]} for m in index.meta["shards"]],
                  "size": index.size, "dim": index.dim, "requested_mode": pm["index"]["requested_mode"]},
        "subset": request | {"tokens": int(np.asarray(train.lengths)[rows].sum()),
                             "documents": int(selected_docs.size),
                             "parent_chunks": len(train)},
        "checksums": dict(sorted(sums.items())),
    }
    write_json(root / dbl.MANIFEST, manifest)
    log.info("wrote database subset %s: %d of %d train chunks (%s), %d neighbours each", root, len(rows),
             len(train), mode, k)
    return manifest
