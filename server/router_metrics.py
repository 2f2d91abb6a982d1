"""The metric families request routers read, under loraserve's names and, on request, vLLM's.

Routers in front of several replicas (the Kubernetes Gateway API inference extension's
endpoint picker, llm-d's router) scrape each model server for its waiting queue, its KV-cache
usage and which adapters it is serving; they read vLLM's names by default. These families
come from the same snapshot as the rest of a scrape (``server.metrics``), so a router never
sees a queue length and an adapter list from two different moments.

``lora_requests_info`` follows vLLM's gauge exactly: its labels carry the state (the adapters
of running requests and of waiting ones, each a comma-separated list of names, and
``max_lora``), its value is the Unix time of the snapshot, and a router keeps the series with
the largest value. vLLM leaves every past label combination behind with its old time; a
scrape here holds only the current one. Adapter names are listed in full (a router matches
them against the ``model`` of requests), sorted, so that the same state is the same series;
temporary adapters (``_`` names, one per composition step) are left out, as no request
names them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from engine.outputs import EngineStats


def lora_requests_info(name: str, s: EngineStats, now: float) -> GaugeMetricFamily:
    """vLLM's ``lora_requests_info`` under ``name``: one series, valued ``now``, labelled
    by the adapters of running and waiting requests and the batch's adapter limit."""
    named = [a for a in s.adapters if not a.name.startswith("_")]
    running = ",".join(sorted(a.name for a in named if a.running))
    waiting = ",".join(sorted(a.name for a in named if a.waiting))
    family = GaugeMetricFamily(
        name,
        "Adapters of running and waiting requests (comma-separated), and the most adapters "
        "one batch may hold; the value is the snapshot's Unix time (the latest series holds).",
        labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
    )
    family.add_metric([str(s.max_loras), running, waiting], now)
    return family


def vllm_families(s: EngineStats, model_name: str, now: float) -> Iterator[Metric]:
    """What routers read from vLLM, under vLLM's names and labels (``model_name``, and
    ``engine`` "0": one engine per server). ``gpu_cache_usage_perc`` is vLLM's older name
    for the KV-cache usage, which the inference extension's picker read up to its v1.2."""
    labels = ["model_name", "engine"]
    gauges = {
        "vllm:num_requests_running": ("Requests running in the engine.", s.num_running),
        "vllm:num_requests_waiting": ("Requests waiting to be scheduled.", s.num_waiting),
        "vllm:kv_cache_usage_perc": ("KV-cache usage; 1 means all pages.", s.kv_cache_usage),
        "vllm:gpu_cache_usage_perc": (
            "KV-cache usage; 1 means all pages (vLLM's older name).",
            s.kv_cache_usage,
        ),
    }
    for name, (doc, value) in gauges.items():
        family = GaugeMetricFamily(name, doc, labels=labels)
        family.add_metric([model_name, "0"], value)
        yield family
    yield lora_requests_info("vllm:lora_requests_info", s, now)
