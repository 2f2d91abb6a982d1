"""Scheduling policies on synthetic traces, counted in tokens and steps (no timing).

The scheduler runs alone here (no model): every step, each scheduled request advances by its
chunk and a sampling chunk yields token 7. Clients are set on the requests directly, as the
engine sets them from the adapter or the user.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from engine import SamplingParams
from engine.config import SchedulerConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache_manager import PAGES_PER_TOKEN, KVCacheManager
from engine.page_pool import PagePool
from engine.request import Request
from engine.scheduler import Scheduler
from engine.scheduler_output import ChunkResult
from engine.scheduling import OTHER_CLIENTS, ClientLedger, FairPolicy
from tests.engine.conftest import adapter_manager
from tests.tiny_models import save_byte_tokenizer

W_IN, W_OUT = 1.0, 2.0


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    return save_byte_tokenizer(tmp_path_factory.mktemp("tok"))


class Trace:
    """A scheduler with a small pool, the requests it has seen and what each was served."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        policy: str,
        num_pages: int = 400,
        max_seqs: int = 8,
        budget: int = 32,
    ) -> None:
        self.tokenizer = tokenizer
        self.pool = PagePool(1, num_pages, 4, torch.float32, torch.device("cpu"))
        config = SchedulerConfig(max_seqs, budget, policy, "adapter", W_IN, W_OUT)
        kv_cache_manager = KVCacheManager(self.pool, enable_prefix_caching=False)
        adapters = adapter_manager(self.pool, kv_cache_manager)
        self.scheduler = Scheduler(config, kv_cache_manager, {2}, adapters)
        self.requests: dict[str, Request] = {}
        self.added_at: dict[str, int] = {}
        self.admitted_at: dict[str, int] = {}
        self.served: dict[str, float] = {}  # weighted tokens per client, as VTC counts them
        self.step_no = 0
        self._ids = itertools.count()

    def add(self, client: str, prompt_len: int, max_tokens: int, priority: int = 0) -> Request:
        rid = f"{client}-{next(self._ids)}"
        prompt = [5] * prompt_len
        request = Request(
            rid,
            prompt,
            SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            IncrementalDetokenizer(self.tokenizer, prompt),
            client=client,
            priority=priority,
        )
        self.requests[rid] = request
        self.added_at[rid] = self.step_no
        self.scheduler.add(request)
        return request

    def waiting(self, client: str) -> int:
        return sum(
            1
            for rid, r in self.requests.items()
            if r.client == client and rid not in self.admitted_at and not r.finished
        )

    def step(self) -> dict[str, int]:
        out, failed = self.scheduler.schedule()
        assert not failed
        for chunk in out.chunks:
            request = self.requests[chunk.request_id]
            if chunk.request_id not in self.admitted_at:
                self.admitted_at[chunk.request_id] = self.step_no
                self.served[request.client] = self.served.get(request.client, 0.0) + W_IN * len(
                    request.prompt_token_ids
                )
            if chunk.sample:
                self.served[request.client] = self.served.get(request.client, 0.0) + W_OUT
        results = {c.request_id: ChunkResult(7) for c in out.chunks if c.sample}
        self.scheduler.update(out, results)
        self.pool.check_integrity()
        self.scheduler.check_integrity()
        self.step_no += 1
        return {c.request_id: c.num_tokens for c in out.chunks}

    def drain(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished():
                return
            self.step()
        raise AssertionError("the scheduler did not drain")


def backlogged_run(
    tokenizer: PreTrainedTokenizerFast, policy: str, steps: int = 300
) -> tuple[Trace, list[dict[str, float]]]:
    """Three clients kept backlogged: "flood" queued 60 requests first, "a" and "b" keep 3
    each waiting; prompts and outputs of different lengths. Returns the served history."""
    trace = Trace(tokenizer, policy)
    rng = random.Random(0)
    for _ in range(60):
        trace.add("flood", rng.randint(8, 16), rng.randint(8, 16))
    history = []
    for _ in range(steps):
        for client in ("a", "b", "flood"):
            while trace.waiting(client) < 3:
                trace.add(client, rng.randint(4, 16), rng.randint(4, 16))
        trace.step()
        history.append({c: trace.served.get(c, 0.0) for c in ("a", "b", "flood")})
    return trace, history


def service_gap(history: list[dict[str, float]], f: str, g: str) -> float:
    """The largest |W_f(t1, t2) - W_g(t1, t2)| over every interval of the history."""
    diffs = [0.0] + [h[f] - h[g] for h in history]
    return max(diffs) - min(diffs)


def test_fair_keeps_backlogged_clients_within_the_vtc_bound(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    # Theorem 4.4 of the VTC paper: 2·max(w_in·L_in, w_out·M), L_in the longest prompt
    # (16), M the most tokens the running batch holds (400 pages hold 200 tokens).
    bound = 2 * max(W_IN * 16, W_OUT * 400 // PAGES_PER_TOKEN)
    _, fair = backlogged_run(tokenizer, "fair")
    for f, g in itertools.combinations(("a", "b", "flood"), 2):
        assert service_gap(fair, f, g) <= bound, (f, g)
    assert min(fair[-1].values()) > 2 * bound  # the run served more than the bound
    # FCFS serves the 60 queued flood requests first: the same trace breaks the bound.
    _, fcfs = backlogged_run(tokenizer, "fcfs")
    assert service_gap(fcfs, "a", "flood") > 2 * bound


def steady_queue_times(tokenizer: PreTrainedTokenizerFast, policy: str, backlog: int) -> list[int]:
    """A client sending one request every 12 steps (8 tokens in, 4 out: within its share)
    beside a client keeping ``backlog`` requests queued (the k-th with 4 + 7k mod 17 tokens
    out); the steady client's queue times, in steps."""
    trace = Trace(tokenizer, policy, num_pages=1000)
    flood = itertools.count()
    steady = []
    for step in range(240):
        while trace.waiting("flood") < backlog:
            trace.add("flood", 12, 4 + 7 * next(flood) % 17)
        if step % 12 == 0:
            steady.append(trace.add("steady", 8, 4).request_id)
        trace.step()
    trace.drain()
    return [trace.admitted_at[rid] - trace.added_at[rid] for rid in steady]


def test_a_client_within_its_share_keeps_its_queue_time_under_a_flood(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    assert max(steady_queue_times(tokenizer, "fair", backlog=0)) == 0
    # Under fair, the steady client waits only for a seat in the full batch: however deep
    # the flood's queue, its queue times are the same.
    fair = steady_queue_times(tokenizer, "fair", backlog=20)
    assert fair == steady_queue_times(tokenizer, "fair", backlog=200)
    assert max(fair) <= 8
    # Under FCFS it waits behind the whole flood queue.
    fcfs = steady_queue_times(tokenizer, "fcfs", backlog=20)
    deeper = steady_queue_times(tokenizer, "fcfs", backlog=200)
    assert min(fcfs[1:]) > 10 and min(deeper[1:]) > 5 * max(fcfs)


def test_no_request_waits_forever(tokenizer: PreTrainedTokenizerFast) -> None:
    """Random arrivals from six clients, one flooding: every request's wait at the head of
    its client's queue is bounded, and everything finishes."""
    trace = Trace(tokenizer, "fair")
    rng = random.Random(1)
    clients = ["flood", *(f"c{i}" for i in range(5))]
    for _ in range(400):
        trace.add("flood", rng.randint(4, 16), rng.randint(4, 16))
        for client in clients[1:]:
            if rng.random() < 0.05:
                trace.add(client, rng.randint(4, 16), rng.randint(4, 16))
        trace.step()
    trace.drain()
    assert all(r.finished and r.finish_reason == "length" for r in trace.requests.values())
    head_waits = []
    for client in clients:
        mine = sorted(
            (r for r in trace.requests.values() if r.client == client), key=lambda r: r.seq
        )
        free_at = 0  # when the request before it was admitted: it became the head then
        for request in mine:
            rid = request.request_id
            head_since = max(trace.added_at[rid], free_at)
            head_waits.append(trace.admitted_at[rid] - head_since)
            free_at = trace.admitted_at[rid]
    # A head request waits while its client's counter is above another's: the gap is within
    # the VTC bound (2·max(16, 2·200) = 800 weighted tokens), and the batch serves at least
    # 2 weighted tokens per running request per step.
    assert max(head_waits) <= 800 // 2


def test_priorities_order_admission_and_preemption(tokenizer: PreTrainedTokenizerFast) -> None:
    # 24 pages hold 12 tokens: two requests of 5 prompt tokens fill it after one decode.
    trace = Trace(tokenizer, "priority", num_pages=24, max_seqs=2, budget=100)
    low = trace.add("x", 5, 4, priority=2)
    trace.add("x", 5, 4, priority=1)
    first = trace.add("x", 5, 4, priority=0)
    assert set(trace.step()) == {first.request_id, "x-1"}  # priority 0 and 1; 2 waits
    tail = trace.add("x", 5, 4, priority=0)  # same level as the first: after it
    assert trace.scheduler.waiting.peek(2) == [tail, low]
    trace.drain()
    assert trace.admitted_at[tail.request_id] < trace.admitted_at[low.request_id]

    # Preemption takes the lowest priority, though it is the oldest running request.
    trace = Trace(tokenizer, "priority", num_pages=24, max_seqs=2, budget=100)
    old = trace.add("x", 5, 6, priority=5)
    trace.step()
    urgent = trace.add("x", 5, 6, priority=0)
    trace.step()  # both run: 6 + 5 tokens
    trace.step()  # 7 + 6 = 13 > 12: the pool is short
    assert trace.scheduler.num_preemptions == 1
    assert old.num_preemptions == 1 and urgent.num_preemptions == 0
    trace.drain()
    assert old.finished and urgent.finished


def test_fcfs_preempts_the_newest(tokenizer: PreTrainedTokenizerFast) -> None:
    trace = Trace(tokenizer, "fcfs", num_pages=24, max_seqs=2, budget=100)
    old = trace.add("x", 5, 6, priority=0)
    trace.step()
    new = trace.add("x", 5, 6)
    for _ in range(3):
        trace.step()
    assert new.num_preemptions == 1 and old.num_preemptions == 0


def test_fair_preempts_the_newest_request_of_the_most_served_client(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    policy = FairPolicy(W_IN, W_OUT)
    make = Trace(tokenizer, "fair")
    rich = [make.add("rich", 4, 8), make.add("rich", 4, 8)]
    poor = make.add("poor", 4, 8)
    for request in (*rich, poor):
        policy.add(request)
    for request in policy.peek(3):
        policy.remove(request)
        policy.admitted(request, first=True)
    for _ in range(3):
        for request in (*rich, poor):
            policy.generated(request)
    assert policy.counters() == {"rich": 2 * 4 + 6 * 2.0, "poor": 4 + 3 * 2.0}
    running = [rich[0], poor, rich[1]]
    assert policy.victim(running) is rich[1]
    assert policy.victim([rich[0], poor]) is rich[0]  # though older than poor

    # Preempted under pressure, nothing is lost.
    trace = Trace(tokenizer, "fair", num_pages=24, max_seqs=3, budget=100)
    for client in ("rich", "rich", "poor"):
        trace.add(client, 3, 6)
    trace.drain()
    assert trace.scheduler.num_preemptions >= 1
    assert all(len(r.output_token_ids) == 6 for r in trace.requests.values())


@pytest.mark.parametrize("backlog", [20, 8])
def test_counter_lift_gives_no_credit_for_idling(
    tokenizer: PreTrainedTokenizerFast, backlog: int
) -> None:
    """A client arriving after 30 steps of asking nothing starts level with the busy client,
    whether that client still has requests waiting (20) or only running (8)."""
    trace = Trace(tokenizer, "fair", num_pages=1000)
    for _ in range(backlog):
        trace.add("busy", 8, 40)
    for _ in range(30):
        trace.step()
    policy = trace.scheduler.waiting
    assert isinstance(policy, FairPolicy)
    assert trace.waiting("busy") == backlog - 8
    busy = policy.counters()["busy"]
    assert busy > 400
    idle = trace.add("idle", 8, 8)
    assert policy.counters()["idle"] == busy
    trace.drain()
    assert idle.finished


def test_the_ledger_names_a_bounded_set_of_clients() -> None:
    ledger = ClientLedger(max_labels=3)
    requests = [
        Request(f"r{i}", [1] * (i + 1), SamplingParams(), None, client=f"c{i}")  # type: ignore[arg-type]
        for i in range(5)
    ]
    for request in requests:
        ledger.admitted(request)
        ledger.generated(request)
    assert ledger.prompt_tokens == {"c0": 1, "c1": 2, "c2": 3, OTHER_CLIENTS: 4 + 5}
    assert ledger.output_tokens == {"c0": 1, "c1": 1, "c2": 1, OTHER_CLIENTS: 2}
    assert ledger.labelled({"c0": 5.0, "c3": 7.0, "c4": 9.0}) == {"c0": 5.0, OTHER_CLIENTS: 9.0}
