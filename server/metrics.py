"""Prometheus metrics, named like vLLM's with a ``loraserve:`` prefix.

Two sources: request timings, observed by the bridge as outputs arrive (histograms and
counters held here), and the engine's own counters and gauges, read from
``LLMEngine.stats()`` at scrape time (a custom collector, so a scrape costs one snapshot and
never waits for the engine thread). The families routers read (``lora_requests_info``, and
vLLM's names under ``--metrics-compat vllm``) come from that same snapshot
(:mod:`server.router_metrics`). Each server has its own registry, so several can live in
one process (tests). Labels stay bounded: ``finished_reason`` has three values, and only the
first ``max_adapter_labels`` adapter names get a label of their own; later ones (and the
temporary ``_`` adapters of compositions, one per step) share ``other``. The same names keep
their labels in every family that has an ``adapter`` label. The ``client`` label (the
scheduler's clients: adapters, or users under ``--fairness-key user``) is bounded by the
engine, which names at most 32 clients and sums the rest under ``(other)``. One family
names every adapter: ``lora_requests_info``, whose lists routers match against requests (one
series per scrape).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

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
from server.config import METRICS_COMPAT
from server.router_metrics import lora_requests_info, vllm_families

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
    """The engine's snapshot as Prometheus families, built at each scrape.

    Args:
        stats: reads the snapshot.
        own_label: whether an adapter name gets a label of its own (else it is ``other``).
        base_name: the served model's name (the base model's label).
        compat: "vllm" adds the families routers read under vLLM's names; "none" does not.
    """

    def __init__(
        self,
        stats: Callable[[], EngineStats],
        own_label: Callable[[str], bool],
        base_name: str = "base",
        compat: str = "none",
    ) -> None:
        self._stats = stats
        self._own_label = own_label
        self._base_name = base_name
        self._compat = compat

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        now = time.time()
        gauges = {
            "num_requests_running": ("Requests running in the engine.", s.num_running),
            "num_requests_waiting": ("Requests waiting to be scheduled.", s.num_waiting),
            "kv_cache_usage_perc": ("Fraction of pool pages holding KV cache.", s.kv_cache_usage),
            "num_pool_pages": ("Pages in the unified pool.", s.num_pages),
            "num_resident_adapters": ("Adapters resident in the pool.", s.resident_adapters),
            "num_loaded_adapters": ("Adapters registered (servable).", s.loaded_adapters),
            "num_pinned_adapters": (
                "Adapters pinned: kept in the pool until unloaded.",
                len(s.pinned_adapters),
            ),
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
        pages.add_metric(["cached"], s.cached_pages)  # kv + adapter + cached + free = all
        pages.add_metric(["free"], s.free_pages)
        yield pages
        yield lora_requests_info(P + "lora_requests_info", s, now)
        if self._compat == "vllm":
            yield from vllm_families(s, self._base_name, now)
        yield from self._adapter_families(s)
        yield from self._client_families(s)
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
            "prefix_cache_queries": (
                "Prompt tokens looked up in the prefix cache.",
                s.prefix_cache_queries,
            ),
            "prefix_cache_hits": (
                "Prompt tokens found in the prefix cache (their keys and values reused).",
                s.prefix_cache_hits,
            ),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(P + name, doc, value=value)

    def _adapter_families(self, s: EngineStats) -> Iterator[Metric]:
        """Gauges labelled by adapter: cached prefix pages, versions, pins and residency."""
        pages: dict[str, int] = {}
        for name, num_pages in sorted(s.cached_pages_by_adapter.items()):
            label = "base" if name == "" else self._label(name)
            # Summed: "other" holds the rest (and an adapter named "base" would share the
            # base model's label), so no label ever has two samples.
            pages[label] = pages.get(label, 0) + num_pages
        family = GaugeMetricFamily(
            P + "prefix_cache_pages",
            "Pages the prefix cache holds, by the adapter that computed them (base: none).",
            labels=["adapter"],
        )
        for label, num_pages in pages.items():
            family.add_metric([label], num_pages)
        yield family
        # A version is one adapter's: names without a label of their own are left out (a
        # sum or maximum of versions under "other" would mean nothing).
        family = GaugeMetricFamily(
            P + "lora_adapter_version",
            "The version each adapter serves (its name's load count, replacements included).",
            labels=["adapter"],
        )
        for name, version in sorted(s.adapter_versions.items()):
            if self._own_label(name):
                family.add_metric([name], version)
        yield family
        family = GaugeMetricFamily(
            P + "lora_adapter_pinned",
            "1 for an adapter kept in the pool until unloaded (pinned), else 0.",
            labels=["adapter"],
        )
        pinned = set(s.pinned_adapters)
        for name in sorted(s.adapter_versions):
            if self._own_label(name):
                family.add_metric([name], float(name in pinned))
        yield family
        yield self._residency(s)

    def _residency(self, s: EngineStats) -> Metric:
        """Where each adapter's weights are: 1 per labelled adapter, under its tier and pin;
        the adapters without a label of their own counted under ``other`` by tier and pin."""
        counts: dict[tuple[str, str, str], int] = {}
        for adapter in sorted(s.adapters, key=lambda a: a.name):
            key = (self._label(adapter.name), adapter.tier, str(adapter.pinned).lower())
            counts[key] = counts.get(key, 0) + 1
        family = GaugeMetricFamily(
            P + "lora_adapter_info",
            "Registered adapters by tier (pool: resident; host: in host memory; disk: read "
            "again when needed) and pin: 1 per named adapter, a count under other.",
            labels=["adapter", "tier", "pinned"],
        )
        for labels, count in counts.items():
            family.add_metric(list(labels), count)
        return family

    def _client_families(self, s: EngineStats) -> Iterator[Metric]:
        """Per client of the scheduler (adapter, or user under ``--fairness-key user``):
        tokens served and the fair policy's virtual token counter. The engine names at most
        ``MAX_CLIENT_LABELS`` clients and sums the rest under one label; "" (the base model,
        without a user) is shown as the served model's name."""
        counters = (
            ("client_prompt_tokens", "Prompt tokens admitted, by client.", s.client_prompt_tokens),
            ("client_generation_tokens", "Tokens generated, by client.", s.client_output_tokens),
        )
        for name, doc, values in counters:
            counter = CounterMetricFamily(P + name, doc, labels=["client"])
            for client, value in self._by_client(values, sum).items():
                counter.add_metric([client], value)
            yield counter
        gauge = GaugeMetricFamily(
            P + "client_virtual_tokens",
            "The fair policy's virtual token counter (weighted service received), by client.",
            labels=["client"],
        )
        for client, value in self._by_client(s.client_virtual_tokens, max).items():
            gauge.add_metric([client], value)
        yield gauge

    def _by_client(
        self, values: Mapping[str, float], merge: Callable[[list[float]], float]
    ) -> dict[str, float]:
        """``values`` under their labels; a client named like the base model shares its
        label (``merge`` combines them), so no label has two samples."""
        grouped: dict[str, list[float]] = {}
        for client, value in sorted(values.items()):
            grouped.setdefault(client or self._base_name, []).append(value)
        return {label: merge(group) for label, group in grouped.items()}

    def _label(self, name: str) -> str:
        return name if self._own_label(name) else "other"


@dataclass
class AdapterTiming:
    """What the API process saw of one adapter's requests (the status route's per-adapter
    figures): finished requests, the sum of their times to first token, and tokens."""

    requests: int = 0
    first_tokens: int = 0
    ttft_seconds: float = 0.0
    tokens: int = 0


class ServerMetrics:
    """The server's registry: request timings plus the engine's snapshot (with ``compat``
    "vllm", also the families routers read, under vLLM's names)."""

    def __init__(
        self,
        stats: Callable[[], EngineStats] | None,
        max_adapter_labels: int = 32,
        base_name: str = "base",
        compat: str = "none",
    ) -> None:
        if compat not in METRICS_COMPAT:
            raise ValueError(f"metrics compat must be one of {', '.join(METRICS_COMPAT)}")
        self.registry = CollectorRegistry(auto_describe=True)
        self._max_adapter_labels = max_adapter_labels
        self._base_name = base_name
        self._compat = compat
        self._adapter_labels: set[str] = set()
        self._lock = threading.Lock()
        self._timings: dict[str, AdapterTiming] = {}  # by label; for the status route
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

    def watch_engine(self, stats: Callable[[], EngineStats]) -> None:
        """Export the engine's snapshot, read through ``stats`` at each scrape."""
        collector = _EngineCollector(stats, self.own_label, self._base_name, self._compat)
        self.registry.register(collector)

    def first_token(self, ttft_s: float, queue_s: float, adapter: str | None = None) -> None:
        self.ttft.observe(ttft_s)
        self.queue_time.observe(max(queue_s, 0.0))
        timing = self._timing(adapter)
        with self._lock:
            timing.ttft_seconds += ttft_s
            timing.first_tokens += 1

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def tokens(self, count: int, adapter: str | None = None) -> None:
        """``count`` tokens generated for a request on ``adapter`` (None: the base)."""
        timing = self._timing(adapter)
        with self._lock:
            timing.tokens += count

    def request_finished(self, reason: str, e2e_s: float, adapter: str | None = None) -> None:
        self.success.labels(reason).inc()
        self.e2e.observe(e2e_s)
        if adapter is not None:
            self.adapter_requests.labels(self._adapter_label(adapter)).inc()
        timing = self._timing(adapter)
        with self._lock:
            timing.requests += 1

    def adapter_timings(self) -> dict[str, AdapterTiming]:
        """A copy of the per-adapter timings: adapters with a label of their own, the base
        model under its name, the rest summed under ``other``."""
        with self._lock:
            return {name: dataclasses.replace(t) for name, t in self._timings.items()}

    def _timing(self, adapter: str | None) -> AdapterTiming:
        label = self._base_name if adapter is None else self._adapter_label(adapter)
        with self._lock:
            return self._timings.setdefault(label, AdapterTiming())

    def _adapter_label(self, name: str) -> str:
        return name if self.own_label(name) else "other"

    def own_label(self, name: str) -> bool:
        """Whether ``name`` has (or, while labels remain, now gets) a label of its own."""
        if name.startswith("_"):
            return False  # temporary: clients never name it, and there is one per step
        with self._lock:
            if name in self._adapter_labels:
                return True
            if len(self._adapter_labels) < self._max_adapter_labels:
                self._adapter_labels.add(name)
                return True
        return False

    def render(self) -> bytes:
        return generate_latest(self.registry)
