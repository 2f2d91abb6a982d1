"""The engine's parts, built and wired together from an :class:`EngineConfig`.

One place decides what exists and who shares what: the page pool (on the model's device, or
bookkeeping only on the meta device when tensor-parallel workers hold the storage), its two
tenants (the KV cache manager and the adapter residency), the scheduler over both, and the
runner (the model here, or the workers' executor). :class:`engine.llm_engine.LLMEngine`
drives them; nothing here runs a step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from adapters.catalog import AdapterCatalog
from adapters.manager import AdapterManager
from adapters.residency import AdapterResidency
from engine.arch import ModelArch
from engine.base_weights import ServedBaseWeights
from engine.config import EngineConfig
from engine.cuda_graph import DecodeGraphs, capture_sizes
from engine.kv_cache_manager import KVCacheManager
from engine.loader import eos_token_ids, load_model, load_tokenizer
from engine.model import Backends, CausalLM
from engine.model_runner import ModelRunner
from engine.page_pool import PagePool, Tenant
from engine.page_tables import PageTables
from engine.parallel.executor import TensorParallelExecutor, combined_weights
from engine.quantization import QuantizationReport, memory_report
from engine.sampler import Sampler
from engine.scheduler import Scheduler
from engine.sizing import max_adapter_pages, pin_capacity

logger = logging.getLogger(__name__)


@dataclass
class EngineParts:
    """Everything an engine is made of.

    Attributes:
        model: the model, or None when tensor-parallel workers hold it (``executor``).
        executor: the workers' executor, or None on one device.
        weights: what the base's weights take (NF4's saving in ``saved_bytes``).
        runner: what executes a step: a :class:`ModelRunner` over ``model``, or ``executor``.
    """

    tokenizer: PreTrainedTokenizerBase
    arch: ModelArch
    model: CausalLM | None
    executor: TensorParallelExecutor | None
    weights: QuantizationReport
    pool: PagePool
    kv_cache_manager: KVCacheManager
    adapters: AdapterManager
    scheduler: Scheduler
    runner: ModelRunner | TensorParallelExecutor
    eos_token_ids: set[int]


def assemble(config: EngineConfig, kernels: str | None) -> EngineParts:
    """Load the model (or start its workers) and build the pool, its tenants, the scheduler
    and the runner; on CUDA with graphs, capture them. Workers started here are stopped
    again if anything after them fails."""
    mc = config.model
    tokenizer: PreTrainedTokenizerBase = load_tokenizer(mc.model_dir, mc.load_format)
    backends = Backends.select(kernels, mc.device)
    arch = ModelArch.load(mc.model_dir)
    if config.parallel.tensor_parallel_size == 1:
        model = load_model(
            mc.model_dir,
            mc.dtype,
            mc.device,
            backends,
            mc.quantization,
            mc.load_format,
            config.seed,
        )
        weights = memory_report(model, mc.dtype)
        return _wire(config, backends, tokenizer, arch, model, None, weights)
    executor = TensorParallelExecutor(config, kernels)
    try:
        weights = combined_weights(executor.reports)
        return _wire(config, backends, tokenizer, arch, None, executor, weights)
    except BaseException:
        executor.close()
        raise


def _wire(
    config: EngineConfig,
    backends: Backends,
    tokenizer: PreTrainedTokenizerBase,
    arch: ModelArch,
    model: CausalLM | None,
    executor: TensorParallelExecutor | None,
    weights: QuantizationReport,
) -> EngineParts:
    mc = config.model
    # With tensor parallelism the model and the pool's storage live in the workers; here the
    # pool is bookkeeping only (pages of the whole width, on the meta device).
    pool = PagePool(
        arch.num_layers,
        config.cache.num_pages,
        arch.kv_width,
        mc.dtype,
        mc.device if model is not None else torch.device("meta"),
    )
    if weights.quantized_params:
        logger.info(
            "nf4 base: %.3f bits per parameter over %.1fM parameters; weights %.1f MiB "
            "instead of %.1f MiB, room for %d more pages",
            weights.bits_per_param,
            weights.quantized_params / 1e6,
            weights.base_bytes / 2**20,
            weights.unquantized_bytes / 2**20,
            weights.saved_bytes // pool.page_bytes,
        )
    cache = config.cache
    kv_cache_manager = KVCacheManager(pool, cache.block_size, cache.enable_prefix_caching)
    adapters = _adapter_manager(config, arch, pool, model)
    # Adapters and unused cached blocks are reclaimed in one least-recently-used order.
    adapters.residency.spare = kv_cache_manager.prefix
    eos = eos_token_ids(mc.model_dir, tokenizer)
    scheduler = Scheduler(
        config.scheduler, kv_cache_manager, eos, adapters, max_loras=config.lora.max_loras
    )
    runner: ModelRunner | TensorParallelExecutor
    if model is None:
        assert executor is not None
        runner = executor
    else:
        sampler = Sampler(torch.Generator(device=mc.device).manual_seed(config.seed))
        page_tables = PageTables(
            config.scheduler.max_num_seqs,
            mc.max_model_len,
            mc.device,
            scratch_page=pool.scratch_page,
        )
        graphs = _decode_graphs(model, config, backends, pool, page_tables, adapters)
        runner = ModelRunner(
            model, pool.layers, sampler, page_tables, adapters.tables, backends.lora, graphs
        )
        if graphs is not None and config.graphs.mode == "graphs":
            graphs.capture()
    logger.info(
        "page pool: %d pages of %d elements per layer (%.1f MiB)",
        pool.num_pages,
        pool.page_width,
        pool.num_pages * pool.page_bytes / 2**20,
    )
    return EngineParts(
        tokenizer,
        arch,
        model,
        executor,
        weights,
        pool,
        kv_cache_manager,
        adapters,
        scheduler,
        runner,
        eos,
    )


def _adapter_manager(
    config: EngineConfig, arch: ModelArch, pool: PagePool, model: CausalLM | None
) -> AdapterManager:
    """The adapter residency, the pool's second tenant, behind the manager."""
    lora = config.lora
    layout = arch.layout()
    residency = AdapterResidency(
        pool.tenant(Tenant.ADAPTER),
        layout.num_layers,
        layout.linear_shapes,
        max_slots=lora.max_resident_loras,
        max_lora_rank=lora.max_lora_rank,
    )
    pool.register(Tenant.ADAPTER, residency)
    catalog = AdapterCatalog(
        residency.cost,
        residency.max_slots,
        layout,
        lora.max_lora_rank,
        max_adapter_pages=max_adapter_pages(pool.num_pages),
        host_cache_bytes=lora.host_cache_bytes,
        pin_capacity=pin_capacity(pool.num_pages, config.model.max_model_len),
        max_loras=lora.max_loras,
        base=None if model is None else ServedBaseWeights(model, layout),
        lora_only=model is None,
    )
    return AdapterManager(residency, catalog)


def _decode_graphs(
    model: CausalLM,
    config: EngineConfig,
    backends: Backends,
    pool: PagePool,
    page_tables: PageTables,
    adapters: AdapterManager,
) -> DecodeGraphs | None:
    """The static-shape decode path, when the config asks for one (None: eager).

    Capture needs a CUDA device and the Triton kernels (the torch references read their
    metadata on the host); elsewhere "graphs" falls back to eager steps, with a warning.
    """
    mode = config.graphs.mode
    if mode == "graphs" and not (
        config.model.device.type == "cuda" and backends.lora.needs_device_passes
    ):
        logger.warning("CUDA graphs need a CUDA device and the Triton kernels; decoding eagerly")
        mode = "eager"
    if mode == "eager":
        return None
    return DecodeGraphs(
        model,
        pool.layers,
        page_tables,
        adapters.tables,
        backends.lora,
        config.graphs.sizes or capture_sizes(config.scheduler.max_num_seqs),
        config.lora.max_lora_rank,
        pool.scratch_page,
    )
