"""Tensor parallelism on the CPU: two gloo workers on loopback against one device and PEFT.

A mixed-adapter batch (ranks 1 to 64, rank and alpha patterns, rsLoRA, base requests) gives
the same greedy tokens with the model split across two workers as on one device and as each
request alone through transformers + PEFT, on a float base (Llama and Qwen2 with GQA) and on
a bitsandbytes NF4 checkpoint; adapters load, mix and unload while requests run. Each
worker holds half of every adapter (counted: the elements it wrote, its page width).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.errors import AdapterError
from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from engine.page_pool import Tenant
from tests.engine.test_generation import random_prompts
from tests.engine.test_multilora import ADAPTERS, peft_greedy
from tests.tiny_models import make_adapter, make_model

pytestmark = pytest.mark.slow

# Every partitioned dimension splits in two, GQA 2:1; 64-value NF4 blocks stay whole in each
# worker's part (o's 128 inputs, down's 256, split in two).
SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
PARAMS = SamplingParams(temperature=0.0, max_tokens=6)


def make_adapters(base: Path, root: Path) -> dict[str, Path]:
    return {
        name: make_adapter(base, root / name, seed=i, std=0.3 / spec["r"] ** 0.25, **spec)
        for i, (name, spec) in enumerate(ADAPTERS.items())
    }


def jobs_for(paths: dict[str, Path], n: int, seed: int) -> list[tuple[list[int], str | None]]:
    choices: list[str | None] = [*paths, None]
    return [(p, choices[i % len(choices)]) for i, p in enumerate(random_prompts(n, seed=seed))]


def run(engine: LLMEngine, jobs: list[tuple[list[int], str | None]]) -> list[list[int]]:
    """Every job in one stream of steps, four admitted at a time."""
    pending = list(enumerate(jobs))
    done: dict[str, list[int]] = {}
    while pending or engine.has_unfinished():
        for i, (prompt, adapter) in pending[:4]:
            engine.add_request(prompt, PARAMS, request_id=str(i), lora=adapter)
        pending = pending[4:]
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        engine.check_integrity()
    return [done[str(i)] for i in range(len(jobs))]


def engine_for(base: Path, size: int, paths: dict[str, Path]) -> LLMEngine:
    config = EngineConfig.create(
        base, dtype="float32", max_num_batched_tokens=48, tensor_parallel_size=size
    )
    engine = LLMEngine(config)
    for name, path in paths.items():
        engine.load_lora(name, path)
    return engine


@pytest.fixture(scope="module")
def split() -> Iterator[list[LLMEngine]]:
    """Engines to shut down at the module's end (their workers are processes)."""
    engines: list[LLMEngine] = []
    yield engines
    for engine in engines:
        engine.shutdown()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_split_in_two_matches_one_device_and_peft(
    family: str, tmp_path: Path, split: list[LLMEngine]
) -> None:
    # Qwen2's vocabulary does not split in two: the last worker's part is padded.
    vocab = {"vocab_size": 321} if family == "qwen2" else {}
    base = make_model(tmp_path / "base", family, **SHAPE, **vocab)
    paths = make_adapters(base, tmp_path)
    jobs = jobs_for(paths, 12, seed=5)
    one = engine_for(base, 1, paths)
    two = engine_for(base, 2, paths)
    split.append(two)
    expected = peft_greedy(base, paths, jobs, PARAMS.max_tokens)
    assert run(one, jobs) == expected
    assert run(two, jobs) == expected

    # Each worker holds half of every resident adapter: the same pages as one device (the
    # tables are shared), each half as wide, holding half the elements.
    assert two.executor is not None
    reports = two.executor.worker_reports()
    one_page_bytes = one.pool.page_bytes
    assert one.pool.num_used(Tenant.ADAPTER) == two.pool.num_used(Tenant.ADAPTER) > 0
    whole = adapter_elements(paths, one)
    for report in reports:
        assert report.page_bytes * 2 == one_page_bytes
        assert report.adapter_elements * 2 == whole
        # One all-reduce of the rank-sized intermediate per LoRA pass and layer group, one
        # after o and one after down, one for the embeddings; one all-gather of the logits.
        assert report.collective_calls["all_gather"] == two.num_steps
    assert reports[0].collective_elements == reports[1].collective_elements
    # The weights: half each (norms are whole on both, so a little over).
    assert 0.5 < reports[0].weights.base_bytes / one.weights.base_bytes < 0.52


def adapter_elements(paths: dict[str, Path], engine: LLMEngine) -> int:
    """Every element of the A and B matrices the engine placed, on one device."""
    total = 0
    for name in paths:
        weights = engine.adapters.weights_of(engine.adapters.registry.get(name))
        total += sum(m.lora_a.numel() + m.lora_b.numel() for m in weights.modules.values())
    return total


def test_an_nf4_base_split_in_two_matches_one_device_and_peft(
    tmp_path: Path, split: list[LLMEngine]
) -> None:
    from tests.engine.test_nf4_model import bitsandbytes_dequantized, save_with_bitsandbytes

    base = make_model(tmp_path / "base", "llama", **SHAPE)
    quantized = save_with_bitsandbytes(base, tmp_path / "bnb")
    oracle = bitsandbytes_dequantized(quantized, tmp_path / "oracle")
    names = ["r1-qv", "r8-all", "r16-rslora", "patterned"]
    paths = {n: p for n, p in make_adapters(base, tmp_path).items() if n in names}
    jobs = jobs_for(paths, 6, seed=7)
    two = engine_for(quantized, 2, paths)
    split.append(two)
    assert two.weights.quantized_params > 0  # served in NF4 by both workers
    expected = peft_greedy(oracle, paths, jobs, PARAMS.max_tokens)
    assert run(engine_for(quantized, 1, paths), jobs) == expected
    assert run(two, jobs) == expected


def test_adapters_load_mix_and_unload_while_requests_run(
    tmp_path: Path, split: list[LLMEngine]
) -> None:
    base = make_model(tmp_path / "base", "qwen2", **SHAPE)
    paths = make_adapters(base, tmp_path)
    first = {n: paths[n] for n in ("r4-attn", "r3-mlp")}
    later = {n: paths[n] for n in ("r64", "patterned")}
    one = engine_for(base, 1, paths)
    one.register_mixture("mix", [("r4-attn", 0.7), ("r64", -0.4)])
    two = engine_for(base, 2, first)
    split.append(two)
    prompts = random_prompts(8, seed=11)
    expected = {}
    for i, p in enumerate(prompts):
        expected[str(i)] = run(one, [(p, ("r4-attn", "r3-mlp", "r64", "patterned", "mix")[i % 5])])
    # Traffic on the first two; the others are loaded, and a mixture registered, meanwhile.
    done: dict[str, list[int]] = {}
    for i in (0, 1, 5, 6):
        two.add_request(prompts[i], PARAMS, request_id=str(i), lora=("r4-attn", "r3-mlp")[i % 5])
    for step in range(40):
        if step == 2:
            for name, path in later.items():
                two.load_lora(name, path)
            two.register_mixture("mix", [("r4-attn", 0.7), ("r64", -0.4)])
            for i in (2, 3, 4, 7):
                lora = ("r4-attn", "r3-mlp", "r64", "patterned", "mix")[i % 5]
                two.add_request(prompts[i], PARAMS, request_id=str(i), lora=lora)
        for out in two.step():
            if out.finished:
                done[out.request_id] = [out.token_ids]
        if not two.has_unfinished():
            break
    assert done == expected
    two.unload_lora("patterned")
    two.step()
    with pytest.raises(AdapterError):
        two.add_request(prompts[0], PARAMS, lora="patterned")
    two.check_integrity()


def test_refuses_a_split_the_model_cannot_take(tmp_path: Path) -> None:
    base = make_model(tmp_path / "base", "llama", **SHAPE)
    with pytest.raises(ValueError, match="must divide the model's num_key_value_heads"):
        EngineConfig.create(base, tensor_parallel_size=4)
    narrow = make_model(tmp_path / "narrow", "llama")  # o's 64 inputs: halves of 32
    with pytest.raises(ValueError, match="not whole 64-value blocks"):
        EngineConfig.create(narrow, quantization="nf4", tensor_parallel_size=2)


def test_adapters_beyond_lora_are_refused_when_split(
    tmp_path: Path, split: list[LLMEngine]
) -> None:
    from tests.peft_kinds import make_kind_adapter

    base = make_model(tmp_path / "base", "llama", **SHAPE)
    dora = make_kind_adapter(base, tmp_path / "dora", "dora", seed=0)
    engine = engine_for(base, 2, {})
    split.append(engine)
    with pytest.raises(AdapterError, match="tensor-parallel"):
        engine.load_lora("dora", dora)
