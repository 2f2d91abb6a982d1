"""A snapshot of an engine's counters, for ``/metrics``, the status route and the console.

Read from any thread while the engine steps: only counters and membership tests are read
(an int read is atomic), and the dicts the engine thread may be changing are copied with
:func:`_snapshot`. A snapshot may lag a step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, TypeVar

from engine.outputs import AdapterStatus, EngineStats
from engine.page_pool import Tenant
from engine.parallel.executor import worker_counters

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine

T = TypeVar("T")


def collect_stats(engine: LLMEngine) -> EngineStats:
    """The engine's counters now."""
    adapters, scheduler, pool = engine.adapters, engine.scheduler, engine.pool
    residency = adapters.residency
    prefetch = adapters.prefetcher.stats
    prefix = engine.kv_cache_manager.prefix
    cached_pages = engine.kv_cache_manager.num_cached_pages
    ledger = scheduler.ledger
    lora, split = engine.config.lora, engine.config.parallel.tensor_parallel_size
    step_seconds, collectives = (
        (0.0, {}) if engine.executor is None else worker_counters(engine.executor)
    )
    weights = engine.weights
    return EngineStats(
        num_running=engine.num_running,
        num_waiting=len(scheduler.waiting) + engine.num_queued,
        num_pages=pool.num_pages,
        free_pages=pool.num_free,
        # Live keys and values; unused cached blocks are counted apart (cached_pages).
        kv_pages=pool.num_used(Tenant.KV) - cached_pages,
        adapter_pages=pool.num_used(Tenant.ADAPTER),
        resident_adapters=residency.num_placed - residency.num_evicted,
        loaded_adapters=len(adapters.registry),
        num_preemptions=scheduler.num_preemptions,
        prefetch_hits=scheduler.prefetch_hits,
        prefetch_misses=scheduler.prefetch_misses,
        adapter_loads=prefetch.loads,
        adapter_evictions=residency.num_evicted,
        adapter_load_seconds=prefetch.load_seconds,
        prompt_tokens=engine.prompt_tokens,
        generation_tokens=engine.generation_tokens,
        num_steps=engine.num_steps,
        num_failed_steps=engine.num_failed_steps,
        weight_bytes=weights.base_bytes,
        unquantized_weight_bytes=weights.unquantized_bytes,
        quantized_bits_per_param=weights.bits_per_param,
        quantization_freed_pages=engine.freed_pages,
        prefix_cache_queries=0 if prefix is None else prefix.queries,
        prefix_cache_hits=0 if prefix is None else prefix.hits,
        cached_pages=cached_pages,
        cached_pages_by_adapter={} if prefix is None else _snapshot(prefix.pages_by_label),
        adapter_versions={e.name: e.version for e in adapters.registry.entries()},
        pinned_adapters=adapters.pinned_names(),
        client_prompt_tokens=_snapshot(ledger.prompt_tokens),
        client_output_tokens=_snapshot(ledger.output_tokens),
        client_virtual_tokens=ledger.labelled(_snapshot(scheduler.waiting.counters())),
        # One device's (a page split across workers holds 1/N of its width on each).
        page_bytes=pool.page_bytes // split,
        adapters=adapter_statuses(engine),
        max_loras=lora.max_loras or lora.max_resident_loras,
        tensor_parallel_size=split,
        worker_step_seconds=step_seconds,
        collectives=collectives,
    )


def adapter_statuses(engine: LLMEngine) -> list[AdapterStatus]:
    """Every registered adapter's tier (pool, host memory or disk), size and load."""
    load = engine.adapter_load()
    adapters = engine.adapters
    residency, host = adapters.residency, adapters.host_cache
    pinned = set(adapters.pinned_names())
    statuses = []
    for entry in adapters.registry.entries():
        tier = "pool" if entry.id in residency else "host" if entry.id in host else "disk"
        running, waiting = load.get(entry.name, (0, 0))
        statuses.append(
            AdapterStatus(
                name=entry.name,
                kind=entry.kind,
                version=entry.version,
                pinned=entry.name in pinned,
                tier=tier,
                rank=entry.max_rank,
                pages=entry.pages,
                running=running,
                waiting=waiting,
            )
        )
    return statuses


def _snapshot(counts: Mapping[str, T]) -> dict[str, T]:
    """A copy of a dict the engine thread may be changing."""
    for _ in range(8):
        try:
            return dict(counts)
        except RuntimeError:  # changed size during the copy
            continue
    return {}
