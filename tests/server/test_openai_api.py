"""The OpenAI routes through the official client: completions, chat, streaming, n, stop,
logprobs, echo, seeds, every sampling option as the engine receives it, /v1/models,
mixed-adapter concurrency, and what a known load does to /metrics."""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.sampling_params import SamplingParams
from server.metrics import P
from tests.server.conftest import BASE, TASKS, WORDS, Served, complete
from tests.server.test_metrics import by_label


@pytest.fixture(scope="module")
def client(demo_server: Served) -> openai.OpenAI:
    return demo_server.openai()


def test_each_model_does_its_task(client: openai.OpenAI) -> None:
    for model, task in TASKS.items():
        for word in WORDS[:3]:
            assert complete(client, model, word) == task(word), (model, word)


def test_completion_response_shape(client: openai.OpenAI) -> None:
    out = client.completions.create(model="upper", prompt="abc=", temperature=0, max_tokens=8)
    assert out.object == "text_completion" and out.model == "upper" and out.id
    (choice,) = out.choices
    assert choice.text == "ABC" and choice.finish_reason == "stop" and choice.index == 0
    assert out.usage is not None
    assert out.usage.prompt_tokens == len(b"<s>abc=") - 2  # byte tokens, BOS counts 1
    assert out.usage.completion_tokens == 4  # "ABC" + EOS
    assert out.usage.total_tokens == out.usage.prompt_tokens + 4
    # Always present (OpenAI's shape); a prompt shorter than a prefix-cache block has none.
    assert out.usage.prompt_tokens_details is not None
    assert out.usage.prompt_tokens_details.cached_tokens == 0


def test_length_finish(client: openai.OpenAI) -> None:
    out = client.completions.create(model=BASE, prompt="abcdef=", temperature=0, max_tokens=3)
    assert out.choices[0].finish_reason == "length" and out.choices[0].text == "abc"


def test_token_id_prompts(demo_server: Served, client: openai.OpenAI) -> None:
    ids = list(demo_server.state.engine.tokenizer("tok=").input_ids)
    one = client.completions.create(model="upper", prompt=ids, temperature=0, max_tokens=8)
    assert one.choices[0].text == "TOK"
    two = client.completions.create(
        model=BASE, prompt=[ids, ids[:-1] + ids[-1:]], temperature=0, max_tokens=8, echo=True
    )
    assert [c.text for c in two.choices] == ["tok=tok", "tok=tok"]  # echo decodes the ids


def test_prompt_lists_give_a_choice_each(client: openai.OpenAI) -> None:
    words = [f"{w}=" for w in WORDS]
    out = client.completions.create(model="swapcase", prompt=words, temperature=0, max_tokens=24)
    assert [c.index for c in out.choices] == list(range(len(words)))
    assert [c.text for c in out.choices] == [w.swapcase() for w in WORDS]


def test_chat_uses_the_template(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="upper",
        messages=[
            {"role": "system", "content": "ignored by the demo template"},
            {"role": "user", "content": "chatWord"},
        ],
        temperature=0,
    )
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == "CHATWORD"
    assert out.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_stream_equals_non_stream(client: openai.OpenAI, route: str) -> None:
    for model in ("upper", BASE):
        kwargs = {"model": model, "temperature": 0.0, "max_tokens": 40, "n": 2, "seed": 3}
        if route == "completions":
            full = client.completions.create(prompt="streamMe=", **kwargs)  # type: ignore[call-overload]
            stream = client.completions.create(
                prompt="streamMe=", stream=True, stream_options={"include_usage": True}, **kwargs
            )  # type: ignore[call-overload]
        else:
            messages = [{"role": "user", "content": "streamMe"}]
            full = client.chat.completions.create(messages=messages, **kwargs)  # type: ignore[call-overload]
            stream = client.chat.completions.create(
                messages=messages, stream=True, stream_options={"include_usage": True}, **kwargs
            )  # type: ignore[call-overload]
        texts = {0: "", 1: ""}
        finishes: dict[int, list[str | None]] = {0: [], 1: []}
        usage_chunks = []
        for chunk in stream:
            if not chunk.choices:
                usage_chunks.append(chunk.usage)
                continue
            assert not usage_chunks, "the usage chunk comes last"
            for c in chunk.choices:
                delta = c.text if route == "completions" else c.delta.content
                texts[c.index] += delta or ""
                finishes[c.index].append(c.finish_reason)
        expected = [c.text if route == "completions" else c.message.content for c in full.choices]
        assert [texts[0], texts[1]] == expected
        for reasons in finishes.values():
            assert reasons[-1] == "stop" and all(r is None for r in reasons[:-1])
        assert len(usage_chunks) == 1 and usage_chunks[0] == full.usage


def test_stream_without_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model=BASE, prompt="a=", stream=True, max_tokens=4))
    assert all(chunk.choices for chunk in chunks)


def test_n_samples_with_seeds(client: openai.OpenAI) -> None:
    kwargs = {"model": BASE, "prompt": "x=", "max_tokens": 12, "temperature": 1.5, "n": 4}
    first = client.completions.create(seed=7, **kwargs)  # type: ignore[call-overload]
    again = client.completions.create(seed=7, **kwargs)  # type: ignore[call-overload]
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert texts == [c.text for c in again.choices]  # seeded: reproducible
    assert len(set(texts)) > 1  # and the choices differ from each other
    assert first.usage is not None and first.usage.prompt_tokens == 3  # counted once


def test_stop_strings(client: openai.OpenAI) -> None:
    word = "abcXdefXghi"
    assert complete(client, BASE, word) == word
    assert complete(client, BASE, word, stop="X") == "abc"
    out = client.completions.create(
        model="upper", prompt=f"{word}=", temperature=0, max_tokens=24, stop=["DEF", "Q"]
    )
    assert out.choices[0].text == "ABCX" and out.choices[0].finish_reason == "stop"


def test_completion_logprobs(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model="upper", prompt="logp=", temperature=0, max_tokens=8, logprobs=3
    )
    choice = out.choices[0]
    assert choice.logprobs is not None
    lp = choice.logprobs
    assert lp.tokens is not None and lp.token_logprobs is not None
    assert lp.top_logprobs is not None and lp.text_offset is not None
    assert "".join(lp.tokens).startswith(choice.text)  # EOS decodes to "" or "</s>"
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0.0 and len(top) <= 3
        assert math.isclose(max(top.values()), logprob, abs_tol=1e-4)  # greedy: the best
        assert token in top
    assert lp.text_offset == [0, 1, 2, 3, 4]


def test_echo_with_logprobs_covers_the_prompt(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=BASE, prompt="ab=", temperature=0, max_tokens=4, echo=True, logprobs=1
    )
    choice = out.choices[0]
    assert choice.text == "ab=ab"
    lp = choice.logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.tokens is not None
    # BOS (no logprob), a, b, =, then a, b, EOS.
    assert lp.token_logprobs[0] is None and len(lp.tokens) == 4 + 3
    assert all(v is not None and v <= 0.0 for v in lp.token_logprobs[1:])


def test_chat_logprobs(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="swapcase",
        messages=[{"role": "user", "content": "Tok"}],
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    choice = out.choices[0]
    assert choice.message.content == "tOK"
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert "".join(c.token for c in content[:3]) == "tOK"
    for item in content:
        assert item.logprob <= 0.0 and len(item.top_logprobs) == 2
        assert item.bytes == list(item.token.encode())


# Every option at a value other than the engine's default, as each route sends it.
SAMPLING_OPTIONS: dict[str, Any] = {
    "max_tokens": 10,
    "temperature": 0.7,
    "top_p": 0.9,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.25,
    "seed": 11,
    "stop": ["zz"],
    "user": "alice",
    "extra_body": {
        "top_k": 5,
        "min_tokens": 3,
        "ignore_eos": True,
        "stop_token_ids": [7],
        "skip_special_tokens": False,
    },
}
# What the engine must receive for choice ``i`` of such a request (seeds: seed + i).
EXPECTED_PARAMS = SamplingParams(
    max_tokens=10,
    temperature=0.7,
    top_p=0.9,
    top_k=5,
    seed=11,
    stop=("zz",),
    stop_token_ids=(7,),
    ignore_eos=True,
    min_tokens=3,
    skip_special_tokens=False,
    logprobs=2,
    prompt_logprobs=2,  # completions with echo; chat has no prompt logprobs
    presence_penalty=0.5,
    frequency_penalty=-0.25,
)


@pytest.fixture
def engine_requests(
    demo_server: Served, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[SamplingParams, dict[str, Any]]]:
    """The parameters and keyword arguments of each ``LLMEngine.add_request`` from now on."""
    engine = demo_server.state.engine
    assert engine is not None
    add_request = engine.add_request
    received: list[tuple[SamplingParams, dict[str, Any]]] = []

    def recording(prompt: Any, params: SamplingParams, *args: Any, **kwargs: Any) -> str:
        received.append((params, kwargs))
        return add_request(prompt, params, *args, **kwargs)

    monkeypatch.setattr(engine, "add_request", recording)
    return received


def test_every_sampling_option_reaches_the_engine(
    client: openai.OpenAI, engine_requests: list[tuple[SamplingParams, dict[str, Any]]]
) -> None:
    defaults = SamplingParams()
    unchanged = [
        f.name
        for f in dataclasses.fields(SamplingParams)
        if getattr(EXPECTED_PARAMS, f.name) == getattr(defaults, f.name)
    ]
    assert unchanged == [], "give every option a non-default value here"

    out = client.completions.create(
        model="upper", prompt="pen=", n=2, logprobs=2, echo=True, **SAMPLING_OPTIONS
    )
    assert [c.index for c in out.choices] == [0, 1]
    chat = client.chat.completions.create(
        model="swapcase",
        messages=[{"role": "user", "content": "pen"}],
        logprobs=True,
        top_logprobs=2,
        **SAMPLING_OPTIONS,
    )
    assert chat.choices[0].message.content is not None

    params = [p for p, _ in engine_requests]
    assert params == [
        EXPECTED_PARAMS,
        dataclasses.replace(EXPECTED_PARAMS, seed=12),  # choice 1
        dataclasses.replace(EXPECTED_PARAMS, prompt_logprobs=None),  # chat
    ]
    routes = [(kw["lora"], kw["user"], kw["priority"]) for _, kw in engine_requests]
    assert routes == [("upper", "alice", 0)] * 2 + [("swapcase", "alice", 0)]


def test_min_tokens_holds_off_eos(client: openai.OpenAI) -> None:
    """What only ``min_tokens`` explains: the base copies ``a`` and ends (EOS: 2 tokens);
    asked for at least 6, it cannot end before them."""
    plain = client.completions.create(model=BASE, prompt="a=", temperature=0, max_tokens=12)
    assert plain.choices[0].text == "a" and plain.choices[0].finish_reason == "stop"
    assert plain.usage is not None and plain.usage.completion_tokens == 2
    held = client.completions.create(
        model=BASE, prompt="a=", temperature=0, max_tokens=12, extra_body={"min_tokens": 6}
    )
    assert held.choices[0].text.startswith("a") and held.choices[0].text != "a"
    assert held.usage is not None and held.usage.completion_tokens >= 6


def test_models_lists_base_and_adapters(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {BASE, "upper", "swapcase"}
    base = models[BASE].model_extra
    assert base is not None and base["parent"] is None
    for name in ("upper", "swapcase"):
        extra = models[name].model_extra
        assert extra is not None and extra["parent"] == BASE
        assert extra["root"] == name  # a logical name, never a server path


def test_concurrent_adapters_equal_alone(demo_server: Served) -> None:
    client = demo_server.openai()
    jobs = [(model, word) for word in WORDS for model in TASKS] * 2
    alone = {
        job: complete(client, *job, max_tokens=40, extra_body={"ignore_eos": True})
        for job in set(jobs)
    }
    with ThreadPoolExecutor(16) as pool:
        together = list(
            pool.map(
                lambda job: complete(client, *job, max_tokens=40, extra_body={"ignore_eos": True}),
                jobs,
            )
        )
    assert together == [alone[job] for job in jobs]
    for (model, word), text in zip(jobs, together, strict=True):
        assert text.startswith(TASKS[model](word))
    demo_server.wait_idle()


Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape_metrics(served: Served) -> Samples:
    """Sample name → (sorted labels → value), of one ``/metrics`` scrape."""
    with served.http() as http:
        text = http.get("/metrics").text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def test_metrics_count_known_traffic(demo_server: Served, client: openai.OpenAI) -> None:
    """Three requests on ``upper`` and two on the base, of known token counts, move each
    counter by exactly their share, and each latency histogram by one per request."""
    demo_server.wait_idle()
    before = scrape_metrics(demo_server)

    upper = [
        client.completions.create(model="upper", prompt="abc=", temperature=0, max_tokens=8)
        for _ in range(3)
    ]
    base = [
        client.completions.create(model=BASE, prompt="abcdef=", temperature=0, max_tokens=3)
        for _ in range(2)
    ]
    for out, text, reason, prompt_tokens, tokens in [
        *[(out, "ABC", "stop", 5, 4) for out in upper],  # BOS a b c =; A B C EOS
        *[(out, "abc", "length", 8, 3) for out in base],
    ]:
        assert (out.choices[0].text, out.choices[0].finish_reason) == (text, reason)
        assert out.usage is not None
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_tokens, tokens)
    demo_server.wait_idle()
    after = scrape_metrics(demo_server)

    def rise(name: str, **labels: str) -> float:
        key = tuple(sorted(labels.items()))
        return after[P + name].get(key, 0.0) - before.get(P + name, {}).get(key, 0.0)

    assert rise("request_success_total", finished_reason="stop") == 3
    assert rise("request_success_total", finished_reason="length") == 2
    assert rise("request_success_total", finished_reason="abort") == 0
    assert rise("adapter_requests_total", adapter="upper") == 3
    assert rise("adapter_requests_total", adapter="swapcase") == 0
    assert rise("prompt_tokens_total") == 3 * 5 + 2 * 8
    assert rise("generation_tokens_total") == 3 * 4 + 2 * 3
    assert rise("client_prompt_tokens_total", client="upper") == 3 * 5
    assert rise("client_prompt_tokens_total", client=BASE) == 2 * 8
    assert rise("client_generation_tokens_total", client="upper") == 3 * 4
    assert rise("client_generation_tokens_total", client=BASE) == 2 * 3
    for histogram in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
    ):
        assert rise(histogram + "_count") == 5, histogram
        assert rise(histogram + "_bucket", le="+Inf") == 5, histogram
        assert rise(histogram + "_sum") > 0, histogram
    # One gap between consecutive tokens of a request: 3 per upper request, 2 per base one.
    assert rise("inter_token_latency_seconds_count") == 3 * 3 + 2 * 2
    # And every family a dashboard reads is exported.
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "num_preemptions_total",
        "pool_pages",
        "prefix_cache_queries_total",
        "prefix_cache_hits_total",
        "num_resident_adapters",
        "adapter_loads_total",
        "adapter_evictions_total",
        "adapter_prefetch_hits_total",
        "adapter_prefetch_misses_total",
        "adapter_load_seconds_total",
    ):
        assert P + name in after, name
    assert set(by_label(after[P + "pool_pages"], "tenant")) == {"kv", "adapter", "cached", "free"}
