"""`make quickstart` end to end at a tiny size, exactly the path the Makefile runs (a fresh
`retro-jax quickstart` process on this machine's one CPU device: the embedded stdlib corpus, the
real MiniLM embedder, both trainings, the evaluation report), so it cannot silently break; and a
rerun skips what is complete and reproduces the same numbers. Both runs' output must hold what the
report promises: the models' columns, numbers that agree with each other, counts that are the
database's validation split, and the verdict line's differences computed from the report's bpb."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

pytest.register_assert_rewrite("_report_checks")  # its failures name the values

from _report_checks import assert_numbers_hold, assert_table_shows

pytestmark = pytest.mark.slow


def _quickstart(argv: list[str]) -> str:
    """`retro-jax quickstart ...` as the Makefile runs it; its standard output."""
    done = subprocess.run([sys.executable, "-m", "retro_jax.cli", *argv], capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


VERDICT = re.compile(r"^retrieval on - off: (\S+) bpb; on - baseline: (\S+) bpb\. On the chunks with r\(C\) <= 0\.125 "
                     r"\(no 8-token overlap with a neighbour\): on - off (\S+), on - baseline (\S+) bpb$", re.M)
MODELS = ("retro", "retro_off", "baseline")


def _eval_table(printed: str) -> str:
    """The evaluation's Markdown table in the quickstart's output (after the presets' table)."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|  | "))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("validation: "))
    return "\n".join(lines[start:end + 1])


def _assert_output_holds(printed: str, out) -> dict:
    """What the quickstart prints and writes: the evaluation report (its numbers agree, the printed
    table shows them), counts that are the database's validation split, and the verdict line's
    differences computed from the report's bpb."""
    summary = json.loads((out / "quickstart.json").read_text())
    report = json.loads((out / "retro" / "eval_validation.json").read_text())
    assert_numbers_hold(report, MODELS)
    assert_table_shows(_eval_table(printed), report)
    assert summary["bpb"] == report["bpb"] and summary["bpb_alpha"] == report["bpb_alpha"]
    assert summary["loss_per_token"] == report["loss_per_token"]

    splits = json.loads(next(line for line in printed.splitlines() if line.startswith('{"splits"')))["splits"]
    val, c = splits["validation"], report["counts"]
    assert (c["documents"], c["chunks"], c["chunk_bytes"]) == (val["documents"], val["chunks"], val["bytes"])
    assert c["tokens"] == val["tokens"] - val["documents"]  # every token is a target but each document's first

    bpb, alpha = report["bpb"], {n: report["bpb_alpha"][n]["0.125"] for n in MODELS}
    diff = lambda a, b: None if a is None or b is None else a - b  # noqa: E731 (no chunk kept: None)
    want = {"on_minus_off": diff(bpb["retro"], bpb["retro_off"]),
            "on_minus_baseline": diff(bpb["retro"], bpb["baseline"]),
            "on_minus_off_alpha_0.125": diff(alpha["retro"], alpha["retro_off"]),
            "on_minus_baseline_alpha_0.125": diff(alpha["retro"], alpha["baseline"])}
    payoff = summary["payoff"]
    assert {k: payoff[k] for k in want} == want  # the same floats, subtracted
    assert VERDICT.search(printed).groups() == tuple("-" if x is None else f"{x:+.4f}" for x in want.values())
    assert payoff["paid_off"] is None  # no verdict off the default budget: no spread measured here
    assert "seed-to-seed spread" not in printed and "PAID OFF" not in printed
    return summary


def test_quickstart_end_to_end_then_rerun_skips_and_agrees(tmp_path):
    out = tmp_path / "qs"
    argv = ["quickstart", "--out", str(out), "--steps", "3", "--max-chunks", "300", "--val-fraction", "0.2"]
    summary = _assert_output_holds(_quickstart(argv), out)
    assert summary["bpb"]["retro"] != summary["bpb"]["retro_off"]  # the neighbours reach the model
    metrics = {name: (out / name / "metrics.jsonl").read_text() for name in ("retro", "baseline")}
    assert all(json.loads(text.splitlines()[-1])["step"] == 3 for text in metrics.values())
    assert (out / "retro" / "eval_validation_bpb_alpha.png").read_bytes()[:4] == b"\x89PNG"

    built = {p: p.stat().st_mtime_ns for p in (out / "db").rglob("*") if p.is_file()}
    printed = _quickstart(argv)
    assert "evaluated already" in printed  # the database, both runs and their evaluation are complete
    assert {p: p.stat().st_mtime_ns for p in (out / "db").rglob("*") if p.is_file()} == built
    assert {name: (out / name / "metrics.jsonl").read_text() for name in metrics} == metrics  # no step retrained
    assert _assert_output_holds(printed, out)["bpb"] == summary["bpb"]


def _report(on: float, off: float, base: float) -> dict:
    return {"bpb": {"retro": on, "retro_off": off, "baseline": base},
            "bpb_alpha": {n: {"0.125": v + 0.1} for n, v in (("retro", on), ("retro_off", off), ("baseline", base))}}


def test_payoff_verdict_needs_both_differences_beyond_the_measured_spread():
    from retro_jax.quickstart import PAYOFF_SPREAD, payoff_verdict

    s_off, s_base = PAYOFF_SPREAD["on_minus_off"], PAYOFF_SPREAD["on_minus_baseline"]
    cases = [(1.0 + 2 * s_off, 1.0 + 2 * s_base, True), (1.0 + s_off / 2, 1.0 + 2 * s_base, False),
             (1.0 + 2 * s_off, 1.0 + s_base / 2, False), (1.0 - 2 * s_off, 1.0 - 2 * s_base, False)]
    for off, base, paid in cases:
        v = payoff_verdict(_report(1.0, off, base), default_budget=True)
        assert v["on_minus_off"] == 1.0 - off and v["on_minus_baseline"] == 1.0 - base
        assert v["paid_off"] is paid and ("RETRIEVAL PAID OFF" if paid else "DID NOT PAY OFF") in v["text"]
        beats = [1.0 - off < -s_off, 1.0 - base < -s_base]
        assert (f"on beats off by more than it: {'yes' if beats[0] else 'no'}; on beats the baseline by more "
                f"than it: {'yes' if beats[1] else 'no'}") in v["text"]
        assert VERDICT.search(v["text"]).groups()[:2] == (f"{1.0 - off:+.4f}", f"{1.0 - base:+.4f}")
    other = payoff_verdict(_report(1.0, 1.5, 1.5), default_budget=False)  # no spread measured there
    assert other["paid_off"] is None and "PAY OFF" not in other["text"]
    assert abs(other["on_minus_baseline_alpha_0.125"] - (-0.5)) < 1e-12
