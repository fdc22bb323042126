"""Gather a sweep's runs into one table (CSV, Markdown, JSON) and the database-size plot.

    python launch/report.py SWEEP_DIR [--out DIR]

Reads SWEEP_DIR/sweep.json (written by launch/sweep.py) and each run's done.json. One row per
model and database size: database chunks and tokens, bpb with retrieval on and off, the
baseline's bpb (evaluated on the same subset, so the leakage filter is the same), on - baseline
paired by seed, and the same at alpha = 0.125 (chunks sharing fewer than 8 contiguous tokens with
their neighbours); mean ± standard deviation over the seeds that finished. Runs that are
missing, unfinished or failed are listed, never silently left out. The plot is the paper's
Figure 1 (middle): bpb against database size (log axis) per model, baselines as horizontal lines,
and the alpha = 0.125 curves beside it (there the baseline is scored on the chunks that pass the
filter at each size, so it is a dashed curve, not a line).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from launch.spec import SPEC_FILE  # noqa: E402

ALPHA = "0.125"
COLUMNS = ["model", "db_chunks", "db_tokens", "seeds", "retro_bpb", "retro_bpb_std", "retro_off_bpb",
           "retro_off_bpb_std", "baseline_bpb", "baseline_bpb_std", "retro_minus_baseline",
           "retro_minus_baseline_std", "retro_bpb_a0125", "retro_bpb_a0125_std", "baseline_bpb_a0125",
           "baseline_bpb_a0125_std", "retro_minus_baseline_a0125", "retro_minus_baseline_a0125_std",
           "chunks_a0125_share"]


def _stats(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else float("nan")
    return mean, std


def gather(sweep_dir: str | Path) -> dict[str, Any]:
    """{"rows": aggregated rows, "runs": per-run rows, "problems": [(run id, status, detail)], "sweep": spec}."""
    sweep_dir = Path(sweep_dir)
    spec_path = sweep_dir / SPEC_FILE
    if not spec_path.is_file():
        raise FileNotFoundError(f"{spec_path} not found: {str(sweep_dir)!r} is not a sweep folder made by "
                                "launch/sweep.py")
    spec = json.loads(spec_path.read_text())
    per_run, problems = [], []
    for r in spec["runs"]:
        d = sweep_dir / "runs" / r["id"]
        if (d / "done.json").is_file():
            per_run.append({**r, "result": json.loads((d / "done.json").read_text())})
        elif (d / "failed.json").is_file():
            problems.append((r["id"], "failed", json.loads((d / "failed.json").read_text()).get("error", "")))
        else:
            problems.append((r["id"], "unfinished" if d.is_dir() else "missing", ""))
    rows = []
    for model in [m["name"] for m in spec["models"]]:
        for chunks in spec["db_chunks"]:
            done = [x["result"] for x in per_run if x["kind"] == "retro" and x["model"] == model
                    and x["chunks"] == chunks]
            if not done:
                continue
            row: dict[str, Any] = {"model": model, "db_chunks": done[0]["database"]["chunks"],
                                   "db_tokens": done[0]["database"]["tokens"],
                                   "seeds": f"{len(done)} of {len(spec['seeds'])}"}
            series = {
                "retro_bpb": [x["bpb"]["retro"] for x in done],
                "retro_off_bpb": [x["bpb"]["retro_off"] for x in done],
                "baseline_bpb": [x["bpb"]["baseline"] for x in done],
                "retro_minus_baseline": [x["bpb"]["retro"] - x["bpb"]["baseline"] for x in done],
                "retro_bpb_a0125": [x["bpb_alpha"]["retro"][ALPHA] for x in done],
                "baseline_bpb_a0125": [x["bpb_alpha"]["baseline"][ALPHA] for x in done],
                "retro_minus_baseline_a0125": [_sub(x["bpb_alpha"]["retro"][ALPHA], x["bpb_alpha"]["baseline"][ALPHA])
                                               for x in done],
            }
            for key, vals in series.items():
                row[key], row[key + "_std"] = _stats(vals)
            counts = done[0].get("alpha_counts", {})
            total = counts.get("1", {}).get("chunks") or 0
            row["chunks_a0125_share"] = counts[ALPHA]["chunks"] / total if total else float("nan")
            rows.append(row)
    return {"rows": rows, "runs": per_run, "problems": problems, "sweep": spec}


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _pm(mean: float, std: float, digits: int = 4) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if math.isfinite(std) else "")


def markdown(g: dict[str, Any]) -> str:
    lines = ["| model | database chunks | tokens | seeds | RETRO bpb | retrieval off | baseline | RETRO - baseline "
             f"| RETRO, alpha = {ALPHA} | baseline, alpha = {ALPHA} | RETRO - baseline, alpha = {ALPHA} "
             f"| chunks with alpha <= {ALPHA} |",
             "|---|---:|---:|---|---|---|---|---|---|---|---|---:|"]
    for r in g["rows"]:
        share = r["chunks_a0125_share"]
        lines.append(
            f"| {r['model']} | {r['db_chunks']:,} | {r['db_tokens']:,} | {r['seeds']} | "
            f"{_pm(r['retro_bpb'], r['retro_bpb_std'])} | {_pm(r['retro_off_bpb'], r['retro_off_bpb_std'])} | "
            f"{_pm(r['baseline_bpb'], r['baseline_bpb_std'])} | "
            f"{_pm(r['retro_minus_baseline'], r['retro_minus_baseline_std'])} | "
            f"{_pm(r['retro_bpb_a0125'], r['retro_bpb_a0125_std'])} | "
            f"{_pm(r['baseline_bpb_a0125'], r['baseline_bpb_a0125_std'])} | "
            f"{_pm(r['retro_minus_baseline_a0125'], r['retro_minus_baseline_a0125_std'])} | "
            + (f"{share:.0%} |" if isinstance(share, float) and math.isfinite(share) else "n/a |"))
    if g["problems"]:
        lines += ["", f"Not in the table ({len(g['problems'])} runs):", ""]
        lines += [f"- {rid}: {state}" + (f" ({detail})" if detail else "") for rid, state, detail in g["problems"]]
    return "\n".join(lines) + "\n"


def plot(g: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (suffix, title) in zip(axes, (("", "all validation chunks"),
                                          ("_a0125", f"alpha = {ALPHA} (no 8-token overlap)"))):
        for i, model in enumerate(dict.fromkeys(r["model"] for r in g["rows"])):
            rows = [r for r in g["rows"] if r["model"] == model]
            c = colours[i % len(colours)]
            x = [r["db_tokens"] for r in rows]
            ax.errorbar(x, [r["retro_bpb" + suffix] for r in rows],
                        yerr=[0 if not math.isfinite(r["retro_bpb" + suffix + "_std"]) else r["retro_bpb" + suffix + "_std"]
                              for r in rows], color=c, marker="o", capsize=3, label=f"{model} RETRO")
            if suffix:  # which chunks pass the filter depends on the database: the baseline's too
                ax.plot(x, [r["baseline_bpb" + suffix] for r in rows], color=c, linestyle="--", marker="x",
                        linewidth=1, label=f"{model} baseline")
            else:  # the baseline reads nothing: one value whatever the database
                base = _stats([r["baseline_bpb"] for r in rows])[0]
                ax.axhline(base, color=c, linestyle="--", linewidth=1, label=f"{model} baseline")
        ax.set_xscale("log")
        ax.set_xlabel("retrieval database size (tokens)")
        ax.set_ylabel("validation bits per byte")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"sweep {g['sweep']['name']}: bpb against database size (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(g: dict[str, Any], out: Path) -> dict[str, str]:
    """report.md, report.csv (one row per model and size), runs.csv (one row per run), report.json, report.png."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "report.md", "csv": out / "report.csv", "runs_csv": out / "runs.csv",
             "json": out / "report.json", "plot": out / "report.png"}
    files["markdown"].write_text(markdown(g))
    with open(files["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(g["rows"])
    with open(files["runs_csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "kind", "model", "seed", "db_chunks", "db_tokens", "retro_bpb", "retro_off_bpb",
                    "baseline_bpb", f"retro_bpb_a{ALPHA}", f"baseline_bpb_a{ALPHA}", "seconds"])
        for x in g["runs"]:
            res = x["result"]
            bpb, alpha = res.get("bpb", {}), res.get("bpb_alpha", {})
            w.writerow([x["id"], x["kind"], x["model"], x["seed"], res["database"]["chunks"],
                        res["database"]["tokens"], bpb.get("retro"), bpb.get("retro_off"), bpb.get("baseline"),
                        alpha.get("retro", {}).get(ALPHA), alpha.get("baseline", {}).get(ALPHA), res.get("seconds")])
        for rid, state, detail in g["problems"]:
            w.writerow([rid, state, detail])
    files["json"].write_text(json.dumps({"rows": g["rows"], "problems": g["problems"]}, indent=2))
    if g["rows"]:
        plot(g, files["plot"])
    else:
        del files["plot"]
    return {k: str(v) for k, v in files.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launch/report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", help="the sweep's folder (launch/sweep.py --out)")
    p.add_argument("--out", help="where to write the report (default SWEEP_DIR/report)")
    args = p.parse_args(argv)
    try:
        g = gather(args.sweep_dir)
    except (OSError, ValueError, KeyError) as e:
        print(f"launch/report.py: error: {e}", file=sys.stderr)
        return 2
    print(markdown(g))
    files = write(g, Path(args.out or Path(args.sweep_dir) / "report"))
    print("wrote " + ", ".join(files.values()), file=sys.stderr)
    return 1 if g["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
