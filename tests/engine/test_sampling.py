"""Sampling settings, seeds, stop conditions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.sampler import Sampler
from engine.scheduler_output import ScheduledChunk
from tests.engine.test_generation import random_prompts


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(llama_dir, dtype="float32")


def chunk(params: SamplingParams, generator: torch.Generator | None = None) -> ScheduledChunk:
    return ScheduledChunk("r", [1], 0, [0], [1], True, params, generator)


def test_seeded_request_is_the_same_alone_and_in_a_busy_batch(llm: LLM) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=24)
    prompt = [7, 8, 9, 10]
    alone = llm.generate([prompt], seeded)[0]
    noise = SamplingParams(temperature=1.3, max_tokens=30)
    busy = llm.generate([*random_prompts(12), prompt], [noise] * 12 + [seeded])[-1]
    assert busy.token_ids == alone.token_ids
    other_seed = llm.generate([prompt], SamplingParams(temperature=1.0, seed=99, max_tokens=24))
    assert other_seed[0].token_ids != alone.token_ids


def test_top_k_one_is_greedy(llm: LLM) -> None:
    prompts = random_prompts(8)
    greedy = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8))
    top1 = llm.generate(prompts, SamplingParams(temperature=0.7, top_k=1, max_tokens=8))
    assert [o.token_ids for o in greedy] == [o.token_ids for o in top1]


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler(torch.Generator().manual_seed(0))
    seen_k, seen_p = set(), set()
    for _ in range(200):
        seen_k |= set(sampler(logits, [chunk(SamplingParams(top_k=2))]))
        seen_p |= set(sampler(logits, [chunk(SamplingParams(top_p=0.8))]))
    assert seen_k == {0, 1}
    assert seen_p == {0, 1}  # 0.5 < 0.8, and 0.5 + 0.3 reaches it


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    sampler = Sampler(torch.Generator().manual_seed(0))
    counts = torch.zeros(3)
    for _ in range(3000):
        (token,) = sampler(probs.log()[None], [chunk(SamplingParams(temperature=1.0))])
        counts[token] += 1
    assert torch.allclose(counts / counts.sum(), probs, atol=0.03)


def test_banned_tokens_are_never_sampled() -> None:
    logits = torch.tensor([[10.0, 0.0, -1.0]])
    c = ScheduledChunk("r", [1], 0, [0], [1], True, SamplingParams(temperature=0), None, (0,))
    assert Sampler(torch.Generator())(logits, [c]) == [1]


def test_max_tokens_and_eos(llm: LLM) -> None:
    eos = next(iter(llm.engine.eos_token_ids))
    prompts = random_prompts(10)
    out = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12))
    for o in out:
        assert len(o.token_ids) <= 12
        if o.finish_reason == "stop":
            assert o.token_ids[-1] == eos and eos not in o.token_ids[:-1]
        else:
            assert o.finish_reason == "length" and len(o.token_ids) == 12
    forced = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in forced)


def test_min_tokens_and_stop_token_ids(llm: LLM) -> None:
    prompt = random_prompts(1)[0]
    free = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    tokens = free[0].token_ids
    stop_at = tokens[3]
    stopped = llm.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=(stop_at,))
    )[0]
    first = tokens.index(stop_at)
    assert stopped.token_ids == tokens[: first + 1] and stopped.finish_reason == "stop"
    delayed = llm.generate(
        [prompt],
        SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=(stop_at,), min_tokens=8),
    )[0]
    assert len(delayed.token_ids) > 8
    assert stop_at not in delayed.token_ids[:8]


def test_stop_string_is_cut_from_the_text(llm: LLM) -> None:
    prompt = random_prompts(1, seed=3)[0]
    free = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    text = free[0].text
    stop = text[5:7]
    assert len(stop) == 2
    out = llm.generate(
        [prompt],
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=(stop,)),
    )[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.index(stop)]
