"""``loraserve bench serve`` against a live server: every planned token arrives, and the
timings come from the stream."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from server.bench.client import run_workload
from server.bench.metrics import SLO, summarize
from server.bench.workloads import synthetic_w2
from server.cli import main as cli_main
from tests.server.conftest import BASE, demo_adapters, make_engine, serve


def test_bench_serve_streams_every_planned_token(tmp_path: Path) -> None:
    served = serve(make_engine(demo_adapters("upper", "swapcase")))
    try:
        workload = synthetic_w2(
            num_adapters=2,
            alpha=1.0,
            rate=50.0,
            cv=1.0,
            num_requests=12,
            input_range=(4, 12),
            output_range=(3, 9),
            seed=7,
            vocab_size=259,
        )
        records, duration = asyncio.run(
            run_workload(served.url, workload, ["upper", "swapcase"], BASE, progress=False)
        )
        assert all(r.error is None for r in records)
        for record, request in zip(records, workload.requests, strict=True):
            assert record.output_len == request.output_len  # ignore_eos + min_tokens
            assert len(record.token_times) == request.output_len
            assert record.start < record.token_times[0] <= record.token_times[-1] <= record.end
        assert {r.adapter for r in records} == {"upper", "swapcase"}
        summary = summarize(records, duration, {"ttft<6s": SLO(6.0, None)})
        assert summary["completed"] == 12 and summary["failed"] == 0
        assert summary["total_output_tokens"] == sum(r.output_len for r in workload.requests)
        assert 0 < summary["mean_ttft_ms"] < summary["mean_e2el_ms"]
        # The command: a saved workload replayed, the summary printed, JSON written.
        saved = tmp_path / "w2.json"
        workload.save(saved)
        out = tmp_path / "result.json"
        assert (
            cli_main(
                ["bench", "serve", "--url", served.url, "--workload", str(saved), "--out", str(out)]
            )
            == 0
        )
        result = json.loads(out.read_text())
        assert result["summary"]["completed"] == 12
    finally:
        served.stop()
