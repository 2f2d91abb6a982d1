"""Requests: every malformed request gets the envelope with the right status,
code and param, before any work is queued, and a good request succeeds right after."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.server.conftest import BASE, Served, assert_error, assert_good


@pytest.fixture(scope="module")
def http(demo_server: Served) -> Iterator[httpx.Client]:
    with demo_server.http() as client:
        yield client


def post(
    http: httpx.Client, body: dict[str, Any], route: str = "/v1/completions"
) -> httpx.Response:
    return http.post(route, json=body)


def check(
    served: Served, response: httpx.Response, status: int, code: str, param: str | None = None
) -> None:
    assert_error(response, status, code, param)
    served.wait_idle()  # nothing was queued, or it is gone already
    assert_good(served)


PROMPT = {"model": BASE, "prompt": "ok="}
CHAT = {"model": BASE, "messages": [{"role": "user", "content": "ok"}]}


@pytest.mark.parametrize("prompt", ["", [], [[]], ["ok=", ""], [[5, 6], []]])
def test_empty_prompt(demo_server: Served, http: httpx.Client, prompt: Any) -> None:
    check(demo_server, post(http, {**PROMPT, "prompt": prompt}), 400, "invalid_prompt", "prompt")


@pytest.mark.parametrize("prompt", [[5, -1], [[5, 6], [-3]], [5, 100_000], [2**40]])
def test_token_ids_out_of_range(demo_server: Served, http: httpx.Client, prompt: Any) -> None:
    check(demo_server, post(http, {**PROMPT, "prompt": prompt}), 400, "invalid_prompt", "prompt")


def test_context_length_exceeded(demo_server: Served, http: httpx.Client) -> None:
    limit = demo_server.state.engine.config.model.max_model_len
    body = {**PROMPT, "max_tokens": limit}
    check(demo_server, post(http, body), 400, "context_length_exceeded", "prompt")
    long = {**PROMPT, "prompt": "x" * (limit + 5) + "="}
    check(demo_server, post(http, long), 400, "context_length_exceeded", "prompt")
    chat = {**CHAT, "messages": [{"role": "user", "content": "x" * limit}]}
    check(demo_server, post(http, chat, "/v1/chat/completions"), 400, "context_length_exceeded")


@pytest.mark.parametrize("max_tokens", [0, -5])
def test_max_tokens_not_positive(demo_server: Served, http: httpx.Client, max_tokens: int) -> None:
    body = {**PROMPT, "max_tokens": max_tokens}
    check(demo_server, post(http, body), 400, "invalid_value", "max_tokens")
    chat = {**CHAT, "max_tokens": max_tokens}
    check(demo_server, post(http, chat, "/v1/chat/completions"), 400, "invalid_value", "max_tokens")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 10**9),
        ("n", 0),
        ("logprobs", 6),
        ("temperature", 2.5),
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", [""]),
        ("presence_penalty", 3.0),
        ("top_k", -2),
        ("seed", -1),
    ],
)
def test_out_of_range_fields(
    demo_server: Served, http: httpx.Client, field: str, value: Any
) -> None:
    check(demo_server, post(http, {**PROMPT, field: value}), 400, "invalid_value", field)


def test_too_many_choices(demo_server: Served, http: httpx.Client) -> None:
    body = {**PROMPT, "prompt": ["a="] * 10, "n": 16}
    check(demo_server, post(http, body), 400, "invalid_value", "n")


def test_chat_top_logprobs_bounds(demo_server: Served, http: httpx.Client) -> None:
    route = "/v1/chat/completions"
    body = {**CHAT, "logprobs": True, "top_logprobs": 6}
    check(demo_server, post(http, body, route), 400, "invalid_value", "top_logprobs")
    body = {**CHAT, "top_logprobs": 2}
    check(demo_server, post(http, body, route), 400, "invalid_value", "top_logprobs")


def test_stream_options_without_stream(demo_server: Served, http: httpx.Client) -> None:
    body = {**PROMPT, "stream_options": {"include_usage": True}}
    check(demo_server, post(http, body), 400, "invalid_value", "stream_options")
    chat = {**CHAT, "stream": False, "stream_options": {"include_usage": True}}
    route = "/v1/chat/completions"
    check(demo_server, post(http, chat, route), 400, "invalid_value", "stream_options")


@pytest.mark.parametrize(
    "raw", [b"{", b'{"model": "x",}', b"\xff\xfe", b"[1, 2]", b"null", b"", b'"text"']
)
def test_malformed_json(demo_server: Served, http: httpx.Client, raw: bytes) -> None:
    response = http.post(
        "/v1/completions", content=raw, headers={"Content-Type": "application/json"}
    )
    check(demo_server, response, 400, "invalid_json")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", "16"),
        ("max_tokens", 1.5),
        ("temperature", "hot"),
        ("stream", "yes"),
        ("prompt", 42),
        ("prompt", [1, "a"]),
        ("model", ["a"]),
        ("stop", 7),
        ("n", True),
    ],
)
def test_wrong_types(demo_server: Served, http: httpx.Client, field: str, value: Any) -> None:
    check(demo_server, post(http, {**PROMPT, field: value}), 400, "invalid_value", field)


def test_missing_fields(demo_server: Served, http: httpx.Client) -> None:
    check(demo_server, post(http, {"prompt": "a="}), 400, "invalid_value", "model")
    check(demo_server, post(http, {"model": BASE}), 400, "invalid_value", "prompt")
    route = "/v1/chat/completions"
    check(demo_server, post(http, {**CHAT, "messages": []}, route), 400, "invalid_value")
    bad_role = {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}
    check(demo_server, post(http, bad_role, route), 400, "invalid_value", "messages")


def test_deeply_nested_body(demo_server: Served, http: httpx.Client) -> None:
    depth = 100_000
    raw = b'{"model": "x", "prompt": "a=", "extra": ' + b"[" * depth + b"]" * depth + b"}"
    response = http.post(
        "/v1/completions", content=raw, headers={"Content-Type": "application/json"}
    )
    check(demo_server, response, 400, "invalid_json")
    nested = b'{"model": "x", "prompt": ' + b"[" * 50 + b"1" + b"]" * 50 + b"}"
    response = http.post(
        "/v1/completions", content=nested, headers={"Content-Type": "application/json"}
    )
    check(demo_server, response, 400, "invalid_value", "prompt")


def test_enormous_body(demo_server: Served, http: httpx.Client) -> None:
    limit = demo_server.state.config.max_request_bytes
    check(
        demo_server, post(http, {**PROMPT, "prompt": "x" * (limit + 1)}), 413, "request_too_large"
    )

    def chunks() -> Any:  # no Content-Length: refused while streaming in
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    response = http.post(
        "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}
    )
    check(demo_server, response, 413, "request_too_large")


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
def test_non_json_content_type(demo_server: Served, http: httpx.Client, content_type: str) -> None:
    response = http.post(
        "/v1/completions", content=b'{"model": "x"}', headers={"Content-Type": content_type}
    )
    check(demo_server, response, 415, "unsupported_media_type")


def test_unknown_route_and_method(demo_server: Served, http: httpx.Client) -> None:
    check(demo_server, http.get("/v1/nothing"), 404, "not_found")
    check(demo_server, http.get("/v1/completions"), 405, "method_not_allowed")


def test_unknown_model_is_404_not_base(demo_server: Served) -> None:
    """Adapters row: a request naming nothing loaded never falls back to the base."""
    client = demo_server.openai()
    for route in ("completions", "chat"):
        with pytest.raises(openai.NotFoundError) as info:
            if route == "completions":
                client.completions.create(model="not-loaded", prompt="a=")
            else:
                client.chat.completions.create(
                    model="not-loaded", messages=[{"role": "user", "content": "a"}]
                )
        assert info.value.code == "model_not_found" and info.value.param == "model"
        assert_good(demo_server)


def test_unsupported_parameters_are_refused(demo_server: Served, http: httpx.Client) -> None:
    check(
        demo_server, post(http, {**PROMPT, "suffix": "x"}), 400, "unsupported_parameter", "suffix"
    )
    body = {**PROMPT, "logit_bias": {"5": 100}}
    check(demo_server, post(http, body), 400, "unsupported_parameter", "logit_bias")
