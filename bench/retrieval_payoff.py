"""What makes retrieval pay off at small scale: every variant tried, over seeds, with the spread.

    .venv/bin/python bench/retrieval_payoff.py [--out out/payoff] [--seeds 0 1 2] [--variants A B ...]
                                               [--steps 150] [--write-docs]

Each variant trains the quickstart's tiny RETRO on the same token budget as the quickstart
(`retro_jax.quickstart`: batch 16 x 256 tokens, the same learning-rate schedule), once per seed,
beside the tiny baseline trained on the same database, seed and tokens (its decoder starts from
the same weights). Each is evaluated on the validation documents with `retro-jax eval`:
bits-per-byte with retrieval on (k = 2) and off, the baseline, and bpb(alpha = 0.125) (chunks
sharing at most 8 tokens with their 10 nearest neighbours), plus a sweep of k at evaluation.

Nothing is tuned on the validation documents: the variants below were fixed before any run, and
every one that was run is reported. The databases are built once under --out (about 2 minutes
each); runs that are complete are skipped, interrupted ones resume from their checkpoints, so
the command can be rerun until the table is whole. About 5 minutes per RETRO run and 2.5 per
baseline run on 2 CPU cores.

--write-docs rewrites docs/retrieval_payoff.md with the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from retro_jax import quickstart
from retro_jax.config import load_config

# The two databases: the quickstart's settings before (a sorted prefix of the standard library)
# and after (a 10% document sample of the whole of it, about the same number of chunks).
DATABASES = {
    "prefix": dict(max_chunks=5000),
    "sampled": dict(sample_documents=0.1),
}
# name -> (database, overrides of the RETRO config on top of the quickstart's). One change at a time.
VARIANTS = {
    "random-init/prefix": ("prefix", ["model.cca_zero_init=False"]),
    "zero-init/prefix": ("prefix", []),
    "zero-init/sampled": ("sampled", []),
    "zero-init/prefix/enc128": ("prefix", ["model.enc_d_model=128", "model.enc_num_heads=4",
                                              "model.enc_head_dim=32", "model.enc_d_ff=512"]),
}
EVAL_KS = (1, 2, 4)


def _db(out: Path, name: str) -> str:
    from retro_jax.retrieval.build import build_database

    path = out / f"db_{name}"
    build_database(None, str(path), val_fraction=0.1, seed=0, progress=False, **DATABASES[name])
    return str(path)


def _overrides(steps: int, seed: int) -> list[str]:
    return quickstart.train_overrides(steps) + [f"train.seed={seed}"]


def _trained(preset: str, overrides: list[str], db: str, workdir: Path) -> None:
    from retro_jax.train.loop import train

    marker = workdir / "done.json"
    if marker.is_file():
        return
    t0 = time.perf_counter()
    train(load_config(preset, overrides), db, str(workdir), progress=False)
    marker.write_text(json.dumps({"seconds": time.perf_counter() - t0}))


def run_one(out: Path, variant: str, seed: int, steps: int) -> dict:
    from retro_jax.eval.run import evaluate

    db_name, extra = VARIANTS[variant]
    result_path = out / "runs" / variant.replace("/", "_") / f"seed{seed}" / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    db = _db(out, db_name)
    base_dir = out / "runs" / f"baseline_{db_name}" / f"seed{seed}"
    _trained("tiny-baseline", _overrides(steps, seed), db, base_dir)
    retro_dir = result_path.parent
    _trained("tiny", _overrides(steps, seed) + extra, db, retro_dir)
    report = evaluate(str(retro_dir), db, baseline=str(base_dir), ks=EVAL_KS, progress=False, write=False)
    result = {"variant": variant, "seed": seed, "steps": steps, "db": db_name,
              "bpb": report["bpb"], "bpb_0.125": {k: v["0.125"] for k, v in report["bpb_alpha"].items()},
              "k_sweep": {k: v["bpb"] for k, v in report["neighbour_sweep"].items()},
              "alpha_counts": report["alpha_counts"], "counts": report["counts"]}
    result_path.write_text(json.dumps(result, indent=2))
    return result


def _ms(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{xs[0]:.4f}" if xs else "-"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def table(results: list[dict]) -> str:
    """Markdown: per variant, mean ± standard deviation over seeds, and the paired differences."""
    rows = ["| variant | seeds | bpb on | bpb off | baseline | on - off | on - baseline | "
            "on @ α=0.125 | baseline @ α=0.125 | on - off @ α=0.125 | on - baseline @ α=0.125 | on, k=1 / 4 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for variant in VARIANTS:
        rs = [r for r in results if r["variant"] == variant]
        if not rs:
            continue
        on = [r["bpb"]["retro"] for r in rs]
        off = [r["bpb"]["retro_off"] for r in rs]
        base = [r["bpb"]["baseline"] for r in rs]
        on_a = [r["bpb_0.125"]["retro"] for r in rs]
        base_a = [r["bpb_0.125"]["baseline"] for r in rs]
        off_a = [r["bpb_0.125"]["retro_off"] for r in rs]
        k1 = [r["k_sweep"].get("1") for r in rs]
        k4 = [r["k_sweep"].get("4") for r in rs]
        rows.append(
            f"| {variant} | {len(rs)} | {_ms(on)} | {_ms(off)} | {_ms(base)} | "
            f"{_ms([a - b for a, b in zip(on, off)])} | {_ms([a - b for a, b in zip(on, base)])} | "
            f"{_ms(on_a)} | {_ms(base_a)} | {_ms([a - b for a, b in zip(on_a, off_a)])} | "
            f"{_ms([a - b for a, b in zip(on_a, base_a)])} | "
            f"{_ms([x for x in k1 if x is not None])} / {_ms([x for x in k4 if x is not None])} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/payoff")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=quickstart.STEPS)
    p.add_argument("--write-docs", action="store_true", help="rewrite docs/retrieval_payoff.md")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for variant in args.variants:
        for seed in args.seeds:
            t0 = time.perf_counter()
            r = run_one(out, variant, seed, args.steps)
            results.append(r)
            print(json.dumps({"variant": variant, "seed": seed, "bpb": r["bpb"], "bpb_0.125": r["bpb_0.125"],
                              "seconds": round(time.perf_counter() - t0)}), flush=True)
    text = table(results)
    print(text)
    if args.write_docs:
        doc = Path(__file__).resolve().parent.parent / "docs" / "retrieval_payoff.md"
        head = doc.read_text().split("<!-- table -->")[0] if doc.is_file() else ""
        doc.write_text(head + "<!-- table -->\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
