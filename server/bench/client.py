"""``loraserve bench serve``: drive a running server over HTTP with a workload.

Each request goes to ``/v1/completions`` at its arrival time (open loop), or as soon as one
of ``max_concurrency`` slots frees (closed loop), with the prompt as token ids, streaming,
``ignore_eos`` and ``min_tokens`` = ``max_tokens`` = its planned output length. Times are
taken at the client: TTFT when the first streamed chunk with text arrives, each chunk's
arrival for its tokens (the final usage chunk gives the count), the end at ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
from tqdm import tqdm

from server.bench.metrics import RequestRecord
from server.bench.workloads import BenchRequest, Workload


async def _one(
    client: httpx.AsyncClient,
    request: BenchRequest,
    model: str,
    record: RequestRecord,
    bar: tqdm[Any],
) -> None:
    body = {
        "model": model,
        "prompt": list(request.prompt),
        "max_tokens": request.output_len,
        "min_tokens": request.output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    record.start = time.perf_counter()
    chunk_times: list[float] = []
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                record.error = f"HTTP {response.status_code}: {text[:200]}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    record.error = str(chunk["error"].get("message"))
                    break
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    chunk_times.append(time.perf_counter())
                usage = chunk.get("usage")
                if usage:
                    record.output_len = int(usage["completion_tokens"])
    except httpx.HTTPError as e:
        record.error = f"{type(e).__name__}: {e}"
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
) -> tuple[list[RequestRecord], float]:
    """Send every request of ``workload``; ``models[i]`` names workload adapter i (None:
    the base). Returns one record per request and the run's duration in seconds."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timeout = httpx.Timeout(None, connect=30.0)
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
    async with httpx.AsyncClient(
        base_url=url.rstrip("/"), headers=headers, limits=limits, timeout=timeout
    ) as client:
        with tqdm(total=len(records), desc="requests", unit="req", disable=not progress) as bar:
            start = time.perf_counter()

            async def send(i: int, request: BenchRequest) -> None:
                if workload.max_concurrency is None:
                    await asyncio.sleep(max(0.0, start + request.arrival - time.perf_counter()))
                async with slots:
                    await _one(client, request, records[i].adapter or base_model, records[i], bar)

            await asyncio.gather(*(send(i, r) for i, r in enumerate(workload.requests)))
            duration = time.perf_counter() - start
    return records, duration


def _model(request: BenchRequest, models: list[str | None], base_model: str) -> str | None:
    if request.adapter is None or not models:
        return None
    return models[request.adapter % len(models)]
