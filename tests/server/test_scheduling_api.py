"""Scheduling through the API, on the demo model and its trained adapters: the ``priority``
field (validated; refused under a policy without priorities; ordering admission under
``--scheduling-policy priority``), ``user`` as the scheduler's client under
``--fairness-key user``, pinned adapters loaded over HTTP (and refused when the pins would
not leave room for a request), and the per-client metrics with their bounded labels."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.scheduling import MAX_CLIENT_LABELS, OTHER_CLIENTS
from server.config import ServerConfig
from server.errors import from_engine_value_error
from tests.server.conftest import (
    BASE,
    DEMO_ADAPTERS,
    Served,
    assert_error,
    assert_good,
    complete,
    demo_adapters,
    make_engine,
    serve,
)

PROMPT = {"model": BASE, "prompt": "ok=", "max_tokens": 4}
CHAT = {"model": BASE, "messages": [{"role": "user", "content": "ok"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def prio() -> Iterator[Served]:
    """The priority policy, users as clients, one request at a time (so admission order is
    completion order), runtime loading, and a pool of 600 pages: pins may take 600 - 2 · 128
    (one request at the full context) = 344 of them; "upper" takes 56, "swapcase" 304."""
    engine = make_engine(
        demo_adapters("upper", "swapcase"),
        scheduling_policy="priority",
        fairness_key="user",
        max_num_seqs=1,
        num_pages=600,
    )
    config = ServerConfig(model_name=BASE, allow_runtime_lora=True, adapter_roots=(DEMO_ADAPTERS,))
    served = serve(engine, config)
    yield served
    served.stop()


def metric(served: Served, name: str) -> dict[str, float]:
    """One family's samples from ``/metrics``: the value by its one label's value ("" for
    an unlabelled sample)."""
    text = httpx.get(served.url + "/metrics", timeout=10).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                values[next(iter(sample.labels.values()), "")] = sample.value
    return values


def wait_for(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


# -- priority ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1", 1.5, True, None, 2**31, -(2**31) - 1])
def test_priority_is_a_32_bit_integer(demo_server: Served, value: Any) -> None:
    with demo_server.http() as http:
        for route, body in (("/v1/completions", PROMPT), ("/v1/chat/completions", CHAT)):
            response = http.post(route, json={**body, "priority": value})
            assert_error(response, 400, "invalid_value", "priority")
    assert_good(demo_server)


def test_a_priority_needs_the_priority_policy(demo_server: Served) -> None:
    """Under the default fair policy a non-zero priority is refused before it is queued
    (the API process knows the policy); 0, the default, is what every request has."""
    with demo_server.http() as http:
        for route, body in (("/v1/completions", PROMPT), ("/v1/chat/completions", CHAT)):
            for priority in (3, -1):
                response = http.post(route, json={**body, "priority": priority})
                error = assert_error(response, 400, "invalid_value", "priority")
                assert "--scheduling-policy priority" in error["message"]
                assert "fair" in error["message"]
            assert http.post(route, json={**body, "priority": 0}).status_code == 200
    demo_server.wait_idle()
    # The engine refuses it too, and its refusal maps onto the same envelope.
    engine = demo_server.state.engine
    with pytest.raises(ValueError) as refused:
        engine.add_request("ok=", SamplingParams(max_tokens=2), priority=3)
    error = from_engine_value_error(refused.value, "prompt")
    assert (error.status, error.code, error.param) == (400, "invalid_value", "priority")
    assert not engine.has_unfinished()


def test_priorities_order_admission(prio: Served) -> None:
    """Three requests queued while the engine holds still, told apart by their lengths:
    with one running at a time, they finish in priority order (lower first)."""
    engine = prio.state.engine
    step = engine.step
    release = threading.Event()
    finished: list[int] = []

    def held_step() -> list[RequestOutput]:
        release.wait(30)
        outputs = step()
        finished.extend(o.num_output_tokens for o in outputs if o.finished)
        return outputs

    lengths = {5: 3, -1: 4, 2: 5}  # priority -> max_tokens
    client = prio.openai()
    engine.step = held_step  # type: ignore[method-assign]
    try:
        with ThreadPoolExecutor(len(lengths)) as pool:
            futures = [
                pool.submit(
                    client.completions.create,
                    model=BASE,
                    prompt="abc=",
                    max_tokens=max_tokens,
                    temperature=0,
                    extra_body={"priority": priority, "ignore_eos": True},
                )
                for priority, max_tokens in lengths.items()
            ]
            assert wait_for(lambda: engine.stats().num_waiting == len(lengths))
            release.set()
            usages = [f.result(30).usage for f in futures]
    finally:
        release.set()
        engine.step = step  # type: ignore[method-assign]
    assert [u.completion_tokens for u in usages if u is not None] == [3, 4, 5]
    assert finished == [4, 5, 3]  # priorities -1, 2, 5
    prio.wait_idle()


# -- user --------------------------------------------------------------------------------


def test_the_user_is_the_client_under_fairness_key_user(prio: Served) -> None:
    client = prio.openai()
    alice = client.completions.create(
        model="upper", prompt="hello=", max_tokens=8, temperature=0, user="alice"
    )
    assert alice.choices[0].text == "HELLO"
    assert complete(client, BASE, "plain") == "plain"  # no user: the anonymous client
    assert complete(client, "swapcase", "Plain", user="") == "pLAIN"  # "" is no user
    prompt = metric(prio, "loraserve:client_prompt_tokens_total")
    generated = metric(prio, "loraserve:client_generation_tokens_total")
    assert alice.usage is not None
    assert prompt["alice"] == alice.usage.prompt_tokens
    assert generated["alice"] == alice.usage.completion_tokens
    # Requests without a user share one anonymous client, shown as the served model's name.
    assert BASE in prompt and "swapcase" not in prompt
    assert "" not in prompt
    assert metric(prio, "loraserve:client_virtual_tokens") == {}  # a fair-policy counter


def test_a_user_is_no_client_under_fairness_key_adapter(demo_server: Served) -> None:
    """The default key: clients are adapters (the base model one too), users are ignored."""
    client = demo_server.openai()
    assert complete(client, "upper", "fair", user="mallory") == "FAIR"
    assert complete(client, BASE, "fair", user="mallory") == "fair"
    prompt = metric(demo_server, "loraserve:client_prompt_tokens_total")
    assert "mallory" not in prompt and {"upper", BASE} <= set(prompt)
    virtual = metric(demo_server, "loraserve:client_virtual_tokens")
    assert virtual["upper"] > 0 and virtual[BASE] > 0


def test_client_labels_stay_bounded(prio: Served) -> None:
    """Forty users: at most 32 clients are named, the rest summed under one label, and no
    token goes uncounted."""
    before = sum(metric(prio, "loraserve:client_prompt_tokens_total").values())
    client = prio.openai()

    def ask(i: int) -> int:
        out = client.completions.create(
            model=BASE, prompt="many=", max_tokens=1, temperature=0, user=f"user-{i}"
        )
        assert out.usage is not None
        return out.usage.prompt_tokens

    with ThreadPoolExecutor(4) as pool:
        prompt_tokens = sum(pool.map(ask, range(40)))
    prompt = metric(prio, "loraserve:client_prompt_tokens_total")
    assert len(prompt) <= MAX_CLIENT_LABELS + 1
    assert OTHER_CLIENTS in prompt
    assert sum(prompt.values()) - before == prompt_tokens
    assert set(metric(prio, "loraserve:client_generation_tokens_total")) == set(prompt)
    prio.wait_idle()


# -- pinned adapters ---------------------------------------------------------------------


def load(served: Served, name: str, adapter: str, **fields: Any) -> httpx.Response:
    body = {"lora_name": name, "lora_path": str(demo_adapters(adapter)[adapter]), **fields}
    return httpx.post(served.url + "/v1/load_lora_adapter", json=body, timeout=60)


def unload(served: Served, name: str) -> bool:
    body = {"lora_name": name}
    return httpx.post(served.url + "/v1/unload_lora_adapter", json=body).status_code == 200


def cards(served: Served) -> dict[str, dict[str, Any]]:
    return {m.id: m.to_dict() for m in served.openai().models.list().data}


def test_a_pinned_load_shows_on_its_card_and_in_the_metrics(prio: Served) -> None:
    reply = load(prio, "pinned-upper", "upper", pinned=True)
    assert reply.status_code == 200, reply.text
    assert reply.json()["pinned"] is True and reply.json()["version"] == 1
    models = cards(prio)
    assert models["pinned-upper"]["pinned"] is True
    assert models["upper"]["pinned"] is False and models["swapcase"]["pinned"] is False
    assert "pinned" not in models[BASE]
    assert complete(prio.openai(), "pinned-upper", "hello") == "HELLO"
    assert metric(prio, "loraserve:num_pinned_adapters") == {"": 1}
    pinned = metric(prio, "loraserve:lora_adapter_pinned")
    assert pinned["pinned-upper"] == 1 and pinned["upper"] == 0
    assert prio.state.engine.adapters.pinned_names() == ["pinned-upper"]
    assert unload(prio, "pinned-upper")
    assert metric(prio, "loraserve:num_pinned_adapters") == {"": 0}
    prio.wait_idle()


def test_a_pin_that_would_not_fit_is_refused(prio: Served) -> None:
    assert load(prio, "small-pin", "upper", pinned=True).status_code == 200  # 56 pages
    # 56 + 304 pinned pages would leave less than one full-length request's 256 of 600.
    error = assert_error(load(prio, "big-pin", "swapcase", pinned=True), 400, "pin_refused")
    assert error["param"] == "pinned" and "pages" in error["message"]
    assert "big-pin" not in cards(prio)
    assert load(prio, "big-unpinned", "swapcase").status_code == 200  # unpinned, it loads
    assert complete(prio.openai(), "big-unpinned", "Hi") == "hI"
    # With the small pin gone, the big one fits.
    assert unload(prio, "small-pin")
    reply = load(prio, "big-pin", "swapcase", pinned=True)
    assert reply.status_code == 200, reply.text
    assert cards(prio)["big-pin"]["pinned"] is True
    assert unload(prio, "big-pin") and unload(prio, "big-unpinned")
    assert_good(prio)
    prio.wait_idle()


def test_pinned_must_be_a_boolean(prio: Served) -> None:
    assert_error(load(prio, "x", "upper", pinned="yes"), 400, "invalid_value", "pinned")
    assert_error(load(prio, "x", "upper", pinned=1), 400, "invalid_value", "pinned")
    assert "x" not in cards(prio)
