"""``benchmarks/compare.py``: every selected system replays the request list and generates
exactly the planned tokens, the ratios are there (no timing is asserted); and the
llama-30m preset loads with dummy weights at its advertised size."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from benchmarks.compare import main as compare_main
from engine import LLM
from engine.config import DEMO_DIR

PRESET = Path(__file__).resolve().parents[2] / "benchmarks" / "presets" / "llama-30m"
SYSTEMS = ("loraserve-http", "loraserve", "peft-mixed")


def test_bench_compare_smoke(tmp_path: Path) -> None:
    out = tmp_path / "compare"
    argv = ["--model", str(DEMO_DIR / "model"), "--dtype", "float32"]
    argv += ["--num-requests", "6", "--num-adapters", "2", "--ranks", "4,8"]
    argv += ["--input-range", "4,12", "--output-range", "2,6", "--seed", "3"]
    argv += ["--systems", ",".join(SYSTEMS), "--threads", "1", "--out", str(out)]
    threads = torch.get_num_threads()
    assert compare_main(argv) == 0
    assert torch.get_num_threads() == threads  # the run puts the caller's setting back
    result = json.loads((out / "compare.json").read_text())
    planned = [r["output_len"] for r in json.loads((out / "workload.json").read_text())["requests"]]
    systems = {s["system"]: s for s in result["systems"]}
    assert set(systems) == set(SYSTEMS)
    for system in systems.values():
        assert system["n"] == 2
        assert system["completed"] == 6 and system["failed"] == 0
        assert system["exact"] and system["generated_tokens"] == sum(planned)
        assert system["total_output_tokens"] == sum(planned)
    assert result["reference"] == "loraserve HTTP"
    assert set(result["ratios"]) == {s["label"] for s in systems.values()}
    assert all(isinstance(r, float) and r > 0 for r in result["ratios"].values())
    assert result["ratios"]["loraserve HTTP"] == 1.0
    assert (out / "compare.png").stat().st_size > 0
    assert len(list((out / "adapters").iterdir())) == 2


def test_llama_30m_preset_loads_with_dummy_weights() -> None:
    llm = LLM(PRESET, load_format="dummy", dtype="float32", num_pages=1024, max_num_seqs=4)
    count = sum(p.numel() for p in llm.engine.model.parameters())
    assert 25_000_000 <= count <= 50_000_000
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(PRESET))  # type: ignore[no-untyped-call]
    assert sum(p.numel() for p in hf.parameters()) == count == 32_317_952
    assert llm.engine.model.arch.vocab_size == 8000
