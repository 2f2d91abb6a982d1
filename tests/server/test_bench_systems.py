"""The systems a sweep replays a workload through time every planned token (nothing timed
here is asserted): loraserve (server/bench/replay.py) and each Hugging Face baseline
(benchmarks/baselines.py)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.baselines import BASELINES, peft_model
from engine.config import DEMO_DIR, EngineConfig
from server.bench.generators import synthetic_w2
from server.bench.metrics import RequestRecord
from server.bench.replay import run_loraserve
from server.cli import main
from tests.server.conftest import demo_adapters

WORKLOAD = synthetic_w2(
    num_adapters=2,
    alpha=1.0,
    rate=200.0,
    cv=1.0,
    num_requests=6,
    input_range=(3, 8),
    output_range=(2, 5),
    seed=3,
    vocab_size=259,
)


def check(records: list[RequestRecord]) -> None:
    for record, request in zip(records, WORKLOAD.requests, strict=True):
        assert record.error is None
        assert record.output_len == len(record.token_times) == request.output_len
        assert record.start <= record.token_times[0] <= record.token_times[-1] <= record.end


def test_loraserve_replay() -> None:
    adapters = list(demo_adapters("upper", "swapcase").items())
    config = EngineConfig.create(DEMO_DIR / "model", dtype="float32")
    records = run_loraserve(config, WORKLOAD, adapters)
    check(records)
    assert {r.adapter for r in records} == {"upper", "swapcase"}


@pytest.mark.parametrize("system", sorted(BASELINES))
def test_baseline_replay(system: str) -> None:
    adapters = list(demo_adapters("upper", "swapcase").items())
    model = peft_model(DEMO_DIR / "model", adapters, torch.float32)
    names = [name for name, _ in adapters]
    check(BASELINES[system](model, WORKLOAD, names, batch_size=4))
    # merge-and-swap leaves no adapter merged behind it
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_sweep_fits_its_lengths_to_the_model(capsys: pytest.CaptureFixture[str]) -> None:
    """Given ranges that cannot fit the model's context are refused before any engine is
    built (exit 2, the reason on stderr); ranges left out are clipped (``fit_ranges``)."""
    base = ["bench", "sweep", "--model", str(DEMO_DIR / "model"), "--adapters", "0"]
    too_long = ["--input-range", "8,200", "--output-range", "8,100"]
    assert main([*base, *too_long]) == 2
    err = capsys.readouterr().err
    assert "298 in all, more than the model's context of 128 tokens" in err
