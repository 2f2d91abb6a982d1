"""The demo adapters do their tasks through loraserve, all tasks mixed in one batch, on the
float base and on the base quantized to NF4 at load."""

from __future__ import annotations

import random

import pytest

from engine import LLM, SamplingParams
from tests.e2e.demo import ADAPTERS_DIR, MIN_ACCURACY, MODEL_DIR, tasks

NUM_WORDS = 64


@pytest.fixture(scope="module", params=["none", "nf4"])
def llm(request: pytest.FixtureRequest) -> LLM:
    llm = LLM(MODEL_DIR, dtype="float32", quantization=request.param)
    for task in tasks.ADAPTER_TASKS:
        llm.engine.load_lora(task, ADAPTERS_DIR / task)
    return llm


def test_every_task_in_one_mixed_batch(llm: LLM) -> None:
    words = tasks.held_out_words(NUM_WORDS)
    jobs = [(task, word) for word in words for task in (None, *tasks.ADAPTER_TASKS)]
    random.Random(0).shuffle(jobs)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=tasks.MAX_WORD_LEN + 2)
    for i, (task, word) in enumerate(jobs):
        engine.add_request(tasks.format_prompt(word), params, request_id=str(i), lora=task)
    texts: dict[str, str] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                assert out.finish_reason == "stop"  # each completion ends with EOS
                texts[out.request_id] = out.text
    engine.check_integrity()
    correct: dict[str, int] = {}
    for i, (task, word) in enumerate(jobs):
        name = task or tasks.BASE_TASK
        correct[name] = correct.get(name, 0) + (texts[str(i)] == tasks.target(name, word))
    accuracy = {name: n / NUM_WORDS for name, n in correct.items()}
    assert all(a >= MIN_ACCURACY for a in accuracy.values()), accuracy
