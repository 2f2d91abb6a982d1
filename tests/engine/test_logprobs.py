"""Log-probabilities, prompt log-probabilities and penalties against transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, LLMEngine, SamplingParams
from engine.config import EngineConfig
from tests.engine.test_generation import random_prompts
from tests.references import hf_model


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    # A small budget splits long prompts into chunks, so prompt logprobs cross chunks.
    return LLM(llama_dir, dtype="float32", max_num_batched_tokens=16)


def hf_logprobs(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every position: (len(ids), vocab)."""
    with torch.inference_mode():
        logits = hf_model(model_dir)(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_generated_and_prompt_logprobs_match_transformers(llm: LLM, llama_dir: Path) -> None:
    prompts = random_prompts(6, seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, prompt_logprobs=2)
    for prompt, out in zip(prompts, llm.generate(prompts, params), strict=True):
        reference = hf_logprobs(llama_dir, prompt + out.token_ids)
        assert out.logprobs is not None and out.prompt_logprobs is not None
        assert len(out.logprobs) == len(out.token_ids)
        for i, entry in enumerate(out.logprobs):
            row = reference[len(prompt) - 1 + i]
            assert entry.token_id == out.token_ids[i]
            assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-4)
            top = row.topk(3)
            assert [t for t, _ in entry.top] == top.indices.tolist()
            assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        for j, prompt_entry in enumerate(out.prompt_logprobs[1:], start=1):
            assert prompt_entry is not None and prompt_entry.token_id == prompt[j]
            expected = float(reference[j - 1, prompt[j]])
            assert prompt_entry.logprob == pytest.approx(expected, abs=1e-4)
            assert len(prompt_entry.top) == 2


def test_penalties_match_a_reference_loop(llm: LLM, llama_dir: Path) -> None:
    prompt = random_prompts(1, seed=6)[0]
    params = SamplingParams(
        temperature=0.0,
        max_tokens=12,
        ignore_eos=True,
        presence_penalty=1.5,
        frequency_penalty=0.7,
    )
    out = llm.generate([prompt], params)[0]
    ids, generated = list(prompt), []
    for _ in range(12):
        with torch.no_grad():
            logits = hf_model(llama_dir)(torch.tensor([ids])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=len(logits))
        logits -= 0.7 * counts.float() + 1.5 * (counts > 0).float()
        generated.append(int(logits.argmax()))
        ids.append(generated[-1])
    assert out.token_ids == generated
    plain = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert plain[0].token_ids != generated  # the penalties did something


def test_a_failing_step_aborts_its_requests_and_serving_continues(llama_dir: Path) -> None:
    engine = LLMEngine(EngineConfig.create(llama_dir, dtype="float32"))
    params = SamplingParams(temperature=0.0, max_tokens=4)
    engine.add_request([5, 6, 7], params, request_id="doomed")
    original = engine.runner.execute
    engine.runner.execute = lambda output: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[method-assign]
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("doomed", "abort")]
    assert outs[0].error and "internal error" in outs[0].error
    engine.runner.execute = original  # type: ignore[method-assign]
    engine.add_request([5, 6, 7], params, request_id="fine")
    finished = []
    while engine.has_unfinished():
        finished += [o for o in engine.step() if o.finished]
        engine.check_integrity()
    assert [o.finish_reason for o in finished] == ["length"]
    assert engine.stats().num_failed_steps == 1
    assert engine.pool.num_free + engine.kv_cache_manager.num_cached_pages == engine.pool.num_pages
