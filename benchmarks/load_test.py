"""Load test: concurrent streaming clients against a real server on loopback.

    python benchmarks/load_test.py [--clients 64] [--duration 120] [--num-pages 4096] [--json F]
    python benchmarks/load_test.py --soak --duration 1800 [--json F]    (benchmarks/soak.sh)

Starts the server in this process (uvicorn on 127.0.0.1, the bundled demo model and its
adapters, runtime loading on), so that the engine's pool can be checked while it runs. Then:

* ``--clients`` asyncio clients send greedy streaming completions back to back for
  ``--duration`` seconds, mixing the base model, the demo adapters and adapters loaded at
  runtime; ~10% of them disconnect (before the first token, or after a few chunks);
* a churn task loads adapters under new names (copies of the demo adapters, plus some bad
  loads), lets traffic use them, and unloads them, in use or not;
* every half second the pool's integrity check runs on the engine thread.

``--soak`` runs the same for longer and adds:

* one phase per scheduling policy (fcfs; fair, keyed by the request's ``user``; priority),
  the duration split evenly, each on a fresh server; requests carry a ``user`` (half the
  clients share one, the others have one each) and, under "priority", a ``priority``;
* prompts behind two shared prefixes of two cache blocks each, beside the short ones, so
  that the prefix cache (on, as by default) has hits to give;
* in-place updates: an adapter named ``live`` is replaced with ``replace: true`` every second
  or so, alternating between upper's and swapcase's weights, while requests run on it. A
  response does not say which version served it, so each version keeps the window in which
  a new request may have been given it (from when its replacement was asked for until the
  next one was answered), and a request's output must equal the solo run of the weights of
  a version whose window meets the request's, from its sending to its first token;
* the process's resident memory (the server runs in it) sampled every 2 s; progress printed
  every 10 s.

Pass: every completed output equals the same request run alone (measured first, one at a time,
through the first server), every request ends exactly once (completed, disconnected by us, or an
expected 404 for an adapter unloaded meanwhile; never lost, never two endings), each server
counted as many finished requests as the clients saw, the integrity checks hold, and once
drained and every adapter unloaded, every page of the pool is free. A soak also needs
prefix-cache hits, in-place updates and hot loads to have happened, and flat memory: the
resident set at the end (the median of the last minute's samples) less than 5% above minute
10's, or, in a run shorter than 20 minutes, above the one at a third of the run (after the
first phase: the warm-up). Prints the summary table (requests, tokens, disconnects, updates,
loads, evictions, errors by kind, prefix-cache hits, resident memory, latency percentiles);
exits 1 on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import random
import re
import socket
import statistics
import sys
import threading
import time
import weakref
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn

from engine import EngineConfig, LLMEngine
from engine.config import DEMO_DIR
from engine.outputs import EngineStats
from server.app import create_app
from server.config import ServerConfig

BASE = "loraserve-demo"
ADAPTERS_DIR = DEMO_DIR / "adapters"
LENGTHS = ((16, False), (48, True))  # (max_tokens, ignore_eos): stop at EOS, or run long
Job = tuple[str, str, int, bool]  # (model, prompt without its "=", max_tokens, ignore_eos)

# Soak: one phase per policy; the fair one shares the engine between users.
POLICIES = ("fcfs", "fair", "priority")
PRIORITIES = (-2, 0, 0, 0, 3, 10)  # lower runs first
# 45 and 46 bytes: with BOS, two whole blocks of 16 that requests on the same model share.
# The longest prompt (a prefix, 12 characters and "="), the prefix-tuned adapter's 16 virtual
# tokens and 48 generated stay inside the demo's 128 positions.
PREFIXES = (
    "the quick brown fox jumps over the lazy dog; ",
    "pack my box with five dozen liquor jugs, then ",
)
LIVE = "live"  # the adapter replaced in place, alternating between these two weight sets
LIVE_SOURCES = ("upper", "swapcase")
# The engine's counters reported as their growth over the load (the solo runs not counted).
COUNTERS = (
    "num_preemptions",
    "adapter_loads",  # disk -> host memory
    "adapter_evictions",  # adapters put out of the pool to make room
    "prefix_cache_queries",  # prompt tokens looked up
    "prefix_cache_hits",  # of those, tokens found
)
RSS_EVERY_S = 2.0
PROGRESS_EVERY_S = 10.0
MAX_RSS_GROWTH = 0.05


@dataclass
class Tally:
    """What the clients (and the churn and update tasks) saw, over every phase."""

    completed: int = 0
    disconnected: int = 0
    expected_404: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    mismatches: list[str] = field(default_factory=list)
    tokens: int = 0
    cached_tokens: int = 0  # the prompt tokens completed requests' usage says were cached
    latencies: array[float] = field(default_factory=lambda: array("d"))
    ttfts: array[float] = field(default_factory=lambda: array("d"))
    integrity_checks: int = 0
    hot_loads: int = 0
    hot_unloads: int = 0
    updates: int = 0  # in-place replacements answered 200
    live_checked: int = 0  # completed requests on the replaced adapter
    live_ambiguous: int = 0  # of those, whose window met versions with different outputs

    @property
    def ended(self) -> int:
        return self.completed + self.disconnected


@dataclass
class Version:
    """One version of the live adapter: whose weights, and when a new request may get it."""

    source: str  # the demo adapter whose files it was loaded from
    since: float  # when its replacement was asked for (monotonic seconds)
    until: float = math.inf  # when the next replacement was answered; inf while served


@dataclass
class LiveAdapter:
    """An adapter replaced in place over and over, alternating two weight sets."""

    name: str
    sources: tuple[str, str]
    versions: list[Version] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.versions.append(Version(self.sources[0], -math.inf))  # loaded with the engine

    def begin(self) -> str:
        """A replacement is about to be asked for: returns the weights it brings."""
        now = time.monotonic()
        # Requests time out after 120 s: a window closed 300 s ago meets none still running.
        self.versions = [v for v in self.versions if v.until > now - 300]
        current = self.versions[-1].source
        source = self.sources[1] if current == self.sources[0] else self.sources[0]
        self.versions.append(Version(source, now))
        return source

    def end(self, ok: bool) -> None:
        """The replacement was answered: the previous version is no longer given out (or,
        refused, the new one never was)."""
        if ok:
            self.versions[-2].until = time.monotonic()
        else:
            self.versions.pop()

    def served(self, sent: float, first: float) -> list[str]:
        """The weights a request sent at ``sent`` whose first token came at ``first`` may
        have run on."""
        return [v.source for v in self.versions if v.since <= first and v.until >= sent]


@dataclass
class Traffic:
    """What one phase's clients choose from, and how they check what they get."""

    jobs: list[Job]
    alone: dict[Job, str]  # each job's output, run alone
    churn: dict[str, str]  # runtime-loaded name -> the demo adapter it copies
    live: LiveAdapter | None
    policy: str
    soak: bool

    def extra(self, rng: random.Random, user: str | None) -> dict[str, Any]:
        """The request fields the scheduling policies read (a priority other than 0 is
        refused by a server that does not schedule by priority)."""
        out: dict[str, Any] = {}
        if user is not None:
            out["user"] = user
        if self.policy == "priority":
            out["priority"] = rng.choice(PRIORITIES)
        return out


@dataclass
class Phase:
    """One server's share of the run and what its drain found."""

    policy: str
    seconds: float
    ended: int  # requests the clients saw end (completed or disconnected by them)
    counted: float  # requests the server counted as finished
    stats: EngineStats  # after the drain
    counters: dict[str, int]  # COUNTERS' growth over the load
    engine: weakref.ref[LLMEngine]  # to see that it is freed once its server stopped


def start_server(
    engine: LLMEngine, config: ServerConfig
) -> tuple[uvicorn.Server, threading.Thread, str, Any]:
    app = create_app(engine, config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    return uv, thread, f"http://127.0.0.1:{sock.getsockname()[1]}", app.state.server


def on_model(model: str, job: Job) -> Job:
    return (model, *job[1:])


def body(job: Job, stream: bool, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    model, prompt, max_tokens, ignore_eos = job
    out: dict[str, Any] = {"model": model, "prompt": f"{prompt}=", "temperature": 0.0}
    out.update(max_tokens=max_tokens, ignore_eos=ignore_eos, stream=stream, **(extra or {}))
    if stream:
        out["stream_options"] = {"include_usage": True}
    return out


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


async def integrity(state: Any, stop: asyncio.Event, t: Tally) -> None:
    while not stop.is_set():
        await asyncio.wrap_future(state.bridge.submit_call(state.engine.check_integrity))
        t.integrity_checks += 1
        await asyncio.sleep(0.5)


def rss_mib() -> float:
    """This process's resident set, in MiB."""
    try:
        import psutil

        return float(psutil.Process().memory_info().rss) / 2**20
    except ImportError:  # Linux without psutil
        status = Path("/proc/self/status").read_text()
        return int(re.findall(r"^VmRSS:\s+(\d+) kB", status, re.M)[0]) / 1024


async def monitor(
    policy: str, offset: float, stop: asyncio.Event, t: Tally, memory: list[tuple[float, float]]
) -> None:
    """Sample the resident set every ``RSS_EVERY_S`` (at seconds of load counted over every
    phase, ``offset`` before this one) and print progress every ``PROGRESS_EVERY_S``."""
    started = time.monotonic()
    next_progress = PROGRESS_EVERY_S
    while not stop.is_set():
        elapsed = time.monotonic() - started
        memory.append((offset + elapsed, rss_mib()))
        if elapsed >= next_progress:
            next_progress += PROGRESS_EVERY_S
            errors = sum(t.errors.values())
            print(
                f"[{offset + elapsed:6.0f} s] {policy}: {t.completed} completed, "
                f"{t.disconnected} disconnected, {t.updates} updates, {t.hot_loads} hot loads, "
                f"{errors} errors, {len(t.mismatches)} mismatches, "
                f"rss {memory[-1][1]:.0f} MiB",
                flush=True,
            )
        await asyncio.sleep(RSS_EVERY_S)


def demo_adapters() -> list[str]:
    return sorted(p.name for p in ADAPTERS_DIR.iterdir() if (p / "adapter_config.json").is_file())


def make_jobs(args: argparse.Namespace, models: list[str]) -> list[Job]:
    words = [f"w{i}" + "aBcDeFgHiJkL"[: 1 + i % 10] for i in range(args.num_words)]
    prompts = list(words)
    if args.soak:  # as many again behind the shared prefixes
        prompts += [PREFIXES[i % len(PREFIXES)] + w for i, w in enumerate(words)]
    return [(m, p, n, e) for m in models for p in prompts for n, e in LENGTHS]


async def run_alone(url: str, jobs: list[Job]) -> dict[Job, str]:
    print(f"{len(jobs)} distinct requests, run alone first ...", flush=True)
    alone: dict[Job, str] = {}
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for job in jobs:
            r = await http.post("/v1/completions", json=body(job, False))
            alone[job] = r.raise_for_status().json()["choices"][0]["text"]
    print(f"... in {time.monotonic() - started:.0f} s", flush=True)
    return alone


async def run_phase(
    args: argparse.Namespace,
    policy: str,
    seconds: float,
    offset: float,
    alone: dict[Job, str],
    t: Tally,
    memory: list[tuple[float, float]],
) -> Phase:
    """``seconds`` of load on a fresh server scheduling by ``policy``, then the drain.
    Fills ``alone`` first if it is empty."""
    # The fair policy shares by adapter by default; the soak's requests name their user.
    fairness_key = "user" if args.soak and policy == "fair" else "adapter"
    engine = LLMEngine(
        EngineConfig.create(
            None,
            num_pages=args.num_pages,
            max_num_seqs=64,
            scheduling_policy=policy,
            fairness_key=fairness_key,
        )
    )
    adapters = demo_adapters()
    for name in adapters:
        engine.load_lora(name, ADAPTERS_DIR / name)
    live = None
    if args.soak:
        live = LiveAdapter(LIVE, LIVE_SOURCES)
        engine.load_lora(LIVE, ADAPTERS_DIR / LIVE_SOURCES[0])
    config = ServerConfig(model_name=BASE, allow_runtime_lora=True, adapter_roots=(ADAPTERS_DIR,))
    uv, thread, url, state = start_server(engine, config)
    jobs = make_jobs(args, [BASE, *adapters])
    if not alone:
        alone.update(await run_alone(url, jobs))
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        counted_before = count_finished((await http.get("/metrics")).text)
    before = engine.stats()
    traffic = Traffic(jobs, alone, {}, live, policy, args.soak)
    print(f"{policy}: {args.clients} clients for {seconds:.0f} s ...", flush=True)
    ended_before, stop = t.ended, asyncio.Event()
    started = time.monotonic()
    end = started + seconds
    watchers = [integrity(state, stop, t), monitor(policy, offset, stop, t, memory)]
    background = [asyncio.create_task(w) for w in watchers]
    work = [churner(url, traffic.churn, end, t)]
    work += [client(i, url, traffic, end, t) for i in range(args.clients)]
    if live is not None:
        work.append(updater(url, live, end, t))
    await asyncio.wait_for(asyncio.gather(*work), seconds + 180)
    elapsed = time.monotonic() - started
    stop.set()
    await asyncio.gather(*background)
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
    thread.join(30)
    counted = count_finished(metrics) - counted_before
    counters = {k: getattr(stats, k) - getattr(before, k) for k in COUNTERS}
    ended = t.ended - ended_before
    return Phase(policy, elapsed, ended, counted, stats, counters, weakref.ref(engine))


async def run(args: argparse.Namespace) -> bool:
    policies = POLICIES if args.soak else ("fair",)
    t = Tally()
    alone: dict[Job, str] = {}
    memory: list[tuple[float, float]] = []  # (seconds of load, resident MiB)
    phases: list[Phase] = []
    for policy in policies:
        offset = sum(p.seconds for p in phases)
        seconds = args.duration / len(policies)
        phases.append(await run_phase(args, policy, seconds, offset, alone, t, memory))
        forget_apps()  # the phase's engine and server go before the next is built
        gc.collect()
    return report(args, t, phases, memory)


def forget_apps() -> None:
    """Empty FastAPI's module-level caches of endpoint callables.

    FastAPI (0.165 here) classifies each endpoint in ``lru_cache``s of 4096 entries; the
    entries hold the route functions, whose closures hold the server's state and its engine,
    so a stopped server's engine stays in memory. One server per process never notices; a
    soak that builds one per phase would count it as growth.
    """
    from fastapi.dependencies import models

    for value in vars(models).values():
        if callable(getattr(value, "cache_clear", None)):
            value.cache_clear()


def ms(values: array[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else float("nan")


def count_finished(metrics: str) -> float:
    """The server's ``request_success_total``, summed over finish reasons."""
    pattern = r"^loraserve:request_success_total\{[^}]*\} (\S+)$"
    return sum(float(v) for v in re.findall(pattern, metrics, re.M))


def rss_points(memory: list[tuple[float, float]], total: float) -> tuple[dict[str, float], float]:
    """Resident MiB at minute 1, 10 and the last (runs of 20 minutes or more), or at 10%, a
    third, half and the end of the run; and the growth from minute 10 (or the third) to the
    end. Each point is the median of the samples around it (the end's: of the last minute,
    or of the last 5% of a short run), so that a step's allocations do not sway it."""
    if total >= 20 * 60:
        points = {"minute 1": 60.0, "minute 10": 600.0}
        baseline, last = "minute 10", "last minute"
    else:
        points = {"10%": 0.1 * total, "1/3": total / 3, "50%": 0.5 * total}
        baseline, last = "1/3", "end"
    window = max(2 * RSS_EVERY_S, min(60.0, 0.05 * total))
    ranges = {k: (p - window / 2, p + window / 2) for k, p in points.items()}
    ranges[last] = (total - window, math.inf)
    out: dict[str, float] = {}
    for key, (lo, hi) in ranges.items():
        near = [mib for s, mib in memory if lo <= s <= hi]
        if not near:  # no sample in the window: the nearest one
            near = [min(memory, key=lambda m: abs(m[0] - (lo + hi) / 2))[1]]
        out[key] = round(statistics.median(near), 1)
    return out, out[last] / out[baseline] - 1


def report(
    args: argparse.Namespace, t: Tally, phases: list[Phase], memory: list[tuple[float, float]]
) -> bool:
    elapsed = sum(p.seconds for p in phases)
    stats = [p.stats for p in phases]

    def total(counter: str) -> int:
        return sum(p.counters[counter] for p in phases)

    checks = {
        "outputs equal alone, each request ended once": not t.mismatches,
        "no unexpected errors": not t.errors,
        "server counted every request once": all(p.counted == p.ended for p in phases),
        "integrity checks held": t.integrity_checks > 0,
        # Unused prefix-cache blocks stay in the pool until someone needs their pages.
        "every page free (or cached) after the drain": all(
            s.free_pages + s.cached_pages == s.num_pages for s in stats
        ),
        "nothing left in the engine": all(s.num_running == s.num_waiting == 0 for s in stats),
    }
    summary: dict[str, Any] = {
        "clients": args.clients,
        "duration_s": round(elapsed, 1),
        "requests": t.ended + t.expected_404 + sum(t.errors.values()),
        "completed": t.completed,
        "disconnected": t.disconnected,
        "expected_404_after_unload": t.expected_404,
        "errors": dict(t.errors),
        "generated_tokens": t.tokens,
        "output_tok_per_s": round(t.tokens / elapsed, 1),
        "req_per_s": round(t.ended / elapsed, 2),
        "latency_ms_p50": ms(t.latencies, 50),
        "latency_ms_p99": ms(t.latencies, 99),
        "ttft_ms_p50": ms(t.ttfts, 50),
        "ttft_ms_p99": ms(t.ttfts, 99),
        "preemptions": total("num_preemptions"),
        "hot_loads": t.hot_loads,
        "hot_unloads": t.hot_unloads,
        "adapter_loads": total("adapter_loads"),
        "adapter_evictions": total("adapter_evictions"),
        "integrity_checks": t.integrity_checks,
    }
    if args.soak:
        rss, growth = rss_points(memory, elapsed)
        summary.update(
            phases={
                p.policy: {
                    "seconds": round(p.seconds, 1),
                    "ended": p.ended,
                    "prefix_cache_hit_tokens": p.counters["prefix_cache_hits"],
                    "adapter_evictions": p.counters["adapter_evictions"],
                }
                for p in phases
            },
            in_place_updates=t.updates,
            live_requests_checked=t.live_checked,
            live_requests_ambiguous=t.live_ambiguous,
            prefix_cache_queried_tokens=total("prefix_cache_queries"),
            prefix_cache_hit_tokens=total("prefix_cache_hits"),
            cached_tokens_in_usage=t.cached_tokens,
            rss_mib=rss,
            rss_growth=f"{growth:+.1%}",
            stopped_engines_alive=sum(p.engine() is not None for p in phases),
        )
        checks["prefix cache hits, in-place updates and hot loads happened"] = (
            total("prefix_cache_hits") > 0 and t.updates > 0 and t.hot_loads > 0
        )
        baseline = "minute 10" if elapsed >= 20 * 60 else "a third of the run"
        checks[f"resident memory grew under 5% from {baseline} to the end"] = (
            growth < MAX_RSS_GROWTH
        )
    summary.update(checks=checks, mismatches=t.mismatches[:10])
    for key, value in summary.items():
        if key != "checks":
            print(f"{key:>30}: {value}")
    for name, ok in checks.items():
        print(f"{'ok' if ok else 'FAILED':>30}: {name}")
    passed = all(checks.values())
    print("PASS" if passed else "FAIL")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({**summary, "passed": passed}, f, indent=2, default=str)
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    parser.add_argument("--num-pages", type=int, default=4096, help="pool size (small: churn)")
    parser.add_argument("--num-words", type=int, default=12, help="distinct prompts per model")
    parser.add_argument(
        "--soak",
        action="store_true",
        help="a phase per scheduling policy, shared prefixes, in-place updates, memory check",
    )
    parser.add_argument("--json", default=None, help="write the summary here")
    args = parser.parse_args(argv)
    return 0 if asyncio.run(run(args)) else 1


if __name__ == "__main__":
    sys.exit(main())
