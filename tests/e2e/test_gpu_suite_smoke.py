"""``benchmarks/gpu_suite.sh`` runs end to end in its CPU smoke mode, so it is known to work
before a GPU is at hand: every step finishes and leaves its JSON and plots."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_suite_smoke_mode(tmp_path: Path) -> None:
    out = tmp_path / "suite"
    env = os.environ | {"SMOKE": "1", "OUT": str(out), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the smoke sizes run the torch references
    done = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # sweep-bf16-eager repeats sweep-bf16 on the CPU (eager there anyway): not in smoke runs;
    # nor sweep-baselines: the smoke run's sweep-bf16 runs the PEFT server beside loraserve.
    steps = ("kernels", "nf4", "graphs", "sweep-bf16", "sweep-nf4")
    timings = (out / "timings.txt").read_text()
    for step in steps:
        assert f"== {step}:" in timings, step
    assert "FAILED" not in timings
    assert "== sweep-bf16-eager:" not in timings and "== sweep-baselines:" not in timings
    assert json.loads((out / "kernels" / "lora_kernels.json").read_text())
    assert json.loads((out / "nf4" / "nf4.json").read_text())["matmuls"]
    graphs = json.loads((out / "graphs" / "decode_graphs.json").read_text())
    assert all(not s["differ"] for e in graphs["equality"] for s in e["sizes"])
    assert all(e["padded_steps"] > 0 for e in graphs["equality"])
    assert set(graphs["summary"]) >= {"graphs_over_eager_batch1", "lora_overhead_graphs"}
    sweep = json.loads((out / "sweep-bf16" / "sweep.json").read_text())
    runs = {(r["system"], r["n"]) for r in sweep["runs"]}
    assert runs >= {("loraserve", 0), ("loraserve", 2), ("PEFT server", 2)}, runs
    assert all(r["failed"] == 0 for r in sweep["runs"])
    for plot in ("throughput_vs_n.png", "lora_overhead.png", "latency_cdf.png"):
        assert (out / "sweep-bf16" / plot).stat().st_size > 0
    nf4 = json.loads((out / "sweep-nf4" / "sweep.json").read_text())
    assert nf4["args"]["quantization"] == "nf4"
    assert {(r["system"], r["n"]) for r in nf4["runs"]} == {("loraserve", 2)}
