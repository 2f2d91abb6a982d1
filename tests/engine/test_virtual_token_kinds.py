"""Prompt and prefix tuning served beside LoRA, DoRA, IA³ and the base model equal PEFT.

Every request runs in one engine (prefix caching on, the default) and must produce the
greedy tokens of PEFT's own forward for the same prompt alone (``peft_forward_greedy``:
PEFT's ``generate`` is wrong for these kinds). The pool is audited after every step: a
prefix-tuned adapter's key/value pages stay the adapter's, never the KV cache's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from engine.request import Request
from engine.virtual_tokens import prefix_pages
from tests.engine.test_generation import random_prompts
from tests.peft_kinds import make_kind_adapter, peft_forward_greedy, peft_logits
from tests.tiny_models import make_adapter

KINDS: dict[str, dict[str, Any]] = {
    "prompt": {"kind": "prompt_tuning", "num_virtual_tokens": 5},
    "prefix": {"kind": "prefix_tuning", "num_virtual_tokens": 4},
    "prefix-projected": {"kind": "prefix_tuning", "num_virtual_tokens": 6,
                         "prefix_projection": True},
    "dora": {"kind": "dora", "r": 4, "targets": ["q_proj", "v_proj", "down_proj"]},
    "ia3": {"kind": "ia3"},
}  # fmt: skip
VIRTUAL = ("prompt", "prefix", "prefix-projected")
NUM_PAGES = 160  # preempts prompt- and prefix-tuned requests (fcfs: the newest)
SHARED = list(range(40, 60))  # a 20-token start several prompts share (a cached block)


def make_adapters(base: Path, root: Path, names: list[str]) -> dict[str, Path]:
    paths = {
        name: make_kind_adapter(base, root / name, seed=i, **KINDS[name])
        for i, name in enumerate(names)
        if name in KINDS
    }
    if "lora" in names:
        paths["lora"] = make_adapter(
            base, root / "lora", r=8, alpha=16, targets="all-linear", seed=9
        )
    return paths


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def family(
    request: pytest.FixtureRequest,
    model_dirs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[str, Path, dict[str, Path]]:
    base = model_dirs[request.param]
    root = tmp_path_factory.mktemp(f"virtual-{request.param}")
    return request.param, base, make_adapters(base, root, [*KINDS, "lora"])


def adapter_dir(paths: dict[str, Path], name: str | None) -> Path | None:
    return None if name is None else paths[name]


def jobs_for(names: list[str | None], seed: int) -> list[tuple[list[int], str | None]]:
    """Mixed prompts. Each virtual-token adapter gets two prompts starting with the same 20
    tokens, the second queued after the others' first (so it can reuse the first's cached
    block under that adapter's identity), and a one-token prompt."""
    prompts = random_prompts(2 * len(names), seed=seed)
    first: list[tuple[list[int], str | None]] = []
    later: list[tuple[list[int], str | None]] = []
    for i, name in enumerate(names):
        if name in VIRTUAL:
            first.append((SHARED + prompts[2 * i][:6], name))
            later += [([3 + i], name), (SHARED + prompts[2 * i + 1][:3], name)]
        else:
            first.append((prompts[2 * i], name))
            later.append((prompts[2 * i + 1], name))
    return first + later


def run(
    engine: LLMEngine,
    paths: dict[str, Path],
    jobs: list[tuple[list[int], str | None]],
    params: SamplingParams,
    join_per_step: int = 3,
) -> dict[str, Any]:
    """Every job in one engine, a few joining per step; after each step the pool's books
    are checked and no prefix page is held by the KV cache or a cached block."""
    for name, path in paths.items():
        engine.load_lora(name, path)
    pending = list(enumerate(jobs))
    done: dict[str, Any] = {}
    while pending or engine.has_unfinished():
        for i, (prompt, adapter) in pending[:join_per_step]:
            engine.add_request(prompt, params, request_id=str(i), lora=adapter)
        pending = pending[join_per_step:]
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.check_integrity()
        assert not adapter_prefix_pages(engine) & set(engine.kv_cache_manager.held_pages())
    return done


def adapter_prefix_pages(engine: LLMEngine) -> set[int]:
    """Every page of a resident prefix-tuned adapter's keys and values."""
    tables = engine.adapters.residency.tables
    pages: set[int] = set()
    for slot, blocks in enumerate(tables.blocks):
        if "prefix" in blocks:
            k, v = prefix_pages(tables, slot)
            pages.update(k + v)
    return pages


def test_mixed_batches_under_preemption_match_peft(
    family: tuple[str, Path, dict[str, Path]],
) -> None:
    """Prompt- and prefix-tuned requests beside LoRA, DoRA, IA³ and base requests, in a pool
    small enough to preempt and evict, with prefix caching; llama's decode-only steps also
    take the static (graph) path."""
    name, base, paths = family
    jobs = jobs_for([*VIRTUAL, "lora", "dora", "ia3", None], seed=11)
    expected = [peft_forward_greedy(base, adapter_dir(paths, a), p, 5) for p, a in jobs]
    graph_mode = "static" if name == "llama" else None
    config = EngineConfig.create(
        base, dtype="float32", num_pages=1100, max_num_batched_tokens=48, graph_mode=graph_mode
    )
    engine = LLMEngine(config)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    done = run(engine, paths, jobs, params, join_per_step=4)
    got = [done[str(i)].token_ids for i in range(len(jobs))]
    assert got == expected
    for i, (prompt, _) in enumerate(jobs):  # usage: the request's own tokens only
        out = done[str(i)]
        assert out.num_prompt_tokens == len(prompt) and out.prompt_token_ids == prompt
        assert 0 <= out.num_cached_tokens < len(prompt)
    stats = engine.stats()
    assert stats.num_preemptions > 0 and stats.adapter_evictions > 0
    assert stats.prefix_cache_hits > 0
    # the second shared start reused the first's block: 16 positions, less the prompt-tuned
    # adapter's 5 placeholders (never counted as the request's own cached tokens)
    for adapter, cached in (("prompt", 11), ("prefix", 16), ("prefix-projected", 16)):
        i = max(i for i, (p, a) in enumerate(jobs) if a == adapter and p[:20] == SHARED)
        assert done[str(i)].num_cached_tokens == cached, adapter
    # every virtual kind changed what the base model says
    for adapter in VIRTUAL:
        rows = [i for i, (_, a) in enumerate(jobs) if a == adapter]
        base_tokens = [peft_forward_greedy(base, None, jobs[i][0], 5) for i in rows]
        assert [got[i] for i in rows] != base_tokens, adapter


def test_virtual_kinds_survive_preemption(family: tuple[str, Path, dict[str, Path]]) -> None:
    """A pool too small for every request at once: prompt- and prefix-tuned requests are
    preempted and recompute only their own tokens (a prompt-tuned one its placeholders
    too), picking up their adapter's pages wherever it is placed again."""
    _, base, paths = family
    paths = {name: paths[name] for name in VIRTUAL}
    jobs = jobs_for([*VIRTUAL, None], seed=17)
    expected = [peft_forward_greedy(base, adapter_dir(paths, a), p, 6) for p, a in jobs]
    config = EngineConfig.create(
        base, dtype="float32", num_pages=NUM_PAGES, max_num_batched_tokens=64,
        scheduling_policy="fcfs",
    )  # fmt: skip
    engine = LLMEngine(config)
    preempted: set[str | None] = set()  # the adapters of preempted requests
    preempt = engine.scheduler._preempt

    def record(request: Request) -> None:
        preempted.add(None if request.adapter is None else request.adapter.name)
        preempt(request)

    engine.scheduler._preempt = record  # type: ignore[method-assign]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    done = run(engine, paths, jobs, params, join_per_step=len(jobs))
    assert [done[str(i)].token_ids for i in range(len(jobs))] == expected
    assert "prompt" in preempted and preempted & {"prefix", "prefix-projected"}


def test_prefix_pages_stay_the_adapters(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Requests on a prefix-tuned adapter share its pages by reference: the KV cache takes
    pages for their own tokens only, the adapter keeps its pages after they finish, and
    unloading it returns every one of them."""
    base = model_dirs["qwen2"]
    paths = make_adapters(base, tmp_path, ["prefix"])
    engine = LLMEngine(EngineConfig.create(base, dtype="float32", num_pages=400))
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    engine.load_lora("prefix", paths["prefix"])
    free = engine.pool.num_free
    jobs = [([*SHARED, 7], "prefix"), ([*SHARED, 9, 10], "prefix")]
    engine.add_request(jobs[0][0], params, request_id="a", lora="prefix")
    engine.step()  # placed, and "a" prefilled
    pages = adapter_prefix_pages(engine)
    entry = engine.adapters.get("prefix")
    assert len(pages) == 2 * 4 == entry.pages  # one page per key and per value
    assert pages <= set(engine.adapters.residency.held_pages())
    # "a": 21 own tokens (its 4 prefix positions take no KV page)
    assert engine.pool.num_free == free - entry.pages - 2 * 21
    engine.add_request(jobs[1][0], params, request_id="b", lora="prefix")
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        engine.check_integrity()
        assert adapter_prefix_pages(engine) == pages
        assert not pages & set(engine.kv_cache_manager.held_pages())
    assert done["b"] == peft_forward_greedy(base, paths["prefix"], jobs[1][0], 3)
    assert engine.stats().prefix_cache_hits == 16  # "b" reused "a"'s first block
    engine.unload_lora("prefix")
    engine.step()
    engine.check_integrity()
    assert not pages & set(engine.adapters.residency.held_pages())


def test_prompt_logprobs_and_usage_leave_out_the_placeholders(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """A prompt-tuned request's prompt log-probabilities are its own tokens' (the first
    None), each equal to PEFT's at that token; the placeholders never show."""
    base = model_dirs["llama"]
    paths = make_adapters(base, tmp_path, ["prompt"])
    engine = LLMEngine(EngineConfig.create(base, dtype="float32", max_num_batched_tokens=8))
    engine.load_lora("prompt", paths["prompt"])
    prompt = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]  # in chunks of 8 with 5 virtual
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1, ignore_eos=True)
    engine.add_request(prompt, params, request_id="r", lora="prompt")
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
        engine.check_integrity()
    last = outs[-1]
    assert last.prompt_token_ids == prompt and last.num_prompt_tokens == len(prompt)
    assert last.prompt_logprobs is not None and len(last.prompt_logprobs) == len(prompt)
    assert last.prompt_logprobs[0] is None
    for k in range(1, len(prompt)):
        want = torch.log_softmax(peft_logits(base, paths["prompt"], prompt[:k]), -1)[prompt[k]]
        entry = last.prompt_logprobs[k]
        assert entry is not None and entry.token_id == prompt[k]
        assert entry.logprob == pytest.approx(float(want), abs=1e-4)
    assert last.token_ids == peft_forward_greedy(base, paths["prompt"], prompt, 2)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_virtual_tokens_count_against_the_context(
    model_dirs: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    base = model_dirs["llama"]
    paths = make_adapters(base, tmp_path, [kind])
    engine = LLMEngine(EngineConfig.create(base, dtype="float32", max_model_len=64))
    engine.load_lora(kind, paths[kind])
    n = KINDS[kind]["num_virtual_tokens"]
    engine.add_request([5] * 40, SamplingParams(max_tokens=64 - 40 - n), lora=kind)
    with pytest.raises(ValueError) as info:
        engine.add_request([5] * 40, SamplingParams(max_tokens=64 - 40), lora=kind)
    assert str(info.value) == (
        f"prompt (40 tokens) + the adapter's virtual tokens ({n}) + max_tokens (24) = {64 + n} "
        "exceeds the context length 64"
    )


def test_an_nf4_base_matches_peft_on_the_dequantized_model(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from tests.engine.test_nf4_model import bitsandbytes_dequantized, save_with_bitsandbytes

    base = model_dirs["qwen2"]
    quantized = save_with_bitsandbytes(base, tmp_path / "bnb")
    oracle = bitsandbytes_dequantized(quantized, tmp_path / "oracle")
    paths = make_adapters(base, tmp_path, ["prompt", "prefix", "lora"])
    jobs = jobs_for(["prompt", "prefix", "lora", None], seed=13)[::2]
    expected = [peft_forward_greedy(oracle, adapter_dir(paths, a), p, 4) for p, a in jobs]
    engine = LLMEngine(EngineConfig.create(quantized, dtype="float32"))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    done = run(engine, paths, jobs, params)
    assert [done[str(i)].token_ids for i in range(len(jobs))] == expected
