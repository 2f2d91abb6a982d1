"""Adapters cycling through the pool, prefetch overlap, and adapter request errors."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from adapters.errors import AdapterError
from adapters.weights import AdapterWeights
from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig, LoraConfig
from engine.page_pool import Tenant
from tests.tiny_models import write_random_adapter

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
# The tiny Llama: hidden 64, 8 heads of 8, 2 KV heads -> page width 16.
ATTN = {"q_proj": (64, 64), "k_proj": (64, 16), "v_proj": (64, 16), "o_proj": (64, 64)}


@pytest.fixture(scope="module")
def many_adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("many")
    return [
        write_random_adapter(root / f"a{i}", ATTN, 2, r=2 + i % 3, alpha=8, seed=i)
        for i in range(200)
    ]


def churn(engine: LLMEngine, adapters: list[Path]) -> dict[str, list[int]]:
    """Two rounds over all adapters (plus base requests), each drained before the next."""
    for i, path in enumerate(adapters):
        engine.load_lora(f"a{i}", path)
    done: dict[str, list[int]] = {}
    for round_ in range(2):
        jobs = [(f"a{i}", [5 + (i + round_) % 50, 6, 7, 8]) for i in range(len(adapters))]
        jobs += [(None, [9, 10, 11 + i]) for i in range(10)]
        pending = list(enumerate(jobs))
        while pending or engine.has_unfinished():
            for i, (lora, prompt) in pending[:6]:
                engine.add_request(prompt, GREEDY, request_id=f"{round_}-{i}", lora=lora)
            pending = pending[6:]
            for out in engine.step():
                if out.finished:
                    assert out.finish_reason == "length", out.error
                    done[out.request_id] = out.token_ids
            engine.check_integrity()
    return done


def test_churn_through_a_small_pool(llama_dir: Path, many_adapters: list[Path]) -> None:
    roomy = LLMEngine(EngineConfig.create(llama_dir, dtype="float32", max_resident_loras=256))
    expected = churn(roomy, many_adapters)
    assert roomy.adapters.residency.num_evicted == 0
    # A rank-r adapter on q, k, v, o takes r * (4 + 4 + 4 + 1 + 4 + 1 + 4 + 4) = 26r pages
    # (A rows of 64 and Bᵀ rows of 64 or 16 elements, 16 to a page): 52 to 104 pages.
    # 1200 pages hold about ten of them beside the KV cache of the running batch.
    config = EngineConfig.create(llama_dir, dtype="float32", num_pages=1200, max_resident_loras=16)
    host_cap = 40 * 12_288  # about 40 parsed adapters (~12 KB each) in host memory
    tight = LLMEngine(
        config.replace(lora=LoraConfig(64, max_resident_loras=16, host_cache_bytes=host_cap))
    )
    got = churn(tight, many_adapters)
    assert got == expected
    residency = tight.adapters.residency
    assert len(residency) <= 16
    assert residency.num_evicted >= 2 * 200 - 16 - 16  # each round evicts nearly all
    assert residency.num_placed == residency.num_evicted + len(residency)
    assert residency.num_placed >= 2 * 200 - 16  # round two reloaded what round one evicted
    stats = tight.adapters.prefetcher.stats
    assert stats.loads >= 200 - 40  # and most of those came back from disk, past the host cap
    assert tight.pool.num_used(Tenant.KV) == tight.kv_cache_manager.num_cached_pages
    assert tight.pool.num_free + tight.kv_cache_manager.num_cached_pages + residency.num_pages == (
        tight.pool.num_pages
    )


def test_prefetch_overlaps_with_running_requests(
    llama_dir: Path, many_adapters: list[Path]
) -> None:
    engine = LLMEngine(EngineConfig.create(llama_dir, dtype="float32"))
    engine.load_lora("fast", many_adapters[0])
    engine.load_lora("slow", many_adapters[1])
    slow = engine.adapters.get("slow")
    engine.adapters.host_cache.drop(slow.id)  # as if evicted from host memory
    gate = threading.Event()
    source = engine.adapters.catalog.source

    def slow_source(path: Path) -> AdapterWeights:
        assert gate.wait(timeout=60)
        return source(path)

    engine.adapters.catalog.source = slow_source
    long_run = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    engine.add_request([5, 6, 7], long_run, request_id="slow", lora="slow")
    engine.add_request([5, 6, 7], long_run, request_id="fast", lora="fast")
    engine.add_request([5, 6, 7], long_run, request_id="base")
    finished = {}
    for _ in range(40):
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    # While the slow adapter was stuck on disk, the others ran to completion.
    assert set(finished) == {"fast", "base"}
    assert engine.num_steps >= 30
    gate.set()
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert len(finished["slow"].token_ids) == 30
    stats = engine.adapters.prefetcher.stats
    assert (stats.loads, engine.scheduler.prefetch_misses) == (1, 1)
    assert engine.scheduler.prefetch_hits == 1  # "fast"; base requests need no adapter


def test_unknown_adapter_is_refused(llama_dir: Path) -> None:
    engine = LLMEngine(EngineConfig.create(llama_dir, dtype="float32"))
    with pytest.raises(AdapterError) as info:
        engine.add_request([5, 6], GREEDY, lora="nope")
    assert info.value.code == "model_not_found"
    assert not engine.has_unfinished()


def test_a_request_that_cannot_fit_beside_its_adapter_is_refused(
    llama_dir: Path, many_adapters: list[Path]
) -> None:
    engine = LLMEngine(EngineConfig.create(llama_dir, dtype="float32", num_pages=160))
    engine.load_lora("a", many_adapters[2])  # rank 4 on the attention: 104 pages
    assert engine.adapters.get("a").pages == 104
    prompt, params = list(range(5, 42)), SamplingParams(temperature=0.0, max_tokens=10)
    with pytest.raises(ValueError, match="beside its adapter's 104"):
        engine.add_request(prompt, params, lora="a")  # 94 pages of KV: it could never run
    engine.add_request(prompt, params)  # the base model has room
    while engine.has_unfinished():
        engine.step()
        engine.check_integrity()


def test_files_changed_since_the_load_fail_only_that_adapters_requests(
    llama_dir: Path, many_adapters: list[Path], tmp_path: Path
) -> None:
    import shutil

    engine = LLMEngine(EngineConfig.create(llama_dir, dtype="float32"))
    path = shutil.copytree(many_adapters[4], tmp_path / "changing")
    engine.load_lora("changing", path)
    engine.adapters.host_cache.drop(engine.adapters.get("changing").id)
    shutil.rmtree(path)
    shutil.copytree(many_adapters[7], path)  # other weights under the same directory
    engine.add_request([5, 6], GREEDY, request_id="c", lora="changing")
    outs = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
        engine.check_integrity()
    assert outs["c"].finish_reason == "abort"
    assert "changed since it was loaded" in (outs["c"].error or "")


def test_deleted_files_fail_only_that_adapters_requests(
    llama_dir: Path, many_adapters: list[Path], tmp_path: Path
) -> None:
    import shutil

    engine = LLMEngine(EngineConfig.create(llama_dir, dtype="float32"))
    doomed = shutil.copytree(many_adapters[2], tmp_path / "doomed")
    engine.load_lora("doomed", doomed)
    engine.load_lora("fine", many_adapters[3])
    engine.adapters.host_cache.drop(engine.adapters.get("doomed").id)
    shutil.rmtree(doomed)
    engine.add_request([5, 6], GREEDY, request_id="d", lora="doomed")
    engine.add_request([5, 6], GREEDY, request_id="f", lora="fine")
    outs = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
        engine.check_integrity()
    assert outs["d"].finish_reason == "abort" and "doomed" in (outs["d"].error or "")
    assert outs["f"].finish_reason == "length"


def test_unload_while_running_finishes_on_the_old_weights(
    llama_dir: Path, many_adapters: list[Path]
) -> None:
    engine = LLMEngine(EngineConfig.create(llama_dir, dtype="float32"))
    engine.load_lora("x", many_adapters[4])
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = LLMEngine(EngineConfig.create(llama_dir, dtype="float32"))
    alone.load_lora("x", many_adapters[4])
    alone.add_request([5, 6, 7], params, request_id="r", lora="x")
    expected = next(o for _ in range(20) for o in alone.step() if o.finished).token_ids

    engine.add_request([5, 6, 7], params, request_id="r", lora="x")
    for _ in range(3):
        engine.step()
    engine.unload_lora("x")
    engine.load_lora("x", many_adapters[5])  # the name is free at once for new weights
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.finished]
        engine.check_integrity()
    assert outs[0].token_ids == expected
    with pytest.raises(AdapterError):
        engine.unload_lora("missing")


def test_unload_on_an_idle_engine_frees_pages_at_the_next_step(
    llama_dir: Path, many_adapters: list[Path]
) -> None:
    engine = LLMEngine(EngineConfig.create(llama_dir, dtype="float32"))
    engine.load_lora("x", many_adapters[6])
    engine.add_request([5, 6], GREEDY, lora="x")
    while engine.has_unfinished():
        engine.step()
    assert engine.pool.num_used(Tenant.ADAPTER) > 0  # stays resident for later requests
    engine.unload_lora("x")
    assert engine.has_unfinished()  # the loop owes one step to apply the unload
    engine.step()
    assert not engine.has_unfinished()
    assert engine.pool.num_free + engine.kv_cache_manager.num_cached_pages == engine.pool.num_pages


def test_an_adapter_in_a_fresh_pool_takes_consecutive_pages(
    llama_dir: Path, many_adapters: list[Path]
) -> None:
    """Allocations come out ascending, so a fresh pool's adapter rows are consecutive pages
    that the CPU LoRA path reads in place (and the table says where they start)."""
    engine = LLMEngine(EngineConfig.create(llama_dir, dtype="float32", num_pages=4096))
    engine.load_lora("a0", many_adapters[0])
    engine.add_request([5, 6, 7], GREEDY, lora="a0")
    while engine.has_unfinished():
        engine.step()
    tables = engine.adapters.residency.tables
    (resident,) = engine.adapters.residency.residents()
    for target in ATTN:
        first = tables.a_first[target][resident.slot]
        rank = int(tables.host_ranks[resident.slot].max())
        assert first >= 0
        pages = tables.a_pages[target][resident.slot, :rank].reshape(-1).tolist()
        assert pages == list(range(first, first + len(pages)))


def test_pinned_adapters_stay_through_the_churn(llama_dir: Path, many_adapters: list[Path]) -> None:
    config = EngineConfig.create(llama_dir, dtype="float32", num_pages=1200, max_model_len=64)
    engine = LLMEngine(config.replace(lora=LoraConfig(64, max_resident_loras=16)))
    pinned = {"p0": many_adapters[0], "p1": many_adapters[1]}
    for name, path in pinned.items():
        engine.load_lora(name, path, pinned=True)
    ids = {engine.adapters.get(name).id for name in pinned}
    residency = engine.adapters.residency
    evicted: list[int] = []
    evict = residency.evict

    def record(adapter_id: int) -> None:
        evicted.append(adapter_id)
        evict(adapter_id)

    residency.evict = record  # type: ignore[method-assign]
    original = engine.step

    def step() -> list:  # type: ignore[type-arg]
        outputs = original()
        assert all(i in residency and residency.get(i).pinned for i in ids)  # type: ignore[union-attr]
        return outputs

    engine.step = step  # type: ignore[method-assign]
    churn(engine, many_adapters[2:])
    engine.add_request([5, 6, 7], GREEDY, request_id="pinned", lora="p0")
    while engine.has_unfinished():
        engine.step()
    assert residency.num_evicted >= 2 * 198 - 16  # the churn went on around the pins
    assert not ids & set(evicted)
    assert engine.stats().pinned_adapters == ["p0", "p1"]
    engine.step = original  # type: ignore[method-assign]
    engine.unload_lora("p0")
    engine.step()
    assert engine.adapters.get("p1").id in residency and set(evicted) & ids == {min(ids)}
    assert engine.stats().pinned_adapters == ["p1"]


def test_pins_that_leave_no_room_for_a_request_are_refused(
    llama_dir: Path, many_adapters: list[Path]
) -> None:
    # 26r pages per adapter of rank r (see above); 64 tokens of context take 128 pages.
    config = EngineConfig.create(llama_dir, dtype="float32", num_pages=400, max_model_len=64)
    engine = LLMEngine(config)
    engine.load_lora("p0", many_adapters[1], pinned=True)  # rank 3: 78 pages
    engine.load_lora("p1", many_adapters[2], pinned=True)  # rank 4: 104 pages
    with pytest.raises(AdapterError) as refused:
        engine.load_lora("p2", many_adapters[5], pinned=True)  # 104 more: past 400 - 128
    assert refused.value.code == "pin_refused"
    assert "pins may take 272 pages" in refused.value.message
    engine.load_lora("p2", many_adapters[5])  # unpinned, it loads
    engine.add_request([5] * 8, GREEDY, request_id="r", lora="p2")
    while engine.has_unfinished():
        engine.step()
    assert set(engine.stats().pinned_adapters) == {"p0", "p1"}
    with pytest.raises(ValueError, match="pinned adapters' 182"):
        # 2 * 60 pages of its own + 104 of its adapter + 182 pinned > 400
        engine.add_request([5] * 56, SamplingParams(max_tokens=4), lora="p2")
    # Unloaded, a pin stops counting at once (its pages go back once nothing uses them):
    # the same request is accepted before the engine has stepped (120 + 104 + 78 <= 400).
    engine.unload_lora("p1")
    engine.add_request([5] * 56, SamplingParams(max_tokens=4), request_id="fits", lora="p2")
    while engine.has_unfinished():
        engine.step()
    engine.check_integrity()
