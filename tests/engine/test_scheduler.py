"""The scheduler's decisions, counted: token budget, chunking, admission, preemption."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig, SchedulerConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache_manager import KVCacheManager
from engine.page_pool import PagePool
from engine.request import Request
from engine.scheduler import Scheduler
from engine.scheduler_output import ChunkResult
from tests.engine.conftest import adapter_manager
from tests.tiny_models import save_byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    return save_byte_tokenizer(tmp_path_factory.mktemp("tok"))


POOLS: dict[int, PagePool] = {}  # scheduler id -> its pool, for integrity checks


def make_scheduler(num_pages: int, max_seqs: int = 8, budget: int = 16) -> Scheduler:
    pool = PagePool(1, num_pages, 4, torch.float32, torch.device("cpu"))
    kv_cache_manager = KVCacheManager(pool)
    config = SchedulerConfig(max_seqs, budget)
    scheduler = Scheduler(config, kv_cache_manager, {2}, adapter_manager(pool, kv_cache_manager))
    POOLS[id(scheduler)] = pool
    return scheduler


def make_request(
    tokenizer: PreTrainedTokenizerFast, rid: str, prompt_len: int, max_tokens: int = 4
) -> Request:
    prompt = [5] * prompt_len
    return Request(
        rid,
        prompt,
        SamplingParams(max_tokens=max_tokens),
        IncrementalDetokenizer(tokenizer, prompt),
    )


def run_step(scheduler: Scheduler) -> dict[str, int]:
    """One step with every sampled token = 7; returns tokens scheduled per request."""
    out, failed = scheduler.schedule()
    assert not failed
    scheduler.update(out, {c.request_id: ChunkResult(7) for c in out.chunks if c.sample})
    scheduler.check_integrity()
    POOLS[id(scheduler)].check_integrity()
    return {c.request_id: c.num_tokens for c in out.chunks}


def test_long_prompt_is_chunked_while_decodes_continue(tokenizer: PreTrainedTokenizerFast) -> None:
    scheduler = make_scheduler(num_pages=200, budget=16)
    requests = {"a": make_request(tokenizer, "a", 5), "b": make_request(tokenizer, "b", 40)}
    for r in requests.values():
        scheduler.add(r)
    assert run_step(scheduler) == {"a": 5, "b": 11}  # FCFS; b gets the rest
    assert run_step(scheduler) == {"a": 1, "b": 15}  # a decodes, b's next chunk
    assert run_step(scheduler) == {"a": 1, "b": 14}  # b's prompt ends: it samples
    assert requests["b"].output_token_ids == [7]
    assert run_step(scheduler) == {"a": 1, "b": 1}


def test_max_num_seqs_and_fcfs(tokenizer: PreTrainedTokenizerFast) -> None:
    scheduler = make_scheduler(num_pages=200, max_seqs=2, budget=100)
    requests = {str(i): make_request(tokenizer, str(i), 3, max_tokens=2) for i in range(4)}
    for r in requests.values():
        scheduler.add(r)
    assert set(run_step(scheduler)) == {"0", "1"}
    assert set(run_step(scheduler)) == {"0", "1"}  # both finish (2 tokens)
    assert set(run_step(scheduler)) == {"2", "3"}


def test_preemption_recomputes_the_newest_request(tokenizer: PreTrainedTokenizerFast) -> None:
    # 2 pages per token: 24 pages hold 12 tokens.
    scheduler = make_scheduler(num_pages=24, budget=100)
    requests = {
        "old": make_request(tokenizer, "old", 5, 8),
        "new": make_request(tokenizer, "new", 5, 8),
    }
    for r in requests.values():
        scheduler.add(r)
    assert run_step(scheduler) == {"old": 5, "new": 5}  # 20 pages
    assert run_step(scheduler) == {"old": 1, "new": 1}  # 24 pages: full
    assert run_step(scheduler) == {"old": 1}  # "new" preempted for "old"
    assert scheduler.num_preemptions == 1
    new = requests["new"]
    assert new.num_computed_tokens == 0 and len(new.output_token_ids) == 2
    assert scheduler.waiting.peek(1) == [new]
    while requests["old"].status.value != "finished":
        run_step(scheduler)
    # Resumed: prompt and its two generated tokens are recomputed in one chunk.
    assert run_step(scheduler) == {"new": 7}


def test_add_and_abort_from_another_thread(llama_dir: Path) -> None:
    engine = LLMEngine(EngineConfig.create(llama_dir, dtype="float32"))
    stop = threading.Event()
    finished: dict[str, str | None] = {}

    def loop() -> None:
        while not stop.is_set() or engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out.finish_reason

    thread = threading.Thread(target=loop)
    thread.start()
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for i in range(12):
        engine.add_request([5 + i, 6, 7], params, request_id=str(i))
        if i % 3 == 0:
            engine.abort(str(i))
    stop.set()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert set(finished) == {str(i) for i in range(12)}
    assert all(finished[str(i)] == ("abort" if i % 3 == 0 else "length") for i in range(12))
    engine.check_integrity()
    assert engine.pool.num_free + engine.kv_cache_manager.num_cached_pages == engine.pool.num_pages
