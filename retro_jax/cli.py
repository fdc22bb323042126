"""The `retro-jax` command: thin verbs that parse, call the library, and print."""

from __future__ import annotations

import argparse
import json
import sys


def _info(args: argparse.Namespace) -> int:
    from retro_jax.config import model_config
    from retro_jax.model.count import flops_per_token, param_counts

    cfg = model_config(args.config)
    counts = param_counts(cfg)
    out = dict(counts.as_json(), flops_per_token=flops_per_token(cfg, args.seq_len))
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{cfg.name}: d_model {cfg.d_model}, {cfg.num_layers} layers, {cfg.num_heads}x{cfg.head_dim} heads, "
          f"d_ff {cfg.d_ff}, vocab {cfg.vocab_size}, CCA layers {list(cfg.cca_layers) or 'none'}")
    print(f"  params total          {counts.total:>15,}")
    print(f"  params embedding      {counts.embedding:>15,}")
    print(f"  params non-embedding  {counts.non_embedding:>15,}")
    print(f"  params retrieval      {counts.retrieval:>15,}  (encoder + CCA)")
    print(f"  train FLOPs / token   {out['flops_per_token']:>15,.0f}  (sequence {args.seq_len})")
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from retro_jax import quickstart

    quickstart.run(args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retro-jax", description="RETRO in JAX/Flax.")
    sub = p.add_subparsers(dest="verb", required=True)

    info = sub.add_parser("info", help="parameter counts and training FLOPs of a config")
    info.add_argument("--config", required=True, help="preset name or config file under configs/")
    info.add_argument("--seq-len", type=int, default=2048, help="sequence length for FLOPs (default 2048)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_info)

    qs = sub.add_parser("quickstart", help="the main job of `make quickstart`")
    qs.add_argument("--out", default="out/quickstart", help="folder for every artefact")
    qs.set_defaults(func=_quickstart)

    from retro_jax.retrieval import commands as db_commands

    db_commands.register(sub)  # build-db, db-info, db-check
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"retro-jax {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
