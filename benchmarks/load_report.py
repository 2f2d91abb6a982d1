"""The load test's accounting: each phase's drain, the resident memory, the summary and the
pass/fail checks.

:func:`monitor` samples this process's resident set while a phase runs (the server runs in
it) and prints progress; :func:`rss_points` reduces the samples to a few medians and the
growth; :func:`report` prints the summary table and the checks, writes the JSON, and says
whether the run passed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import statistics
import time
import weakref
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.load_traffic import Tally
from engine import LLMEngine
from engine.outputs import EngineStats

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
class Phase:
    """One server's share of the run and what its drain found."""

    policy: str
    seconds: float
    ended: int  # requests the clients saw end (completed or disconnected by them)
    counted: float  # requests the server counted as finished
    stats: EngineStats  # after the drain
    counters: dict[str, int]  # COUNTERS' growth over the load
    engine: weakref.ref[LLMEngine]  # to see that it is freed once its server stopped


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
