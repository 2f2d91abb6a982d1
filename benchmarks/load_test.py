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

This file starts the servers and runs the phases; what the clients send and check is in
``load_traffic.py``, the client, churn and update tasks in ``load_clients.py``, and the
memory samples, the summary and the checks in ``load_report.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import socket
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.load_clients import churner, client, updater
from benchmarks.load_report import COUNTERS, Phase, count_finished, monitor, report
from benchmarks.load_traffic import (
    ADAPTERS_DIR,
    BASE,
    LIVE,
    LIVE_SOURCES,
    POLICIES,
    Job,
    LiveAdapter,
    Tally,
    Traffic,
    body,
    demo_adapters,
    make_jobs,
)
from engine import EngineConfig, LLMEngine
from server.app import create_app
from server.config import ServerConfig


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


async def integrity(state: Any, stop: asyncio.Event, t: Tally) -> None:
    while not stop.is_set():
        await asyncio.wrap_future(state.bridge.submit_call(state.engine.check_integrity))
        t.integrity_checks += 1
        await asyncio.sleep(0.5)


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
        gc.collect()  # the phase's engine and server go before the next is built
    return report(args, t, phases, memory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64, help="concurrent streaming clients")
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
