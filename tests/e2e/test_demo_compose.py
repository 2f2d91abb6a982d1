"""LoRAHub composition on the demo: from 5 examples of a task and the four LoRA demo adapters
as candidates, 40 steps find weights whose adapter does the task on held-out words, and the
task's own adapter weighs the most. Every task, both methods."""

from __future__ import annotations

import pytest

from adapters.compose import ComposeSpec, Example
from engine import LLM, SamplingParams
from tests.e2e.demo import ADAPTERS_DIR, MODEL_DIR, tasks

# The LoRA adapters: compositions weigh LoRA updates (the prefix-tuned one has none).
LORA_TASKS = ("upper", "swapcase", "caesar", "reverse")
NUM_EXAMPLES = 5
NUM_HELD_OUT = 100


@pytest.fixture(scope="module")
def llm() -> LLM:
    llm = LLM(MODEL_DIR, dtype="float32")
    for task in tasks.ADAPTER_TASKS:
        llm.engine.load_lora(task, ADAPTERS_DIR / task)
    return llm


@pytest.mark.parametrize("method", ["lorahub", "mixture"])
@pytest.mark.parametrize("task", LORA_TASKS)
def test_composition_learns_the_task(llm: LLM, task: str, method: str) -> None:
    words = tasks.held_out_words(NUM_EXAMPLES + NUM_HELD_OUT, task=task)
    examples = words[:NUM_EXAMPLES]
    spec = ComposeSpec(
        name=f"composed-{method}-{task}",
        candidates=LORA_TASKS,
        examples=tuple(Example(tasks.format_prompt(w), tasks.target(task, w)) for w in examples),
        method=method,
        max_steps=40,
    )
    job = llm.compose(spec)
    state = job.snapshot()
    assert state["status"] == "succeeded", state["error"]
    assert state["step"] == 40 and len(state["loss_history"]) == 40
    weights = state["best_weights"]
    assert max(weights, key=lambda name: abs(weights[name])) == task, weights
    held_out = words[NUM_EXAMPLES:]
    params = SamplingParams(temperature=0.0, max_tokens=tasks.MAX_WORD_LEN + 2)
    engine = llm.engine
    ids = [engine.add_request(tasks.format_prompt(w), params, lora=spec.name) for w in held_out]
    texts = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                texts[out.request_id] = out.text
    correct = sum(texts[i] == tasks.target(task, w) for i, w in zip(ids, held_out, strict=True))
    assert correct / NUM_HELD_OUT >= 0.9, (correct, weights)
