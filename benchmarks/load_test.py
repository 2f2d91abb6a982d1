"""Load test: concurrent streaming clients against a real server on loopback.

    python benchmarks/load_test.py [--clients 64] [--duration 120] [--num-pages 4096] [--json F]

Starts the server in this process (uvicorn on 127.0.0.1, the bundled demo model and its
adapters, runtime loading on), so that the engine's pool can be checked while it runs. Then:

* ``--clients`` asyncio clients send greedy streaming completions back to back for
  ``--duration`` seconds, mixing the base model, the demo adapters and adapters loaded at
  runtime; ~10% of them disconnect (before the first token, or after a few chunks);
* a churn task loads adapters under new names (copies of the demo adapters, plus some bad
  loads), lets traffic use them, and unloads them, in use or not;
* every half second the pool's integrity check runs on the engine thread.

Pass: every completed output equals the same request run alone (measured first, one at a time,
through the same server), every request ends exactly once (completed, disconnected by us, or an
expected 404 for an adapter unloaded meanwhile; never lost, never two endings), the server counted
as many finished requests as the clients saw, the integrity checks hold, and once drained and
every adapter unloaded, every page of the pool is free. Prints requests, tokens, errors and
latency percentiles; exits 1 on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import uvicorn

from engine import EngineConfig, LLMEngine
from engine.config import DEMO_DIR
from server.app import create_app
from server.config import ServerConfig

BASE = "loraserve-demo"
ADAPTERS_DIR = DEMO_DIR / "adapters"
LENGTHS = ((16, False), (48, True))  # (max_tokens, ignore_eos): stop at EOS, or run long
Job = tuple[str, str, int, bool]  # (model, word, max_tokens, ignore_eos)


@dataclass
class Tally:
    """What the clients saw."""

    completed: int = 0
    disconnected: int = 0
    expected_404: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    mismatches: list[str] = field(default_factory=list)
    tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    integrity_checks: int = 0


def start_server(engine: LLMEngine, config: ServerConfig) -> tuple[uvicorn.Server, str, Any]:
    app = create_app(engine, config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True).start()
    deadline = time.monotonic() + 60
    while not uv.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    return uv, f"http://127.0.0.1:{sock.getsockname()[1]}", app.state.server


def body(job: Job, stream: bool) -> dict[str, Any]:
    model, word, max_tokens, ignore_eos = job
    out: dict[str, Any] = {"model": model, "prompt": f"{word}=", "temperature": 0.0}
    out.update(max_tokens=max_tokens, ignore_eos=ignore_eos, stream=stream)
    if stream:
        out["stream_options"] = {"include_usage": True}
    return out


async def one_request(
    http: httpx.AsyncClient, job: Job, expected: str, churned: bool, cut: int | None, t: Tally
) -> None:
    """One streamed request, checked; ``cut``: disconnect after that many chunks."""
    started = time.monotonic()
    text, finishes, dones, usage, chunks = "", 0, 0, None, 0
    async with http.stream("POST", "/v1/completions", json=body(job, True)) as response:
        if response.status_code != 200:
            error = json.loads(await response.aread())["error"]
            if churned and error["code"] == "model_not_found":
                t.expected_404 += 1
            else:
                t.errors[f"{response.status_code} {error['code']}"] += 1
            return
        async for line in response.aiter_lines():
            if cut is not None and chunks >= cut:
                t.disconnected += 1
                return  # leaving the block closes the connection mid-stream
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                dones += 1
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                t.errors["stream " + chunk["error"]["code"]] += 1
                return
            if not chunk["choices"]:
                usage = chunk["usage"]
                continue
            if chunks == 0:
                t.ttfts.append(time.monotonic() - started)
            chunks += 1
            text += chunk["choices"][0]["text"]
            finishes += chunk["choices"][0]["finish_reason"] is not None
    if (finishes, dones) != (1, 1) or usage is None:
        t.mismatches.append(f"{job}: {finishes} finishes, {dones} [DONE], usage {usage}")
        return
    if text != expected:
        t.mismatches.append(f"{job}: {text!r} != alone {expected!r}")
    t.completed += 1
    t.tokens += usage["completion_tokens"]
    t.latencies.append(time.monotonic() - started)


async def client(
    i: int,
    url: str,
    jobs: list[Job],
    alone: dict[Job, str],
    churn: dict[str, str],
    end: float,
    tally: Tally,
) -> None:
    rng = random.Random(i)
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while time.monotonic() < end:
            job = rng.choice(jobs)
            churned = bool(churn) and rng.random() < 0.2
            if churned:  # a runtime-loaded copy: must answer like its source adapter
                name, source = rng.choice(list(churn.items()))
                expected = alone[(source, *job[1:])]
                job = (name, *job[1:])
            else:
                expected = alone[job]
            cut = rng.choice([0, 1, 3]) if rng.random() < 0.1 else None
            await one_request(http, job, expected, churned, cut, tally)


async def churner(url: str, churn: dict[str, str], end: float, tally: Tally) -> None:
    rng = random.Random(-1)
    sources = sorted(
        p.name for p in ADAPTERS_DIR.iterdir() if (p / "adapter_config.json").is_file()
    )
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        n = 0
        while time.monotonic() < end:
            n += 1
            if n % 5 == 0:  # a bad load now and then: refused, nothing else changes
                r = await http.post(
                    "/v1/load_lora_adapter", json={"lora_name": f"bad-{n}", "lora_path": "missing"}
                )
                if r.status_code != 400:  # a lora_path that does not exist
                    tally.errors[f"bad load {r.status_code}"] += 1
                continue
            name, source = f"churn-{n}", rng.choice(sources)
            r = await http.post(
                "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": source}
            )
            if r.status_code != 200:
                tally.errors[f"load {r.status_code}"] += 1
                continue
            churn[name] = source
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            del churn[name]  # new requests stop choosing it; some are still in flight
            await asyncio.sleep(rng.uniform(0.0, 0.1))
            r = await http.post("/v1/unload_lora_adapter", json={"lora_name": name})
            if r.status_code != 200:
                tally.errors[f"unload {r.status_code}"] += 1


async def integrity(state: Any, stop: asyncio.Event, tally: Tally) -> None:
    while not stop.is_set():
        await asyncio.wrap_future(state.bridge.submit_call(state.engine.check_integrity))
        tally.integrity_checks += 1
        await asyncio.sleep(0.5)


async def run(args: argparse.Namespace) -> bool:
    engine = LLMEngine(EngineConfig.create(None, num_pages=args.num_pages, max_num_seqs=64))
    adapters = sorted(
        p.name for p in ADAPTERS_DIR.iterdir() if (p / "adapter_config.json").is_file()
    )
    for name in adapters:
        engine.load_lora(name, ADAPTERS_DIR / name)
    config = ServerConfig(model_name=BASE, allow_runtime_lora=True, adapter_roots=(ADAPTERS_DIR,))
    uv, url, state = start_server(engine, config)
    words = [f"w{i}" + "aBcDeFgHiJkL"[: 1 + i % 10] for i in range(args.num_words)]
    jobs = [(m, w, n, e) for m in [BASE, *adapters] for w in words for n, e in LENGTHS]
    print(f"{len(jobs)} distinct requests, run alone first ...", flush=True)
    alone: dict[Job, str] = {}
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for job in jobs:
            r = await http.post("/v1/completions", json=body(job, False))
            alone[job] = r.raise_for_status().json()["choices"][0]["text"]
        counted_before = count_finished((await http.get("/metrics")).text)
    tally, churn, stop = Tally(), {}, asyncio.Event()
    print(f"{args.clients} clients for {args.duration:.0f} s ...", flush=True)
    started = time.monotonic()
    end = started + args.duration
    checker = asyncio.create_task(integrity(state, stop, tally))
    tasks = [client(i, url, jobs, alone, churn, end, tally) for i in range(args.clients)]
    await asyncio.wait_for(
        asyncio.gather(churner(url, churn, end, tally), *tasks), args.duration + 180
    )
    elapsed = time.monotonic() - started
    stop.set()
    await checker
    # Drain: nothing pending; unload every adapter (the idle engine applies it at once).
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for name in engine.adapters.registry.names():
            (
                await http.post("/v1/unload_lora_adapter", json={"lora_name": name})
            ).raise_for_status()
        metrics = (await http.get("/metrics")).text
    deadline = time.monotonic() + 10
    while engine.has_unfinished() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.wrap_future(state.bridge.submit_call(engine.check_integrity))
    stats = engine.stats()
    uv.should_exit = True
    return report(args, tally, elapsed, stats, count_finished(metrics) - counted_before)


def ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else float("nan")


def count_finished(metrics: str) -> float:
    """The server's ``request_success_total``, summed over finish reasons."""
    pattern = r"^loraserve:request_success_total\{[^}]*\} (\S+)$"
    return sum(float(v) for v in re.findall(pattern, metrics, re.M))


def report(args: argparse.Namespace, t: Tally, elapsed: float, stats: Any, counted: float) -> bool:
    ended = t.completed + t.disconnected
    checks = {
        "outputs equal alone, each request ended once": not t.mismatches,
        "no unexpected errors": not t.errors,
        "server counted every request once": counted == ended,
        "integrity checks held": t.integrity_checks > 0,
        # Unused prefix-cache blocks stay in the pool until someone needs their pages.
        "every page free (or cached) after the drain": (
            stats.free_pages + stats.cached_pages == stats.num_pages
        ),
        "nothing left in the engine": stats.num_running == stats.num_waiting == 0,
    }
    summary = {
        "clients": args.clients,
        "duration_s": round(elapsed, 1),
        "requests": ended + t.expected_404 + sum(t.errors.values()),
        "completed": t.completed,
        "disconnected": t.disconnected,
        "expected_404_after_unload": t.expected_404,
        "errors": dict(t.errors),
        "generated_tokens": t.tokens,
        "output_tok_per_s": round(t.tokens / elapsed, 1),
        "req_per_s": round(ended / elapsed, 2),
        "latency_ms_p50": ms(t.latencies, 50),
        "latency_ms_p99": ms(t.latencies, 99),
        "ttft_ms_p50": ms(t.ttfts, 50),
        "ttft_ms_p99": ms(t.ttfts, 99),
        "preemptions": stats.num_preemptions,
        "adapter_loads": stats.adapter_loads,
        "adapter_evictions": stats.adapter_evictions,
        "integrity_checks": t.integrity_checks,
        "checks": checks,
        "mismatches": t.mismatches[:10],
    }
    for key, value in summary.items():
        if key != "checks":
            print(f"{key:>28}: {value}")
    for name, ok in checks.items():
        print(f"{'ok' if ok else 'FAILED':>28}: {name}")
    passed = all(checks.values())
    print("PASS" if passed else "FAIL")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**summary, "passed": passed}, f, indent=2, default=str)
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    parser.add_argument("--num-pages", type=int, default=4096, help="pool size (small: churn)")
    parser.add_argument("--num-words", type=int, default=12, help="distinct prompts per model")
    parser.add_argument("--json", default=None, help="write the summary here")
    args = parser.parse_args(argv)
    return 0 if asyncio.run(run(args)) else 1


if __name__ == "__main__":
    sys.exit(main())
