"""What ``loraserve bench fairness`` computes from one system's records: per client group and
per client, over time, one system's entry of the result, and the ratios between systems.

Pure functions of the client's records (:class:`~server.bench.metrics.RequestRecord`, in
workload order), each request's workload adapter (``adapters[i]`` for ``records[i]``) and
the server's ``/metrics`` samples. Times in the series are seconds after ``t0``, the run's
first send.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from server.bench.fairness_workload import FLOODER, GROUPS, client_group
from server.bench.metrics import RequestRecord, replay_span, summarize
from server.bench.workload import Workload

# The targets on 2 CPU cores: the modest clients' p99 TTFT at least 5× lower under fair than
# under fcfs, at a total output throughput within 5% of fcfs's.
TARGETS = {"modest_ttft_p99_fcfs_over_fair": 5.0, "output_throughput_fair_over_fcfs": 0.95}
WAITING, RUNNING = "loraserve:num_requests_waiting", "loraserve:num_requests_running"
GAUGES = (WAITING, RUNNING)  # what the bench reads from the server's /metrics


def group_summaries(
    records: Sequence[RequestRecord], adapters: Sequence[int | None], duration_s: float
) -> dict[str, dict[str, Any]]:
    """``summarize`` of each client group's requests ("flooder", "modest"), throughputs over
    the whole run's ``duration_s``, plus ``output_share``: the group's share of every output
    token served."""
    total = sum(r.output_len for r in records if r.ok)
    out = {}
    for group in GROUPS:
        mine = [r for r, a in zip(records, adapters, strict=True) if client_group(a) == group]
        summary = summarize(mine, duration_s)
        summary["output_share"] = summary["total_output_tokens"] / total if total else None
        out[group] = summary
    return out


def client_summaries(
    records: Sequence[RequestRecord], adapters: Sequence[int | None]
) -> list[dict[str, Any]]:
    """One entry per client (adapter), in adapter order: its group, requests completed and
    failed, output tokens served, TTFT p50 and p99 in ms (None without a completed one)."""
    out = []
    for adapter in sorted({a for a in adapters if a is not None}):
        mine = [r for r, a in zip(records, adapters, strict=True) if a == adapter]
        done = [r for r in mine if r.ok]
        ttfts = [t * 1000.0 for r in done if (t := r.ttft) is not None]
        p50, p99 = np.percentile(ttfts, (50, 99)).tolist() if ttfts else (None, None)
        out.append(
            {
                "adapter": adapter,
                "group": client_group(adapter),
                "completed": len(done),
                "failed": len(mine) - len(done),
                "output_tokens": sum(r.output_len for r in done),
                "p50_ttft_ms": p50,
                "p99_ttft_ms": p99,
            }
        )
    return out


def request_points(
    records: Sequence[RequestRecord], adapters: Sequence[int | None], t0: float
) -> list[list[Any]]:
    """``[adapter, sent at (s after t0), TTFT (s; None without a token), E2E latency (s)]`` per
    request, for the TTFT-over-time plot."""
    return [
        [a, r.start - t0, r.ttft, r.e2el if r.ok else None]
        for r, a in zip(records, adapters, strict=True)
    ]


def served_over_time(
    records: Sequence[RequestRecord],
    adapters: Sequence[int | None],
    t0: float,
    step_s: float,
) -> dict[str, Any]:
    """Cumulative output tokens each client had received at t = 0, step_s, 2·step_s, … and
    at the last token's time: ``{"t": [...], "tokens": {adapter: [...]}}`` (adapters as
    strings, JSON keys), so the last counts are the totals. A token counts when its chunk
    arrived at the client; the tokens of a completed request none of whose chunks carried
    text (the detokenizer held every piece back) count at its end."""
    if step_s <= 0:
        raise ValueError("step_s must be positive")
    times: dict[int, list[float]] = {}
    for r, a in zip(records, adapters, strict=True):
        if a is None:
            continue
        arrived = r.token_times or ([r.end] * r.output_len if r.ok else [])
        times.setdefault(a, []).extend(t - t0 for t in arrived)
    end = max((max(ts) for ts in times.values() if ts), default=0.0)
    grid = np.append(np.arange(0.0, end, step_s), end)
    tokens = {
        str(a): np.searchsorted(np.sort(ts), grid, side="right").tolist()
        for a, ts in sorted(times.items())
    }
    return {"t": grid.tolist(), "tokens": tokens}


def queue_series(samples: Sequence[tuple[float, Mapping[str, float]]], t0: float) -> dict[str, Any]:
    """The server's waiting and running requests as ``/metrics`` said during the run:
    ``[t, waiting, running]`` per scrape, and the largest and mean waiting count (None
    without a scrape)."""
    points = [[t - t0, v.get(WAITING), v.get(RUNNING)] for t, v in samples]
    waiting = [p[1] for p in points if p[1] is not None]
    return {
        "max_waiting": max(waiting) if waiting else None,
        "mean_waiting": float(np.mean(waiting)) if waiting else None,
        "samples": points,
    }


def stalled(samples: list[tuple[float, dict[str, float]]], window_s: float) -> bool:
    """Whether every sample of the last ``window_s`` seconds (and the samples reach that far
    back) shows requests waiting and none running: a server that admits nothing although
    nothing holds its pages or its batch."""
    if not samples or samples[-1][0] - samples[0][0] < window_s:
        return False
    recent = [v for t, v in samples if t >= samples[-1][0] - window_s]
    return all(v.get(RUNNING) == 0 and (v.get(WAITING) or 0) > 0 for v in recent)


def system_entry(
    key: str,
    workload: Workload,
    records: list[RequestRecord],
    samples: list[tuple[float, dict[str, float]]],
    wall_s: float,
) -> dict[str, Any]:
    """One system's entry of ``fairness.json`` (``key``: "fcfs", "fair" or "priority") from
    its records, in workload order, and its ``/metrics`` samples; ``wall_s``: the system's
    time with its server's start-up and stop. The entry's ``series`` is what the plots draw."""
    adapters = [r.adapter for r in workload.requests]
    span = replay_span(records, wall_s)
    t0 = min(r.start for r in records)
    planned = [r.output_len for r in workload.requests]
    generated = [r.output_len for r in records]
    queue = queue_series(samples, t0)
    flood_end = max((r.end for r, a in zip(records, adapters, strict=True) if a == FLOODER))
    modest_last_sent = max(
        (r.start for r, a in zip(records, adapters, strict=True) if a != FLOODER), default=t0
    )
    return {
        "system": key,
        "generated_tokens": sum(generated),
        "planned_tokens": sum(planned),
        "exact": generated == planned,
        "wall_s": wall_s,  # with the server's start-up and stop
        # Every modest request met the flood: the flooder was still served after the last.
        "flood_outlasted_modest": flood_end >= modest_last_sent,
        **summarize(records, span),
        "groups": group_summaries(records, adapters, span),
        "clients": client_summaries(records, adapters),
        "queue": {k: v for k, v in queue.items() if k != "samples"},
        # Written to fairness_series.json, not fairness.json: what the plots draw.
        "series": {
            "requests": request_points(records, adapters, t0),
            "served": served_over_time(records, adapters, t0, max(span / 200, 0.05)),
            "queue": queue["samples"],
        },
    }


def fairness_ratios(systems: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """The ratios between systems (keyed "fcfs", "fair", "priority"; None where a system or a
    value is missing): the modest clients' TTFT p99 and p50 under fcfs over fair and over
    priority (> 1: fcfs is slower), and total output and request throughput of fair and
    priority over fcfs (< 1: fcfs is faster)."""

    def value(system: str, *path: str) -> float | None:
        node: Any = systems.get(system)
        for key in path:
            node = node.get(key) if node is not None else None
        return float(node) if node else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    out: dict[str, float | None] = {}
    for other in ("fair", "priority"):
        for stat in ("p99", "median"):
            name = "p50" if stat == "median" else stat
            out[f"modest_ttft_{name}_fcfs_over_{other}"] = ratio(
                value("fcfs", "groups", "modest", f"{stat}_ttft_ms"),
                value(other, "groups", "modest", f"{stat}_ttft_ms"),
            )
        for kind in ("output", "request"):
            out[f"{kind}_throughput_{other}_over_fcfs"] = ratio(
                value(other, f"{kind}_throughput"), value("fcfs", f"{kind}_throughput")
            )
    return out


def targets_met(ratios: Mapping[str, float | None]) -> bool | None:
    """Whether every ratio in :data:`TARGETS` reaches its target; None when one is missing."""
    values = [ratios.get(key) for key in TARGETS]
    if any(v is None for v in values):
        return None
    return all(v is not None and v >= t for v, t in zip(values, TARGETS.values(), strict=True))
