"""Prometheus metrics, named like vLLM's with a ``loraserve:`` prefix.

Two sources: request timings, observed by the bridge as outputs arrive (histograms and
counters held here), and the engine's own counters and gauges, read from
``LLMEngine.stats()`` at scrape time (a custom collector, so a scrape costs one snapshot and
never waits for the engine thread). Each server has its own registry, so several can live in
one process (tests). Labels stay bounded: ``finished_reason`` has three values, and only the
first ``max_adapter_labels`` adapter names get a label of their own; later ones share
``other``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.outputs import EngineStats

P = "loraserve:"
# No ``*_created`` series: they double the output and nothing here needs them.
disable_created_metrics()  # type: ignore[no-untyped-call]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_E2E_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
)


class _EngineCollector(Collector):
    """The engine's snapshot as Prometheus families, built at each scrape."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        gauges = {
            "num_requests_running": ("Requests running in the engine.", s.num_running),
            "num_requests_waiting": ("Requests waiting to be scheduled.", s.num_waiting),
            "kv_cache_usage_perc": ("Fraction of pool pages holding KV cache.", s.kv_cache_usage),
            "num_pool_pages": ("Pages in the unified pool.", s.num_pages),
            "num_resident_adapters": ("Adapters resident in the pool.", s.resident_adapters),
            "num_loaded_adapters": ("Adapters registered (servable).", s.loaded_adapters),
            "base_weight_bytes": ("Bytes of the base model's weights.", s.weight_bytes),
            "base_weight_unquantized_bytes": (
                "Bytes the base model's weights would take unquantized.",
                s.unquantized_weight_bytes,
            ),
            "quantized_bits_per_param": (
                "Bits per parameter of the NF4 linear weights (0 without quantization).",
                s.quantized_bits_per_param,
            ),
            "quantization_freed_pages": (
                "Pool pages the quantized base leaves free, against an unquantized one.",
                s.quantization_freed_pages,
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(P + name, doc, value=value)
        pages = GaugeMetricFamily(P + "pool_pages", "Pool pages by tenant.", labels=["tenant"])
        pages.add_metric(["kv"], s.kv_pages)
        pages.add_metric(["adapter"], s.adapter_pages)
        pages.add_metric(["free"], s.free_pages)
        yield pages
        counters = {
            "num_preemptions": ("Preemptions (recompute).", s.num_preemptions),
            "prompt_tokens": ("Prompt tokens admitted.", s.prompt_tokens),
            "generation_tokens": ("Tokens generated.", s.generation_tokens),
            "adapter_loads": ("Adapter loads from disk into host memory.", s.adapter_loads),
            "adapter_evictions": ("Adapters evicted from the pool.", s.adapter_evictions),
            "adapter_prefetch_hits": ("Adapters ready when first needed.", s.prefetch_hits),
            "adapter_prefetch_misses": ("Adapters a request waited for.", s.prefetch_misses),
            "adapter_load_seconds": ("Time spent loading adapters.", s.adapter_load_seconds),
            "engine_steps": ("Engine steps.", s.num_steps),
            "engine_failed_steps": ("Engine steps that failed.", s.num_failed_steps),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(P + name, doc, value=value)


class ServerMetrics:
    """The server's registry: request timings plus the engine's snapshot."""

    def __init__(
        self, stats: Callable[[], EngineStats] | None, max_adapter_labels: int = 32
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        if stats is not None:
            self.watch_engine(stats)
        r = self.registry
        self.ttft = Histogram(
            P + "time_to_first_token_seconds",
            "Time to first token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            P + "inter_token_latency_seconds",
            "Time between tokens.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            P + "e2e_request_latency_seconds",
            "Arrival to last output.",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            P + "request_queue_time_seconds",
            "Arrival to the step that produced the first token.",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.success = Counter(
            P + "request_success",
            "Finished requests (choices) by reason.",
            ["finished_reason"],
            registry=r,
        )
        self.adapter_requests = Counter(
            P + "adapter_requests",
            "Finished requests (choices) by adapter.",
            ["adapter"],
            registry=r,
        )
        self.adapter_api_seconds = Histogram(
            P + "adapter_registration_seconds",
            "Validation and registration of an API load.",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            P + "request_rejected",
            "Requests refused before queuing, by HTTP status.",
            ["status"],
            registry=r,
        )
        self._max_adapter_labels = max_adapter_labels
        self._adapter_labels: set[str] = set()
        self._lock = threading.Lock()

    def watch_engine(self, stats: Callable[[], EngineStats]) -> None:
        """Export the engine's snapshot, read through ``stats`` at each scrape."""
        self.registry.register(_EngineCollector(stats))

    def first_token(self, ttft_s: float, queue_s: float) -> None:
        self.ttft.observe(ttft_s)
        self.queue_time.observe(max(queue_s, 0.0))

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def request_finished(self, reason: str, e2e_s: float, adapter: str | None = None) -> None:
        self.success.labels(reason).inc()
        self.e2e.observe(e2e_s)
        if adapter is not None:
            self.adapter_requests.labels(self._adapter_label(adapter)).inc()

    def _adapter_label(self, name: str) -> str:
        with self._lock:
            if name in self._adapter_labels:
                return name
            if len(self._adapter_labels) < self._max_adapter_labels:
                self._adapter_labels.add(name)
                return name
        return "other"

    def render(self) -> bytes:
        return generate_latest(self.registry)
