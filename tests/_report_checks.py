"""What an evaluation report must hold, checked from its own numbers (tests/test_eval_run.py and
tests/test_quickstart.py): the models' columns, bpb that is the token loss over the counted
bytes, bpb(alpha) and its kept counts that grow with alpha up to the whole split, a histogram
over every chunk, and a Markdown table that shows exactly those numbers."""

from __future__ import annotations

import math
import re

import pytest

# The table's column of each model (README: "RETRO [on] (k=2) | RETRO [off] | baseline").
COLUMNS = {"retro": "RETRO [on] (k={k})", "retro_off": "RETRO [off]", "baseline": "baseline"}
FOOTER = re.compile(r"^(\w+): (\d+) documents, (\d+) chunks, (\d+) scored tokens, (\d+) scored bytes; "
                    r"windows (\d+) / stride (\d+); r\(C\) against (\d+) neighbours, mean ([\d.]+)$")


def _cell(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def assert_numbers_hold(report: dict, models: tuple[str, ...]) -> None:
    """The report's numbers agree with each other (every model scored on the same targets)."""
    assert list(report["bpb"]) == list(models) == list(report["bpb_alpha"]) == list(report["loss_per_token"])
    c, alphas = report["counts"], report["alphas"]
    assert [float(a) for a in alphas] == sorted(float(a) for a in alphas) and alphas[-1] == "1"
    assert 0 < c["documents"] <= c["chunks"] and c["tokens"] > 0 and c["bytes"] > 0
    for name in models:
        bpb, loss = report["bpb"][name], report["loss_per_token"][name]
        assert math.isfinite(bpb) and bpb > 0
        # bits per byte = (nats per token) x tokens / (ln 2 x bytes): the same targets, counted once.
        assert bpb == pytest.approx(loss * c["tokens"] / (math.log(2) * c["bytes"]), rel=1e-9)
        kept_bits = []
        for a in alphas:
            value, kept = report["bpb_alpha"][name][a], report["alpha_counts"][a]
            assert (value is None) == (kept["bytes"] == 0), (name, a)
            kept_bits.append(0.0 if value is None else value * kept["bytes"])
        assert all(x <= y * (1 + 1e-9) for x, y in zip(kept_bits, kept_bits[1:])), (name, kept_bits)
        assert report["bpb_alpha"][name]["1"] == pytest.approx(bpb, rel=1e-9)  # r(C) <= 1 keeps every chunk
    kept = [report["alpha_counts"][a] for a in alphas]
    for key in ("chunks", "tokens", "bytes"):
        assert [k[key] for k in kept] == sorted(k[key] for k in kept) and kept[-1][key] == c[key], key
    hist = report["leakage_histogram"]
    assert sum(hist["counts"]) == c["chunks"] and hist["zero"] == report["alpha_counts"]["0"]["chunks"]
    assert 0 <= hist["mean"] <= 1
    for k, s in report["neighbour_sweep"].items():
        assert s["bpb_alpha"]["1"] == pytest.approx(s["bpb"], rel=1e-9), k


def assert_table_shows(table: str, report: dict) -> None:
    """The Markdown table (as `retro-jax eval` and the quickstart print it) shows the report."""
    lines = table.strip().splitlines()
    rows = {}
    for line in lines:
        if line.startswith("|") and not line.startswith("|---"):
            cells = [x.strip() for x in line.strip("|").split("|")]
            rows.setdefault(cells[0], cells[1:])
    names, c = list(report["bpb"]), report["counts"]
    k = report["models"].get("retro", {}).get("neighbours")
    assert rows[""] == [COLUMNS[n].format(k=k) for n in names] + ["chunks kept"]
    assert rows["bpb"] == [_cell(report["bpb"][n]) for n in names] + [str(c["chunks"])]
    assert rows["loss (nats/token)"] == [_cell(report["loss_per_token"][n]) for n in names] + [""]
    for a in report["alphas"]:
        assert rows[f"bpb(alpha={a})"] == ([_cell(report["bpb_alpha"][n][a]) for n in names]
                                           + [str(report["alpha_counts"][a]["chunks"])])
    sweep = report["neighbour_sweep"]
    if sweep:
        assert rows["neighbours k"] == list(sweep)
        assert rows["RETRO bpb"] == [_cell(s["bpb"]) for s in sweep.values()]
    else:
        assert "neighbours k" not in rows
    footer = FOOTER.match(next(line for line in lines if line.startswith(report["split"] + ":")))
    assert footer is not None
    assert footer.groups()[1:8] == tuple(str(x) for x in (c["documents"], c["chunks"], c["tokens"], c["bytes"],
                                                           report["window"], report["stride"],
                                                           report["leakage_neighbours"]))
    assert footer[9] == _cell(report["leakage_histogram"]["mean"])
