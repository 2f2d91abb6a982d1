"""Prefix caching end to end: outputs equal transformers + PEFT with caching on and off,
under preemption and eviction; nothing is shared across adapter identities; an adapter
replaced in place serves running requests the old weights and new ones the new.

The units (keys, matching, sharing, eviction order) are in ``test_prefix_cache.py``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from engine import LLMEngine, RequestOutput, SamplingParams
from engine.config import DEMO_DIR, EngineConfig
from tests.engine.test_multilora import ADAPTERS
from tests.tiny_models import make_adapter

BLOCK = 16  # the default block size
GREEDY = SamplingParams(temperature=0.0, max_tokens=6)
SHORT = SamplingParams(temperature=0.0, max_tokens=4)
# Three adapters on different layers (attention, q and v only, the MLP), and "a-v2": the
# shape of "a" with other weights, its second version.
SPECS = {"a": "r4-attn", "b": "r1-qv", "c": "r3-mlp", "a-v2": "r4-attn"}

Job = tuple[list[int], str | None]  # (prompt, adapter name or None for the base model)


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 259) for _ in range(n)]


LONG = tokens(random.Random(14), 3 * BLOCK + 5)  # three full blocks and a few tokens


@pytest.fixture(scope="module")
def adapters(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prefix-adapters")
    paths = {}
    for seed, (name, kind) in enumerate(SPECS.items()):
        spec = ADAPTERS[kind]
        paths[name] = make_adapter(
            llama_dir, root / name, seed=seed, std=0.3 / spec["r"] ** 0.25, **spec
        )
    return paths


class Peft:
    """Greedy transformers + PEFT, one request at a time, every adapter loaded once (the
    engine's names; "a-v2" is a version of "a"); each answer computed once."""

    def __init__(self, base: Path, paths: dict[str, Path]) -> None:
        hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        names = list(paths)
        self.model = PeftModel.from_pretrained(hf, paths[names[0]], adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(paths[name], adapter_name=name)
        self.model.eval()
        self._memo: dict[tuple[tuple[int, ...], str | None, int], list[int]] = {}

    def __call__(self, prompt: list[int], adapter: str | None, max_tokens: int) -> list[int]:
        key = (tuple(prompt), adapter, max_tokens)
        if key not in self._memo:
            ids = torch.tensor([prompt])
            kwargs = {"max_new_tokens": max_tokens, "do_sample": False, "pad_token_id": 0}
            with torch.inference_mode():
                if adapter is None:
                    with self.model.disable_adapter():
                        out = self.model.generate(input_ids=ids, **kwargs)
                else:
                    self.model.set_adapter(adapter)
                    out = self.model.generate(input_ids=ids, **kwargs)
            self._memo[key] = [int(t) for t in out[0, len(prompt) :]]
        return self._memo[key]


@pytest.fixture(scope="module")
def peft(llama_dir: Path, adapters: dict[str, Path]) -> Peft:
    return Peft(llama_dir, adapters)


def make_engine(
    llama_dir: Path, adapters: dict[str, Path], names: tuple[str, ...], **options: Any
) -> LLMEngine:
    """A float32 engine with a 32-token budget (prompts prefill in chunks) and ``names``
    loaded."""
    config = EngineConfig.create(llama_dir, dtype="float32", max_num_batched_tokens=32, **options)
    engine = LLMEngine(config)
    # Adapters and unused cached blocks are reclaimed in one order.
    assert engine.adapters.residency.spare is engine.kv_cache_manager.prefix
    for name in names:
        engine.load_lora(name, adapters[name])
    return engine


def drain(
    engine: LLMEngine,
    jobs: list[Job],
    params: SamplingParams = GREEDY,
    per_step: int = 2,
    mix: list[int] | None = None,
) -> list[RequestOutput]:
    """Add ``per_step`` jobs before each step until all ran; the final outputs, in job order.
    The pool's and the prefix cache's books are checked after every step; ``mix`` gets the
    number of distinct adapters (the base counted as one) running after each step."""
    pending = list(enumerate(jobs))
    done: dict[str, RequestOutput] = {}
    while pending or engine.has_unfinished():
        for i, (prompt, adapter) in pending[:per_step]:
            engine.add_request(prompt, params, request_id=f"job-{i}", lora=adapter)
        pending = pending[per_step:]
        for out in engine.step():
            if out.finished:
                assert out.error is None, out.error
                done[out.request_id] = out
        if mix is not None:  # the requests that ran this step and go on
            mix.append(len({r.adapter for r in engine.scheduler.running}))
        engine.check_integrity()
    return [done[f"job-{i}"] for i in range(len(jobs))]


def run_one(
    engine: LLMEngine, prompt: list[int], adapter: str | None, params: SamplingParams = SHORT
) -> RequestOutput:
    return drain(engine, [(prompt, adapter)], params)[0]


def assert_no_leak(engine: LLMEngine) -> None:
    """Idle: every page is free, an unused cached block's, or a resident adapter's."""
    engine.check_integrity()
    assert engine.kv_cache_manager.num_requests() == 0
    pool = engine.pool
    cached = engine.kv_cache_manager.num_cached_pages
    assert pool.num_free + cached + engine.adapters.residency.num_pages == pool.num_pages
    stats = engine.stats()
    assert stats.cached_pages == cached and stats.kv_pages == 0
    assert sum(stats.cached_pages_by_adapter.values()) == cached


# -- exactness -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_jobs() -> list[Job]:
    """Twelve prompts, one common prefix of three blocks and suffixes of 1 to 9 tokens,
    under three adapters and the base: pairs of one adapter first (the second of a pair
    finds the first's blocks), then one of each in a mixed batch."""
    rng = random.Random(0)
    prefix = tokens(rng, 3 * BLOCK)
    jobs = [
        (prefix + tokens(rng, rng.randint(1, 9)), adapter)
        for _ in range(3)
        for adapter in ("a", "b", "c", None)
    ]
    return [jobs[i] for i in (0, 4, 1, 5, 2, 6, 3, 7, 8, 9, 10, 11)]


# (enable_prefix_caching, num_pages): the default pool holds everything. 300 pages cannot
# hold the three adapters (243 pages) beside one request's keys and values (up to 126
# pages): requests are preempted, adapters and cached blocks evicted. 600 pages hold a few
# requests and the adapters, and evict cached blocks to make room for the next.
POOLS = {
    "off": (False, None),
    "roomy": (True, None),
    "preempting": (True, 300),
    "evicting": (True, 600),
}


@pytest.mark.parametrize("pool", list(POOLS))
def test_mixed_batches_on_a_shared_prefix_equal_peft(
    llama_dir: Path, adapters: dict[str, Path], peft: Peft, mixed_jobs: list[Job], pool: str
) -> None:
    caching, num_pages = POOLS[pool]
    engine = make_engine(
        llama_dir, adapters, ("a", "b", "c"), enable_prefix_caching=caching, num_pages=num_pages
    )
    mix: list[int] = []
    outs = drain(engine, mixed_jobs, mix=mix)
    # Batches of several adapters (and the base); fewer where the pool holds fewer.
    assert max(mix) >= (2 if pool == "preempting" else 3)
    for (prompt, adapter), out in zip(mixed_jobs, outs, strict=True):
        assert out.token_ids == peft(prompt, adapter, GREEDY.max_tokens), (adapter, pool)
    stats = engine.stats()
    prefix = engine.kv_cache_manager.prefix
    cached = [out.num_cached_tokens for out in outs]
    if pool == "off":
        assert prefix is None
        assert stats.prefix_cache_queries == stats.prefix_cache_hits == 0 and not any(cached)
        assert engine.pool.num_free == engine.pool.num_pages - engine.adapters.residency.num_pages
    else:
        assert prefix is not None and stats.prefix_cache_hits > 0 and any(cached)
        assert all(n % BLOCK == 0 for n in cached)
        assert stats.prefix_cache_queries >= sum(len(p) for p, _ in mixed_jobs)
    preemptions = engine.scheduler.num_preemptions
    if pool == "roomy":
        assert preemptions == 0 and prefix is not None and prefix.num_evicted == 0
        # Each request looked up once: the hits are exactly the tokens the requests reused.
        assert stats.prefix_cache_hits == sum(cached)
        assert stats.prefix_cache_queries == sum(len(p) for p, _ in mixed_jobs)
        assert max(cached) == 3 * BLOCK
    if pool == "preempting":
        assert preemptions > 0 and prefix is not None and prefix.num_evicted > 0
    if pool == "evicting":
        assert prefix is not None and prefix.num_evicted > 0
    assert_no_leak(engine)


@pytest.mark.parametrize("graph_mode", ["eager", "static"])
def test_prompts_cached_up_to_their_last_token_and_on_block_boundaries(
    llama_dir: Path, adapters: dict[str, Path], peft: Peft, graph_mode: str
) -> None:
    # "static": decode steps take the padded path CUDA graphs capture, which must leave a
    # request's first chunk to the eager path when it starts on cached blocks.
    engine = make_engine(llama_dir, adapters, ("a",), graph_mode=graph_mode, max_num_seqs=4)
    prompt = LONG[: 2 * BLOCK + 8]  # 40 tokens
    first = run_one(engine, prompt, "a", SamplingParams(temperature=0.0, max_tokens=10))
    assert first.token_ids == peft(prompt, "a", 10)
    assert len(first.token_ids) == 10  # 49 tokens computed: three blocks, the last with
    # eight generated tokens in it
    # All cached but the last token, alone: its first step is one sampling token.
    alone = run_one(engine, prompt[: 2 * BLOCK + 1], "a")
    assert alone.num_cached_tokens == 2 * BLOCK
    assert alone.token_ids == peft(prompt[: 2 * BLOCK + 1], "a", SHORT.max_tokens)
    jobs: list[Job] = [
        (prompt[: 2 * BLOCK], "a"),  # ends on a boundary: its last block is recomputed
        (prompt[:BLOCK], "a"),  # one block: its only block holds its last token
        ([*prompt, *first.token_ids[:8], 7], "a"),  # a follow-up turn: generated tokens hit
    ]
    outs = drain(engine, jobs, SHORT, per_step=len(jobs))
    assert [out.num_cached_tokens for out in outs] == [BLOCK, 0, 3 * BLOCK]
    for (p, adapter), out in zip(jobs, outs, strict=True):
        assert out.token_ids == peft(p, adapter, SHORT.max_tokens)
    assert_no_leak(engine)


PENALIZED = SamplingParams(
    temperature=0.0, max_tokens=10, ignore_eos=True, frequency_penalty=0.8, presence_penalty=0.6
)


@pytest.mark.parametrize("pool", ["roomy", "preempting"])
def test_penalties_with_a_cache_hit_equal_caching_off(
    llama_dir: Path, adapters: dict[str, Path], peft: Peft, pool: str
) -> None:
    rng = random.Random(5)
    prefix = tokens(rng, 2 * BLOCK + 3)
    warm: list[Job] = [(prefix, "a"), (prefix, None)]
    jobs: list[Job] = [(prefix + tokens(rng, 2), a) for a in ("a", "a", None, None)]

    def penalized(engine: LLMEngine) -> list[RequestOutput]:
        drain(engine, warm, SHORT)
        return drain(engine, jobs, PENALIZED, per_step=len(jobs))

    off = penalized(make_engine(llama_dir, adapters, ("a",), enable_prefix_caching=False))
    # 240 pages: "a" (104 pages) and one request (up to 94 pages), not two.
    engine = make_engine(llama_dir, adapters, ("a",), num_pages=None if pool == "roomy" else 240)
    on = penalized(engine)
    assert [o.token_ids for o in on] == [o.token_ids for o in off]
    assert engine.stats().prefix_cache_hits > 0
    if pool == "roomy":
        assert all(o.num_cached_tokens == 2 * BLOCK for o in on)
    else:
        assert engine.scheduler.num_preemptions > 0
    # The penalties did something (so the comparison could fail).
    assert on[0].token_ids != peft(jobs[0][0], "a", PENALIZED.max_tokens)
    assert_no_leak(engine)


# -- isolation -------------------------------------------------------------------------------


def test_no_sharing_across_adapters_or_the_base(
    llama_dir: Path, adapters: dict[str, Path], peft: Peft
) -> None:
    engine = make_engine(llama_dir, adapters, ("a", "b"))
    order: list[str | None] = ["a", "b", None, "a", "b", None]
    outs = [run_one(engine, LONG, adapter) for adapter in order]
    assert [o.num_cached_tokens for o in outs] == [0, 0, 0, 3 * BLOCK, 3 * BLOCK, 3 * BLOCK]
    for adapter, out in zip(order, outs, strict=True):
        assert out.token_ids == peft(LONG, adapter, SHORT.max_tokens), adapter
    assert set(engine.stats().cached_pages_by_adapter) == {"a", "b", ""}
    assert_no_leak(engine)


def test_a_reloaded_name_shares_nothing_with_its_earlier_versions(
    llama_dir: Path, adapters: dict[str, Path], peft: Peft
) -> None:
    engine = make_engine(llama_dir, adapters, ("a",))
    assert run_one(engine, LONG, "a").num_cached_tokens == 0
    assert run_one(engine, LONG, "a").num_cached_tokens == 3 * BLOCK
    # Unloaded and loaded again under the same name, with other weights.
    engine.unload_lora("a")
    engine.load_lora("a", adapters["a-v2"])
    second = run_one(engine, LONG, "a")
    assert second.num_cached_tokens == 0
    assert second.token_ids == peft(LONG, "a-v2", SHORT.max_tokens)
    assert second.token_ids != peft(LONG, "a", SHORT.max_tokens)
    # Replaced by the very same weights: a new version, still nothing shared.
    engine.load_lora("a", adapters["a-v2"], replace=True)
    third = run_one(engine, LONG, "a")
    assert third.num_cached_tokens == 0 and third.token_ids == second.token_ids
    assert run_one(engine, LONG, "a").num_cached_tokens == 3 * BLOCK
    assert engine.stats().adapter_versions == {"a": 3}
    assert_no_leak(engine)


def test_a_mixture_shares_nothing_with_its_components(
    llama_dir: Path, adapters: dict[str, Path]
) -> None:
    engine = make_engine(llama_dir, adapters, ("a", "b"))
    engine.register_mixture("mix", [("a", 0.7), ("b", 1.3)])
    other = tokens(random.Random(8), 2 * BLOCK + 1)
    # A component first, then the mixture; the mixture first, then its components.
    order: list[Job] = [(LONG, "a"), (LONG, "mix"), (LONG, "mix"), (other, "mix")]
    order += [(other, "a"), (other, "b"), (other, None)]
    outs = [run_one(engine, prompt, adapter) for prompt, adapter in order]
    assert [o.num_cached_tokens for o in outs] == [0, 0, 3 * BLOCK, 0, 0, 0, 0]
    assert outs[1].token_ids == outs[2].token_ids  # cached or not, the same tokens
    assert outs[1].token_ids != outs[0].token_ids  # the mixture is not its component
    assert_no_leak(engine)


def test_prompt_logprobs_requests_never_use_the_cache(
    llama_dir: Path, adapters: dict[str, Path]
) -> None:
    asking = SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=1)
    reference = run_one(
        make_engine(llama_dir, adapters, (), enable_prefix_caching=False), LONG, None, asking
    )
    engine = make_engine(llama_dir, adapters, ())
    plain = run_one(engine, LONG, None)
    assert run_one(engine, LONG, None).num_cached_tokens == 3 * BLOCK
    prefix = engine.kv_cache_manager.prefix
    assert prefix is not None
    blocks, queries = len(prefix), engine.stats().prefix_cache_queries
    out = run_one(engine, LONG, None, asking)
    assert out.num_cached_tokens == 0 and out.token_ids == plain.token_ids
    assert engine.stats().prefix_cache_queries == queries  # not even looked up
    assert len(prefix) == blocks  # nor offered
    entries = out.prompt_logprobs
    assert entries is not None and len(entries) == len(LONG) and entries[0] is None
    assert reference.prompt_logprobs is not None
    pairs = zip(entries, reference.prompt_logprobs, strict=True)
    for j, (entry, expected) in list(enumerate(pairs))[1:]:
        assert entry is not None and expected is not None
        assert entry.token_id == LONG[j]
        assert entry.logprob == pytest.approx(expected.logprob, abs=1e-5)
    assert_no_leak(engine)


# -- in-place updates ----------------------------------------------------------------------


def test_replace_while_running_serves_each_request_its_own_version(
    llama_dir: Path, adapters: dict[str, Path], peft: Peft
) -> None:
    engine = make_engine(llama_dir, adapters, ("a",))
    params = SamplingParams(temperature=0.0, max_tokens=8)
    old = engine.adapters.get("a")
    engine.add_request(LONG, params, request_id="v1", lora="a")
    outputs: dict[str, list[int]] = {"v1": [], "v2": []}
    finished: dict[str, RequestOutput] = {}

    def step() -> None:
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
            if out.finished:
                finished[out.request_id] = out
        engine.check_integrity()

    while len(outputs["v1"]) < 3:  # started: its prompt computed, a few tokens out
        step()
    engine.load_lora("a", adapters["a-v2"], replace=True)
    new = engine.adapters.get("a")
    assert new.version == 2 and old.unloading and new.identity != old.identity
    engine.add_request(LONG, params, request_id="v2", lora="a")
    while "v1" not in finished:
        assert old.id in engine.adapters.residency  # v1 still runs on it
        step()
    # The old version's last request is done: its pages are gone, its cached blocks first
    # in line for eviction (no request can ever match them again).
    assert old.refs == 0 and old.id not in engine.adapters.residency
    prefix = engine.kv_cache_manager.prefix
    assert prefix is not None and prefix.oldest() == float("-inf")
    while engine.has_unfinished():
        step()
    v1, v2 = finished["v1"], finished["v2"]
    assert v1.token_ids == peft(LONG, "a", 8)
    assert v2.token_ids == peft(LONG, "a-v2", 8)
    assert v1.token_ids != v2.token_ids
    assert v2.num_cached_tokens == 0  # v1's blocks of the very same prompt were not used
    assert engine.adapters.registry.get("a").version == 2
    assert engine.stats().adapter_versions == {"a": 2}
    assert_no_leak(engine)
    # The new version's own blocks serve the next request.
    again = run_one(engine, LONG, "a", params)
    assert again.num_cached_tokens == 3 * BLOCK and again.token_ids == v2.token_ids
    assert_no_leak(engine)


def test_a_pool_full_of_one_adapters_cached_blocks_keeps_admitting_it() -> None:
    """Sequential requests on one adapter fill the pool with its unused blocks; each next
    request must take some of them (a regression: it once waited forever, nothing running)."""
    engine = LLMEngine(EngineConfig.create(DEMO_DIR / "model", dtype="float32", num_pages=1000))
    engine.load_lora("a", DEMO_DIR / "adapters" / "upper")
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for i in range(24):
        prompt = [rng.randrange(3, 100) for _ in range(48)]
        engine.add_request(prompt, params, request_id=f"r{i}", lora="a")
        for _ in range(100):
            if any(out.finished for out in engine.step()):
                break
        else:
            raise AssertionError(f"request {i} was never admitted: {engine.stats()}")
        engine.check_integrity()
    assert (
        engine.kv_cache_manager.prefix is not None
        and engine.kv_cache_manager.prefix.num_evicted > 0
    )
