"""The prefix cache through the API, on the demo model and its trained adapters: a repeated
prompt reports cached tokens and the same text; another adapter, the base and a replacement
reuse nothing (the isolation rows of the reliability table)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from engine.outputs import RequestOutput
from server.config import ServerConfig
from tests.server.conftest import BASE, DEMO_ADAPTERS, Served, demo_adapters, make_engine, serve

# 61 bytes + BOS: three whole blocks of 16 and a tail, well inside the demo's 128 tokens.
PROMPT = "the quick brown fox jumps over the lazy dog; pack my box now="


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    config = ServerConfig(model_name=BASE, allow_runtime_lora=True, adapter_roots=(DEMO_ADAPTERS,))
    server = serve(make_engine(demo_adapters("upper", "swapcase")), config)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def uncached() -> Iterator[Served]:
    server = serve(make_engine(demo_adapters("upper", "swapcase"), enable_prefix_caching=False))
    yield server
    server.stop()


def complete(client: openai.OpenAI, model: str) -> tuple[str, int]:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    usage: Any = out.usage
    return out.choices[0].text, int(usage.prompt_tokens_details.cached_tokens)


def test_a_repeated_prompt_is_served_from_the_cache(served: Served, uncached: Served) -> None:
    client = served.openai()
    first, cached_first = complete(client, "upper")
    again, cached_again = complete(client, "upper")
    assert cached_first == 0
    assert cached_again == 48  # three blocks; the tail and the last token are computed
    assert again == first == complete(uncached.openai(), "upper")[0]
    assert complete(uncached.openai(), "upper")[1] == 0
    served.wait_idle()


def test_no_reuse_across_adapters_the_base_or_versions(served: Served) -> None:
    client = served.openai()
    complete(client, "upper")
    assert complete(client, "swapcase")[1] == 0
    assert complete(client, BASE)[1] == 0
    assert complete(client, "upper")[1] == 48
    # The same files loaded again in place: a new version, nothing of the old one reused.
    path = str(demo_adapters("upper")["upper"])
    body = {"lora_name": "upper", "lora_path": path, "replace": True}
    reply = httpx.post(f"{served.url}/v1/load_lora_adapter", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    text, cached = complete(client, "upper")
    assert cached == 0
    assert complete(client, "upper") == (text, 48)
    served.wait_idle()


def test_a_stream_running_through_a_replacement_finishes_on_its_version(served: Served) -> None:
    """The reliability row for in-place updates, with adapters whose outputs tell them
    apart: "upper" is replaced by swapcase's weights while a stream on it is half done (the
    engine holds still after the stream's third token until the replacement is in)."""
    client = served.openai()
    paths = demo_adapters("upper", "swapcase")
    engine = served.state.engine
    step = engine.step
    held, resume = threading.Event(), threading.Event()

    def step_then_hold() -> list[RequestOutput]:
        outputs = step()
        if any(o.num_output_tokens == 3 and not o.finished for o in outputs):
            held.set()
            resume.wait(30)
        return outputs

    engine.step = step_then_hold  # type: ignore[method-assign]
    try:
        stream = client.completions.create(
            model="upper", prompt="HelloWorld=", max_tokens=16, temperature=0, stream=True
        )
        chunks = iter(stream)
        text = next(chunks).choices[0].text
        assert held.wait(30)
        body = {"lora_name": "upper", "lora_path": str(paths["swapcase"]), "replace": True}
        reply = httpx.post(f"{served.url}/v1/load_lora_adapter", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["version"] >= 2
    finally:
        resume.set()
        engine.step = step  # type: ignore[method-assign]
    text += "".join(chunk.choices[0].text for chunk in chunks)
    assert text == "HELLOWORLD"  # version 1's weights to the end
    after = client.completions.create(
        model="upper", prompt="HelloWorld=", max_tokens=16, temperature=0
    )
    assert after.choices[0].text == "hELLOwORLD"  # the new version
    # Back to the real "upper"; nothing leaked.
    body = {"lora_name": "upper", "lora_path": str(paths["upper"]), "replace": True}
    assert httpx.post(f"{served.url}/v1/load_lora_adapter", json=body, timeout=60).is_success
    served.wait_idle()
