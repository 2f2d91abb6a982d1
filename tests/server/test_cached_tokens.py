"""``usage.prompt_tokens_details.cached_tokens``: what the engine reports as reused from the
prefix cache, in completions and chat, collected and streamed, through the official client.

The engine here reports a cached prefix of every prompt but its last token (what a full hit
leaves to compute) on the outputs that carry the prompt (the first and the last), so the
server's side is tested whatever the prefix cache itself finds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from engine.outputs import RequestOutput
from tests.server.conftest import BASE, Served, demo_adapters, make_engine, serve


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    engine = make_engine(demo_adapters("upper"))
    step = engine.step

    def step_reporting_a_cached_prefix() -> list[RequestOutput]:
        return [
            dataclasses.replace(
                out,
                num_cached_tokens=out.num_prompt_tokens - 1 if out.prompt_token_ids else 0,
            )
            for out in step()
        ]

    engine.step = step_reporting_a_cached_prefix  # type: ignore[method-assign]
    server = serve(engine)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(served: Served) -> openai.OpenAI:
    return served.openai()


def cached(usage: Any) -> int:
    assert usage is not None and usage.prompt_tokens_details is not None
    return int(usage.prompt_tokens_details.cached_tokens)


def test_completions_report_cached_tokens(client: openai.OpenAI) -> None:
    out = client.completions.create(model="upper", prompt="abcdef=", max_tokens=8, temperature=0)
    assert out.choices[0].text == "ABCDEF"
    assert out.usage is not None and out.usage.prompt_tokens == 8  # BOS + 7 bytes
    assert cached(out.usage) == 7


def test_each_prompt_counts_once_however_many_choices(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=BASE, prompt=["ab=", "abcd="], n=3, max_tokens=4, temperature=0
    )
    assert len(out.choices) == 6
    assert out.usage is not None and out.usage.prompt_tokens == 4 + 6
    assert cached(out.usage) == 3 + 5  # never more than prompt_tokens


def test_chat_reports_cached_tokens(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="upper", messages=[{"role": "user", "content": "abc"}], temperature=0
    )
    assert out.choices[0].message.content == "ABC"
    assert out.usage is not None and cached(out.usage) == out.usage.prompt_tokens - 1


def test_the_streamed_usage_chunk_matches_the_response(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": "upper", "max_tokens": 8, "temperature": 0}
    full = client.completions.create(prompt="xyz=", **kwargs)
    stream = client.completions.create(
        prompt="xyz=", stream=True, stream_options={"include_usage": True}, **kwargs
    )
    last = list(stream)[-1]
    assert last.choices == [] and last.usage == full.usage and cached(last.usage) == 4
    messages = [{"role": "user", "content": "hey"}]
    chat = client.chat.completions.create(messages=messages, **kwargs)  # type: ignore[arg-type]
    parts = list(
        client.chat.completions.create(
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
            **kwargs,
        )
    )
    assert parts[-1].usage == chat.usage and cached(chat.usage) == chat.usage.prompt_tokens - 1


def test_the_raw_shape_is_openais(served: Served) -> None:
    with served.http() as http:
        body = {"model": BASE, "prompt": "ab=", "max_tokens": 2, "temperature": 0}
        usage = http.post("/v1/completions", json=body).json()["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 3}
    assert set(usage) == {
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "prompt_tokens_details",
    }
