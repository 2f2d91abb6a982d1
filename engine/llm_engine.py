"""The engine loop: ``step()`` = schedule → run → update.

Requests may be added and aborted from any thread: those calls validate at once (raising
``ValueError`` for a request that can never run) and leave the request in an inbox that the
next ``step()`` drains, so the scheduler's state is only ever touched by the stepping thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from adapters.manager import AdapterManager
from adapters.registry import AdapterEntry
from adapters.residency import AdapterResidency
from adapters.weights import AdapterWeights
from engine.base_weights import ServedBaseWeights
from engine.config import EngineConfig, LoraConfig
from engine.cuda_graph import DecodeGraphs, capture_sizes
from engine.detokenizer import IncrementalDetokenizer, NoDetokenizer
from engine.kv_cache_manager import PAGES_PER_TOKEN, KVCacheManager
from engine.loader import eos_token_ids, load_config, load_model, load_tokenizer
from engine.model import Backends, CausalLM, ModelArch
from engine.model_runner import ModelRunner
from engine.outputs import AdapterStatus, EngineStats, RequestOutput
from engine.page_pool import PagePool, Tenant
from engine.parallel.executor import (
    TensorParallelExecutor,
    WorkerDied,
    combined_weights,
    worker_counters,
)
from engine.quantization import memory_report
from engine.request import Request
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.scheduler_output import SchedulerOutput
from engine.scheduling import token_cost
from engine.sizing import decoder_layout, max_adapter_pages, pin_capacity
from engine.slot_tables import SlotTables
from engine.virtual_tokens import virtual_positions

logger = logging.getLogger(__name__)
T = TypeVar("T")


class LLMEngine:
    """Continuous batching of generation requests over one model and its page pool.

    Args:
        config: what to load and how big the pool and the batches are.
        kernels: "torch" (the references) or "triton"; by default Triton on CUDA only.
    """

    def __init__(self, config: EngineConfig, kernels: str | None = None) -> None:
        self.config = config
        self.executor: TensorParallelExecutor | None = None
        try:
            self._build(config, kernels)
        except BaseException:
            self.shutdown()  # a split model's workers, if they started
            raise

    def _build(self, config: EngineConfig, kernels: str | None) -> None:
        mc = config.model
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(mc.model_dir, mc.load_format)
        backends = Backends.select(kernels, mc.device)
        self.arch = arch = ModelArch.from_config(load_config(mc.model_dir))
        workers = config.parallel.tensor_parallel_size
        # With tensor parallelism the model and the pool's storage live in the workers; here
        # the pool is bookkeeping only (pages of the whole width, on the meta device).
        self.model: CausalLM | None = None
        if workers == 1:
            self.model = load_model(
                mc.model_dir,
                mc.dtype,
                mc.device,
                backends,
                mc.quantization,
                mc.load_format,
                config.seed,
            )
            self.weights = memory_report(self.model, mc.dtype)
        else:
            self.executor = TensorParallelExecutor(config, kernels)
            self.weights = combined_weights(self.executor.reports)
        self.pool = PagePool(
            arch.num_layers,
            config.cache.num_pages,
            arch.kv_width,
            mc.dtype,
            mc.device if self.model is not None else torch.device("meta"),
        )
        if self.weights.quantized_params:
            logger.info(
                "nf4 base: %.3f bits per parameter over %.1fM parameters; weights %.1f MiB "
                "instead of %.1f MiB, room for %d more pages",
                self.weights.bits_per_param,
                self.weights.quantized_params / 1e6,
                self.weights.base_bytes / 2**20,
                self.weights.unquantized_bytes / 2**20,
                self.freed_pages,
            )
        cache = config.cache
        self.kv_cache_manager = KVCacheManager(
            self.pool, cache.block_size, cache.enable_prefix_caching
        )
        self.adapters = self._adapter_manager(config.lora)
        # Adapters and unused cached blocks are reclaimed in one least-recently-used order.
        self.adapters.residency.spare = self.kv_cache_manager.prefix
        self.eos_token_ids = eos_token_ids(mc.model_dir, self.tokenizer)
        self.scheduler = Scheduler(
            config.scheduler,
            self.kv_cache_manager,
            self.eos_token_ids,
            self.adapters,
            max_loras=config.lora.max_loras,
        )
        self.runner: ModelRunner | TensorParallelExecutor
        if self.model is None:
            assert self.executor is not None
            self.runner = self.executor
        else:
            sampler = Sampler(torch.Generator(device=mc.device).manual_seed(config.seed))
            slot_tables = SlotTables(
                config.scheduler.max_num_seqs,
                config.model.max_model_len,
                mc.device,
                scratch_page=self.pool.scratch_page,
            )
            graphs = self._decode_graphs(self.model, config, backends, slot_tables)
            self.runner = ModelRunner(
                self.model,
                self.pool.layers,
                sampler,
                slot_tables,
                self.adapters.tables,
                backends.lora,
                graphs,
            )
            if graphs is not None and config.graphs.mode == "graphs":
                graphs.capture()
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
        logger.info(
            "page pool: %d pages of %d elements per layer (%.1f MiB)",
            self.pool.num_pages,
            self.pool.page_width,
            self.pool.num_pages * self.pool.page_bytes / 2**20,
        )

    def _decode_graphs(
        self, model: CausalLM, config: EngineConfig, backends: Backends, slot_tables: SlotTables
    ) -> DecodeGraphs | None:
        """The static-shape decode path, when the config asks for one (None: eager).

        Capture needs a CUDA device and the Triton kernels (the torch references read their
        metadata on the host); elsewhere "graphs" falls back to eager steps, with a warning.
        """
        mode = config.graphs.mode
        if mode == "graphs" and not (
            config.model.device.type == "cuda" and backends.lora.needs_device_passes
        ):
            logger.warning(
                "CUDA graphs need a CUDA device and the Triton kernels; decoding eagerly"
            )
            mode = "eager"
        if mode == "eager":
            return None
        return DecodeGraphs(
            model,
            self.pool.layers,
            slot_tables,
            self.adapters.tables,
            backends.lora,
            config.graphs.sizes or capture_sizes(config.scheduler.max_num_seqs),
            config.lora.max_lora_rank,
            self.pool.scratch_page,
        )

    @property
    def freed_pages(self) -> int:
        """Pages the quantized base leaves for the pool, against the same base unquantized."""
        return self.weights.saved_bytes // self.pool.page_bytes

    def _adapter_manager(self, config: LoraConfig) -> AdapterManager:
        layout = decoder_layout(self.arch)
        residency = AdapterResidency(
            self.pool.tenant(Tenant.ADAPTER),
            layout.num_layers,
            layout.linear_shapes,
            max_slots=config.max_resident_loras,
            max_lora_rank=config.max_lora_rank,
        )
        self.pool.register(Tenant.ADAPTER, residency)
        return AdapterManager(
            residency,
            layout,
            config.max_lora_rank,
            max_adapter_pages=max_adapter_pages(self.pool.num_pages),
            host_cache_bytes=config.host_cache_bytes,
            pin_capacity=pin_capacity(self.pool.num_pages, self.config.model.max_model_len),
            max_loras=config.max_loras,
            base=None if self.model is None else ServedBaseWeights(self.model, layout),
            lora_only=self.model is None,
        )

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
        aborted += [self._output(r) for r in failed]
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
        return aborted + [self._output(r) for r in advanced]

    def _fail(self, scheduled: SchedulerOutput) -> list[RequestOutput]:
        """Abort every request of a step the runner failed."""
        outputs = []
        for chunk in scheduled.chunks:
            request = self.scheduler.abort(
                chunk.request_id, "internal error while running the batch", "engine_error"
            )
            assert request is not None, "a scheduled request is unfinished until update()"
            outputs.append(self._output(request))
        return outputs

    def stats(self) -> EngineStats:
        """A snapshot of the engine's counters (safe to call from any thread)."""
        # Counters only: the residency's structures are the engine thread's (an int read is
        # atomic, and a snapshot may lag a step).
        residency = self.adapters.residency
        prefetch = self.adapters.prefetcher.stats
        prefix = self.kv_cache_manager.prefix
        cached_pages = self.kv_cache_manager.num_cached_pages
        ledger = self.scheduler.ledger
        step_seconds, collectives = (
            (0.0, {}) if self.executor is None else worker_counters(self.executor)
        )
        return EngineStats(
            num_running=self.num_running,
            num_waiting=len(self.scheduler.waiting) + len(self._inbox),
            num_pages=self.pool.num_pages,
            free_pages=self.pool.num_free,
            # Live keys and values; unused cached blocks are counted apart (cached_pages).
            kv_pages=self.pool.num_used(Tenant.KV) - cached_pages,
            adapter_pages=self.pool.num_used(Tenant.ADAPTER),
            resident_adapters=residency.num_placed - residency.num_evicted,
            loaded_adapters=len(self.adapters.registry),
            num_preemptions=self.scheduler.num_preemptions,
            prefetch_hits=self.scheduler.prefetch_hits,
            prefetch_misses=self.scheduler.prefetch_misses,
            adapter_loads=prefetch.loads,
            adapter_evictions=residency.num_evicted,
            adapter_load_seconds=prefetch.load_seconds,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            num_steps=self.num_steps,
            num_failed_steps=self.num_failed_steps,
            weight_bytes=self.weights.base_bytes,
            unquantized_weight_bytes=self.weights.unquantized_bytes,
            quantized_bits_per_param=self.weights.bits_per_param,
            quantization_freed_pages=self.freed_pages,
            prefix_cache_queries=0 if prefix is None else prefix.queries,
            prefix_cache_hits=0 if prefix is None else prefix.hits,
            cached_pages=cached_pages,
            cached_pages_by_adapter={} if prefix is None else _snapshot(prefix.pages_by_label),
            adapter_versions={e.name: e.version for e in self.adapters.registry.entries()},
            pinned_adapters=self.adapters.pinned_names(),
            client_prompt_tokens=_snapshot(ledger.prompt_tokens),
            client_output_tokens=_snapshot(ledger.output_tokens),
            client_virtual_tokens=ledger.labelled(_snapshot(self.scheduler.waiting.counters())),
            # One device's (a page split across workers holds 1/N of its width on each).
            page_bytes=self.pool.page_bytes // self.config.parallel.tensor_parallel_size,
            adapters=self._adapter_statuses(),
            max_loras=self.config.lora.max_loras or self.config.lora.max_resident_loras,
            tensor_parallel_size=self.config.parallel.tensor_parallel_size,
            worker_step_seconds=step_seconds,
            collectives=collectives,
        )

    def _adapter_statuses(self) -> list[AdapterStatus]:
        """Every registered adapter's tier, size and load (any thread: membership tests and
        the engine thread's last count, which this asks to be taken again)."""
        self._load_wanted = True
        load = self._adapter_load if self.has_unfinished() else {}
        with self._lock:
            queued = [r.adapter.name for r in self._inbox if r.adapter is not None]
        residency, host = self.adapters.residency, self.adapters.host_cache
        pinned = set(self.adapters.pinned_names())
        statuses = []
        for entry in self.adapters.registry.entries():
            tier = "pool" if entry.id in residency else "host" if entry.id in host else "disk"
            running, waiting = load.get(entry.name, (0, 0))
            statuses.append(
                AdapterStatus(
                    name=entry.name,
                    kind=entry.kind,
                    version=entry.version,
                    pinned=entry.name in pinned,
                    tier=tier,
                    rank=entry.max_rank,
                    pages=entry.pages,
                    running=running,
                    waiting=waiting + queued.count(entry.name),
                )
            )
        return statuses

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
                outputs.append(self._output(aborted))
        return outputs

    def _output(self, request: Request) -> RequestOutput:
        """The request's news since its previous output (and the whole record when done)."""
        finished = request.finished
        delta = request.detokenizer.release(finished)
        first = request.num_reported == 0
        start, end = request.num_reported, len(request.output_token_ids)
        request.num_reported = end
        logprobs = request.logprobs
        prompt_logprobs = request.prompt_logprobs if first or finished else None
        return RequestOutput(
            request_id=request.request_id,
            delta=delta,
            new_token_ids=request.output_token_ids[start:end],
            num_prompt_tokens=len(request.prompt_token_ids),
            num_output_tokens=end,
            finished=finished,
            finish_reason=request.finish_reason,
            error=request.error,
            error_code=request.error_code,
            queue_time=(
                None
                if request.first_scheduled_time is None
                else request.first_scheduled_time - request.arrival_time
            ),
            new_logprobs=None if logprobs is None else logprobs[start:end],
            prompt_token_ids=request.prompt_token_ids if first or finished else None,
            prompt_logprobs=None if prompt_logprobs is None else list(prompt_logprobs),
            text=request.detokenizer.released_text if finished else "",
            token_ids=list(request.output_token_ids) if finished else [],
            logprobs=None if logprobs is None or not finished else list(logprobs),
            num_cached_tokens=request.num_cached_tokens or 0,
        )

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


def _snapshot(counts: Mapping[str, T]) -> dict[str, T]:
    """A copy of a dict the engine thread may be changing (for stats from another thread)."""
    for _ in range(8):
        try:
            return dict(counts)
        except RuntimeError:  # changed size during the copy
            continue
    return {}
