"""Merging, composing and exporting adapters over HTTP while the server serves, and
the refusals around them: each refusal is a 4xx naming the rule, then a good
request still succeeds."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from engine.config import DEMO_DIR
from server.config import ServerConfig
from tests.server.conftest import (
    BASE,
    Served,
    assert_error,
    assert_good,
    complete,
    demo_adapters,
    make_engine,
    serve,
)

ADMIN = {"Authorization": "Bearer admin"}
USER = {"Authorization": "Bearer user"}
UPPER_EXAMPLES = [
    {"prompt": f"{w}=", "completion": w.upper()} for w in ("eLq2", "zVun0", "bZYU", "rhIMc", "xq9")
]


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tmp_path_factory.mktemp("adapter-root"), tmp_path_factory.mktemp("export-root")


@pytest.fixture(scope="module")
def served(roots: tuple[Path, Path]) -> Iterator[Served]:
    adapter_root, export_root = roots
    config = ServerConfig(
        model_name=BASE,
        api_key="user",
        admin_api_key="admin",
        adapter_roots=(adapter_root,),
        export_root=export_root,
        max_compose_steps=60,
    )
    engine = make_engine(demo_adapters("upper", "swapcase", "caesar", "reverse"))
    server = serve(engine, config)
    yield server
    server.stop()


def post(
    served: Served, path: str, body: dict[str, Any], headers: dict[str, str] = ADMIN
) -> httpx.Response:
    with served.http(headers=headers) as client:
        return client.post(path, json=body)


def wait_for(served: Served, job: str, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    with served.http(headers=ADMIN) as client:
        while time.monotonic() < deadline:
            state = client.get(f"/v1/adapters/compose/{job}").json()
            if state["status"] in ("succeeded", "failed"):
                return dict(state)
            time.sleep(0.05)
    raise AssertionError(f"composition {job} did not finish")


def test_merged_adapters_serve_at_once_and_save(served: Served, roots: tuple[Path, Path]) -> None:
    r = post(
        served,
        "/v1/adapters/merge",
        {
            "name": "upper-cat",
            "adapters": ["upper", "swapcase"],
            "weights": [1.0, 0.0],
            "combination_type": "cat",
            "save": True,
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["rank"] == 12 and r.json()["saved"]
    client = served.openai("user")
    assert complete(client, "upper-cat", "hello") == "HELLO"  # weight 0 drops swapcase
    saved = roots[0] / "upper-cat"
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(DEMO_DIR / "model"), saved
    )
    assert peft.peft_config["default"].r == 12
    # A mixture: the components run side by side, never materialised.
    r = post(
        served,
        "/v1/adapters/merge",
        {
            "name": "mix",
            "adapters": ["upper", "reverse"],
            "weights": [1.0, 1.0],
            "combination_type": "mixture",
        },
    )
    assert r.status_code == 200, r.text
    assert complete(client, "mix", "abc") != complete(client, "upper", "abc")
    models = {m.id for m in client.models.list().data}
    assert {"upper-cat", "mix"} <= models
    served.wait_idle()


@pytest.mark.parametrize(
    ("body", "status", "code", "words"),
    [
        ({"combination_type": "average"}, 400, "invalid_merge", "unknown combination_type"),
        ({"combination_type": "linear"}, 400, "invalid_merge", "same r value"),
        ({"weights": [1.0]}, 400, "invalid_merge", "one weight per adapter"),
        ({"combination_type": "ties", "density": 1.5}, 400, "invalid_merge", "density"),
        ({"combination_type": "ties"}, 400, "invalid_merge", "density"),
        ({"adapters": ["upper", "nope"]}, 404, "model_not_found", "nope"),
        ({"name": "upper"}, 409, "adapter_already_loaded", "upper"),
        ({"name": BASE}, 409, "adapter_already_loaded", "base model"),
        ({"name": "has space"}, 400, "invalid_value", None),
    ],
)
def test_merge_refusals_name_the_rule(
    served: Served, body: dict[str, Any], status: int, code: str, words: str | None
) -> None:
    request = {
        "name": "bad",
        "adapters": ["upper", "swapcase"],
        "weights": [0.5, 0.5],
        "combination_type": "cat",
    } | body
    error = assert_error(post(served, "/v1/adapters/merge", request), status, code)
    if words is not None:
        assert words in error["message"], error
    assert_good(served, "user")


def test_a_taken_name_is_refused_before_any_work(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name is checked before the adapters' weights are read or merged."""
    reads: list[str] = []
    manager = served.state.engine.adapters
    weights_of = manager.weights_of
    monkeypatch.setattr(manager, "weights_of", lambda e: reads.append(e.name) or weights_of(e))
    request = {"name": "upper", "adapters": ["upper", "swapcase"], "weights": [0.5, 0.5]}
    assert_error(post(served, "/v1/adapters/merge", request), 409, "adapter_already_loaded", "name")
    assert reads == []
    assert_good(served, "user")


def test_user_key_gets_403_on_every_new_route(served: Served) -> None:
    for path, body in (
        ("/v1/adapters/merge", {"name": "x", "adapters": ["upper"], "weights": [1.0]}),
        ("/v1/adapters/compose", {"name": "x", "examples": UPPER_EXAMPLES}),
        ("/v1/adapters/upper/export", {}),
    ):
        assert_error(post(served, path, body, headers=USER), 403, "permission_denied")
    with served.http(headers=USER) as client:
        assert_error(client.get("/v1/adapters/compose/anything"), 403, "permission_denied")
        assert_error(client.get("/v1/adapters/compose"), 403, "permission_denied")
    assert_good(served, "user")


def test_composition_runs_off_the_request_path(served: Served, roots: tuple[Path, Path]) -> None:
    engine = served.state.engine
    steps_before = engine.num_steps
    r = post(
        served,
        "/v1/adapters/compose",
        {
            "name": "composed-upper",
            "examples": UPPER_EXAMPLES,
            "max_steps": 24,
            "candidates": ["upper", "swapcase", "caesar", "reverse"],
            "method": "mixture",
            "save": True,
        },
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] in ("queued", "running") and job["id"].startswith("compose-")
    # Other requests keep completing while the job runs.
    answers: list[str] = []

    def traffic() -> None:
        client = served.openai("user")
        for word in ("one", "two", "three", "four", "five", "six"):
            answers.append(complete(client, "swapcase", word))

    thread = threading.Thread(target=traffic)
    thread.start()
    state = wait_for(served, job["id"])
    thread.join(60)
    assert answers == ["ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX"]
    assert state["status"] == "succeeded", state
    assert state["step"] == 24 and len(state["loss_history"]) == 24
    assert max(state["best_weights"], key=lambda n: abs(state["best_weights"][n])) == "upper"
    assert state["best_loss"] == min(state["loss_history"])
    with served.http(headers=ADMIN) as client:
        listed = client.get("/v1/adapters/compose").json()["data"]
    assert listed[0] == state  # the newest first
    assert engine.num_steps > steps_before + 24  # every evaluation ran through engine steps
    assert complete(served.openai("user"), "composed-upper", "mixed9Case") == "MIXED9CASE"
    # Saved as the one adapter the mixture equals (candidates adapt different modules:
    # upper only attention), it loads in PEFT and serves the same.
    saved = roots[0] / "composed-upper"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO_DIR / "model"), saved)
    r = post(served, "/v1/load_lora_adapter", {"lora_name": "reloaded", "lora_path": str(saved)})
    assert r.status_code == 200, r.text
    assert complete(served.openai("user"), "reloaded", "mixed9Case") == "MIXED9CASE"
    # Its temporary adapters are gone and were never listed.
    assert all(not n.startswith("_") for n in engine.adapters.registry.names())
    served.wait_idle()


@pytest.mark.parametrize(
    ("body", "status", "code", "words"),
    [
        ({"method": "gradient"}, 400, "invalid_composition", "method"),
        ({"max_steps": 1000}, 400, "invalid_composition", "max_steps"),
        ({"bounds": [1.0, -1.0]}, 400, "invalid_composition", "bounds"),
        ({"candidates": ["upper", "mix"]}, 400, "invalid_composition", "mixture"),
        ({"candidates": ["upper", "upper"]}, 400, "invalid_composition", "at most once"),
        ({"candidates": []}, 400, "invalid_composition", "no candidate"),
        ({"candidates": ["upper", "nope"]}, 404, "model_not_found", "nope"),
        ({"name": "upper"}, 409, "adapter_already_loaded", "upper"),
        ({"examples": []}, 400, "invalid_value", None),
        (
            {"examples": [{"prompt": "a=", "completion": "x" * 5000}]},
            400,
            "invalid_composition",
            "too long",
        ),
    ],
)
def test_composition_refusals_name_the_rule(
    served: Served, body: dict[str, Any], status: int, code: str, words: str | None
) -> None:
    if (
        body.get("candidates") == ["upper", "mix"]
        and "mix" not in served.state.engine.adapters.registry.names()
    ):
        served.state.engine.register_mixture("mix", [("upper", 1.0), ("reverse", 1.0)])
    request = {"name": "c-bad", "examples": UPPER_EXAMPLES} | body
    error = assert_error(post(served, "/v1/adapters/compose", request), status, code)
    if words is not None:
        assert words in error["message"], error
    with served.http(headers=ADMIN) as client:
        assert_error(client.get("/v1/adapters/compose/compose-none"), 404, "job_not_found")
    assert_good(served, "user")


def test_export_writes_a_model_transformers_loads(served: Served, roots: tuple[Path, Path]) -> None:
    r = post(served, "/v1/adapters/upper/export", {"dtype": "float32"})
    assert r.status_code == 200, r.text
    out = roots[1] / r.json()["out"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer_ids = served.state.engine.tokenizer("serve=")["input_ids"]
    generated = model.generate(
        torch.tensor([tokenizer_ids]), max_new_tokens=8, do_sample=False, pad_token_id=0
    )
    text = served.state.engine.tokenizer.decode(
        generated[0, len(tokenizer_ids) :], skip_special_tokens=True
    )
    assert text == complete(served.openai("user"), "upper", "serve") == "SERVE"
    assert_error(post(served, "/v1/adapters/upper/export", {}), 409, "export_exists")
    assert_error(post(served, "/v1/adapters/nope/export", {}), 404, "model_not_found")
    assert_error(post(served, "/v1/adapters/upper/export", {"dtype": "int8"}), 400, "invalid_value")
    assert_good(served, "user")


def test_export_needs_an_export_root() -> None:
    config = ServerConfig(model_name=BASE, admin_api_key="admin")
    server = serve(make_engine(demo_adapters("upper")), config)
    try:
        assert_error(post(server, "/v1/adapters/upper/export", {}), 400, "export_disabled")
        assert_good(server)
    finally:
        server.stop()
