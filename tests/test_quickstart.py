"""`make quickstart` end to end at a tiny size, exactly the path the Makefile runs (a fresh
`retro-jax quickstart` process on this machine's one CPU device: the embedded stdlib corpus, the
real MiniLM embedder, both trainings, the evaluation report), so it cannot silently break; and a
rerun skips what is complete and reproduces the same numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _quickstart(argv: list[str]) -> str:
    """`retro-jax quickstart ...` as the Makefile runs it; its standard output."""
    done = subprocess.run([sys.executable, "-m", "retro_jax.cli", *argv], capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_quickstart_end_to_end_then_rerun_skips_and_agrees(tmp_path):
    out = tmp_path / "qs"
    argv = ["quickstart", "--out", str(out), "--steps", "3", "--max-chunks", "300", "--val-fraction", "0.2"]
    printed = _quickstart(argv)
    assert "RETRO [on] (k=2)" in printed and "bpb(alpha=0.125)" in printed  # the report's table
    assert "retrieval on - off:" in printed and "PAID OFF" not in printed  # no verdict off the default budget
    summary = json.loads((out / "quickstart.json").read_text())
    assert set(summary["bpb"]) == {"retro", "retro_off", "baseline"}
    assert all(np.isfinite(v) and v > 0 for v in summary["bpb"].values())
    assert summary["bpb"]["retro"] != summary["bpb"]["retro_off"]  # the neighbours reach the model
    metrics = {name: (out / name / "metrics.jsonl").read_text() for name in ("retro", "baseline")}
    assert all(json.loads(text.splitlines()[-1])["step"] == 3 for text in metrics.values())
    assert (out / "retro" / "eval_validation_bpb_alpha.png").read_bytes()[:4] == b"\x89PNG"

    built = {p: p.stat().st_mtime_ns for p in (out / "db").rglob("*") if p.is_file()}
    assert "evaluated already" in _quickstart(argv)  # the database, both runs and their evaluation are complete
    assert {p: p.stat().st_mtime_ns for p in (out / "db").rglob("*") if p.is_file()} == built
    assert {name: (out / name / "metrics.jsonl").read_text() for name in metrics} == metrics  # no step retrained
    assert json.loads((out / "quickstart.json").read_text())["bpb"] == summary["bpb"]


def _report(on: float, off: float, base: float) -> dict:
    return {"bpb": {"retro": on, "retro_off": off, "baseline": base},
            "bpb_alpha": {n: {"0.125": v + 0.1} for n, v in (("retro", on), ("retro_off", off), ("baseline", base))}}


def test_payoff_verdict_needs_both_differences_beyond_the_measured_spread():
    from retro_jax.quickstart import PAYOFF_SPREAD, payoff_verdict

    s_off, s_base = PAYOFF_SPREAD["on_minus_off"], PAYOFF_SPREAD["on_minus_baseline"]
    clear = payoff_verdict(_report(1.0, 1.0 + 2 * s_off, 1.0 + 2 * s_base), default_budget=True)
    assert clear["paid_off"] is True and "RETRIEVAL PAID OFF" in clear["text"]
    for off, base in ((1.0 + s_off / 2, 1.0 + 2 * s_base), (1.0 + 2 * s_off, 1.0 + s_base / 2)):
        within = payoff_verdict(_report(1.0, off, base), default_budget=True)
        assert within["paid_off"] is False and "DID NOT PAY OFF" in within["text"]
    other = payoff_verdict(_report(1.0, 1.5, 1.5), default_budget=False)  # no spread measured there
    assert other["paid_off"] is None and "PAY OFF" not in other["text"]
    assert abs(other["on_minus_baseline_alpha_0.125"] - (-0.5)) < 1e-12
