"""A lean step, proven by counting: one metadata upload per step, outputs as deltas, the
CPU LoRA path grouped by adapter (both forms exact against PEFT, no per-token gather)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from engine.lora_backends import LORA_BACKENDS
from engine.lora_torch import TorchLora
from engine.outputs import RequestOutput
from engine.scheduler_output import ChunkResult, SchedulerOutput
from kernels import lora_expand, lora_layout, lora_shrink
from tests.engine.test_generation import random_prompts
from tests.engine.test_multilora import ADAPTERS, peft_greedy
from tests.tiny_models import make_adapter


@pytest.fixture(scope="module")
def llama_adapters(
    model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Path]]:
    base = model_dirs["llama"]
    root = tmp_path_factory.mktemp("lean-adapters")
    chosen = ["r1-qv", "r8-all", "r3-mlp", "patterned"]
    paths = {
        name: make_adapter(
            base, root / name, seed=i, std=0.3 / ADAPTERS[name]["r"] ** 0.25, **ADAPTERS[name]
        )
        for i, name in enumerate(chosen)
    }
    return base, paths


def run_mixed(
    engine: LLMEngine, jobs: list[tuple[list[int], str | None]], params: SamplingParams
) -> dict[str, list[RequestOutput]]:
    """Every output of every request, four requests added per step."""
    outputs: dict[str, list[RequestOutput]] = {}
    pending = list(enumerate(jobs))
    while pending or engine.has_unfinished():
        for i, (prompt, adapter) in pending[:4]:
            engine.add_request(prompt, params, request_id=str(i), lora=adapter)
        pending = pending[4:]
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        engine.check_integrity()
    return outputs


def mixed_jobs(paths: dict[str, Path], n: int = 12) -> list[tuple[list[int], str | None]]:
    choices: list[str | None] = [*paths, None]
    jobs = [(p, choices[i % len(choices)]) for i, p in enumerate(random_prompts(n, seed=11))]
    random.Random(1).shuffle(jobs)
    return jobs


@pytest.mark.parametrize("form", ["grouped", "stacked"])
def test_each_cpu_form_matches_peft(
    form: str, llama_adapters: tuple[Path, dict[str, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both CPU forms, forced for every layer, give PEFT's greedy tokens; and the per-token
    gather of the kernel references is never called (it would raise here)."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("per-token weight gather in the CPU LoRA path")

    for module in (lora_layout, lora_shrink, lora_expand):
        monkeypatch.setattr(module, "gather_token_rows", forbidden)
    monkeypatch.setitem(LORA_BACKENDS, "torch", lambda: TorchLora(force_form=form))
    base, paths = llama_adapters
    engine = LLMEngine(EngineConfig.create(base, dtype="float32", max_num_batched_tokens=48))
    for name, path in paths.items():
        engine.load_lora(name, path)
    jobs = mixed_jobs(paths)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    outputs = run_mixed(engine, jobs, params)
    expected = peft_greedy(base, paths, jobs, params.max_tokens)
    for i, (_, adapter) in enumerate(jobs):
        assert outputs[str(i)][-1].token_ids == expected[i], (i, adapter)


def test_one_upload_per_step_and_outputs_are_deltas(
    llama_adapters: tuple[Path, dict[str, Path]],
) -> None:
    base, paths = llama_adapters
    engine = LLMEngine(EngineConfig.create(base, dtype="float32", max_num_batched_tokens=48))
    for name, path in paths.items():
        engine.load_lora(name, path)
    params = SamplingParams(temperature=0.0, max_tokens=10, logprobs=2, prompt_logprobs=1)
    outputs = run_mixed(engine, mixed_jobs(paths, 8), params)
    # One host-to-device copy of the step's metadata per step that ran a forward.
    assert engine.runner.upload.num_copies == engine.num_steps
    for outs in outputs.values():
        final = outs[-1]
        assert final.finished and not any(o.finished for o in outs[:-1])
        assert [t for o in outs for t in o.new_token_ids] == final.token_ids
        assert "".join(o.delta for o in outs) == final.text
        assert [e for o in outs for e in o.new_logprobs or []] == final.logprobs
        assert [o.num_output_tokens for o in outs] == list(range(1, len(outs) + 1))
        # Each step's output carries its own news only: no history, no prompt copy.
        for o in outs[1:-1]:
            assert len(o.new_token_ids) == 1 and o.token_ids == [] and o.text == ""
            assert o.prompt_token_ids is None and o.prompt_logprobs is None
        assert outs[0].prompt_logprobs is not None and final.prompt_logprobs is not None
        assert outs[0].prompt_token_ids == final.prompt_token_ids


def test_penalties_are_counted_incrementally(
    llama_adapters: tuple[Path, dict[str, Path]],
) -> None:
    """The scheduler sends a penalized request's history only on its first chunk after
    admission; the runner keeps the counts. A request preempted halfway (its counts dropped
    and rebuilt from the history it sends again) generates the same tokens."""
    base, _ = llama_adapters
    prompt = random_prompts(1, seed=3)[0]
    params = SamplingParams(temperature=0.0, max_tokens=12, frequency_penalty=1.5)

    def generate(preempt_at: int | None) -> tuple[list[int], list[tuple[int, int]]]:
        engine = LLMEngine(EngineConfig.create(base, dtype="float32"))
        sent: list[tuple[int, int]] = []  # (start_pos, history length) of every chunk
        execute = engine.runner.execute

        def recording(output: SchedulerOutput) -> dict[str, ChunkResult]:
            sent.extend((c.start_pos, len(c.output_token_ids)) for c in output.chunks)
            return execute(output)

        engine.runner.execute = recording  # type: ignore[method-assign]
        engine.add_request(prompt, params, request_id="a")
        final, steps = None, 0
        while engine.has_unfinished():
            if steps == preempt_at:
                engine.scheduler._preempt(engine.scheduler.running[0])
                execute(SchedulerOutput(chunks=[], preempted_ids=["a"], finished_ids=[]))
            for o in engine.step():
                final = o if o.finished else final
            steps += 1
        assert final is not None and len(final.token_ids) == 12
        return final.token_ids, sent

    tokens, sent = generate(None)
    assert all(history == 0 for _, history in sent)
    preempted, sent = generate(6)
    assert preempted == tokens
    assert [history for start, history in sent if start == 0] == [0, 6]  # resent once
    assert all(history == 0 for start, history in sent if start > 0)
