"""The load test's asyncio tasks against a running server: streaming clients, the churn of
adapters loaded and unloaded at runtime, and the in-place updates of the live adapter.

Each records what it saw in the shared :class:`~benchmarks.load_traffic.Tally`.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from typing import Any

import httpx

from benchmarks.load_traffic import (
    LIVE,
    Job,
    LiveAdapter,
    Tally,
    Traffic,
    body,
    demo_adapters,
    on_model,
)


async def one_request(
    http: httpx.AsyncClient,
    job: Job,
    extra: dict[str, Any],
    churned: bool,
    cut: int | None,
    t: Tally,
) -> tuple[str, float, float] | None:
    """One streamed request; ``cut``: disconnect after that many chunks. Returns a completed
    request's text, when it was sent and when its first token came; None otherwise."""
    started = time.monotonic()
    text, finishes, dones, usage, chunks, first = "", 0, 0, None, 0, math.inf
    async with http.stream("POST", "/v1/completions", json=body(job, True, extra)) as response:
        if response.status_code != 200:
            error = json.loads(await response.aread())["error"]
            if churned and error["code"] == "model_not_found":
                t.expected_404 += 1
            else:
                t.errors[f"{response.status_code} {error['code']}"] += 1
            return None
        async for line in response.aiter_lines():
            if cut is not None and chunks >= cut:
                t.disconnected += 1
                return None  # leaving the block closes the connection mid-stream
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                dones += 1
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                t.errors["stream " + chunk["error"]["code"]] += 1
                return None
            if not chunk["choices"]:
                usage = chunk["usage"]
                continue
            if chunks == 0:
                first = time.monotonic()
                t.ttfts.append(first - started)
            chunks += 1
            text += chunk["choices"][0]["text"]
            finishes += chunk["choices"][0]["finish_reason"] is not None
    if (finishes, dones) != (1, 1) or usage is None:
        t.mismatches.append(f"{job}: {finishes} finishes, {dones} [DONE], usage {usage}")
        return None
    t.completed += 1
    t.tokens += usage["completion_tokens"]
    t.cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    t.latencies.append(time.monotonic() - started)
    return text, started, first


async def client(i: int, url: str, traffic: Traffic, end: float, t: Tally) -> None:
    rng = random.Random(i)
    user = ("shared" if i % 2 == 0 else f"user-{i}") if traffic.soak else None
    alone = traffic.alone
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while time.monotonic() < end:
            job = rng.choice(traffic.jobs)
            sources = [job[0]]  # whose solo output this one must equal (one of)
            live = traffic.live is not None and rng.random() < 0.2
            churned = not live and bool(traffic.churn) and rng.random() < 0.2
            if live:
                job = on_model(LIVE, job)
            elif churned:  # a runtime-loaded copy: must answer like its source adapter
                name, source = rng.choice(list(traffic.churn.items()))
                job, sources = on_model(name, job), [source]
            cut = rng.choice([0, 1, 3]) if rng.random() < 0.1 else None
            done = await one_request(http, job, traffic.extra(rng, user), churned, cut, t)
            if done is None:
                continue
            text, sent, first = done
            if live:
                assert traffic.live is not None
                sources = traffic.live.served(sent, first)
            expected = {alone[on_model(source, job)] for source in sources}
            t.live_checked += live
            t.live_ambiguous += len(expected) > 1
            if text not in expected:
                t.mismatches.append(f"{job} on {sources}: {text!r} != alone {expected!r}")


async def churner(url: str, churn: dict[str, str], end: float, t: Tally) -> None:
    rng = random.Random(-1)
    sources = demo_adapters()
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        n = 0
        while time.monotonic() < end:
            n += 1
            if n % 5 == 0:  # a bad load now and then: refused, nothing else changes
                r = await http.post(
                    "/v1/load_lora_adapter", json={"lora_name": f"bad-{n}", "lora_path": "missing"}
                )
                if r.status_code != 400:  # a lora_path that does not exist
                    t.errors[f"bad load {r.status_code}"] += 1
                continue
            name, source = f"churn-{n}", rng.choice(sources)
            r = await http.post(
                "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": source}
            )
            if r.status_code != 200:
                t.errors[f"load {r.status_code}"] += 1
                continue
            t.hot_loads += 1
            churn[name] = source
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            del churn[name]  # new requests stop choosing it; some are still in flight
            await asyncio.sleep(rng.uniform(0.0, 0.1))
            r = await http.post("/v1/unload_lora_adapter", json={"lora_name": name})
            if r.status_code != 200:
                t.errors[f"unload {r.status_code}"] += 1
            else:
                t.hot_unloads += 1


async def updater(url: str, live: LiveAdapter, end: float, t: Tally) -> None:
    """Replace ``live`` in place, alternating its two weight sets, while requests run on it."""
    rng = random.Random(-2)
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        while True:
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            if time.monotonic() >= end:
                return
            source = live.begin()
            r = await http.post(
                "/v1/load_lora_adapter",
                json={"lora_name": live.name, "lora_path": source, "replace": True},
            )
            live.end(r.status_code == 200)
            if r.status_code != 200:
                t.errors[f"replace {r.status_code}"] += 1
            else:
                t.updates += 1
