"""The load test itself, in its soak mode for two minutes: it must keep passing as the server
changes. One run covers the plain mode too (the soak is the same load with more on top): a
phase per scheduling policy, shared prefixes, in-place updates, hot loads and unloads,
disconnects, and the resident-memory check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_two_minute_soak_passes(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "summary.json"
    # 100 s of load: with the solo runs first and a server per phase, two minutes in all.
    command = [sys.executable, "benchmarks/load_test.py", "--soak", "--duration", "100"]
    # One word per model: fewer solo runs to measure first (each is repeated more often).
    command += ["--clients", "8", "--num-words", "1", "--num-pages", "2048", "--json", str(out)]
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["passed"] and "PASS" in result.stdout
    assert summary["errors"] == {} and summary["mismatches"] == []
    assert list(summary["phases"]) == ["fcfs", "fair", "priority"]
    assert all(phase["ended"] > 0 for phase in summary["phases"].values())
    assert summary["completed"] > 0 and summary["disconnected"] > 0
    assert summary["in_place_updates"] > 0 and summary["live_requests_checked"] > 0
    assert summary["hot_loads"] > 0 and summary["prefix_cache_hit_tokens"] > 0
    assert set(summary["rss_mib"]) == {"10%", "1/3", "50%", "end"}
