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

    quickstart.run(args.out, steps=args.steps, max_chunks=args.max_chunks, val_fraction=args.val_fraction)
    return 0


def _load(args: argparse.Namespace, **train_flags):
    """--config with the verb's first-class train.* flags (those given), then --config.a.b=v overrides."""
    from retro_jax.config import load_config

    return load_config(args.config, [f"train.{k}={v}" for k, v in train_flags.items() if v is not None]
                       + args.overrides)


def _train(args: argparse.Namespace) -> int:
    from retro_jax.eval.run import make_validator
    from retro_jax.retrieval.database import Database
    from retro_jax.train.loop import TrainingError, train

    config = _load(args, steps=args.steps, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                   seed=args.seed)
    validate = make_validator(config, Database.open(args.db)) if config.train.eval_every else None
    try:
        out = train(config, args.db, args.workdir, init_from=args.init_from, freeze_decoder=args.freeze_decoder,
                    progress=not args.no_progress, coordinator=args.coordinator,
                    num_processes=args.num_processes, process_id=args.process_id, validate=validate,
                    allow_db_change=args.allow_db_change)
    except TrainingError as e:
        print(f"retro-jax train: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


def _plan(args: argparse.Namespace) -> int:
    import re

    import jax

    if m := re.fullmatch(r"cpu:(\d+)", args.topology):  # as many CPU devices as asked for, if JAX has not
        try:                                                # started its CPU backend yet (in-process callers)
            jax.config.update("jax_num_cpu_devices", max(int(m.group(1)), jax.config.jax_num_cpu_devices or 1))
        except RuntimeError:
            pass
    from retro_jax.train.plan import markdown, plan

    config = _load(args, batch_size=args.batch, seq_len=args.seq_len)
    report = plan(config, args.topology, mfu=args.mfu)
    print(json.dumps(report) if args.json else markdown(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retro-jax", description="RETRO in JAX/Flax.")
    sub = p.add_subparsers(dest="verb", required=True)

    info = sub.add_parser("info", help="parameter counts and training FLOPs of a config")
    info.add_argument("--config", required=True, help="preset name, config file (configs/x.py) or workdir")
    info.add_argument("--seq-len", type=int, default=2048, help="sequence length for FLOPs (default 2048)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_info)

    qs = sub.add_parser("quickstart", help="the main job of `make quickstart`")
    qs.add_argument("--out", default="out/quickstart", help="folder for every artefact")
    qs.add_argument("--steps", type=int, help="training steps per model (default 150)")
    qs.add_argument("--max-chunks", type=int, help="database size in training chunks (default 5000)")
    qs.add_argument("--val-fraction", type=float, help="share of documents held out for validation (default 0.1)")
    qs.set_defaults(func=_quickstart)

    tr = sub.add_parser("train", help="train (or resume) a RETRO or baseline model on a database",
                        epilog="Any config field can be overridden: --config.train.lr_max=1e-3 "
                               "--config.model.num_layers=6 --config.mesh.fsdp=2 (values keep their type).")
    tr.add_argument("--config", required=True,
                    help="preset name (tiny, retro-172m, ...), a config file (configs/x.py[:arg]) or a workdir")
    tr.add_argument("--db", required=True, help="database folder made by build-db")
    tr.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard events; resumed if present")
    tr.add_argument("--steps", type=int, help="total training steps (config: train.steps)")
    tr.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (train.checkpoint_every)")
    tr.add_argument("--log-every", type=int, help="steps between metric lines (train.log_every)")
    tr.add_argument("--seed", type=int, help="init and data-order seed (train.seed)")
    tr.add_argument("--init-from", metavar="BASELINE_WORKDIR", help="initialise the decoder from a trained baseline")
    tr.add_argument("--freeze-decoder", action="store_true", help="with --init-from: train only encoder + CCA (retrofit)")
    tr.add_argument("--allow-db-change", action="store_true",
                    help="resume on another database than the run's (same tokenizer; default: refused)")
    tr.add_argument("--coordinator", help="host:port of process 0 (multi-process; else from the cluster env)")
    tr.add_argument("--num-processes", type=int, help="number of processes (multi-process)")
    tr.add_argument("--process-id", type=int, help="this process's index (multi-process)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=_train, overrides=[])

    pl = sub.add_parser("plan", help="compile the training step ahead of time for a slice: memory per device, "
                                     "whether it fits, FLOPs, estimated step time and days",
                        epilog="Mesh and model fields are overridden as in train: --config.mesh.fsdp=64.")
    pl.add_argument("--config", required=True, help="preset name, config file or workdir")
    pl.add_argument("--topology", required=True,
                    help="a Cloud TPU slice (v4-32, v5p-128, v5e-256; needs libtpu) or cpu:N")
    pl.add_argument("--batch", type=int, help="global batch in sequences (train.batch_size)")
    pl.add_argument("--seq-len", type=int, help="tokens per sequence (train.seq_len)")
    pl.add_argument("--mfu", type=float, default=0.5, help="assumed model FLOPs utilisation (default 0.5)")
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    pl.set_defaults(func=_plan, overrides=[])

    from retro_jax.retrieval import commands as db_commands

    db_commands.register(sub)  # build-db, db-subset, db-info, db-check

    from retro_jax.eval import run as eval_run

    eval_run.register(sub)  # eval

    from retro_jax.infer import commands as infer_commands

    infer_commands.register(sub)  # export, generate
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if not (args.verb in ("train", "plan") and a.startswith("--config."))]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.verb in ("train", "plan"):
        args.overrides = extra
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # bad input, missing files, unreadable checkpoints: one line
        print(f"retro-jax {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
