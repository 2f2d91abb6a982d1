"""``GET /v1/status``: the server's state as JSON, for the operator console and scripts.

One snapshot of the engine (the pool by tenant, the queue, the adapter counters, every
registered adapter's tier and load) and of what the API process measured per adapter (time
to first token, tokens generated, finished requests). Rates (tokens per second) are for the
reader to take between two polls: every figure here is a total or a gauge. The adapters are
bounded as the metrics' labels are: those with a label of their own (the first
``--max-metric-adapters`` names the server saw) get a row each, busiest first; the rest are
summed in one row named ``(others)``. The fields are documented in `docs/status.md`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request

from engine.outputs import AdapterStatus, EngineStats
from engine.sizing import tokens_beside
from server.auth import is_admin
from server.metrics import AdapterTiming
from server.state import server_state

OTHERS = "(others)"


status_router = APIRouter()


@status_router.get("/v1/status")
async def status(request: Request) -> dict[str, Any]:
    state = server_state(request)
    await state.handle.refresh_stats()
    stats = state.handle.stats()
    timings = state.metrics.adapter_timings()
    body = build_status(stats, timings, state.config.model_name, state.metrics.own_label)
    body["plan"] = state.plan
    body["access"] = {"admin": is_admin(state.config, request.headers.raw)}
    return body


def build_status(
    stats: EngineStats,
    timings: dict[str, AdapterTiming],
    model: str,
    own_label: Callable[[str], bool],
) -> dict[str, Any]:
    """The route's body (see `docs/status.md`); ``own_label``: whether an adapter has a
    metrics label of its own (its timings are its own; the rest share ``other``'s)."""
    listed = [a for a in stats.adapters if not a.name.startswith("_")]  # no temporary ones
    shown = [a for a in listed if own_label(a.name)]
    rest = [a for a in listed if not own_label(a.name)]
    # the busiest first (running and waiting requests, then tokens served), then by name
    shown.sort(key=lambda a: (-(a.running + a.waiting), -_timing(timings, a.name).tokens, a.name))
    adapters = [_adapter_row(a, timings) for a in shown]
    if rest:
        adapters.append(_others_row(rest, timings))
    base = _timing(timings, model)
    return {
        "object": "status",
        "time": time.time(),
        "model": model,
        "pool": {
            "num_pages": stats.num_pages,
            "page_bytes": stats.page_bytes,
            "free": stats.free_pages,
            "kv": stats.kv_pages,
            "adapter": stats.adapter_pages,
            "cached": stats.cached_pages,
            "token_capacity": tokens_beside(stats.num_pages, stats.adapter_pages),
        },
        "requests": {
            "running": stats.num_running,
            "waiting": stats.num_waiting,
            "preemptions": stats.num_preemptions,
            "prompt_tokens": stats.prompt_tokens,
            "generation_tokens": stats.generation_tokens,
            "steps": stats.num_steps,
            "failed_steps": stats.num_failed_steps,
        },
        "adapter_counters": {
            "loaded": stats.loaded_adapters,
            "resident": stats.resident_adapters,
            "pinned": len(stats.pinned_adapters),
            "loads": stats.adapter_loads,
            "evictions": stats.adapter_evictions,
            "prefetch_hits": stats.prefetch_hits,
            "prefetch_misses": stats.prefetch_misses,
            "load_seconds": stats.adapter_load_seconds,
        },
        "prefix_cache": {"queries": stats.prefix_cache_queries, "hits": stats.prefix_cache_hits},
        "tensor_parallel": {
            "size": stats.tensor_parallel_size,
            "worker_step_seconds": stats.worker_step_seconds,
            "collectives": {
                name: {"calls": c.calls, "elements": c.elements, "seconds": c.seconds}
                for name, c in stats.collectives.items()
            },
        },
        "base": _timing_fields(base),
        "adapters": adapters,
    }


def _timing(timings: dict[str, AdapterTiming], name: str) -> AdapterTiming:
    return timings.get(name) or AdapterTiming()


def _timing_fields(timing: AdapterTiming) -> dict[str, Any]:
    mean = timing.ttft_seconds / timing.first_tokens if timing.first_tokens else None
    return {
        "requests_finished": timing.requests,
        "generated_tokens": timing.tokens,
        "ttft_mean_seconds": mean,
    }


def _adapter_row(adapter: AdapterStatus, timings: dict[str, AdapterTiming]) -> dict[str, Any]:
    return {
        "name": adapter.name,
        "kind": adapter.kind,
        "version": adapter.version,
        "pinned": adapter.pinned,
        "tier": adapter.tier,
        "rank": adapter.rank,
        "pages": adapter.pages,
        "running": adapter.running,
        "waiting": adapter.waiting,
        **_timing_fields(_timing(timings, adapter.name)),
    }


def _others_row(rest: list[AdapterStatus], timings: dict[str, AdapterTiming]) -> dict[str, Any]:
    """The adapters past the bound, summed. Their timings are the metrics' ``other``."""
    tiers = {tier: sum(1 for a in rest if a.tier == tier) for tier in ("pool", "host", "disk")}
    return {
        "name": OTHERS,
        "count": len(rest),
        "tiers": tiers,
        "pinned": sum(a.pinned for a in rest),
        "pages": sum(a.pages for a in rest),
        "running": sum(a.running for a in rest),
        "waiting": sum(a.waiting for a in rest),
        **_timing_fields(_timing(timings, "other")),
    }
