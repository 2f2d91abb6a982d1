"""``loraserve bench fairness``: the flooding workload is what it says (a closed-loop flooder
first, modest Poisson streams after, in arrival order) and is deterministic; the client runs
the flooder as a closed loop of its own and adds the priority field; the per-client
summaries, series and ratios are right on hand-made records; a ``--smoke`` run starts the
three servers and writes the JSON and the plots (structure and counts only, no timing is
asserted)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shlex
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from engine.arch import ModelArch
from server.bench.client import run_workload, sample_gauges
from server.bench.fairness import (
    SMOKE,
    FairnessArgs,
    fairness_workload,
    load_result,
    priority_fields,
)
from server.bench.fairness_metrics import (
    TARGETS,
    client_summaries,
    fairness_ratios,
    group_summaries,
    queue_series,
    request_points,
    served_over_time,
    stalled,
    targets_met,
)
from server.bench.fairness_workload import FLOODER, client_group, flooding
from server.bench.metrics import RequestRecord
from server.bench.workload import Workload
from server.cli import main as cli_main

PRESET = Path(__file__).resolve().parents[2] / "benchmarks" / "presets" / "tiny"


def _workload(**kw: Any) -> Workload:
    args: dict[str, Any] = {
        "num_adapters": 4,
        "flood_requests": 30,
        "flood_concurrency": 6,
        "modest_rate": 5.0,
        "modest_start_s": 2.0,
        "duration_s": 20.0,
        "input_range": (8, 17),
        "output_range": (4, 9),
        "seed": 7,
        "vocab_size": 50,
    }
    return flooding(**{**args, **kw})


def test_flooding_workload(tmp_path: Path) -> None:
    w = _workload()
    assert w.kind == "fairness" and w.max_concurrency is None and w.num_adapters == 4
    assert w.params["flood_concurrency"] == 6 and w.params["flooder"] == FLOODER
    flood, modest = w.requests[:30], w.requests[30:]
    assert all(r.adapter == FLOODER and r.arrival == 0.0 for r in flood)
    assert all(r.adapter != FLOODER for r in modest)
    arrivals = [r.arrival for r in modest]
    assert arrivals == sorted(arrivals) and arrivals[0] > 2.0 and arrivals[-1] < 22.0
    counts = Counter(r.adapter for r in modest)
    assert set(counts) == {1, 2, 3}
    # Poisson, 100 expected per client: well inside ±5 standard deviations.
    assert all(50 < n < 150 for n in counts.values())
    for r in w.requests:
        assert 8 <= len(r.prompt) < 17 and 4 <= r.output_len < 9
        assert all(3 <= t < 50 for t in r.prompt)
    assert _workload() == w  # the seed fixes the list
    assert _workload(seed=8) != w
    assert w.with_num_adapters(4) == w  # each x gives its adapter back
    w.save(tmp_path / "w.json")
    assert Workload.load(tmp_path / "w.json") == w
    assert [client_group(a) for a in (0, 1, 3)] == ["flooder", "modest", "modest"]
    assert [f["priority"] for f in priority_fields(w)] == [1] * 30 + [0] * len(modest)
    with pytest.raises(ValueError, match="at least 2"):
        _workload(num_adapters=1)
    with pytest.raises(ValueError, match="positive"):
        _workload(modest_rate=0.0)
    with pytest.raises(ValueError, match="modest_start_s"):
        _workload(modest_start_s=-1.0)


def test_fairness_workload_fits_the_context(tmp_path: Path) -> None:
    args = FairnessArgs(model_dir=PRESET, out=tmp_path, input_range=(100, 120))
    arch = dataclasses.replace(ModelArch.load(PRESET), max_positions=128, vocab_size=320)
    with pytest.raises(ValueError, match="context of 128 positions"):
        fairness_workload(args, arch)
    args.input_range = (16, 64)
    assert len(fairness_workload(args, arch).requests) > args.flood_requests


@asynccontextmanager
async def _fake_server(bodies: list[dict[str, Any]], in_flight: Counter[str]) -> AsyncIterator[str]:
    """Streams one token after 20 ms, then usage and [DONE]; records each body and the most
    requests of each model in flight at once (in ``in_flight["max " + model]``); answers
    ``/metrics`` with two gauges."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET /metrics"):
            text = b"loraserve:num_requests_waiting 3.0\nloraserve:num_requests_running 2.0\n"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(text) + text)
            await writer.drain()
            writer.close()
            return
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = json.loads(await reader.readexactly(length))
        bodies.append(body)
        model = body["model"]
        in_flight[model] += 1
        in_flight["max " + model] = max(in_flight["max " + model], in_flight[model])
        await asyncio.sleep(0.02)
        in_flight[model] -= 1
        usage = {"prompt_tokens": 1, "completion_tokens": body["max_tokens"]}
        events = [{"choices": [{"text": "a"}]}, {"choices": [], "usage": usage}]
        data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        writer.write(data + b"data: [DONE]\n\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}"


def test_client_closed_loop_per_client_and_extra_fields() -> None:
    w = _workload(
        flood_requests=12, flood_concurrency=3, modest_rate=20.0, modest_start_s=0.0, duration_s=0.3
    )
    bodies: list[dict[str, Any]] = []
    in_flight: Counter[str] = Counter()

    async def replay() -> tuple[list[RequestRecord], list[tuple[float, dict[str, float]]]]:
        async with _fake_server(bodies, in_flight) as url:
            stop = asyncio.Event()
            gauges = ["loraserve:num_requests_waiting", "loraserve:num_requests_running"]
            samples: list[tuple[float, dict[str, float]]] = []
            sampler = asyncio.create_task(sample_gauges(url, gauges, 0.05, stop, samples))
            records, _ = await run_workload(
                url,
                w,
                w.adapter_names(),
                "base",
                progress=False,
                closed_loops={FLOODER: 3},
                extra_body=priority_fields(w),
            )
            stop.set()
            await sampler
            return records, samples

    records, samples = asyncio.run(replay())
    assert all(r.ok for r in records) and len(bodies) == len(w.requests)
    assert in_flight["max adapter-0"] == 3  # the flooder's own closed loop
    for body in bodies:
        assert body["priority"] == (1 if body["model"] == "adapter-0" else 0)
    t0 = min(r.start for r in records)
    for record, request in zip(records, w.requests, strict=True):
        if request.adapter != FLOODER:  # sent at its arrival time, not held by the flood
            assert record.start - t0 >= request.arrival - 0.01
    assert samples and samples[0][1] == {
        "loraserve:num_requests_waiting": 3.0,
        "loraserve:num_requests_running": 2.0,
    }


def _record(start: float, first: float, end: float, tokens: int, ok: bool = True) -> RequestRecord:
    times = [first + 0.1 * i for i in range(tokens)]
    return RequestRecord(
        adapter=None,
        prompt_len=4,
        start=start,
        token_times=times if ok else [],
        end=end,
        output_len=tokens if ok else 0,
        error=None if ok else "HTTP 500",
    )


def test_group_and_client_summaries() -> None:
    records = [
        _record(10.0, 12.0, 13.0, 4),  # flooder, TTFT 2 s
        _record(10.0, 14.0, 15.0, 4),  # flooder, TTFT 4 s
        _record(11.0, 11.1, 12.0, 2),  # adapter 1, TTFT 0.1 s
        _record(12.0, 12.3, 13.0, 2),  # adapter 2, TTFT 0.3 s
        _record(12.0, 0.0, 13.0, 2, ok=False),  # adapter 2, failed
    ]
    adapters = [0, 0, 1, 2, 2]
    groups = group_summaries(records, adapters, duration_s=5.0)
    assert groups["flooder"]["completed"] == 2 and groups["modest"]["completed"] == 2
    assert groups["modest"]["failed"] == 1
    assert groups["flooder"]["median_ttft_ms"] == pytest.approx(3000.0)
    assert groups["modest"]["median_ttft_ms"] == pytest.approx(200.0)
    assert groups["flooder"]["output_throughput"] == pytest.approx(8 / 5.0)
    assert groups["flooder"]["output_share"] == pytest.approx(8 / 12)
    assert groups["modest"]["output_share"] == pytest.approx(4 / 12)
    clients = client_summaries(records, adapters)
    assert [c["adapter"] for c in clients] == [0, 1, 2]
    assert [c["group"] for c in clients] == ["flooder", "modest", "modest"]
    assert [c["output_tokens"] for c in clients] == [8, 2, 2]
    assert [(c["completed"], c["failed"]) for c in clients] == [(2, 0), (1, 0), (1, 1)]
    assert clients[2]["p50_ttft_ms"] == pytest.approx(300.0)
    points = request_points(records, adapters, t0=10.0)
    assert points[0] == [0, 0.0, pytest.approx(2.0), pytest.approx(3.0)]
    assert points[4][2] is None and points[4][3] is None


def test_served_over_time_and_queue_series() -> None:
    records = [_record(0.0, 1.0, 2.0, 3), _record(0.0, 0.5, 1.0, 1), _record(0.0, 2.0, 3.0, 2)]
    textless = _record(0.0, 0.0, 1.5, 2)
    textless.token_times = []  # every chunk's text held back: its 2 tokens count at its end
    records.append(textless)
    served = served_over_time(records, [0, 1, 1, 0], t0=0.0, step_s=1.0)
    # Adapter 0's tokens at 1.0, 1.1, 1.2 and 1.5 (two); adapter 1's at 0.5, 2.0 and 2.1.
    assert served["t"] == [0.0, 1.0, 2.0, pytest.approx(2.1)]
    assert served["tokens"] == {"0": [0, 1, 5, 5], "1": [0, 1, 2, 3]}
    with pytest.raises(ValueError):
        served_over_time(records, [0, 1, 1, 0], t0=0.0, step_s=0.0)
    w, r = "loraserve:num_requests_waiting", "loraserve:num_requests_running"
    queue = queue_series([(5.0, {w: 4.0, r: 2.0}), (5.5, {w: 8.0, r: 2.0})], t0=5.0)
    assert queue == {
        "max_waiting": 8.0,
        "mean_waiting": 6.0,
        "samples": [[0.0, 4.0, 2.0], [0.5, 8.0, 2.0]],
    }
    assert queue_series([], t0=0.0)["max_waiting"] is None


def test_stalled() -> None:
    def sample(t: float, waiting: float, running: float) -> tuple[float, dict[str, float]]:
        return t, {
            "loraserve:num_requests_waiting": waiting,
            "loraserve:num_requests_running": running,
        }

    busy = [sample(0.0, 90.0, 32.0), sample(5.0, 90.0, 0.0)]
    stuck = [sample(t, 90.0, 0.0) for t in (6.0, 8.0, 10.0)]
    assert stalled(busy + stuck, window_s=5.0)  # 5 s to 10 s: waiting, none running
    assert not stalled(busy + stuck, window_s=10.0)  # at 0 s it ran
    assert not stalled(stuck, window_s=5.0)  # the samples reach back 4 s only
    assert not stalled([*busy, *stuck, sample(11.0, 0.0, 0.0)], window_s=5.0)  # idle, done


def _system(modest_p99: float, modest_p50: float, tok_s: float) -> dict[str, Any]:
    return {
        "output_throughput": tok_s,
        "request_throughput": tok_s / 10,
        "groups": {"modest": {"p99_ttft_ms": modest_p99, "median_ttft_ms": modest_p50}},
    }


def test_fairness_ratios_and_targets() -> None:
    systems = {
        "fcfs": _system(3000.0, 2000.0, 1000.0),
        "fair": _system(200.0, 100.0, 980.0),
        "priority": _system(100.0, 50.0, 1010.0),
    }
    ratios = fairness_ratios(systems)
    assert ratios["modest_ttft_p99_fcfs_over_fair"] == pytest.approx(15.0)
    assert ratios["modest_ttft_p50_fcfs_over_fair"] == pytest.approx(20.0)
    assert ratios["modest_ttft_p99_fcfs_over_priority"] == pytest.approx(30.0)
    assert ratios["output_throughput_fair_over_fcfs"] == pytest.approx(0.98)
    assert ratios["request_throughput_priority_over_fcfs"] == pytest.approx(1.01)
    assert targets_met(ratios) is True
    systems["fair"] = _system(200.0, 100.0, 900.0)  # 10% slower than fcfs
    assert targets_met(fairness_ratios(systems)) is False
    del systems["priority"]
    ratios = fairness_ratios(systems)
    assert ratios["modest_ttft_p99_fcfs_over_priority"] is None
    assert targets_met({"modest_ttft_p99_fcfs_over_fair": 9.0}) is None
    assert set(TARGETS) <= set(ratios)


def test_bench_fairness_smoke(tmp_path: Path) -> None:
    out = tmp_path / "fairness"
    argv = ["bench", "fairness", "--model", str(PRESET), "--load-format", "dummy", "--smoke"]
    argv += ["--threads", "1", "--out", str(out)]
    assert cli_main(argv) == 0
    result = json.loads((out / "fairness.json").read_text())
    series = json.loads((out / "fairness_series.json").read_text())
    workload = Workload.load(out / "workload.json")
    planned = sum(r.output_len for r in workload.requests)
    assert workload.kind == "fairness"
    assert sum(r.adapter == FLOODER for r in workload.requests) == SMOKE["flood_requests"]
    assert [s["system"] for s in result["systems"]] == ["fcfs", "fair", "priority"]
    for system in result["systems"]:
        assert system["completed"] == len(workload.requests) and system["failed"] == 0
        assert system["exact"] and system["total_output_tokens"] == planned
        assert set(system["groups"]) == {"flooder", "modest"}
        for group in system["groups"].values():
            assert group["completed"] > 0 and group["p99_ttft_ms"] > 0
        assert len(system["clients"]) == SMOKE["num_adapters"]
        assert sum(c["output_tokens"] for c in system["clients"]) == planned
        assert "series" not in system and system["queue"]["max_waiting"] is not None
        command = (out / f"server-{system['system']}.log").read_text().splitlines()[0]
        assert command.endswith(shlex.join(system["flags"]))
        assert system["flags"][-2:] == ["--scheduling-policy", system["system"]]
        drawn = series[system["system"]]
        assert len(drawn["requests"]) == len(workload.requests)
        assert sum(counts[-1] for counts in drawn["served"]["tokens"].values()) == planned
    assert not any("no priority field" in note for note in result["notes"])
    assert result["targets"] == TARGETS and result["targets_met"] in (True, False)
    joined = load_result(out)
    assert joined["systems"][1]["series"] == series["fair"]
    assert all(isinstance(r, float) and r > 0 for r in result["ratios"].values())
    for name in ("fairness_ttft.png", "fairness_tokens.png", "fairness_summary.png"):
        assert (out / name).stat().st_size > 0
    assert len(list((out / "adapters").iterdir())) == SMOKE["num_adapters"]
