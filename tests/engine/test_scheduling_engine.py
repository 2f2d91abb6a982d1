"""Scheduling policies in the engine: they change the order, never the tokens; ``max_loras``
caps the adapters of every batch without failing a request."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.errors import AdapterError
from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from engine.scheduler_output import SchedulerOutput
from tests.tiny_models import write_random_adapter

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
ATTN = {"q_proj": (64, 64), "k_proj": (64, 16), "v_proj": (64, 16), "o_proj": (64, 64)}
MLP = {"gate_proj": (64, 160), "up_proj": (64, 160), "down_proj": (160, 64)}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("sched-adapters")
    return [
        write_random_adapter(
            root / f"a{i}", ATTN if i % 2 else {**ATTN, **MLP}, 2, r=r, alpha=16, seed=i
        )
        for i, r in enumerate((2, 8, 4, 16, 1, 6))
    ]


def jobs() -> list[tuple[str, str | None, list[int], int]]:
    """(request id, adapter, prompt, priority): every adapter and the base, mixed."""
    out = []
    for i in range(14):
        lora = None if i % 7 == 6 else f"a{i % 6}"
        prompt = [3 + (i * 5 + j) % 90 for j in range(6 + (i * 3) % 11)]
        out.append((f"r{i}", lora, prompt, i % 3))
    return out


def run(
    engine: LLMEngine, paths: list[Path], todo: list[tuple[str, str | None, list[int], int]]
) -> tuple[dict[str, list[int]], list[SchedulerOutput]]:
    for i, path in enumerate(paths):
        engine.load_lora(f"a{i}", path)
    steps: list[SchedulerOutput] = []
    execute = engine.runner.execute

    def record(output: SchedulerOutput):  # type: ignore[no-untyped-def]
        steps.append(output)
        return execute(output)

    engine.runner.execute = record  # type: ignore[method-assign]
    priority_ok = engine.config.scheduler.policy == "priority"
    for rid, lora, prompt, priority in todo:
        engine.add_request(
            prompt, GREEDY, request_id=rid, lora=lora, priority=priority if priority_ok else 0
        )
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                assert out.finish_reason == "length", out.error
                done[out.request_id] = out.token_ids
        engine.check_integrity()
    return done, steps


@pytest.fixture(scope="module")
def solo(llama_dir: Path, adapters: list[Path]) -> dict[str, list[int]]:
    """Each request alone through an engine."""
    engine = LLMEngine(EngineConfig.create(llama_dir, dtype="float32", scheduling_policy="fcfs"))
    out = {}
    for job in jobs():
        done, _ = run(engine, adapters if not out else [], [job])
        out.update(done)
    return out


@pytest.mark.parametrize("policy", ["fcfs", "fair", "priority"])
def test_policies_change_the_order_never_the_tokens(
    llama_dir: Path, adapters: list[Path], solo: dict[str, list[int]], policy: str
) -> None:
    # A pool that holds about three requests beside the adapters: preemptions happen.
    config = EngineConfig.create(
        llama_dir, dtype="float32", num_pages=500, max_num_seqs=6, scheduling_policy=policy
    )
    engine = LLMEngine(config)
    done, _ = run(engine, adapters, jobs())
    assert done == solo
    assert engine.scheduler.num_preemptions > 0


def test_max_loras_caps_every_batch_and_fails_nothing(
    llama_dir: Path, adapters: list[Path], solo: dict[str, list[int]]
) -> None:
    config = EngineConfig.create(llama_dir, dtype="float32", max_loras=2)
    engine = LLMEngine(config)
    done, steps = run(engine, adapters, jobs())
    assert done == solo
    per_step = [{s for c in out.chunks for s in c.adapter_slots} for out in steps]
    assert max(len(slots) for slots in per_step) == 2
    # Without the cap the first step runs every adapter at once.
    uncapped = LLMEngine(EngineConfig.create(llama_dir, dtype="float32"))
    _, steps = run(uncapped, adapters, jobs())
    assert len({s for c in steps[0].chunks for s in c.adapter_slots}) == 6


def test_max_loras_counts_each_part_of_a_mixture(llama_dir: Path, adapters: list[Path]) -> None:
    engine = LLMEngine(EngineConfig.create(llama_dir, dtype="float32", max_loras=2))
    for i, path in enumerate(adapters[:3]):
        engine.load_lora(f"a{i}", path)
    engine.register_mixture("mix", [("a0", 0.5), ("a1", 0.5)])
    for i, lora in enumerate(["a2", "mix", "a0", "a2"]):
        engine.add_request([5, 6, 7, 8], GREEDY, request_id=f"q{i}", lora=lora)
    seen: list[set[int]] = []
    execute = engine.runner.execute

    def record(output: SchedulerOutput):  # type: ignore[no-untyped-def]
        seen.append({s for c in output.chunks for s in c.adapter_slots})
        return execute(output)

    engine.runner.execute = record  # type: ignore[method-assign]
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None
    assert max(len(s) for s in seen) == 2


def test_a_mixture_larger_than_a_batch_is_refused(llama_dir: Path, adapters: list[Path]) -> None:
    engine = LLMEngine(EngineConfig.create(llama_dir, dtype="float32", max_loras=2))
    for i, path in enumerate(adapters[:3]):
        engine.load_lora(f"a{i}", path)
    with pytest.raises(AdapterError, match="exceeds the 2 one batch may hold"):
        engine.register_mixture("mix", [("a0", 1.0), ("a1", 1.0), ("a2", 1.0)])
