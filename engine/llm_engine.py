"""The engine loop: ``step()`` = schedule → run → update.

Requests may be added and aborted from any thread: those calls validate at once (raising
``ValueError`` for a request that can never run) and leave the request in an inbox that the
next ``step()`` drains, so the scheduler's state is only ever touched by the stepping thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
from pathlib import Path

import torch

from adapters.registry import AdapterEntry
from adapters.weights import AdapterWeights
from engine.assembly import assemble
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer, NoDetokenizer
from engine.engine_stats import collect_stats
from engine.kv_cache_manager import PAGES_PER_TOKEN
from engine.outputs import EngineStats, RequestOutput
from engine.parallel.executor import WorkerDied
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler_output import SchedulerOutput
from engine.scheduling import token_cost
from engine.virtual_tokens import virtual_positions

logger = logging.getLogger(__name__)


class LLMEngine:
    """Continuous batching of generation requests over one model and its page pool.

    Args:
        config: what to load and how big the pool and the batches are.
        kernels: "torch" (the references) or "triton"; by default Triton on CUDA only.
    """

    def __init__(self, config: EngineConfig, kernels: str | None = None) -> None:
        self.config = config
        parts = assemble(config, kernels)
        self.tokenizer = parts.tokenizer
        self.arch = parts.arch
        self.model = parts.model
        self.executor = parts.executor
        self.weights = parts.weights
        self.pool = parts.pool
        self.kv_cache_manager = parts.kv_cache_manager
        self.adapters = parts.adapters
        self.scheduler = parts.scheduler
        self.runner = parts.runner
        self.eos_token_ids = parts.eos_token_ids
        self._inbox: list[Request] = []
        # Running and waiting requests by adapter, counted after a step when stats asked
        self._adapter_load: dict[str, tuple[int, int]] = {}
        self._load_wanted = False
        self._aborts: list[str] = []
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.num_steps = 0
        self.num_failed_steps = 0
        self.prompt_tokens = 0  # prompt tokens of accepted requests
        self.generation_tokens = 0

    @property
    def freed_pages(self) -> int:
        """Pages the quantized base leaves for the pool, against the same base unquantized."""
        return self.weights.saved_bytes // self.pool.page_bytes

    # -- adapters -------------------------------------------------------------------------

    def load_lora(
        self, name: str, path: str | Path, replace: bool = False, pinned: bool = False
    ) -> int:
        """Validate and register a PEFT LoRA adapter under ``name``; returns its version (1
        for a name's first load, one more with each load since). Safe from any thread.

        With ``replace``, requests already running keep the weights they started with and
        new ones get these; nothing cached for the old version is reused. ``pinned`` keeps
        the adapter in the pool through any churn until it is unloaded (or replaced).

        Raises:
            AdapterError: the adapter is invalid (code and message say why), the name is
                taken (``adapter_already_loaded``) and ``replace`` is False, or
                (``pin_refused``) pinning it would leave no room for a request.
        """
        return self.adapters.load(name, Path(path), replace=replace, pinned=pinned).version

    def load_lora_weights(
        self, name: str, weights: AdapterWeights, replace: bool = False, pinned: bool = False
    ) -> None:
        """Register an adapter made in memory (a merge result, say). Safe from any thread."""
        self.adapters.load_weights(name, weights, replace=replace, pinned=pinned)

    def register_mixture(
        self, name: str, components: list[tuple[str, float]], replace: bool = False
    ) -> None:
        """Register a virtual adapter y = Wx + Σᵢ wᵢ·sᵢ·Bᵢ(Aᵢx) over loaded adapters (see
        :meth:`adapters.manager.AdapterManager.register_mixture`). Safe from any thread."""
        self.adapters.register_mixture(name, components, replace=replace)

    def unload_lora(self, name: str) -> None:
        """Unregister ``name``. Requests already using it finish on its weights.

        Raises:
            AdapterError: ``model_not_found`` when no adapter has that name.
        """
        self.adapters.unload(name)

    # -- requests -------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        lora: str | None = None,
        detokenize: bool = True,
        *,
        priority: int = 0,
        user: str | None = None,
    ) -> str:
        """Queue a request; returns its id. Safe to call from any thread.

        Args:
            prompt: text (tokenized with special tokens) or token ids.
            params: sampling and stopping; greedy-free defaults when None.
            request_id: unique among unfinished requests; generated when None.
            lora: the name of a loaded adapter, or None for the base model.
            detokenize: render text (deltas, stop strings) here; False leaves outputs'
                text empty and stop strings to the caller (the API process does both).
            priority: lower runs first under the "priority" policy; must be 0 under others.
            user: the OpenAI ``user`` field: the client the "fair" policy charges when
                ``fairness_key`` is "user".

        Raises:
            ValueError: the prompt is empty or has unknown token ids, the request can never
                fit the model's context or the page pool, or it has a priority the
                scheduling policy does not use.
            AdapterError: ``lora`` names no loaded adapter (``model_not_found``).
        """
        params = params or SamplingParams()
        sched = self.config.scheduler
        if priority != 0 and sched.policy != "priority":
            raise ValueError(
                f"priority {priority} needs --scheduling-policy priority; this server "
                f"schedules by {sched.policy}"
            )
        adapter = self.adapters.get(lora) if lora is not None else None
        ids = self.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
        self.validate(ids, params, self.adapters.pinned_pages(adapter), adapter)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        placeholders, prefix_positions = virtual_positions(adapter)
        generator = None
        if params.seed is not None:
            # (a split model's workers keep their own: no device here, no CUDA context)
            device = self.config.model.device if self.model is not None else "cpu"
            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed)
        request = Request(
            request_id=request_id,
            prompt_token_ids=ids,
            params=params,
            detokenizer=(
                IncrementalDetokenizer(self.tokenizer, ids, params.stop, params.skip_special_tokens)
                if detokenize
                else NoDetokenizer()
            ),
            generator=generator,
            adapter=adapter,
            priority=priority,
            client=self._client(adapter, user),
            token_cost=token_cost(adapter.flops_ratio) if adapter is not None else 1.0,
            num_placeholders=placeholders,
            num_prefix_positions=prefix_positions,
        )
        with self._lock:
            if request_id in self.scheduler or any(r.request_id == request_id for r in self._inbox):
                raise ValueError(f"request id {request_id!r} is already in use")
            self._inbox.append(request)
        return request_id

    def _client(self, adapter: AdapterEntry | None, user: str | None) -> str:
        """Whom the fair policy charges: the adapter's name ("" for the base model), or with
        ``fairness_key`` "user" the user ("" for requests without one: one anonymous
        client)."""
        if self.config.scheduler.fairness_key == "user":
            return user or ""
        return adapter.name if adapter is not None else ""

    def validate(
        self,
        ids: list[int],
        params: SamplingParams,
        pinned_pages: int = 0,
        adapter: AdapterEntry | None = None,
    ) -> None:
        """Raise ValueError when the request could never run (add_request calls it): its
        pages at full length must fit the pool beside its adapter's (``adapter``) and the
        pinned adapters' other than its own (``pinned_pages``)."""
        if not ids:
            raise ValueError("the prompt is empty")
        vocab_size = self.arch.vocab_size
        if any(not 0 <= t < vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
        # A prompt- or prefix-tuned adapter's virtual tokens take positions before the prompt.
        placeholders, prefix_positions = virtual_positions(adapter)
        virtual = placeholders + prefix_positions
        total = virtual + len(ids) + params.max_tokens
        limit = self.config.model.max_model_len
        if total > limit:
            named = f" + the adapter's virtual tokens ({virtual})" if virtual else ""
            raise ValueError(
                f"prompt ({len(ids)} tokens){named} + max_tokens ({params.max_tokens}) = "
                f"{total} exceeds the context length {limit}"
            )
        need = PAGES_PER_TOKEN * (total - prefix_positions)  # prefix K/V: the adapter's pages
        adapter_pages = 0 if adapter is None else adapter.pages
        if need + adapter_pages + pinned_pages > self.pool.num_pages:
            beside = f" beside its adapter's {adapter_pages}" if adapter_pages else ""
            if pinned_pages:
                beside += f" and the pinned adapters' {pinned_pages}"
            raise ValueError(
                f"the request needs up to {need} pages{beside}; the pool has {self.pool.num_pages}"
            )

    def abort(self, request_id: str) -> None:
        """Stop a request at the next step and free its pages. Safe to call from any thread."""
        with self._lock:
            self._aborts.append(request_id)

    @property
    def num_running(self) -> int:
        """Requests being served now (any thread; a snapshot may lag a step)."""
        return len(self.scheduler.running)

    def has_unfinished(self) -> bool:
        """Whether ``step()`` has work: requests to run, or adapter unloads to apply."""
        with self._lock:
            if self._inbox or self.scheduler.has_unfinished():
                return True
        return self.adapters.has_pending_unloads()

    # -- the loop -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule → run → update. Returns the outputs of requests that advanced."""
        aborted = self._drain_inbox()
        scheduled, failed = self.scheduler.schedule()
        aborted += [r.take_output() for r in failed]
        try:
            results = self.runner.execute(scheduled)
        except WorkerDied:
            raise  # the model is gone, not one batch: the caller stops the engine
        except Exception:
            # One bad batch must not take the server down: fail its requests, keep serving.
            logger.exception(
                "step %d failed; aborting its %d requests", self.num_steps, len(scheduled.chunks)
            )
            self.num_failed_steps += 1
            self.num_steps += 1
            failed_outputs = self._fail(scheduled)  # first: it unpins their adapters
            # The runner may have failed before writing the adapters this schedule placed.
            self.adapters.discard(scheduled.placements)
            return aborted + failed_outputs
        advanced = self.scheduler.update(scheduled, results)
        self.num_steps += 1
        self.generation_tokens += sum(1 for c in scheduled.chunks if c.sample)
        if self._load_wanted:  # someone asked for stats since the last count
            self._load_wanted = False
            self._adapter_load = self.scheduler.count_by_adapter()
        return aborted + [r.take_output() for r in advanced]

    def _fail(self, scheduled: SchedulerOutput) -> list[RequestOutput]:
        """Abort every request of a step the runner failed."""
        outputs = []
        for chunk in scheduled.chunks:
            request = self.scheduler.abort(
                chunk.request_id, "internal error while running the batch", "engine_error"
            )
            assert request is not None, "a scheduled request is unfinished until update()"
            outputs.append(request.take_output())
        return outputs

    def stats(self) -> EngineStats:
        """A snapshot of the engine's counters (safe to call from any thread)."""
        return collect_stats(self)

    def adapter_load(self) -> dict[str, tuple[int, int]]:
        """Running and waiting requests by adapter name (any thread): the engine thread's
        last count, which this asks to be taken again after the next step, plus the
        requests queued since."""
        self._load_wanted = True
        load = dict(self._adapter_load) if self.has_unfinished() else {}
        with self._lock:
            queued = [r.adapter.name for r in self._inbox if r.adapter is not None]
        for name in queued:
            running, waiting = load.get(name, (0, 0))
            load[name] = (running, waiting + 1)
        return load

    @property
    def num_queued(self) -> int:
        """Requests added but not yet handed to the scheduler (any thread)."""
        return len(self._inbox)

    def _drain_inbox(self) -> list[RequestOutput]:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for request in inbox:
            self.prompt_tokens += len(request.prompt_token_ids)
            if request.adapter is not None:
                self.adapters.acquire(request.adapter)
            self.scheduler.add(request)
        self.adapters.sync()
        outputs = []
        for request_id in aborts:
            aborted = self.scheduler.abort(request_id)
            if aborted is not None:
                outputs.append(aborted.take_output())
        return outputs

    def check_workers(self) -> None:
        """Raise :class:`engine.parallel.executor.WorkerDied` if a tensor-parallel worker has
        exited, even between steps (a no-op on one device)."""
        if self.executor is not None:
            self.executor.check()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (they also stop when this process
        ends). The engine cannot step afterwards."""
        if self.executor is not None:
            self.executor.close()

    def check_integrity(self) -> None:
        """Assert the page pool's invariants across both tenants, and the adapter pins."""
        self.pool.check_integrity()
        self.kv_cache_manager.check_integrity()
        self.scheduler.check_integrity()
        assert self.kv_cache_manager.num_requests() <= len(self.scheduler.running)
        pins: dict[int, int] = {}
        for request in self.scheduler.running:
            if request.adapter is not None:
                for adapter_id in self.adapters.ids(request.adapter):
                    pins[adapter_id] = pins.get(adapter_id, 0) + 1
        residency = self.adapters.residency
        for adapter_id, count in pins.items():
            resident = residency.get(adapter_id)
            assert resident is not None and resident.pins == count, "adapter pins drifted"
        assert sum(r.pins for r in residency.residents()) == sum(pins.values())
