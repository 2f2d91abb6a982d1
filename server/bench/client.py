"""``loraserve bench serve``: drive a running server over HTTP with a workload.

Each request goes to ``/v1/completions`` at its arrival time (open loop), or as soon as one
of ``max_concurrency`` places frees (closed loop; or one of its client's places, for the clients
``run_workload``'s ``closed_loops`` names), with the prompt as token ids, streaming,
``ignore_eos`` and ``min_tokens`` = ``max_tokens`` = its planned output length. Times are
taken at the client: TTFT when the first streamed chunk with text arrives, each chunk's
arrival for its tokens (the final usage chunk gives the count, and the prompt tokens read from
the server's prefix cache when it reports ``prompt_tokens_details.cached_tokens``), the end
at ``[DONE]``. A request that fails keeps the HTTP status, the error envelope's ``code`` and
its message, or the connection error that ended it (``RequestRecord``). The client is a
minimal HTTP/1.1 reader over asyncio (plain ``http://`` only), so that on a small machine it
takes as little CPU as possible from the server it measures.

Before sending anything, :func:`read_models` reads the server's model list and its
``max_model_len``, and :func:`check_fits` refuses a request list that the server would refuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from tqdm import tqdm

from server.bench.metrics import CONNECTION_ERROR, RequestRecord
from server.bench.workload import BenchRequest, Workload

MAX_ERROR_BODY = 65536  # bytes of an error answer read for its message


class _HTTPError(Exception):
    """The server answered with a status other than 200; ``code`` is its error envelope's."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class _ProtocolError(Exception):
    """An answer the client could not read (a malformed chunk or event)."""


# Adapter kinds that add virtual tokens to every request's sequence, beside its prompt.
VIRTUAL_TOKEN_KINDS = ("prompt_tuning", "prefix_tuning")


@dataclass(frozen=True)
class ServedModels:
    """What a server's ``GET /v1/models`` lists.

    Attributes:
        base: the base model's name (the card with no ``parent``).
        adapters: every other card's name, in the server's order.
        max_model_len: the longest sequence (prompt + output tokens) the server accepts, as
            vLLM and loraserve report it on each card; None when the cards do not say.
        virtual_tokens: per model name, the virtual tokens its card reports
            (``num_virtual_tokens``: prompt and prefix tuning), which count against
            ``max_model_len`` beside the prompt.
        unreported: adapters of a kind in ``VIRTUAL_TOKEN_KINDS`` whose card does not say
            how many virtual tokens they add.
    """

    base: str
    adapters: tuple[str, ...]
    max_model_len: int | None
    virtual_tokens: Mapping[str, int] = field(default_factory=dict)
    unreported: tuple[str, ...] = ()

    def room(self, model: str | None) -> int | None:
        """Prompt + output tokens a request to ``model`` (None: the base) may take; None
        when the server does not say."""
        if self.max_model_len is None:
            return None
        return self.max_model_len - self.virtual_tokens.get(model or self.base, 0)

    def context(self, model: str | None) -> str:
        """``room(model)`` in words, for messages."""
        virtual = self.virtual_tokens.get(model or self.base, 0)
        if not virtual:
            return f"the server's max_model_len of {self.max_model_len}"
        return (
            f"the {self.room(model)} positions the server's max_model_len of "
            f"{self.max_model_len} leaves beside {model}'s {virtual} virtual tokens"
        )


def read_models(url: str, api_key: str | None = None) -> ServedModels:
    """``GET /v1/models``; a ``ValueError`` saying why when the server cannot be reached or
    does not answer with a model list."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    target = url.rstrip("/") + "/v1/models"
    try:
        response = httpx.get(target, headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise ValueError(f"cannot reach {target}: {e or type(e).__name__}") from None
    if response.status_code != 200:
        error = _http_error(response.status_code, response.content)
        raise ValueError(f"{target} answered HTTP {error.status}: {error}")
    try:
        cards = {str(c["id"]): c for c in response.json()["data"]}
        base = next(name for name, c in cards.items() if not c.get("parent"))
    except (ValueError, KeyError, TypeError, AttributeError, StopIteration):
        raise ValueError(f"{target} answered no model list with a base model") from None
    lengths = [int(c["max_model_len"]) for c in cards.values() if c.get("max_model_len")]
    own = cards[base].get("max_model_len")
    return ServedModels(
        base=base,
        adapters=tuple(name for name in cards if name != base),
        max_model_len=int(own) if own else min(lengths, default=None),
        virtual_tokens={
            name: int(c["num_virtual_tokens"])
            for name, c in cards.items()
            if c.get("num_virtual_tokens")
        },
        unreported=tuple(
            name
            for name, c in cards.items()
            if c.get("kind") in VIRTUAL_TOKEN_KINDS and c.get("num_virtual_tokens") is None
        ),
    )


def check_fits(
    workload: Workload, served: ServedModels, models: Sequence[str | None], source: str
) -> None:
    """A ``ValueError`` when a request of ``workload`` (from ``source``, for the message),
    sent to its model as :func:`run_workload` would send it, needs more positions than the
    server has for it: prompt + output tokens (+ the model's virtual tokens) over
    ``max_model_len``. The server would refuse every such request. Nothing is checked when
    the server does not report ``max_model_len``."""
    over: list[tuple[int, BenchRequest, str | None]] = []
    for request in workload.requests:
        model = _model(request, list(models), served.base)
        room = served.room(model)
        need = len(request.prompt) + request.output_len
        if room is not None and need > room:
            over.append((need - room, request, model))
    if over:
        _, worst, model = max(over, key=lambda o: o[0])
        raise ValueError(
            f"{len(over)} of the {len(workload.requests)} requests of {source} do not fit "
            f"{served.context(model)} (the furthest over: a {len(worst.prompt)}-token prompt "
            f"and {worst.output_len} output tokens, to {model or served.base})"
        )


def _http_error(status: int, body: bytes) -> _HTTPError:
    """The error envelope's message and code, or the start of a body that is not one."""
    try:
        error = json.loads(body)["error"]
        code = error.get("code")
        return _HTTPError(status, None if code is None else str(code), str(error["message"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        text = body.decode(errors="replace").strip()
        return _HTTPError(status, None, text[:200] or "(no body)")


async def _read_body(reader: asyncio.StreamReader, chunked: bool, length: int | None) -> bytes:
    """An answer's body, at most ``MAX_ERROR_BODY`` bytes of it."""
    if length is not None:
        return await reader.readexactly(min(length, MAX_ERROR_BODY))
    if not chunked:
        return await reader.read(MAX_ERROR_BODY)
    body = b""
    while len(body) < MAX_ERROR_BODY:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            break
        body += (await reader.readexactly(size + 2))[:-2]
    return body


async def _post_sse(
    host: str, port: int, path: str, body: bytes, headers: dict[str, str]
) -> AsyncIterator[bytes]:
    """POST ``body`` and yield the data of each server-sent event, as bytes.

    A minimal HTTP/1.1 client over one asyncio connection (``Connection: close``), reading a
    chunked or plain body. The benchmark's client shares the machine with the server: a
    general client (httpx) spends about a core here parsing 64 streams, which would be taken
    from the server being measured; this one spends a small fraction of that. An answer
    other than 200 raises ``_HTTPError`` with its error envelope's code and message.
    """
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}", "", ""]
        writer.write("\r\n".join(head).encode() + body)
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection without answering")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise _ProtocolError(f"not an HTTP status line: {status_line[:80]!r}")
        status = int(parts[1])
        chunked = False
        length: int | None = None
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"content-length" and value.strip().isdigit():
                length = int(value)
        if status != 200:
            raise _http_error(status, await _read_body(reader, chunked, length))
        buffer = b""
        while True:
            if chunked:
                size_line = await reader.readline()
                try:
                    size = int(size_line.split(b";")[0].strip() or b"0", 16)
                except ValueError:
                    raise _ProtocolError(f"a bad chunk size: {size_line[:80]!r}") from None
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
            record.status = 200
            if data == b"[DONE]":
                break
            # Parse only what needs parsing: most chunks are one token of text.
            if b'"error"' in data or b'"usage":{' in data:
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise _ProtocolError(f"an event that is not JSON: {data[:80]!r}") from None
                if "error" in chunk:
                    error = chunk["error"]
                    record.error = str(error.get("message"))
                    record.error_code = None if error.get("code") is None else str(error["code"])
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
    except _HTTPError as e:
        record.status, record.error_code, record.error = e.status, e.code, str(e)
    except (_ProtocolError, ValueError) as e:
        record.error_code, record.error = "protocol_error", str(e)
    except (OSError, asyncio.IncompleteReadError) as e:
        record.error_code = CONNECTION_ERROR
        record.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
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
    places = asyncio.Semaphore(workload.max_concurrency or len(workload.requests) or 1)
    loops = {a: asyncio.Semaphore(n) for a, n in (closed_loops or {}).items()}
    with tqdm(total=len(records), desc="requests", unit="req", disable=not progress) as bar:
        start = time.perf_counter()

        async def send(i: int, request: BenchRequest) -> None:
            own = loops.get(request.adapter) if request.adapter is not None else None
            if own is None and workload.max_concurrency is None:
                await asyncio.sleep(max(0.0, start + request.arrival - time.perf_counter()))
            # The semaphores wake waiters in the order they came, which is list order.
            async with own if own is not None else places:
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
