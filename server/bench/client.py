"""``loraserve bench serve``: drive a running server over HTTP with a workload.

Each request goes to ``/v1/completions`` at its arrival time (open loop), or as soon as one
of ``max_concurrency`` slots frees (closed loop; or one of its client's slots, for the clients
``run_workload``'s ``closed_loops`` names), with the prompt as token ids, streaming,
``ignore_eos`` and ``min_tokens`` = ``max_tokens`` = its planned output length. Times are
taken at the client: TTFT when the first streamed chunk with text arrives, each chunk's
arrival for its tokens (the final usage chunk gives the count, and the prompt tokens read from
the server's prefix cache when it reports ``prompt_tokens_details.cached_tokens``), the end
at ``[DONE]``. The
client is a minimal HTTP/1.1 reader over asyncio (plain ``http://`` only), so that on a small
machine it takes as little CPU as possible from the server it measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx
from tqdm import tqdm

from server.bench.metrics import RequestRecord
from server.bench.workloads import BenchRequest, Workload


class _StreamError(Exception):
    """The server answered with a status other than 200, or broke the protocol."""


async def _post_sse(
    host: str, port: int, path: str, body: bytes, headers: dict[str, str]
) -> AsyncIterator[bytes]:
    """POST ``body`` and yield the data of each server-sent event, as bytes.

    A minimal HTTP/1.1 client over one asyncio connection (``Connection: close``), reading a
    chunked or plain body. The benchmark's client shares the machine with the server: a
    general client (httpx) spends about a core here parsing 64 streams, which would be taken
    from the server being measured; this one spends a small fraction of that.
    """
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}", "", ""]
        writer.write("\r\n".join(head).encode() + body)
        status_line = await reader.readline()
        parts = status_line.split(b" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        chunked = False
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if status != 200:
            text = (await reader.read(4096)).decode(errors="replace")
            raise _StreamError(f"HTTP {status}: {text[:200]}")
        buffer = b""
        while True:
            if chunked:
                size_line = await reader.readline()
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    return
                data = await reader.readexactly(size + 2)  # the chunk and its CRLF
                buffer += data[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    return
                buffer += data
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if event.startswith(b"data: "):
                    yield event[6:]
    finally:
        writer.close()


async def _one(
    url: httpx.URL,
    request: BenchRequest,
    model: str,
    record: RequestRecord,
    bar: tqdm[Any],
    headers: dict[str, str],
    fields: Mapping[str, Any],
) -> None:
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(request.prompt),
        "max_tokens": request.output_len,
        "min_tokens": request.output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **fields,
    }
    record.start = time.perf_counter()
    chunk_times: list[float] = []
    host, port = url.host, url.port or 80
    try:
        async for data in _post_sse(
            host, port, "/v1/completions", json.dumps(body).encode(), headers
        ):
            if data == b"[DONE]":
                break
            # Parse only what needs parsing: most chunks are one token of text.
            if b'"error"' in data or b'"usage":{' in data:
                chunk = json.loads(data)
                if "error" in chunk:
                    record.error = str(chunk["error"].get("message"))
                    break
                usage = chunk.get("usage")
                if usage:
                    record.output_len = int(usage["completion_tokens"])
                    details = usage.get("prompt_tokens_details") or {}
                    if details.get("cached_tokens") is not None:
                        record.cached_tokens = int(details["cached_tokens"])
                if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                    continue
            if b'"text":""' not in data:
                chunk_times.append(time.perf_counter())
    except (OSError, asyncio.IncompleteReadError, ValueError, _StreamError) as e:
        record.error = str(e) if isinstance(e, _StreamError) else f"{type(e).__name__}: {e}"
    finally:
        record.end = time.perf_counter()
        # Chunks carry at least one token each; spread the rest onto the last chunk.
        extra = max(0, record.output_len - len(chunk_times))
        record.token_times = chunk_times + chunk_times[-1:] * extra if chunk_times else []
        if not record.output_len:
            record.output_len = len(chunk_times)
        bar.update(1)


async def run_workload(
    url: str,
    workload: Workload,
    models: list[str | None],
    base_model: str,
    api_key: str | None = None,
    progress: bool = True,
    closed_loops: Mapping[int, int] | None = None,
    extra_body: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Send every request of ``workload``; ``models[i]`` names workload adapter i (None:
    the base). Returns one record per request and the run's duration in seconds.

    ``closed_loops`` maps a workload adapter to a number of requests in flight: that
    adapter's requests are sent in list order as a closed loop of their own, whatever their
    arrival times, while the others follow the workload. ``extra_body[i]`` holds fields to
    add to request i's body (e.g. ``{"priority": 1}``).
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    base = httpx.URL(url.rstrip("/"))
    records = [
        RequestRecord(
            adapter=_model(r, models, base_model),
            prompt_len=len(r.prompt),
            start=0.0,
            token_times=[],
            end=0.0,
            output_len=0,
            error=None,
        )
        for r in workload.requests
    ]
    slots = asyncio.Semaphore(workload.max_concurrency or len(workload.requests) or 1)
    loops = {a: asyncio.Semaphore(n) for a, n in (closed_loops or {}).items()}
    with tqdm(total=len(records), desc="requests", unit="req", disable=not progress) as bar:
        start = time.perf_counter()

        async def send(i: int, request: BenchRequest) -> None:
            own = loops.get(request.adapter) if request.adapter is not None else None
            if own is None and workload.max_concurrency is None:
                await asyncio.sleep(max(0.0, start + request.arrival - time.perf_counter()))
            # The semaphores wake waiters in the order they came, which is list order.
            async with own if own is not None else slots:
                model = records[i].adapter or base_model
                fields = extra_body[i] if extra_body is not None else {}
                await _one(base, request, model, records[i], bar, headers, fields)

        await asyncio.gather(*(send(i, r) for i, r in enumerate(workload.requests)))
        duration = time.perf_counter() - start
    return records, duration


def _model(request: BenchRequest, models: list[str | None], base_model: str) -> str | None:
    if request.adapter is None or not models:
        return None
    return models[request.adapter % len(models)]


async def sample_gauges(
    url: str,
    names: Sequence[str],
    interval_s: float,
    stop: asyncio.Event,
    samples: list[tuple[float, dict[str, float]]],
) -> None:
    """Read the unlabelled gauges ``names`` (e.g. ``loraserve:num_requests_waiting``) from the
    server's ``/metrics`` every ``interval_s`` seconds until ``stop`` is set.

    Appends ``(time.perf_counter() at the reply, {name: value})`` to ``samples`` per scrape,
    as they come (others may watch it meanwhile), on the clock of the records; a scrape that
    fails is skipped. Plain HTTP over asyncio, as the
    requests; an httpx client would build an SSL context on the event loop first, holding
    up the requests it runs beside for tens of milliseconds.
    """
    wanted = set(names)
    target = httpx.URL(url.rstrip("/"))
    host, port = target.host, target.port or 80
    while not stop.is_set():
        try:
            text = await _get(host, port, "/metrics")
        except (OSError, asyncio.IncompleteReadError):
            text = ""
        values = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in wanted:
                with contextlib.suppress(ValueError):
                    values[name] = float(value)
        if values:
            samples.append((time.perf_counter(), values))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


async def _get(host: str, port: int, path: str) -> str:
    """GET ``path`` and return the body of a 200 answer, else ""."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        # HTTP/1.0: the answer comes whole, never chunked.
        head = f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n"
        writer.write(head.encode())
        response = await reader.read()
    finally:
        writer.close()
    status, _, rest = response.partition(b"\r\n")
    if b" 200 " not in status + b" ":
        return ""
    _, _, body = rest.partition(b"\r\n\r\n")
    return body.decode(errors="replace")
