"""Tensor parallelism on the CPU: two gloo workers on loopback against one device and PEFT.

A mixed-adapter batch (ranks 1 to 64, rank and alpha patterns, rsLoRA, base requests) gives
the same greedy tokens with the model split across two workers as on one device and as each
request alone through transformers + PEFT, on a float base (Llama and Qwen2 with GQA) and on
a bitsandbytes NF4 checkpoint. Seeded sampling, log-probabilities, preemption and adapter
eviction give what one device gives; adapters load, mix and unload from another thread while
requests run. Each worker holds half of every adapter, and runs the collectives the
partition says (counted). A worker that fails, or dies in the middle of a step, ends the
engine at once; nothing is left running. The tests of one family share its engines, in file
order: the last one ends them.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapters.errors import AdapterError
from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from engine.outputs import RequestOutput
from engine.page_pool import Tenant
from engine.parallel.executor import WorkerDied
from engine.scheduler_output import ScheduledChunk, SchedulerOutput
from tests.engine.test_generation import random_prompts
from tests.engine.test_multilora import ADAPTERS, peft_greedy
from tests.tiny_models import make_adapter, make_model

pytestmark = pytest.mark.slow

# Every split dimension halves, GQA 2:1; 64-value NF4 blocks stay whole in each worker's
# part (the hidden size's rows; o's 128 inputs and down's 256, halved).
SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
LAYERS = 2
GREEDY = SamplingParams(temperature=0.0, max_tokens=6)
Jobs = list[tuple[list[int], str | None]]


def make_adapters(
    base: Path, root: Path, names: tuple[str, ...] = tuple(ADAPTERS)
) -> dict[str, Path]:
    return {
        name: make_adapter(base, root / name, seed=i, std=0.3 / spec["r"] ** 0.25, **spec)
        for i, (name, spec) in enumerate(ADAPTERS.items())
        if name in names
    }


def jobs_for(paths: dict[str, Path], n: int, seed: int) -> Jobs:
    choices: list[str | None] = [*paths, None]
    return [(p, choices[i % len(choices)]) for i, p in enumerate(random_prompts(n, seed=seed))]


def run(engine: LLMEngine, jobs: Jobs, params: SamplingParams = GREEDY) -> list[RequestOutput]:
    """Every job in one stream of steps, four admitted at a time; each one's final output."""
    pending = list(enumerate(jobs))
    done: dict[str, RequestOutput] = {}
    while pending or engine.has_unfinished():
        for i, (prompt, adapter) in pending[:4]:
            engine.add_request(prompt, params, request_id=str(i), lora=adapter)
        pending = pending[4:]
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.check_integrity()
    return [done[str(i)] for i in range(len(jobs))]


def tokens(outputs: list[RequestOutput]) -> list[list[int]]:
    return [out.token_ids for out in outputs]


def engine_for(base: Path, size: int, paths: dict[str, Path], **config: int) -> LLMEngine:
    engine = LLMEngine(
        EngineConfig.create(
            base, dtype="float32", max_num_batched_tokens=48, tensor_parallel_size=size, **config
        )
    )
    try:
        for name, path in paths.items():
            engine.load_lora(name, path)
    except BaseException:
        engine.shutdown()
        raise
    return engine


@dataclass
class Family:
    """A tiny model, every adapter of ``ADAPTERS``, and engines on one device and on two."""

    base: Path
    paths: dict[str, Path]
    one: LLMEngine
    two: LLMEngine


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def family(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Family]:
    tmp = tmp_path_factory.mktemp(f"tp-{request.param}")
    # Qwen2's vocabulary does not split in two: the last worker's part is padded.
    vocab = {"vocab_size": 321} if request.param == "qwen2" else {}
    base = make_model(tmp / "base", request.param, num_layers=LAYERS, **SHAPE, **vocab)
    paths = make_adapters(base, tmp)
    one = engine_for(base, 1, paths)
    two = engine_for(base, 2, paths)
    yield Family(base, paths, one, two)
    two.shutdown()
    assert two.executor is not None and not two.executor.procs


def test_split_in_two_matches_one_device_and_peft(family: Family) -> None:
    jobs = jobs_for(family.paths, 12, seed=5)
    expected = peft_greedy(family.base, family.paths, jobs, GREEDY.max_tokens)
    assert tokens(run(family.one, jobs)) == expected
    assert tokens(run(family.two, jobs)) == expected

    # Each worker holds half of every resident adapter: the same pages as one device (the
    # tables are shared), each half as wide, holding half the elements.
    two = family.two
    assert two.executor is not None
    before = two.executor.worker_reports()
    assert family.one.pool.num_used(Tenant.ADAPTER) == two.pool.num_used(Tenant.ADAPTER) > 0
    whole = adapter_elements(family.one, family.paths)
    for report in before:
        assert report.page_bytes * 2 == family.one.pool.page_bytes
        assert report.adapter_elements * 2 == whole
    assert before[0].collectives.keys() == before[1].collectives.keys()
    # The weights: half each (the norms are whole on both, so a little over).
    assert 0.5 < before[0].weights.base_bytes / family.one.weights.base_bytes < 0.52

    # The collectives the partition says: per forward one all-reduce of the embeddings, two
    # per layer (after o and down), one all-gather of the logits where a row samples, and
    # LoRA's only where an adapter touches a layer: none for base requests.
    run(two, [(p, None) for p in random_prompts(3, seed=2)])
    after = two.executor.worker_reports()
    calls = {
        k: after[0].collectives[k][0] - before[0].collectives[k][0] for k in after[0].collectives
    }
    forwards = calls["all_reduce:embedding"]
    assert forwards > 0 and calls["all_reduce"] == 2 * LAYERS * forwards
    assert 0 < calls["all_gather"] <= forwards and calls["all_reduce:lora"] == 0


def adapter_elements(engine: LLMEngine, paths: dict[str, Path]) -> int:
    """Every element of the A and B matrices the engine placed, on one device."""
    total = 0
    for name in paths:
        weights = engine.adapters.weights_of(engine.adapters.registry.get(name))
        total += sum(m.lora_a.numel() + m.lora_b.numel() for m in weights.modules.values())
    return total


def test_adapters_load_mix_and_unload_while_requests_run(family: Family) -> None:
    one, two = family.one, family.two
    late = ("r64", "patterned")
    for name in late:
        two.unload_lora(name)
    two.step()
    one.register_mixture("mix", [("r4-attn", 0.7), ("r64", -0.4)])
    order = ("r4-attn", "r3-mlp", "r64", "patterned", "mix")
    prompts = random_prompts(8, seed=11)
    jobs: Jobs = [(p, order[i % 5]) for i, p in enumerate(prompts)]
    expected = tokens(run(one, jobs))
    # Requests on the first two adapters; the others are loaded, and a mixture registered,
    # by another thread while the engine steps; their requests follow.
    for i in (0, 1, 5, 6):
        two.add_request(prompts[i], GREEDY, request_id=str(i), lora=order[i % 5])

    def hot_load() -> None:
        for name in late:
            two.load_lora(name, family.paths[name])
        two.register_mixture("mix", [("r4-attn", 0.7), ("r64", -0.4)])
        for i in (2, 3, 4, 7):
            two.add_request(prompts[i], GREEDY, request_id=str(i), lora=order[i % 5])

    loader = threading.Thread(target=hot_load)
    loader.start()
    done: dict[str, list[int]] = {}
    while len(done) < len(jobs):
        for out in two.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    loader.join()
    assert [done[str(i)] for i in range(len(jobs))] == expected
    two.unload_lora("mix")
    two.step()
    with pytest.raises(AdapterError):
        two.add_request(prompts[0], GREEDY, lora="mix")
    two.check_integrity()


def test_adapters_beyond_lora_are_refused_when_split(family: Family, tmp_path: Path) -> None:
    from tests.peft_kinds import make_kind_adapter

    dora = make_kind_adapter(family.base, tmp_path / "dora", "dora", seed=0)
    with pytest.raises(AdapterError, match="tensor-parallel"):
        family.two.load_lora("dora", dora)


def test_an_nf4_base_split_in_two_matches_one_device_and_peft(tmp_path: Path) -> None:
    """On a bitsandbytes NF4 checkpoint, and a pool too small for every request and adapter at
    once (requests are preempted, adapters evicted and placed again): greedy tokens equal
    PEFT's on the dequantized model; seeded sampling and log-probabilities equal one
    device's."""
    from tests.engine.test_nf4_model import bitsandbytes_dequantized, save_with_bitsandbytes

    base = make_model(tmp_path / "base", "llama", num_layers=LAYERS, **SHAPE)
    quantized = save_with_bitsandbytes(base, tmp_path / "bnb")
    oracle = bitsandbytes_dequantized(quantized, tmp_path / "oracle")
    paths = make_adapters(base, tmp_path, ("r1-qv", "r16-rslora", "r64", "patterned"))
    greedy = jobs_for(paths, 6, seed=7)
    expected = peft_greedy(oracle, paths, greedy, GREEDY.max_tokens)
    sampled = jobs_for(paths, 10, seed=4)
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=12, logprobs=2, prompt_logprobs=1)
    outputs = []
    for size in (1, 2):
        engine = engine_for(quantized, size, paths, num_pages=2600, max_num_seqs=8)
        try:
            assert engine.weights.quantized_params > 0  # served in NF4 (by both workers)
            assert tokens(run(engine, greedy)) == expected
            outputs.append(run(engine, sampled, params))
            stats = engine.stats()
            assert stats.num_preemptions > 0 and stats.adapter_evictions > 0
        finally:
            engine.shutdown()
    one, two = outputs
    assert tokens(two) == tokens(one)
    for a, b in zip(one, two, strict=True):
        assert a.logprobs is not None and b.logprobs is not None
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.top[0][0] == y.top[0][0] and abs(x.logprob - y.logprob) < 1e-4
        assert a.prompt_logprobs is not None and b.prompt_logprobs is not None
        for x, y in zip(a.prompt_logprobs, b.prompt_logprobs, strict=True):
            assert (x is None) == (y is None)
            assert x is None or y is None or abs(x.logprob - y.logprob) < 1e-4


def test_a_worker_that_fails_ends_the_engine(tmp_path: Path) -> None:
    """A worker raising (a page past its pool): it says why, and every worker is ended."""
    base = make_model(tmp_path / "base", "llama", num_layers=1, **SHAPE)
    engine = engine_for(base, 2, {})
    executor = engine.executor
    assert executor is not None
    procs = list(executor.procs)
    bad = ScheduledChunk("bad", [5], 0, [10**6], [10**6 + 1], True, GREEDY, None)
    with pytest.raises(WorkerDied, match="worker"):
        executor.execute(SchedulerOutput([bad], [], []))
    assert all(p.wait(10) is not None for p in procs)
    with pytest.raises(WorkerDied):
        engine.step()
    engine.shutdown()


def test_a_worker_killed_mid_step_ends_the_step_at_once(family: Family) -> None:
    """The other worker waits for it in a collective: the step still ends (and the family's
    engine with it: this is the last test of each family)."""
    two = family.two
    assert two.executor is not None
    procs = list(two.executor.procs)
    os.kill(procs[1].pid, signal.SIGSTOP)  # it will not reach the step's first collective
    two.add_request([5, 6, 7], GREEDY)
    killer = threading.Timer(1.0, os.kill, (procs[1].pid, signal.SIGKILL))
    killer.start()
    with pytest.raises(WorkerDied, match="worker 1"):
        while True:
            two.step()
    killer.join()
    assert all(p.wait(10) is not None for p in procs)
    # After a shutdown, the engine says so; it never waits for workers that are gone.
    two.shutdown()
    with pytest.raises(WorkerDied):
        two.check_workers()


def test_refuses_a_split_the_model_cannot_take(tmp_path: Path) -> None:
    base = make_model(tmp_path / "base", "llama", num_layers=LAYERS, **SHAPE)
    with pytest.raises(ValueError, match="must divide the model's num_key_value_heads"):
        EngineConfig.create(base, tensor_parallel_size=4)
    narrow = make_model(tmp_path / "narrow", "llama")  # o's 64 inputs: halves of 32
    with pytest.raises(ValueError, match="not whole 64-value blocks"):
        EngineConfig.create(narrow, quantization="nf4", tensor_parallel_size=2)
