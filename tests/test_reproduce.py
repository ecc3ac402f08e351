"""The seed-reproduction script's --quick mode end to end: every method trained through the CLI,
the EANN assembled, the table, the verdicts and the plots written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_reproduce_quick(tmp_path: Path, fmnist: Path) -> None:  # fmnist: the data set exists
    out = tmp_path / "reproduce"
    done = subprocess.run(
        # Two at a time: the quick runs are mostly a process's start-up.
        [sys.executable, "benchmarks/reproduce_seed.py", "--quick", "--jobs", "2", "--out",
         str(out), "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    results = json.loads((out / "results.json").read_text())
    summary = results["summary"]
    assert set(summary) == {"OPT", "CONST", "LINEAR", "SIEVE", "SIEVE-AUTHORS", "LINEAR-ALT",
                            "LINEAR-ALT-AUTHORS", "ADALOSS", "CONST-2d"}
    assert all(len(exits) == 3 for m, exits in summary.items() if m != "CONST-2d")
    assert len(summary["CONST-2d"]) == 6
    # The relative increase is recomputed from the per-seed errors the runs wrote.
    opt, sieve = results["runs"]["OPT"][0]["top1"], results["runs"]["SIEVE"][0]["top1"]
    assert summary["SIEVE"][-1]["rel_mean"] == pytest.approx((sieve[-1] - opt[-1]) / opt[-1])
    run = json.loads((out / "d8_sieve_s0" / "results.json").read_text())
    assert sieve == [e["top1_error"] for e in run["exits"]]

    eann = results["eann"]
    assert eann["depths"] == [8, 14, 26]  # depth ratio 2, the seed's b
    errors = [o["top1_error"] for o in eann["schedule"]]
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == len(errors)
    report = (out / "results.md").read_text()
    for claim in ("SIEVE near OPT", "CONST more than 10%", "LINEAR more than 10%",
                  "SIEVE with the authors' alternating rule", "LINEAR with alternating",
                  "close to CONST at depth 2d", "Cost ratio C"):
        assert claim in report
    assert (out / "schemes.png").stat().st_size > 10_000
    assert (out / "eann" / "eann_curve.png").exists()
    # The authors' alternating rule reached the trainer of its run only.
    assert "alternating (rule: authors)" in (out / "d8_sieve-authors_s0.log").read_text()
    assert "alternating (rule: seed)" in (out / "d8_sieve_s0.log").read_text()

    # A subset of the methods: the finished runs are reused, the report covers only them.
    done = subprocess.run(
        [sys.executable, "benchmarks/reproduce_seed.py", "--quick", "--out", str(out),
         "--data-dir", str(tmp_path / "data"), "--methods", "SIEVE", "SIEVE-AUTHORS"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "] train d" not in done.stdout  # nothing trained again
    subset = json.loads((out / "results.json").read_text())
    assert set(subset["summary"]) == {"OPT", "SIEVE", "SIEVE-AUTHORS"}
    assert subset["eann"] is None
    report = (out / "results.md").read_text()
    assert "the authors' alternating rule" in report and "the seed's rule" in report
    assert "CONST" not in report and "Cost ratio C" not in report
