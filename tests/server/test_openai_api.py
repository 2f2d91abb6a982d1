"""The OpenAI routes through the official client: completions, chat, streaming, n, stop,
logprobs, echo, seeds, penalties, /v1/models, and mixed-adapter concurrency."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.server.conftest import BASE, TASKS, WORDS, Served, complete


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


def test_sampling_options_are_accepted(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=BASE,
        prompt="pen=",
        max_tokens=10,
        temperature=0.7,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        seed=1,
        extra_body={"top_k": 5, "min_tokens": 2, "ignore_eos": True},
    )
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 10


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


def test_metrics_exposition(demo_server: Served) -> None:
    with demo_server.http() as http:
        text = http.get("/metrics").text
    for name in (
        "loraserve:num_requests_running",
        "loraserve:num_requests_waiting",
        "loraserve:kv_cache_usage_perc",
        "loraserve:num_preemptions_total",
        "loraserve:prompt_tokens_total",
        "loraserve:generation_tokens_total",
        'loraserve:request_success_total{finished_reason="stop"}',
        "loraserve:time_to_first_token_seconds_bucket",
        "loraserve:inter_token_latency_seconds_bucket",
        "loraserve:e2e_request_latency_seconds_bucket",
        "loraserve:request_queue_time_seconds_bucket",
        'loraserve:pool_pages{tenant="kv"}',
        'loraserve:pool_pages{tenant="adapter"}',
        'loraserve:pool_pages{tenant="free"}',
        'loraserve:pool_pages{tenant="cached"}',
        "loraserve:prefix_cache_queries_total",
        "loraserve:prefix_cache_hits_total",
        "# TYPE loraserve:prefix_cache_pages gauge",
        "# TYPE loraserve:lora_adapter_version gauge",
        "loraserve:num_resident_adapters",
        "loraserve:adapter_loads_total",
        "loraserve:adapter_evictions_total",
        "loraserve:adapter_prefetch_hits_total",
        "loraserve:adapter_prefetch_misses_total",
        "loraserve:adapter_load_seconds_total",
        'loraserve:adapter_requests_total{adapter="upper"}',
    ):
        assert name in text, name
