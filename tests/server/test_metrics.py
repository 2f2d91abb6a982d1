"""The engine's snapshot as Prometheus families: the prefix cache's counters and pages, the
pool's tenants, adapter versions, and adapter labels kept to the configured cap.

The snapshots are built here (the engine fills these fields on its own branch), read through
``ServerMetrics`` as a scrape reads them and parsed back with prometheus_client's parser.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from engine.outputs import EngineStats
from server.metrics import ServerMetrics

_REQUIRED = {
    f.name: 0
    for f in dataclasses.fields(EngineStats)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
}


def snapshot(**fields: Any) -> EngineStats:
    return EngineStats(**_REQUIRED | fields)


def scrape(metrics: ServerMetrics) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name → (sorted labels → value), of one render."""
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def by_label(samples: dict[tuple[tuple[str, str], ...], float], key: str) -> dict[str, float]:
    return {dict(labels)[key]: value for labels, value in samples.items()}


def test_prefix_cache_counters_and_the_pools_cached_tenant() -> None:
    stats = snapshot(
        num_pages=100,
        kv_pages=30,
        adapter_pages=20,
        cached_pages=15,
        free_pages=35,
        prefix_cache_queries=640,
        prefix_cache_hits=256,
    )
    got = scrape(ServerMetrics(lambda: stats))
    assert got["loraserve:prefix_cache_queries_total"] == {(): 640}
    assert got["loraserve:prefix_cache_hits_total"] == {(): 256}
    pages = by_label(got["loraserve:pool_pages"], "tenant")
    assert pages == {"kv": 30, "adapter": 20, "cached": 15, "free": 35}
    assert sum(pages.values()) == got["loraserve:num_pool_pages"][()]
    # Nothing cached, no adapters: the families exist, without samples.
    empty = ServerMetrics(lambda: snapshot(num_pages=1)).render().decode()
    assert "# TYPE loraserve:prefix_cache_pages gauge" in empty
    assert "# TYPE loraserve:lora_adapter_version gauge" in empty
    assert "loraserve:prefix_cache_pages{" not in empty


def test_cached_pages_and_versions_by_adapter_stay_within_the_label_cap() -> None:
    names = [f"a{i}" for i in range(6)]
    stats = snapshot(
        num_pages=1000,
        cached_pages_by_adapter={"": 7} | {n: i + 1 for i, n in enumerate(names)} | {"_c.s1": 50},
        adapter_versions={n: i + 1 for i, n in enumerate(names)} | {"_c.s1": 1},
    )
    metrics = ServerMetrics(lambda: stats, max_adapter_labels=3)
    got = scrape(metrics)
    pages = by_label(got["loraserve:prefix_cache_pages"], "adapter")
    # Names get labels in sorted order; the rest (and the temporary "_" one) sum to "other".
    assert pages == {"base": 7, "a0": 1, "a1": 2, "a2": 3, "other": 4 + 5 + 6 + 50}
    versions = by_label(got["loraserve:lora_adapter_version"], "adapter")
    assert versions == {"a0": 1, "a1": 2, "a2": 3}  # no meaningless "other" version
    # The labels stick, and every adapter-labelled family shares them.
    metrics.request_finished("stop", 0.1, "a5")
    metrics.request_finished("stop", 0.1, "a1")
    requests = by_label(scrape(metrics)["loraserve:adapter_requests_total"], "adapter")
    assert requests == {"other": 1, "a1": 1}


def test_a_replaced_adapter_reports_its_new_version() -> None:
    versions = {"tuned": 1}
    metrics = ServerMetrics(lambda: snapshot(num_pages=1, adapter_versions=dict(versions)))
    assert by_label(scrape(metrics)["loraserve:lora_adapter_version"], "adapter") == {"tuned": 1}
    versions["tuned"] = 2
    assert by_label(scrape(metrics)["loraserve:lora_adapter_version"], "adapter") == {"tuned": 2}


def test_client_families_name_the_base_model_and_keep_the_engines_labels() -> None:
    """Per-client tokens and virtual counters as the engine labels them (at most 32 named,
    the rest under "(other)"); "" (the base model) shows as the served model's name, and a
    client of that same name shares its label (counters summed, the gauge its largest)."""
    stats = snapshot(
        num_pages=1,
        client_prompt_tokens={"": 10, "upper": 5, "(other)": 7, "demo": 1},
        client_output_tokens={"": 4, "upper": 2, "(other)": 3, "demo": 1},
        client_virtual_tokens={"": 18.0, "upper": 9.5, "(other)": 13.0, "demo": 3.0},
    )
    got = scrape(ServerMetrics(lambda: stats, base_name="demo"))
    prompt = by_label(got["loraserve:client_prompt_tokens_total"], "client")
    assert prompt == {"demo": 11, "upper": 5, "(other)": 7}
    generated = by_label(got["loraserve:client_generation_tokens_total"], "client")
    assert generated == {"demo": 5, "upper": 2, "(other)": 3}
    virtual = by_label(got["loraserve:client_virtual_tokens"], "client")
    assert virtual == {"demo": 18.0, "upper": 9.5, "(other)": 13.0}
    # No traffic yet: the families exist, without samples.
    empty = ServerMetrics(lambda: snapshot(num_pages=1)).render().decode()
    for family in ("client_prompt_tokens", "client_generation_tokens"):
        assert f"# TYPE loraserve:{family}_total counter" in empty
    assert "# TYPE loraserve:client_virtual_tokens gauge" in empty
    assert "{client=" not in empty


def test_pinned_adapters_count_and_flag_within_the_label_cap() -> None:
    stats = snapshot(
        num_pages=1,
        adapter_versions={"a0": 1, "a1": 1, "a2": 2, "a3": 1},
        pinned_adapters=["a1", "a3"],
    )
    got = scrape(ServerMetrics(lambda: stats, max_adapter_labels=3))
    assert got["loraserve:num_pinned_adapters"] == {(): 2}  # every pin, labelled or not
    pinned = by_label(got["loraserve:lora_adapter_pinned"], "adapter")
    assert pinned == {"a0": 0, "a1": 1, "a2": 0}  # a3 has no label of its own
