"""Greedy generation equals transformers token for token, under continuous batching."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine import LLMEngine, RequestOutput, SamplingParams
from engine.config import EngineConfig
from tests.references import hf_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=10)


def random_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 2, 7, 16, 17, 33, 60, *(rng.randint(1, 70) for _ in range(n - 7))]
    return [[rng.randrange(3, 259) for _ in range(length)] for length in lengths]


def run_staggered(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, per_step: int = 3
) -> dict[str, RequestOutput]:
    """Add ``per_step`` prompts before each step, so requests join a running batch."""
    pending = list(enumerate(prompts))
    done: dict[str, RequestOutput] = {}
    while pending or engine.has_unfinished():
        for i, prompt in pending[:per_step]:
            engine.add_request(prompt, params, request_id=str(i))
        pending = pending[per_step:]
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.check_integrity()
    return done


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_greedy_matches_transformers(model_dirs: dict[str, Path], family: str) -> None:
    model_dir = model_dirs[family]
    # A small token budget forces chunked prefill of the longer prompts alongside decodes.
    config = EngineConfig.create(model_dir, dtype="float32", max_num_batched_tokens=24)
    engine = LLMEngine(config)
    prompts = random_prompts(18)
    done = run_staggered(engine, prompts, GREEDY)
    for i, prompt in enumerate(prompts):
        assert done[str(i)].token_ids == hf_greedy(model_dir, prompt, GREEDY.max_tokens), i
    assert engine.pool.num_free + engine.kv_cache_manager.num_cached_pages == engine.pool.num_pages


def test_tiny_pool_preempts_and_changes_nothing(llama_dir: Path) -> None:
    prompts = random_prompts(16, seed=1)
    roomy = LLMEngine(EngineConfig.create(llama_dir, dtype="float32"))
    expected = run_staggered(roomy, prompts, GREEDY)
    # 2 pages per token; the longest request needs 2 * (70 + 10) = 160 pages.
    tight = LLMEngine(EngineConfig.create(llama_dir, dtype="float32", num_pages=170))
    got = run_staggered(tight, prompts, GREEDY)
    assert tight.scheduler.num_preemptions > 0
    assert {k: v.token_ids for k, v in got.items()} == {k: v.token_ids for k, v in expected.items()}
    assert tight.pool.num_free + tight.kv_cache_manager.num_cached_pages == tight.pool.num_pages


def test_abort_mid_generation_frees_pages(llama_dir: Path) -> None:
    engine = LLMEngine(EngineConfig.create(llama_dir, dtype="float32"))
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    for i, prompt in enumerate(random_prompts(8)):
        engine.add_request(prompt, params, request_id=str(i))
    for _ in range(3):
        engine.step()
    assert engine.pool.num_free < engine.pool.num_pages
    for i in range(0, 8, 2):
        engine.abort(str(i))
    outputs = {o.request_id: o for o in engine.step()}
    assert {outputs[str(i)].finish_reason for i in range(0, 8, 2)} == {"abort"}
    engine.check_integrity()
    while engine.has_unfinished():
        finished = [o for o in engine.step() if o.finished]
        assert all(o.finish_reason == "length" for o in finished)
        engine.check_integrity()
    assert engine.pool.num_free + engine.kv_cache_manager.num_cached_pages == engine.pool.num_pages


def test_requests_that_cannot_fit_are_refused(llama_dir: Path) -> None:
    engine = LLMEngine(
        EngineConfig.create(llama_dir, dtype="float32", max_model_len=64, num_pages=100)
    )
    with pytest.raises(ValueError, match="exceeds the context length 64"):
        engine.add_request([5] * 60, SamplingParams(max_tokens=5))
    with pytest.raises(ValueError, match="pool has 100"):
        engine.add_request([5] * 50, SamplingParams(max_tokens=5))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request([5, 100_000], SamplingParams())
    assert not engine.has_unfinished()


def test_triton_kernels_give_the_same_tokens(llama_dir: Path) -> None:
    """The engine on the Triton backend (under the interpreter on CPU) matches transformers."""
    prompts = [p[:20] for p in random_prompts(7, seed=2)]
    config = EngineConfig.create(llama_dir, dtype="float32", max_num_batched_tokens=16)
    engine = LLMEngine(config, kernels="triton")
    params = SamplingParams(temperature=0.0, max_tokens=6)
    done = run_staggered(engine, prompts, params, per_step=2)
    for i, prompt in enumerate(prompts):
        assert done[str(i)].token_ids == hf_greedy(llama_dir, prompt, params.max_tokens), i
