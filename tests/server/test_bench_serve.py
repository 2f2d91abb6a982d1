"""``loraserve bench serve`` against a live server: every planned token arrives, and the
timings come from the stream; lengths are fitted to the server's context before anything is
sent, or refused when the user's cannot fit; failed requests are counted by status and error
code, with their messages, and a run where all failed exits non-zero."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from server.bench.client import ServedModels, check_fits, run_workload
from server.bench.commands import fit_ranges
from server.bench.generators import synthetic_w2
from server.bench.harness import free_port
from server.bench.metrics import (
    CONNECTION_ERROR,
    MAX_FAILURE_MESSAGES,
    SLO,
    format_summary,
    summarize,
)
from server.bench.workload import Workload
from server.cli import main as cli_main
from tests.server.conftest import BASE, Served, demo_adapters, make_engine, serve


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


# ----------------------------------------------------------------------------------------------
# Lengths that fit the server; failures that say why
# ----------------------------------------------------------------------------------------------


def test_bench_serve_fits_default_lengths_to_the_server(
    demo_server: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The defaults (up to 511 + 511 tokens) against the demo's 128-token context: clipped,
    said once, every request completes, and the same seed gives the same requests."""
    saved, out = tmp_path / "w2.json", tmp_path / "result.json"
    argv = ["bench", "serve", "--url", demo_server.url, "--num-requests", "6", "--rate", "50"]
    assert cli_main([*argv, "--save-workload", str(saved), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("lengths clipped") == 1
    assert "max_model_len of 128: --input-range 8,65 --output-range 8,65" in printed
    assert "Failures" not in printed
    result = json.loads(out.read_text())
    assert result["max_model_len"] == 128
    assert result["summary"]["completed"] == 6 and result["summary"]["failures"] == []
    workload = Workload.load(saved)
    assert all(len(r.prompt) + r.output_len <= 128 for r in workload.requests)
    assert workload == synthetic_w2(
        num_adapters=2,
        alpha=1.0,
        rate=50.0,
        cv=1.0,
        num_requests=6,
        input_range=(8, 65),
        output_range=(8, 65),
        seed=42,
        vocab_size=259,
    )


def test_bench_serve_runs_the_churn_workload(demo_server: Served, tmp_path: Path) -> None:
    """``--kind W4`` from the command line: W2's law over far more adapters than the server
    holds, saved as a W4 list, and run."""
    saved = tmp_path / "w4.json"
    argv = ["bench", "serve", "--url", demo_server.url, "--num-requests", "4", "--rate", "50"]
    argv += ["--kind", "W4", "--num-adapters", "50", "--save-workload", str(saved)]
    assert cli_main(argv) == 0
    workload = Workload.load(saved)
    assert workload.kind == "W4" and workload.num_adapters == 50


def test_bench_serve_reports_why_requests_failed(
    demo_server: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A model the server does not have: every request is refused; the summary says so.
    out = tmp_path / "result.json"
    argv = ["bench", "serve", "--url", demo_server.url, "--adapters", "no-such-adapter"]
    argv += ["--num-requests", "4", "--rate", "100", "--input-range", "4,8"]
    assert cli_main([*argv, "--output-range", "2,4", "--out", str(out)]) == 1
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert "note: /v1/models does not list no-such-adapter" in lines
    assert "All 4 requests failed: nothing was measured." in lines
    assert re.search(r"^HTTP 404 model_not_found: +4$", printed.out, re.MULTILINE)
    assert "e.g. HTTP 404 model_not_found: the model 'no-such-adapter' does not exist" in lines
    assert "4 of 4 requests failed (HTTP 404 model_not_found: 4)" in printed.err
    summary = json.loads(out.read_text())["summary"]
    assert summary["failures"] == [
        {"kind": "HTTP 404 model_not_found", "status": 404, "code": "model_not_found", "count": 4}
    ]
    assert len(summary["failure_messages"]) == 1  # one distinct message
    # Lengths forced past the context (the command refuses them, run_workload does not):
    # counted by status and code, at most three distinct messages kept.
    too_long = synthetic_w2(
        num_adapters=0,
        alpha=1.0,
        rate=1e6,
        cv=1.0,
        num_requests=5,
        input_range=(100, 120),
        output_range=(40, 60),
        seed=3,
        vocab_size=259,
    )
    records, duration = asyncio.run(
        run_workload(demo_server.url, too_long, [], BASE, progress=False)
    )
    assert {(r.status, r.error_code) for r in records} == {(400, "context_length_exceeded")}
    s = summarize(records, duration)
    assert s["failures"] == [
        {
            "kind": "HTTP 400 context_length_exceeded",
            "status": 400,
            "code": "context_length_exceeded",
            "count": 5,
        }
    ]
    assert len(s["failure_messages"]) == MAX_FAILURE_MESSAGES
    assert all("exceeds the context length 128" in m for m in s["failure_messages"])
    assert "All 5 requests failed" in format_summary(s)
    # The command refuses what cannot fit before sending anything.
    base = ["bench", "serve", "--url", demo_server.url]
    assert cli_main([*base, "--input-range", "200,300"]) == 2
    assert "no room for an output within the server's max_model_len of 128" in (
        capsys.readouterr().err
    )
    too_long.save(tmp_path / "long.json")
    assert cli_main([*base, "--workload", str(tmp_path / "long.json")]) == 2
    assert "5 of the 5 requests of" in capsys.readouterr().err


def test_connection_errors_count_as_their_own_kind(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens
    workload = synthetic_w2(
        num_adapters=0, alpha=1.0, rate=1e6, cv=1.0, num_requests=2, vocab_size=259
    )
    records, duration = asyncio.run(run_workload(url, workload, [], BASE, progress=False))
    s = summarize(records, duration)
    assert s["failures"] == [
        {"kind": "connection error", "status": None, "code": CONNECTION_ERROR, "count": 2}
    ]
    assert s["failure_messages"][0].startswith("connection error: ")
    assert cli_main(["bench", "serve", "--url", url]) == 2
    assert f"cannot reach {url}/v1/models" in capsys.readouterr().err


@asynccontextmanager
async def _answering(head: bytes, body: bytes) -> AsyncIterator[str]:
    """A server that answers every request with ``head`` and ``body``, then closes."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_head = await reader.readuntil(b"\r\n\r\n")
        length = int(request_head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(head + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def test_client_reads_error_envelopes_chunked_and_in_the_stream() -> None:
    workload = synthetic_w2(
        num_adapters=0, alpha=1.0, rate=1e6, cv=1.0, num_requests=2, vocab_size=259
    )
    envelope = {"error": {"message": "busy", "type": "x", "param": None, "code": "overloaded"}}
    data = json.dumps(envelope).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
    in_stream = b'data: {"choices":[{"text":"a"}]}\n\ndata: ' + data + b"\n\n"

    async def replay(head: bytes, body: bytes) -> dict[str, Any]:
        async with _answering(head, body) as url:
            records, duration = await run_workload(url, workload, [], BASE, progress=False)
        return summarize(records, duration)

    s = asyncio.run(replay(b"HTTP/1.1 429 Too Many\r\nTransfer-Encoding: chunked\r\n\r\n", chunked))
    assert s["failures"][0]["kind"] == "HTTP 429 overloaded"
    assert s["failure_messages"] == ["HTTP 429 overloaded: busy"]
    s = asyncio.run(replay(b"HTTP/1.1 200 OK\r\n\r\n", in_stream))
    assert s["failures"][0]["kind"] == "HTTP 200, then overloaded in the stream"
    s = asyncio.run(replay(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 7\r\n\r\n", b"no JSON"))
    assert s["failures"][0]["kind"] == "HTTP 502"
    assert s["failure_messages"] == ["HTTP 502: no JSON"]


def test_fit_ranges() -> None:
    default = (8, 512)
    assert fit_ranges("W2", None, None, None) == (default, default, None)
    assert fit_ranges("W2", None, None, 2048) == (default, default, None)
    inputs, outputs, note = fit_ranges("W2", None, None, 128, "the server's max_model_len of 128")
    assert (inputs, outputs) == ((8, 65), (8, 65))
    assert note is not None and "max_model_len of 128: --input-range 8,65" in note
    # A range the user gave stays; the other takes the room left.
    assert fit_ranges("W2", (8, 100), None, 128)[:2] == ((8, 100), (8, 30))
    assert fit_ranges("W3", None, (8, 100), 128)[:2] == ((8, 29), (8, 100))  # W3: HI included
    assert fit_ranges("W2", None, None, 10)[:2] == ((5, 6), (5, 6))  # LO follows HI down
    with pytest.raises(ValueError, match="sum to at most 128, or leave one out"):
        fit_ranges("W2", (8, 100), (8, 100), 128)
    with pytest.raises(ValueError, match="no room for an output"):
        fit_ranges("W2", (200, 300), None, 128)
    # Virtual tokens (prompt and prefix tuning) take positions beside the prompt.
    served = ServedModels("base", ("p",), 128, virtual_tokens={"p": 16})
    assert served.room("p") == 112 and served.room(None) == 128
    long = synthetic_w2(
        num_adapters=1,
        alpha=1.0,
        rate=1.0,
        cv=1.0,
        num_requests=20,
        input_range=(60, 65),
        output_range=(60, 65),
        vocab_size=259,
    )
    check_fits(long, served, [None], "w")  # the base has all 128
    with pytest.raises(ValueError, match=r"the 112 positions .* beside p.s 16 virtual tokens"):
        check_fits(long, served, ["p"], "w")
