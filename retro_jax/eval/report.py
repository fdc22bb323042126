"""The evaluation report: JSON file, a Markdown table for the terminal, two PNG plots.

Files written into the output folder (the workdir by default), for split S:
  eval_S.json           the report object (`--json` prints the same object)
  eval_S_bpb_alpha.png  bpb(alpha) of every model on one figure (the paper's Figure 6)
  eval_S_leakage.png    histogram of r(C) over the evaluation chunks
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

LABELS = {"retro": "RETRO [on]", "retro_off": "RETRO [off]", "baseline": "baseline", "baseline_2": "baseline 2"}


def _label(name: str, report: dict[str, Any]) -> str:
    label = LABELS.get(name, name)
    k = report.get("models", {}).get(name, {}).get("neighbours")
    return f"{label} (k={k})" if name == "retro" and k else label


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def markdown_table(report: dict[str, Any]) -> str:
    """Models side by side: rows bpb and bpb(alpha) (with the chunks each alpha keeps), then the
    neighbour-count sweep and the totals."""
    names = list(report["bpb"])
    head = ["", *(_label(n, report) for n in names), "chunks kept"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    n_chunks = report["counts"]["chunks"]
    lines.append("| bpb | " + " | ".join(_fmt(report["bpb"][n]) for n in names) + f" | {n_chunks} |")
    if "loss_per_token" in report:
        lines.append("| loss (nats/token) | " + " | ".join(_fmt(report["loss_per_token"][n]) for n in names) + " | |")
    for a in report["alphas"]:
        kept = report["alpha_counts"][a]["chunks"]
        cells = " | ".join(_fmt(report["bpb_alpha"][n][a]) for n in names)
        lines.append(f"| bpb(alpha={a}) | {cells} | {kept} |")
    sweep = report.get("neighbour_sweep") or {}
    if sweep:
        lines += ["", "| neighbours k | " + " | ".join(sweep) + " |", "|---|" + "---|" * len(sweep),
                  "| RETRO bpb | " + " | ".join(_fmt(v["bpb"]) for v in sweep.values()) + " |"]
    c = report["counts"]
    mean_r = _fmt(report["leakage_histogram"]["mean"])
    lines += ["", f"{report['split']}: {c['documents']} documents, {c['chunks']} chunks, {c['tokens']} scored "
              f"tokens, {c['bytes']} scored bytes; windows {report['window']} / stride {report['stride']}; "
              f"r(C) against {report['leakage_neighbours']} neighbours, mean {mean_r}"]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bpb_alpha(report: dict[str, Any], path: Path) -> None:
    """bpb(alpha) curves of every model: x = alpha (max allowed overlap r(C)), y = bpb."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")]  # overlapping curves stay visible
    for i, (name, curve) in enumerate(report["bpb_alpha"].items()):
        xs = [float(a) for a in report["alphas"] if curve[a] is not None]
        ys = [curve[a] for a in report["alphas"] if curve[a] is not None]
        marker, line = styles[i % len(styles)]
        ax.plot(xs, ys, marker=marker, linestyle=line, label=_label(name, report))
    ax.set_xlabel("alpha: max allowed overlap r(C) with the database")
    ax.set_ylabel("bits per byte (chunks with r(C) <= alpha)")
    ax.set_title(f"Leakage-filtered bpb ({report['split']})")
    ax.set_xticks([float(a) for a in report["alphas"]], report["alphas"])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_histogram(report: dict[str, Any], path: Path) -> None:
    """Histogram of r(C) over the evaluation chunks."""
    plt = _pyplot()
    h = report["leakage_histogram"]
    edges, counts = h["edges"], h["counts"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges[:-1], edges[1:])], align="edge",
           edgecolor="black", linewidth=0.5)
    ax.set_xlabel("r(C): longest token run shared with a neighbour / chunk size")
    ax.set_ylabel("evaluation chunks")
    ax.set_title(f"Overlap with the database ({report['split']}, {report['counts']['chunks']} chunks)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(report: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Write the JSON report and both plots into out_dir; returns {kind: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"eval_{report['split']}"
    files = {"json": str(out_dir / f"{stem}.json"), "bpb_alpha_png": str(out_dir / f"{stem}_bpb_alpha.png"),
             "leakage_png": str(out_dir / f"{stem}_leakage.png")}
    plot_bpb_alpha(report, Path(files["bpb_alpha_png"]))
    plot_histogram(report, Path(files["leakage_png"]))
    Path(files["json"]).write_text(json.dumps(dict(report, files=files), indent=2))
    return files
