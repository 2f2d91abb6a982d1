"""``loraserve bench prefix``: the shared-prefix workload is what it says (one system prompt,
short questions, a balanced spread over the adapters, a closed loop) and saves and loads
back equal; the client reads ``cached_tokens`` when a server reports it; a ``--smoke`` run
starts both servers and replays the list through each (structure and counts only, no
timing is asserted); flags the server does not know and prompts longer than the context are
refused before anything starts."""

from __future__ import annotations

import asyncio
import json
import shlex
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from engine.arch import ModelArch
from engine.config import DEMO_DIR
from server.bench.client import run_workload
from server.bench.generators import shared_prefix
from server.bench.metrics import summarize
from server.bench.prefix import (
    SMOKE,
    TARGETS,
    PrefixArgs,
    check_serve_flags,
    prefix_workload,
)
from server.bench.workload import Workload, describe
from server.cli import main as cli_main

PRESET = Path(__file__).resolve().parents[2] / "benchmarks" / "presets" / "tiny"


def test_shared_prefix_workload(tmp_path: Path) -> None:
    w = shared_prefix(
        num_requests=20,
        num_adapters=8,
        prefix_len=100,
        question_range=(16, 49),
        output_range=(16, 33),
        concurrency=4,
        seed=7,
        vocab_size=50,
    )
    assert w.kind == "shared-prefix" and w.popularity == "uniform"
    assert w.max_concurrency == 4 and len(w.requests) == 20
    system = w.requests[0].prompt[:100]
    for r in w.requests:
        assert r.prompt[:100] == system and 16 <= len(r.prompt) - 100 < 49
        assert 16 <= r.output_len < 33 and r.arrival == 0.0
        assert all(3 <= t < 50 for t in r.prompt)
    assert len({r.prompt[100:] for r in w.requests}) == 20  # the questions differ
    assert sorted(Counter(r.adapter for r in w.requests).values()) == [2] * 4 + [3] * 4
    assert describe(w)["adapters_used"] == 8
    w.save(tmp_path / "w.json")
    assert Workload.load(tmp_path / "w.json") == w
    same = shared_prefix(
        num_requests=20, num_adapters=3, prefix_len=100, concurrency=4, seed=7, vocab_size=50
    )
    assert same == w.with_num_adapters(3)  # n changes the adapter column only
    assert all(r.adapter is None for r in w.with_num_adapters(0).requests)
    other = shared_prefix(num_requests=20, prefix_len=100, seed=8, vocab_size=50)
    assert other.requests[0].prompt[:100] != system
    with pytest.raises(ValueError, match="prefix_len"):
        shared_prefix(prefix_len=0, vocab_size=50)


@asynccontextmanager
async def _fake_server(usage: dict[str, object]) -> AsyncIterator[str]:
    """A server that streams two one-token chunks and a final usage chunk, then [DONE],
    compact JSON as loraserve writes it."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        events = [
            {"choices": [{"text": "a"}]},
            {"choices": [{"text": "b"}]},
            {"choices": [], "usage": usage},
        ]
        body = b"".join(
            b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events
        )
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        writer.write(body + b"data: [DONE]\n\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("cached", [None, 96])
def test_client_reads_cached_tokens(cached: int | None) -> None:
    usage: dict[str, object] = {"prompt_tokens": 110, "completion_tokens": 2}
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    w = shared_prefix(num_requests=3, num_adapters=1, prefix_len=100, vocab_size=50)

    async def replay() -> list[int | None]:
        async with _fake_server(usage) as url:
            records, _ = await run_workload(url, w, ["a"], "base", progress=False)
        assert all(r.ok and r.output_len == 2 for r in records)
        assert summarize(records, 1.0)["total_cached_tokens"] == (None if cached is None else 288)
        return [r.cached_tokens for r in records]

    assert asyncio.run(replay()) == [cached] * 3


def test_bench_prefix_smoke(tmp_path: Path) -> None:
    out = tmp_path / "prefix"
    argv = ["bench", "prefix", "--model", str(PRESET), "--load-format", "dummy", "--smoke"]
    argv += ["--threads", "1", "--out", str(out)]
    assert cli_main(argv) == 0
    result = json.loads((out / "prefix.json").read_text())
    workload = Workload.load(out / "workload.json")
    planned = sum(r.output_len for r in workload.requests)
    assert workload.kind == "shared-prefix" and len(workload.requests) == SMOKE["num_requests"]
    assert workload.max_concurrency == SMOKE["concurrency"]
    assert [s["system"] for s in result["systems"]] == ["on", "off"]
    for system in result["systems"]:
        assert system["completed"] == SMOKE["num_requests"] and system["failed"] == 0
        assert system["exact"] and system["total_output_tokens"] == planned
        for key in ("median_ttft_ms", "p90_ttft_ms", "output_throughput", "request_throughput"):
            assert system[key] > 0
        assert "total_cached_tokens" in system and "cached_fraction" in system
        command = (out / f"server-{system['system']}.log").read_text().splitlines()[0]
        assert command.endswith(shlex.join(system["flags"]))
    assert set(result["ratios"]) == {
        "ttft_p50_off_over_on",
        "ttft_p50_on_over_off",
        "ttft_p90_off_over_on",
        "output_throughput_on_over_off",
        "request_throughput_on_over_off",
    }
    assert all(isinstance(r, float) and r > 0 for r in result["ratios"].values())
    assert result["targets"] == TARGETS and result["targets_met"] in (True, False)
    on, off = result["systems"]
    assert "--no-enable-prefix-caching" in off["flags"]
    assert off["total_cached_tokens"] == 0
    # Each adapter computes the system prompt once; every later request reuses it.
    assert on["total_cached_tokens"] > 0
    assert (out / "prefix.png").stat().st_size > 0
    assert len(list((out / "adapters").iterdir())) == SMOKE["num_adapters"]


def test_bench_prefix_refuses_what_cannot_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not know --no-such-flag"):
        check_serve_flags(PRESET, ["--no-such-flag"], "off")
    check_serve_flags(PRESET, ["--engine-in-process", "--num-pages", "64"], "on")
    demo = ModelArch.load(DEMO_DIR / "model")
    args = PrefixArgs(model_dir=DEMO_DIR / "model", out=tmp_path)
    with pytest.raises(ValueError, match=r"context of 128 positions.*--prefix-len 48"):
        prefix_workload(args, demo)
    args.prefix_len = 48
    assert all(len(r.prompt) + r.output_len <= 128 for r in prefix_workload(args, demo).requests)
