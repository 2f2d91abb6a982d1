"""The families routers read (``lora_requests_info``, and vLLM's names under
``--metrics-compat vllm``) and the adapters' residency gauge, checked against the engine.

A live server runs one adapter per batch (``max_loras=1``) and two requests at once, so a
burst over several adapters leaves one running and the others waiting. Each check runs on
the engine thread right after a step that counted the requests by adapter (what a snapshot's
per-adapter figures are), so the scrape, the snapshot and the scheduler's own lists describe
the same moment, with no timing involved.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.outputs import AdapterStatus, EngineStats
from server.config import ServerConfig
from server.metrics import ServerMetrics
from server.serve import server_config
from server.serve_args import add_serve_args
from tests.server.conftest import BASE, Served, demo_adapters, make_engine, serve
from tests.server.test_metrics import by_label, scrape, snapshot

T = TypeVar("T")
Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]
ROUTER_LABELS = ("max_lora", "running_lora_adapters", "waiting_lora_adapters")


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def lora_info(samples: Samples, name: str) -> tuple[dict[str, str], float]:
    """The one series of a ``lora_requests_info`` family: its labels and value."""
    [(labels, value)] = samples[name].items()
    return dict(labels), value


def adapter(name: str, tier: str = "host", **fields: Any) -> AdapterStatus:
    return AdapterStatus(name=name, kind="lora", version=1, tier=tier, rank=8, pages=4, **fields)


def test_lora_requests_info_lists_running_and_waiting_adapters_by_name() -> None:
    stats = snapshot(
        num_pages=10,
        max_loras=4,
        adapters=[
            adapter("zeta", "pool", pinned=False, running=2, waiting=1),
            adapter("alpha", "pool", pinned=False, running=1),
            adapter("mid", "host", pinned=False, waiting=3),
            adapter("idle", "disk", pinned=False),
            adapter("_c.s1", "pool", pinned=False, running=1),  # a composition's temporary
        ],
    )
    before = time.time()
    got = scrape(ServerMetrics(lambda: stats))
    after = time.time()
    labels, value = lora_info(got, "loraserve:lora_requests_info")
    # Sorted names, every adapter named (no label cap: routers match them), no temporaries.
    assert labels == {
        "max_lora": "4",
        "running_lora_adapters": "alpha,zeta",
        "waiting_lora_adapters": "mid,zeta",
    }
    assert before <= value <= after  # the snapshot's Unix time: routers keep the latest
    assert not any(name.startswith("vllm:") for name in got)  # --metrics-compat none
    idle = scrape(ServerMetrics(lambda: snapshot(num_pages=1, max_loras=1)))
    labels, _ = lora_info(idle, "loraserve:lora_requests_info")
    assert labels == {"max_lora": "1", "running_lora_adapters": "", "waiting_lora_adapters": ""}


def test_vllm_names_repeat_the_router_families_with_vllms_labels() -> None:
    stats = snapshot(num_pages=40, kv_pages=10, num_running=3, num_waiting=5, max_loras=2)
    stats.adapters.append(adapter("upper", "pool", pinned=False, running=3, waiting=5))
    got = scrape(ServerMetrics(lambda: stats, base_name="demo", compat="vllm"))
    engine_labels = (("engine", "0"), ("model_name", "demo"))
    for ours, vllms, value in (
        ("num_requests_running", "num_requests_running", 3),
        ("num_requests_waiting", "num_requests_waiting", 5),
        ("kv_cache_usage_perc", "kv_cache_usage_perc", 0.25),
        ("kv_cache_usage_perc", "gpu_cache_usage_perc", 0.25),  # vLLM's older name
    ):
        assert got["loraserve:" + ours] == {(): value}
        assert got["vllm:" + vllms] == {engine_labels: value}
    ours_info, _ = lora_info(got, "loraserve:lora_requests_info")
    vllm_info, _ = lora_info(got, "vllm:lora_requests_info")
    assert (
        ours_info
        == vllm_info
        == {
            "max_lora": "2",
            "running_lora_adapters": "upper",
            "waiting_lora_adapters": "upper",
        }
    )
    with pytest.raises(ValueError, match="metrics compat"):
        ServerMetrics(lambda: stats, compat="sglang")


def test_residency_gauge_names_the_first_adapters_and_counts_the_rest() -> None:
    stats = snapshot(
        num_pages=1,
        adapters=[
            adapter("a0", "pool", pinned=True),
            adapter("a1", "host", pinned=False),
            adapter("a2", "pool", pinned=False),
            adapter("a3", "disk", pinned=False),
            adapter("a4", "pool", pinned=True),
            adapter("_c.s1", "pool", pinned=False),
        ],
    )
    got = scrape(ServerMetrics(lambda: stats, max_adapter_labels=2))
    assert got["loraserve:lora_adapter_info"] == {
        (("adapter", "a0"), ("pinned", "true"), ("tier", "pool")): 1,
        (("adapter", "a1"), ("pinned", "false"), ("tier", "host")): 1,
        (("adapter", "other"), ("pinned", "false"), ("tier", "pool")): 2,  # a2, _c.s1
        (("adapter", "other"), ("pinned", "false"), ("tier", "disk")): 1,
        (("adapter", "other"), ("pinned", "true"), ("tier", "pool")): 1,
    }


def test_the_flag_reaches_the_server_config() -> None:
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    assert server_config(parser.parse_args([])).metrics_compat == "none"
    assert server_config(parser.parse_args(["--metrics-compat", "vllm"])).metrics_compat == "vllm"
    with pytest.raises(ValueError, match="metrics_compat"):
        ServerConfig(model_name=BASE, metrics_compat="sglang")


BURST = ("upper", "upper", "swapcase", "caesar", None)  # None: the base model
PINNED = "reverse"


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    adapters = demo_adapters("upper", "swapcase", "caesar")
    engine = make_engine(adapters, max_num_seqs=2, max_loras=1, num_pages=4096)
    engine.load_lora(PINNED, demo_adapters(PINNED)[PINNED], pinned=True)
    config = ServerConfig(model_name=BASE, max_metric_adapters=2, metrics_compat="vllm")
    served = serve(engine, config)
    yield served
    served.stop()


def after_a_counted_step(served: Served, check: Callable[[], T]) -> T:
    """``check()`` on the engine thread, right after a step that counted requests by adapter.

    A snapshot's per-adapter running and waiting figures are the count of the last step run
    after a snapshot asked for one. Asking on the engine thread, then running ``check`` in
    the calls the engine thread runs after its next step, makes them exact; a call that
    comes before that step (both in one round of calls) tries again.
    """
    engine = served.state.engine
    for _ in range(100):
        asked = served.on_engine(lambda: (engine.stats(), engine.num_steps)[1])
        counted, result = served.on_engine(
            lambda n=asked: (True, check()) if engine.num_steps == n + 1 else (False, None)
        )
        if counted:
            return result  # type: ignore[return-value]
    raise AssertionError("no step ran between two engine calls")


def test_router_families_match_the_engine_while_adapters_run_and_wait(served: Served) -> None:
    engine = served.state.engine
    client = served.openai()

    def one(model: str | None) -> None:
        client.completions.create(
            model=model or BASE, prompt="abc=", max_tokens=32, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip

    # Hold the engine while the burst arrives, so that none of it finishes before the check.
    gate = threading.Event()
    held = served.state.bridge.submit_call(lambda: gate.wait(20))
    threads = [threading.Thread(target=one, args=(model,)) for model in BURST]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while engine.stats().num_waiting < len(BURST):
        assert time.monotonic() < deadline, "the burst did not reach the engine"
        time.sleep(0.01)
    gate.set()
    assert held.result(5)

    def check() -> tuple[Samples, EngineStats, set[str], set[str], int, int]:
        stats = engine.stats()
        with served.http() as http:
            text = http.get("/metrics").text
        sched = engine.scheduler
        waiting = sched.waiting.peek(len(sched.waiting))
        running_names = {r.adapter.name for r in sched.running if r.adapter is not None}
        waiting_names = {r.adapter.name for r in waiting if r.adapter is not None}
        return parse(text), stats, running_names, waiting_names, len(sched.running), len(waiting)

    got, stats, running, waiting, num_running, num_waiting = after_a_counted_step(served, check)
    assert len(running) == 1 and waiting  # one adapter per batch; the others wait
    expected = {
        "max_lora": "1",
        "running_lora_adapters": ",".join(sorted(running)),
        "waiting_lora_adapters": ",".join(sorted(waiting)),
    }
    for name in ("loraserve:lora_requests_info", "vllm:lora_requests_info"):
        assert lora_info(got, name)[0] == expected
    assert (num_running, num_waiting) == (2, len(BURST) - 2)
    vllm_labels = (("engine", "0"), ("model_name", BASE))
    assert got["loraserve:num_requests_running"] == {(): num_running}
    assert got["vllm:num_requests_running"] == {vllm_labels: num_running}
    assert got["loraserve:num_requests_waiting"] == {(): num_waiting}
    assert got["vllm:num_requests_waiting"] == {vllm_labels: num_waiting}
    usage = stats.kv_pages / stats.num_pages
    assert 0 < usage == got["loraserve:kv_cache_usage_perc"][()]
    assert (
        got["vllm:kv_cache_usage_perc"] == got["vllm:gpu_cache_usage_perc"] == {vllm_labels: usage}
    )

    # Residency: the engine's tier and pin of each adapter; two names labelled, the rest
    # counted under "other".
    labels = {a.name: a.name if served.state.metrics.own_label(a.name) else "other"
              for a in stats.adapters}  # fmt: skip
    assert list(labels.values()).count("other") == len(stats.adapters) - 2
    expected_residency = Counter(
        (labels[a.name], a.tier, str(a.pinned).lower()) for a in stats.adapters
    )
    residency = {
        (d["adapter"], d["tier"], d["pinned"]): value
        for d, value in ((dict(k), v) for k, v in got["loraserve:lora_adapter_info"].items())
    }
    assert residency == expected_residency
    tiers = {a.name: (a.tier, a.pinned) for a in stats.adapters}
    assert tiers[PINNED] == ("pool", True)
    assert tiers[next(iter(running))] == ("pool", False)  # a running adapter is resident

    for t in threads:
        t.join(60)
    served.wait_idle()
    with served.http() as http:
        idle = parse(http.get("/metrics").text)
    for name in ("loraserve:lora_requests_info", "vllm:lora_requests_info"):
        assert lora_info(idle, name)[0] == {
            "max_lora": "1", "running_lora_adapters": "", "waiting_lora_adapters": "",
        }  # fmt: skip
    assert by_label(idle["loraserve:pool_pages"], "tenant")["kv"] == 0
