"""Continuous batching over the page pool, adapters included.

The algorithm, once, as :meth:`Scheduler.schedule` runs it every step:

    budget = max_num_batched_tokens
    1. Running requests, in the policy's order (oldest first but under ``priority``).
       Each wants the tokens it has not computed yet: 1 for a decode, the rest of its
       prompt (capped by the budget) for a prefill, so long prompts are prefilled in
       chunks across steps while decodes keep flowing. If the KV cache cannot hold those
       tokens, evict adapters no running request uses; if that is not enough, preempt the
       policy's victim (fcfs: the newest request; priority: the lowest priority; fair: the
       newest of the most served client), which drops its pages, goes back to the waiting
       queue where its arrival puts it and is recomputed later, and retry, until the
       request fits or is itself the one preempted. The running order serves the victims
       last, so a preemption rarely undoes a chunk already scheduled (when it does, the
       chunk's tokens go back to the budget).
    2. If nothing was preempted (and every pinned adapter is in the pool), admit waiting
       requests in the policy's order (``engine/scheduling.py``) while the budget,
       ``max_num_seqs`` and the pages allow. A request whose adapter would make the batch
       hold more than ``max_loras`` distinct adapters is passed over for a later step. A
       request's adapter must be resident first: the pages it needs count against the pool
       like the KV cache's (evicting unused adapters and cached blocks when needed). A
       request whose adapter is still loading from disk is passed over, not waited for, so
       requests behind it still run. With prefix caching, an admitted request starts on the
       cached blocks of its longest cached prefix (under its adapter's identity) and
       computes only the rest.
    3. Place the adapters of the next waiting requests (in the policy's order) into free
       pages (prefetch), so they are resident by the time they are admitted.

Placing an adapter is bookkeeping here: the step's output carries the placements, and the
runner copies the weights into the pool before its forward. After the step, :meth:`update`
offers the prefix cache every block the step filled.

The scheduler owns its requests: from :meth:`add` until they are retired, it alone changes
them, and the engine names them by id (:meth:`abort`). A request whose adapter fails is
retired inside :meth:`schedule`, which hands it back beside the step's output for the engine
to report.

There are no prefill and decode phases: both share one budget in one batch. A request
whose chunk reaches its last token samples one new token in :meth:`update`.
"""

from __future__ import annotations

import time

from adapters.errors import AdapterError
from adapters.manager import AdapterManager, Readiness
from engine.config import SchedulerConfig
from engine.kv_cache_manager import KVCacheManager
from engine.page_pool import OutOfPages
from engine.prefix_cache import BASE_ROOT, chain_keys
from engine.request import Request, RequestStatus
from engine.scheduler_output import ChunkResult, ScheduledChunk, SchedulerOutput
from engine.scheduling import ClientLedger, make_policy
from engine.virtual_tokens import prefix_pages

_PREFETCH_AHEAD = 8  # waiting requests whose adapters step 3 copies into free pages


class Scheduler:
    """Owns the unfinished requests, the waiting queue, the running list and the KV cache's
    page lists.

    Args:
        config: batch limits and the scheduling policy.
        kv_cache_manager: the KV tenant's page lists.
        eos_token_ids: tokens that end a request.
        adapters: the adapter side of the engine.
        max_loras: the most distinct adapters in one batch (None: no cap).
    """

    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache_manager: KVCacheManager,
        eos_token_ids: set[int],
        adapters: AdapterManager,
        max_loras: int | None = None,
    ) -> None:
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.eos_token_ids = eos_token_ids
        self.adapters = adapters
        self.max_loras = max_loras
        self.waiting = make_policy(config)  # the waiting queue, in the policy's order
        self.ledger = ClientLedger()
        self.running: list[Request] = []
        self._requests: dict[str, Request] = {}  # the unfinished ones (waiting or running) by id
        self.num_preemptions = 0
        # Requests whose adapter was in host memory or the pool when first considered for
        # admission, and those that waited for it to load.
        self.prefetch_hits = 0
        self.prefetch_misses = 0
        self._failed: list[Request] = []  # retired in this schedule(): their adapter failed
        self._retired: list[str] = []  # finished or aborted since the last schedule()

    def add(self, request: Request) -> None:
        """Queue a new request (its id unique among the unfinished ones)."""
        self._requests[request.request_id] = request
        self.waiting.add(request)

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running (any thread: one dict read)."""
        return bool(self._requests)

    def __contains__(self, request_id: str) -> bool:
        """Whether an unfinished request has this id (any thread: one dict read)."""
        return request_id in self._requests

    def abort(
        self, request_id: str, error: str | None = None, error_code: str | None = None
    ) -> Request | None:
        """Retire an unfinished request as aborted, with the error that ended it if any;
        returns it, or None when no unfinished request has that id (finished already)."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        if error is not None:
            request.error, request.error_code = error, error_code
        self._finish(request, "abort")
        return request

    def count_by_adapter(self) -> dict[str, tuple[int, int]]:
        """Adapter name to (running, waiting) requests."""
        counts: dict[str, list[int]] = {}
        for request in self._requests.values():
            if request.adapter is not None:
                count = counts.setdefault(request.adapter.name, [0, 0])
                count[request.status is not RequestStatus.RUNNING] += 1
        return {name: (running, waiting) for name, (running, waiting) in counts.items()}

    def check_integrity(self) -> None:
        """Assert that every unfinished request is waiting or running, and only those."""
        assert len(self._requests) == len(self.waiting) + len(self.running)
        assert all(self._requests.get(r.request_id) is r for r in self.running)

    def schedule(self) -> tuple[SchedulerOutput, list[Request]]:
        """The step's work for the runner, and the requests this schedule retired because
        their adapter failed (for the engine to report)."""
        budget = self.config.max_num_batched_tokens
        chunks: dict[str, int] = {}  # request id -> tokens scheduled this step
        preempted: list[Request] = []

        for request in list(self.waiting.running_order(self.running)):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            fits, budget = self._reserve(request, num_new, preempted, chunks, budget)
            if fits:
                chunks[request.request_id] = num_new
                budget -= num_new

        pins_placed = self.adapters.place_pinned()
        if not preempted and pins_placed:
            budget = self._admit(budget, chunks)
        ahead = [r.adapter for r in self.waiting.peek(_PREFETCH_AHEAD) if r.adapter]
        self.adapters.prefetch_into_pool(ahead)

        scheduled = [r for r in self.running if r.request_id in chunks]
        retired, self._retired = self._retired, []
        failed, self._failed = self._failed, []
        output = SchedulerOutput(
            chunks=[self._chunk(r, chunks[r.request_id]) for r in scheduled],
            preempted_ids=[r.request_id for r in preempted],
            finished_ids=retired,
            placements=self.adapters.take_placements(),
        )
        return output, failed

    def _admit(self, budget: int, chunks: dict[str, int]) -> int:
        """Admit waiting requests in the policy's order (step 2); returns the budget left."""
        in_batch = self._batch_adapters()
        for request in self.waiting.order():
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            parts: list[int] = []
            if in_batch is not None and request.adapter is not None:
                parts = [i for i in self._adapter_ids(request) if i not in in_batch]
                if len(in_batch) + len(parts) > (self.max_loras or 0):
                    continue  # one adapter too many for this batch: a later step
            readiness = self._adapter_readiness(request)
            if readiness is Readiness.LOADING:
                continue  # its adapter is still on its way from disk: do not hold others
            if readiness is Readiness.NO_ROOM and not self.running:
                # Nothing pins an adapter or holds KV pages: every page but those of the
                # adapter's own parts could be reclaimed, and were not enough. It never fits
                # (a mixture whose components were on disk when it was registered).
                assert request.adapter is not None
                message = f"adapter {request.adapter.name!r} needs more pages than the pool has"
                self._fail(request, AdapterError("adapter_too_large", message))
                continue
            if readiness is Readiness.NO_ROOM:
                break
            cached = self._match(request)
            num_new = min(request.num_tokens - cached, budget)
            if not self._grow(request, cached + num_new, keep_adapter=True):
                self.kv_cache_manager.free(request.request_id)  # lets go of the matched blocks
                break
            self._count_lookup(request, cached)
            request.num_computed_tokens = cached
            request.just_admitted = True
            self.waiting.remove(request)
            first = request.first_scheduled_time is None
            if first:
                request.first_scheduled_time = time.monotonic()
                self.ledger.admitted(request)
            self.waiting.admitted(request, first)
            if in_batch is not None:
                in_batch.update(parts)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if request.adapter is not None:
                self.adapters.pin(request.adapter)
            chunks[request.request_id] = num_new
            budget -= num_new
        return budget

    def _batch_adapters(self) -> set[int] | None:
        """The adapters the running requests use, when ``max_loras`` caps them (else None)."""
        if self.max_loras is None:
            return None
        return {i for r in self.running for i in self._adapter_ids(r)}

    def _root(self, request: Request) -> bytes | None:
        """The root of the request's chain keys; None when it must not use the cache (no
        prefix cache; it wants every prompt token's log-probability; an adapter without an
        identity)."""
        if self.kv_cache_manager.prefix is None or request.params.prompt_logprobs is not None:
            return None
        if request.adapter is None:
            return BASE_ROOT
        return request.adapter.identity or None

    def _keys(self, request: Request, root: bytes, num_blocks: int) -> list[bytes]:
        return chain_keys(
            request.block_keys,
            root,
            request.token_ids,
            num_blocks,
            self.kv_cache_manager.block_size,
        )

    def _adapter_ids(self, request: Request) -> tuple[int, ...]:
        if request.adapter is None:
            return ()
        return tuple(self.adapters.ids(request.adapter))

    def _match(self, request: Request) -> int:
        """Start the request on its longest cached prefix; returns the tokens it covers
        (whole blocks, and never the last token, which must be computed to sample)."""
        root = self._root(request)
        if root is None:
            return 0
        num_blocks = (request.num_tokens - 1) // self.kv_cache_manager.block_size
        keys = self._keys(request, root, num_blocks)
        return self.kv_cache_manager.match(request.request_id, keys, self._adapter_ids(request))

    def _count_lookup(self, request: Request, cached: int) -> None:
        prefix = self.kv_cache_manager.prefix
        if prefix is None or self._root(request) is None:
            return
        prefix.queries += request.num_tokens
        prefix.hits += cached
        if request.num_cached_tokens is None:  # own prompt tokens only, as prompt_tokens
            own = cached - request.num_placeholders
            request.num_cached_tokens = min(max(own, 0), len(request.prompt_token_ids))

    def _commit(self, request: Request) -> None:
        """Offer the prefix cache the blocks the request's computed tokens fill."""
        num_blocks = request.num_computed_tokens // self.kv_cache_manager.block_size
        root = self._root(request)
        if root is None or num_blocks <= self.kv_cache_manager.num_offered(request.request_id):
            return  # (most steps: a decode that fills no block)
        keys = self._keys(request, root, num_blocks)
        label = request.adapter.name if request.adapter is not None else ""
        self.kv_cache_manager.commit(
            request.request_id,
            keys,
            request.num_computed_tokens,
            self._adapter_ids(request),
            label,
        )

    def _adapter_readiness(self, request: Request) -> Readiness | None:
        """Make the request's adapter resident if it can be; None for base-model requests."""
        if request.adapter is None:
            return None
        if request.waited_for_adapter is None:
            request.waited_for_adapter = not self.adapters.is_ready(request.adapter)
            if request.waited_for_adapter:
                self.prefetch_misses += 1
            else:
                self.prefetch_hits += 1
        try:
            return self.adapters.ensure_resident(request.adapter)
        except AdapterError as e:
            self._fail(request, e)
            return Readiness.LOADING  # gone from the queue; move on

    def _fail(self, request: Request, error: AdapterError) -> None:
        """Retire a request its adapter fails; :meth:`schedule` hands it to the engine."""
        self.abort(request.request_id, error.message, error.code)
        self._failed.append(request)

    def _grow(self, request: Request, num_tokens: int, keep_adapter: bool = False) -> bool:
        """Give the request KV pages for ``num_tokens`` tokens, evicting unused adapters."""
        try:
            self.kv_cache_manager.grow(request.request_id, num_tokens)
            return True
        except OutOfPages as e:
            # Unused adapters and unused cached blocks, least recently used first.
            keep = request.adapter if keep_adapter else None
            if not self.adapters.reclaim(e.requested, keep=keep):
                return False
        self.kv_cache_manager.grow(request.request_id, num_tokens)
        return True

    def _reserve(
        self,
        request: Request,
        num_new: int,
        preempted: list[Request],
        chunks: dict[str, int],
        budget: int,
    ) -> tuple[bool, int]:
        """Grow a running request's pages for ``num_new`` tokens, preempting the policy's
        victims; returns whether it fits, and the budget (with the tokens of any victim
        already scheduled this step given back)."""
        target = request.num_computed_tokens + num_new
        while not self._grow(request, target):
            victim = self.waiting.victim(self.running)
            self._preempt(victim)
            preempted.append(victim)
            budget += chunks.pop(victim.request_id, 0)
            if victim is request:
                return False, budget
        return True, budget

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv_cache_manager.free(request.request_id)
        if request.adapter is not None:
            self.adapters.unpin(request.adapter)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.requeue(request)
        self.num_preemptions += 1

    def _chunk(self, request: Request, num_new: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        end = start + num_new
        k_pages, v_pages = self.kv_cache_manager.token_pages(request.request_id, start, end)
        first, request.just_admitted = request.just_admitted, False
        cached_k: list[int] = []
        cached_v: list[int] = []
        if first and start:
            cached_k, cached_v = self.kv_cache_manager.token_pages(request.request_id, 0, start)
        slots: list[tuple[int, int, float]] = []  # (slot, rank, weight) per component
        if request.adapter is not None:
            slots = self.adapters.slots(request.adapter)
        if first and request.num_prefix_positions:
            # Prefix tuning: positions 0 .. n - 1 are the adapter's pages, wherever it is
            # placed now (`engine/virtual_tokens.py`); the request's own tokens follow.
            prefix_k, prefix_v = prefix_pages(self.adapters.tables, slots[0][0])
            cached_k, cached_v = prefix_k + cached_k, prefix_v + cached_v
        return ScheduledChunk(
            request_id=request.request_id,
            token_ids=request.token_ids(start, end),
            start_pos=request.num_prefix_positions + start,
            new_k_pages=k_pages,
            new_v_pages=v_pages,
            sample=end == request.num_tokens,
            params=request.params,
            generator=request.generator,
            banned_token_ids=self._banned(request),
            adapter_slots=tuple(slot for slot, _, _ in slots),
            adapter_weights=tuple(weight for _, _, weight in slots),
            adapter_rank=max((rank for _, rank, _ in slots), default=0),
            # The runner keeps penalty counts from step to step: it needs the history only
            # on the first chunk after (re)admission.
            output_token_ids=(
                tuple(request.output_token_ids) if request.params.penalized and first else ()
            ),
            prompt_targets=self._prompt_targets(request, start, end),
            cached_k_pages=cached_k,
            cached_v_pages=cached_v,
        )

    @staticmethod
    def _prompt_targets(request: Request, start: int, end: int) -> tuple[int, ...]:
        """The tokens that tokens ``start .. end - 1`` of the request's sequence predict, up
        to its prompt's end (a placeholder's target may be a placeholder: ``update`` keeps
        only the prompt's)."""
        have = request.prompt_logprobs
        if have is None or len(have) == len(request.prompt_token_ids):
            return ()
        prompt_end = request.num_placeholders + len(request.prompt_token_ids)
        return tuple(request.token_ids(start + 1, min(end + 1, prompt_end)))

    def _banned(self, request: Request) -> tuple[int, ...]:
        """Token ids that may not be sampled next: stop tokens while under ``min_tokens``."""
        params = request.params
        if len(request.output_token_ids) >= params.min_tokens:
            return ()
        eos = () if params.ignore_eos else tuple(self.eos_token_ids)
        return eos + params.stop_token_ids

    def update(self, output: SchedulerOutput, results: dict[str, ChunkResult]) -> list[Request]:
        """Advance every request of ``output`` (this step's schedule) by its chunk and append
        its sampled token.

        Returns the requests that produced a token (finished ones included).
        """
        advanced: list[Request] = []
        for chunk in output.chunks:
            request = self._requests[chunk.request_id]
            request.num_computed_tokens += chunk.num_tokens
            self._commit(request)
            result = results.get(chunk.request_id, ChunkResult())
            if request.prompt_logprobs is not None:
                # own prompt token k sits at position num_virtual_tokens + k
                first_target = chunk.start_pos + 1 - request.num_virtual_tokens
                for i, entry in enumerate(result.prompt_logprobs):
                    if first_target + i == len(request.prompt_logprobs):  # not recomputed
                        request.prompt_logprobs.append(entry)
            if not chunk.sample:
                continue
            token = result.token
            assert token is not None, "a sampling chunk came back without a token"
            if request.logprobs is not None and result.logprob is not None:
                request.logprobs.append(result.logprob)
            request.output_token_ids.append(token)
            self.waiting.generated(request)
            self.ledger.generated(request)
            request.detokenizer.add_token(token)
            reason = self._finish_reason(request, token)
            if reason is not None:
                self._finish(request, reason)
            advanced.append(request)
        return advanced

    def _finish_reason(self, request: Request, token: int) -> str | None:
        params = request.params
        num_out = len(request.output_token_ids)
        # Below min_tokens the sampler masks these ids, so they cannot appear here early.
        if not params.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if token in params.stop_token_ids or request.detokenizer.stopped:
            return "stop"
        if num_out >= params.max_tokens:
            return "length"
        return None

    def _finish(self, request: Request, reason: str) -> None:
        """Retire a request (finished or aborted): free its pages, drop its adapter."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
            if request.adapter is not None:
                self.adapters.unpin(request.adapter)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        del self._requests[request.request_id]
        self.kv_cache_manager.free(request.request_id)
        if request.adapter is not None:
            self.adapters.release(request.adapter)
        self.waiting.finished(request)
        self._retired.append(request.request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
