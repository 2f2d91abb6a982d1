"""The load test itself, in a few seconds: it must keep passing as the server changes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_short_load_test_passes(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "summary.json"
    command = [sys.executable, "benchmarks/load_test.py", "--clients", "8", "--duration", "4"]
    command += ["--num-words", "3", "--num-pages", "2048", "--json", str(out)]
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["passed"] and summary["completed"] > 0 and summary["disconnected"] >= 0
    assert "PASS" in result.stdout
