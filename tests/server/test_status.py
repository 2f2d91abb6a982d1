"""``GET /v1/status`` against the engine's own counts: the pool by tenant, every adapter's
tier, rank, pages and load, and what the API process measured per adapter."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from engine.plan import plan_for
from engine.prefix_cache import PAGES_PER_TOKEN
from server.auth import is_admin
from server.config import ServerConfig
from tests.server.conftest import BASE, Served, assert_error, demo_adapters, make_engine, serve

KEY = "status-key"
DEMO = ("upper", "swapcase", "caesar", "reverse", "lower")


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    config = ServerConfig(model_name=BASE, api_key=KEY, max_metric_adapters=3)
    served = serve(make_engine(demo_adapters(*DEMO)), config)
    yield served
    served.stop()


def status(served: Served) -> dict[str, Any]:
    with served.http(headers={"Authorization": f"Bearer {KEY}"}) as http:
        response = http.get("/v1/status")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_status_needs_the_key(served: Served) -> None:
    with served.http() as http:
        assert_error(http.get("/v1/status"), 401, "invalid_api_key")


def test_status_matches_the_engine(served: Served) -> None:
    engine = served.state.engine
    client = served.openai(KEY)
    completions: dict[str, int] = {}
    for model in ("upper", "upper", "lower", BASE):
        out = client.completions.create(model=model, prompt="hello=", max_tokens=8, temperature=0)
        assert out.usage is not None
        completions[model] = completions.get(model, 0) + out.usage.completion_tokens
    served.wait_idle()
    body = status(served)
    stats = engine.stats()
    pool = body["pool"]
    assert pool["num_pages"] == stats.num_pages == engine.pool.num_pages
    assert pool["free"] + pool["kv"] + pool["adapter"] + pool["cached"] == pool["num_pages"]
    assert pool["adapter"] == engine.adapters.residency.num_pages
    assert pool["page_bytes"] == engine.pool.page_bytes
    assert body["requests"]["generation_tokens"] == stats.generation_tokens
    assert body["adapter_counters"]["loaded"] == len(DEMO)
    rows = {row["name"]: row for row in body["adapters"]}
    # a row each for the three names with a metrics label (the first three the server saw,
    # in name order at start-up), the rest summed
    assert set(rows) == {"caesar", "lower", "reverse", "(others)"}
    others = rows.pop("(others)")
    assert others["count"] == len(DEMO) - 3
    assert others["generated_tokens"] == completions["upper"]
    assert others["tiers"] == {"pool": 1, "host": 1, "disk": 0}  # upper used, swapcase not
    for name, row in rows.items():
        entry = engine.adapters.get(name)
        assert (row["rank"], row["pages"], row["version"], row["kind"]) == (
            entry.max_rank, entry.pages, entry.version, entry.kind,
        )  # fmt: skip
        resident = entry.id in engine.adapters.residency
        assert row["tier"] == ("pool" if resident else "host")
    assert rows["lower"]["tier"] == "pool" and rows["caesar"]["tier"] == "host"
    assert rows["lower"]["kind"] == "prefix_tuning" and rows["lower"]["rank"] == 0
    assert rows["lower"]["generated_tokens"] == completions["lower"]
    assert rows["lower"]["requests_finished"] == 1
    assert rows["lower"]["ttft_mean_seconds"] > 0
    assert next(iter(rows)) == "lower"  # the busiest first: it served tokens
    assert body["base"]["generated_tokens"] == completions[BASE]
    assert all((r["running"], r["waiting"]) == (0, 0) for r in rows.values())


def test_status_counts_requests_in_flight(served: Served) -> None:
    """While a burst runs, the running and waiting counts of its adapter are the engine's
    (as of the last step), and drop to zero once it is done."""
    client = served.openai(KEY)

    def one() -> None:
        client.completions.create(
            model="caesar", prompt="abc=", max_tokens=60, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    seen = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(t.is_alive() for t in threads):
        row = next((r for r in status(served)["adapters"] if r["name"] == "caesar"), None)
        if row is not None:
            seen = max(seen, row["running"] + row["waiting"])
        time.sleep(0.02)
    for t in threads:
        t.join()
    assert 1 <= seen <= 6
    served.wait_idle()
    row = next(r for r in status(served)["adapters"] if r["name"] == "caesar")
    assert (row["running"], row["waiting"]) == (0, 0)
    assert row["generated_tokens"] == 6 * 60


def test_status_shows_the_plan_beside_the_pool(served: Served) -> None:
    """The plan is ``loraserve plan --json``'s for the engine's own config, and the token
    capacity is what the plan's arithmetic gives for the adapters resident now."""
    engine = served.state.engine
    body = status(served)
    assert body["plan"] == plan_for(engine.config).to_json()
    assert body["plan"]["pool"]["num_pages"] == body["pool"]["num_pages"]
    assert body["plan"]["pool"]["page_bytes"] == body["pool"]["page_bytes"]
    free_of_adapters = engine.pool.num_pages - engine.adapters.residency.num_pages
    assert body["pool"]["token_capacity"] == free_of_adapters // PAGES_PER_TOKEN
    assert body["access"] == {"admin": False}  # no admin routes on this server


@pytest.mark.parametrize(
    ("admin_key", "runtime", "token", "admin"),
    [
        ("adm", False, "adm", True),
        ("adm", False, KEY, False),  # the user key
        (None, True, KEY, True),  # runtime loading by flag: the user key manages adapters
        (None, False, KEY, False),  # no management routes at all
    ],
)
def test_status_says_whether_the_key_may_manage_adapters(
    admin_key: str | None, runtime: bool, token: str, admin: bool
) -> None:
    config = ServerConfig(
        model_name=BASE, api_key=KEY, admin_api_key=admin_key, allow_runtime_lora=runtime
    )
    headers = [(b"authorization", f"Bearer {token}".encode())]
    assert is_admin(config, headers) is admin
