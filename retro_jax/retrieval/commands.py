"""CLI verbs for the retrieval database: build-db, db-subset, db-info, db-check.

`register(subparsers)` adds them to the `retro-jax` argparse subparsers. Each handler returns
an exit code: 0 success, 1 a failed check (db-check), 2 bad input (one-line message on stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from retro_jax.data.corpus import CorpusError

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _fail(verb: str, err: BaseException) -> int:
    print(f"retro-jax {verb}: error: {err}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _build_db(args: argparse.Namespace) -> int:
    from retro_jax.retrieval.build import build_database

    _logging()
    try:
        manifest = build_database(
            args.corpus, args.out, val_fraction=args.val_fraction, seed=args.seed, dedup=not args.no_dedup,
            vocab_size=args.vocab_size, tokenizer=args.tokenizer, chunk_size=args.chunk_size,
            embedder=args.embedder, embed_batch_size=args.embed_batch_size, max_length=args.max_length,
            shards=args.shards, index_mode=args.index_mode, neighbours_stored=args.neighbours,
            max_documents=args.max_documents, max_chunks=args.max_chunks,
            sample_documents=args.sample_documents, worker=args.worker,
            num_workers=args.num_workers, combine=args.combine, overwrite=args.overwrite,
            progress=not args.no_progress)
    except (ValueError, OSError, CorpusError) as e:
        return _fail("build-db", e)
    if manifest is None:
        print(f"slice {args.worker} of {args.num_workers} done in {args.out}; the last worker (or --combine) "
              "finishes the database")
        return EXIT_OK
    c = manifest["counts"]
    print(f"database {args.out}: {c['train']['chunks']} train chunks from {c['train']['documents']} documents, "
          f"{c['validation']['chunks']} validation chunks, {manifest['neighbours_stored']} neighbours each")
    return EXIT_OK


def _db_subset(args: argparse.Namespace) -> int:
    from retro_jax.retrieval.subset import subset_database

    _logging()
    try:
        m = subset_database(args.db, args.out, args.chunks, mode=args.mode, seed=args.seed,
                            overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, OSError) as e:
        return _fail("db-subset", e)
    sub = m["subset"]
    print(f"database {args.out}: retrieves from {sub['chunks']:,} of {sub['parent_chunks']:,} train chunks "
          f"({sub['tokens']:,} tokens, {sub['documents']:,} documents, {sub['mode']}); "
          f"{m['neighbours_stored']} neighbours each")
    return EXIT_OK


def _print_info(info: dict[str, Any]) -> None:
    for split, c in info["splits"].items():
        print(f"{split:<11} {c['documents']:>9,} documents {c['chunks']:>11,} chunks {c['tokens']:>13,} tokens "
              f"{c['bytes']:>14,} bytes")
    modes = ",".join(sorted({s["mode"] for s in info["shards"]}))
    print(f"chunk size {info['chunk_size']}, neighbours stored {info['neighbours_stored']}, "
          f"index {len(info['shards'])} shard(s) ({modes})")
    print(f"tokenizer  {info['tokenizer']['sha256'][:16]} (vocab {info['tokenizer']['vocab_size']}, "
          f"{info['tokenizer']['source']})")
    print(f"embedder   {info['embedder']['name']} (dim {info['embedder']['dim']})")
    print(f"near-duplicates removed {info['near_duplicates_removed']}, skipped {info['skipped_documents']}")
    if info.get("subset"):
        sub = info["subset"]
        print(f"subset     retrieves from {sub['chunks']:,} of the {sub['parent_chunks']:,} train chunks of "
              f"{sub['of']} ({sub['mode']}); every train chunk is still training data")


def _db_info(args: argparse.Namespace) -> int:
    from retro_jax.retrieval.database import Database

    try:
        info = Database.open(args.db_dir).info()
    except (ValueError, OSError) as e:
        return _fail("db-info", e)
    if args.json:
        print(json.dumps(info))
    else:
        _print_info(info)
    return EXIT_OK


def _db_check(args: argparse.Namespace) -> int:
    from retro_jax.retrieval.database import Database

    if args.sample < 1:
        return _fail("db-check", ValueError(f"--sample must be >= 1, got {args.sample}"))
    try:
        result = Database.open(args.db_dir).check(sample=args.sample, seed=args.seed, seq_len=args.seq_len,
                                                  num_neighbours=args.num_neighbours)
    except (ValueError, OSError) as e:
        return _fail("db-check", e)
    window = result["window_rule"]
    ok = result["same_document_neighbours"] == 0 and result["checksums_ok"] and window["after"]["in_window"] == 0
    if args.json:
        print(json.dumps(result))
    else:
        for key in ("recall_at_10", "same_document_neighbours", "missing_neighbours", "checksums_ok"):
            print(f"{key:<26} {result[key]}")
        before = window["before"]
        print(f"{'window_rule':<26} {window['sequences']} sequences of {window['seq_len']} tokens, "
              f"{window['slots']} slots (first {window['num_neighbours']} neighbours per chunk)")
        print(f"{'  stored, in window':<26} {before['in_window']} slots from a document of their window "
              f"({before['later_document']} from a later document, {before['later_window_chunks']} later chunks "
              f"of the window; {window['sequences_affected']} sequences, "
              f"{window['sequences_affected_later']} with a later document)")
        print(f"{'  loaded, in window':<26} {window['after']['in_window']} (after the loader's window rule; "
              f"{window['after']['empty']} slots empty)")
        print("OK" if ok else "FAILED")
    return EXIT_OK if ok else EXIT_CHECK_FAILED


def register(subparsers: Any) -> None:
    """Add build-db, db-subset, db-info and db-check to an argparse subparsers object."""
    b = subparsers.add_parser("build-db", help="build a retrieval database: chunks, embeddings, index, neighbours")
    b.add_argument("--corpus", nargs="+", metavar="PATH",
                   help=".txt folders, .jsonl(.gz/.zst), .parquet (default: this Python's standard library)")
    b.add_argument("--out", required=True, metavar="DB_DIR", help="database folder (resumed if it exists)")
    b.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out (default 0.05)")
    b.add_argument("--seed", type=int, default=0, help="split and tokenizer seed (default 0)")
    b.add_argument("--no-dedup", action="store_true", help="keep training near-duplicates of validation documents")
    b.add_argument("--vocab-size", type=int, default=8192, help="SentencePiece vocabulary (default 8192)")
    b.add_argument("--tokenizer", metavar="MODEL", help="reuse this SentencePiece .model instead of training one")
    b.add_argument("--chunk-size", type=int, default=64, help="tokens per chunk (default 64)")
    b.add_argument("--embedder", metavar="BERT_DIR", help="Hugging Face BERT folder (default all-MiniLM-L6-v2)")
    b.add_argument("--embed-batch-size", type=int, default=64, help="BERT batch size (default 64)")
    b.add_argument("--max-length", type=int, default=128, help="BERT tokens per chunk (default 128)")
    b.add_argument("--shards", type=int, default=1, help="index shards (default 1)")
    b.add_argument("--index-mode", choices=("auto", "exact", "scann"), default="auto",
                   help="auto: exact below 20k chunks per shard, ScaNN above (default auto)")
    b.add_argument("--neighbours", type=int, default=10, help="neighbours stored per chunk (default 10)")
    b.add_argument("--max-documents", type=int, help="read at most this many documents")
    b.add_argument("--max-chunks", type=int, help="stop adding documents once the database has this many chunks")
    b.add_argument("--sample-documents", type=float, default=1.0, metavar="P",
                   help="keep each document with probability P (a seeded hash of its name), so a small "
                        "database spans the whole corpus rather than its first folders (default 1)")
    b.add_argument("--worker", type=int, default=0, help="this worker's slice: documents with doc_id %% W == I")
    b.add_argument("--num-workers", type=int, default=1, help="number of slices W (default 1)")
    b.add_argument("--combine", action="store_true", help="only merge finished slices and finish the database")
    b.add_argument("--overwrite", action="store_true", help="rebuild the stages whose settings differ")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(func=_build_db)

    u = subparsers.add_parser(
        "db-subset", help="a database retrieving from only N of another's train chunks (database-size "
                          "ablations): new index and neighbours, nothing re-embedded",
        description="Make a database whose index covers N train chunks of DB (hard links to its chunks and "
                    "embeddings, a new index, neighbours recomputed for both splits). Every train chunk stays "
                    "training data, so models at every database size see the same tokens.")
    u.add_argument("--db", required=True, metavar="DB_DIR", help="the full database (built with build-db)")
    u.add_argument("--out", required=True, metavar="OUT_DIR", help="folder of the subset (reused if complete)")
    u.add_argument("--chunks", required=True, type=int, help="train chunks to retrieve from")
    u.add_argument("--mode", choices=("documents", "prefix"), default="documents",
                   help="documents: whole documents in a seeded random order, nested across sizes "
                        "(default); prefix: the first N chunks in corpus order")
    u.add_argument("--seed", type=int, default=0, help="document order seed for --mode documents (default 0)")
    u.add_argument("--overwrite", action="store_true", help="replace a different database in --out")
    u.add_argument("--no-progress", action="store_true", help="no progress bars")
    u.set_defaults(func=_db_subset)

    i = subparsers.add_parser("db-info", help="documents, chunks, tokens, tokenizer, embedder, index of a database")
    i.add_argument("db_dir", metavar="DB_DIR")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=_db_info)

    c = subparsers.add_parser("db-check", help="recall@10 vs exact search, same-document neighbours, the window rule, "
                                                  "checksums")
    c.add_argument("db_dir", metavar="DB_DIR")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--sample", type=int, default=1000, help="query chunks for recall@10 (default 1000)")
    c.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    c.add_argument("--seq-len", type=int, default=2048,
                   help="training sequence length whose windows the window rule is counted on (default 2048)")
    c.add_argument("--num-neighbours", type=int, default=2,
                   help="neighbours per chunk the model is given, K (default 2)")
    c.set_defaults(func=_db_check)
