"""The prefix cache through the API, on the demo model and its trained adapters: a repeated
prompt reports cached tokens and the same text; another adapter, the base and a replacement
reuse nothing (the isolation rows of the reliability table)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

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
