"""The `export` and `generate` verbs of the `retro-jax` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from retro_jax.config import ATTENTION_MODES


def _export(args: argparse.Namespace) -> int:
    import jax

    from retro_jax.infer.export import export
    from retro_jax.runtime import distributed

    distributed.maybe_initialize()  # several processes (a cluster's environment): process 0 writes
    out = export(args.workdir, args.out, step=args.step, dtype=args.dtype, overwrite=args.overwrite,
                 attention=args.attention)
    if jax.process_index() == 0:
        meta = json.loads((out / "config.json").read_text())
        print(f"exported step {meta['step']} of {args.workdir} ({meta['model']['name']}, {meta['dtype']}) to {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from retro_jax.infer.generate import Generator

    prompts = list(args.prompt or [])
    if args.prompt_file:
        text = Path(args.prompt_file).read_text()
        prompts += [p for p in text.split("\n\n") if p.strip()] if args.split_prompts else [text]
    if not prompts:
        raise ValueError("give --prompt TEXT (repeatable) or --prompt-file F")
    gen = Generator(args.model, args.db, neighbours=args.neighbours, retrieval=not args.no_retrieval)
    outs = gen.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, show_neighbours=args.show_neighbours or args.json,
                        progress=not args.no_progress and not args.json)
    if args.json:
        print(json.dumps({"generations": [o.__dict__ for o in outs], "timings": gen.timings}))
        return 0
    for i, o in enumerate(outs):
        if len(outs) > 1:
            print(f"=== prompt {i + 1}")
        print(o.prompt + o.text)
        if args.show_neighbours:
            for r in o.neighbours:
                print(f"--- chunk {r['chunk']} (read from position {r['position']}): {r['chunk_text']!r}",
                      file=sys.stderr)
                for j, n in enumerate(r["neighbours"]):
                    print(f"    neighbour {j + 1}: {n!r}", file=sys.stderr)
    return 0


def register(sub: Any) -> None:
    """Add the `export` and `generate` verbs to an argparse subparsers object."""
    ex = sub.add_parser("export", help="write a checkpoint's params for inference (safetensors + JSON config)",
                        description="Export the params of a training workdir's checkpoint (no optimizer state) "
                                    "to EXPORT_DIR: model.safetensors, config.json, tokenizer.model, README.md. "
                                    "The folder is written beside EXPORT_DIR and moved into place whole. "
                                    "Several processes (a multi-host run) all read; process 0 writes.")
    ex.add_argument("--workdir", required=True, help="training workdir (config.json + checkpoints)")
    ex.add_argument("--out", required=True, metavar="EXPORT_DIR", help="folder to write")
    ex.add_argument("--step", type=int, help="checkpoint step to export (default: the newest)")
    ex.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="tensor dtype in the file (default float32, as trained)")
    ex.add_argument("--overwrite", action="store_true",
                    help="replace an existing export in EXPORT_DIR (written beside it, then swapped in)")
    ex.add_argument("--attention", choices=ATTENTION_MODES,
                    help="model.attention recorded in config.json (default: the run's; all compute the same function)")
    ex.set_defaults(func=_export)

    g = sub.add_parser("generate", help="generate text from an exported model, retrieving neighbours live",
                       description="Autoregressive decoding with a key/value cache; at every 64-token chunk "
                                   "boundary the completed chunk's neighbours are retrieved from --db and read "
                                   "through CCA, as in training.")
    g.add_argument("--model", required=True, metavar="EXPORT_DIR", help="folder written by retro-jax export")
    g.add_argument("--db", metavar="DB_DIR", help="database to retrieve from (needed unless --no-retrieval)")
    g.add_argument("--prompt", action="append", help="prompt text (repeat for a batch of prompts)")
    g.add_argument("--prompt-file", help="read a prompt from a file")
    g.add_argument("--split-prompts", action="store_true", help="with --prompt-file: one prompt per blank-line block")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy, deterministic (default 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: all)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--neighbours", type=int, help="neighbours per chunk (default: the model's num_neighbours)")
    g.add_argument("--no-retrieval", action="store_true", help="generate with retrieval off (no CCA)")
    g.add_argument("--show-neighbours", action="store_true",
                   help="print (to stderr) the neighbour text each chunk read")
    g.add_argument("--json", action="store_true", help="print one JSON object (with the neighbours read)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.set_defaults(func=_generate)
