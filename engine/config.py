"""Engine configuration: a few frozen, validated dataclasses.

"auto" values (dtype, device, pool size) are resolved by :func:`EngineConfig.create` before the
dataclasses are built, so every field of a constructed config is concrete.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapters.host_cache import DEFAULT_HOST_CACHE_BYTES
from engine.arch import ModelArch
from engine.checkpoint import (
    QUANTIZATIONS,
    check_tensor_parallel,
    resolve_dtype,
    resolve_quantization,
)
from engine.cuda_graph import GRAPH_MODES, capture_sizes
from engine.sizing import PoolSizing, size_pool, startup_adapters

# Which waiting request is admitted next (see ``engine/scheduling.py``).
SCHEDULING_POLICIES = ("fcfs", "fair", "priority")
# What the fair policy shares the engine between: adapters, or the OpenAI ``user`` field.
FAIRNESS_KEYS = ("adapter", "user")
# "auto": the safetensors checkpoint; "dummy": random weights from config.json alone.
LOAD_FORMATS = ("auto", "dummy")

# The engine's defaults, in one place: the config dataclasses, EngineConfig.create and the
# command line's flags (``server/engine_args.py``) all read these.
DEFAULT_MAX_NUM_SEQS = 64
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
DEFAULT_MAX_LORA_RANK = 64
DEFAULT_MAX_RESIDENT_LORAS = 256
DEFAULT_BLOCK_SIZE = 16
DEFAULT_SCHEDULING_POLICY = "fair"
DEFAULT_FAIRNESS_KEY = "adapter"
DEFAULT_INPUT_TOKEN_WEIGHT = 1.0
DEFAULT_OUTPUT_TOKEN_WEIGHT = 2.0

# Where the bundled demo model lives: served when no model directory is given.
DEMO_DIR = Path(__file__).resolve().parent.parent / "examples" / "demo"


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and how.

    Attributes:
        model_dir: a Hugging Face model directory (config.json, *.safetensors, tokenizer).
        dtype: the dtype weights are loaded in and activations computed in.
        device: where the model and the page pool live.
        max_model_len: the longest sequence (prompt + generated tokens) accepted.
        quantization: "nf4" to serve the decoder's linear layers in NF4, else "none".
        load_format: "auto" loads the safetensors checkpoint; "dummy" needs only config.json
            and draws random weights (and, without tokenizer files, a synthetic tokenizer).
    """

    model_dir: Path
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    quantization: str = "none"
    load_format: str = "auto"

    def __post_init__(self) -> None:
        if not (self.model_dir / "config.json").is_file():
            raise ValueError(f"{self.model_dir.name}: not a model directory (no config.json)")
        if self.max_model_len <= 0:
            raise ValueError("max_model_len must be positive")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {self.quantization!r}"
            )
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(
                f"load_format must be one of {', '.join(LOAD_FORMATS)}; got {self.load_format!r}"
            )


@dataclass(frozen=True)
class CacheConfig:
    """The unified page pool's size, as a page count.

    A page is one vector of ``num_kv_heads * head_dim`` elements in every layer: one
    token's K, or one token's V, or rank-rows of an adapter.

    Attributes:
        num_pages: pages in the pool.
        enable_prefix_caching: keep the keys and values of full blocks of computed tokens
            after their request ends, and reuse them for a later request with the same
            tokens under the same adapter (``engine/prefix_cache.py``).
        block_size: tokens per block of the prefix cache: what is hashed and reused as one.
        sizing: how ``num_pages`` was reached, when :meth:`EngineConfig.create` sized it
            (``loraserve plan`` and the status route show it); None when built by hand.
    """

    num_pages: int
    enable_prefix_caching: bool = True
    block_size: int = DEFAULT_BLOCK_SIZE
    sizing: PoolSizing | None = None

    def __post_init__(self) -> None:
        if self.num_pages < 2:
            raise ValueError("the page pool needs at least 2 pages (one token's K and V)")
        if self.block_size <= 0:
            raise ValueError("block_size must be positive")
        if self.sizing is not None and self.sizing.num_pages != self.num_pages:
            raise ValueError("num_pages disagrees with the sizing it came from")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching limits.

    Attributes:
        max_num_seqs: the most requests running at once.
        max_num_batched_tokens: the per-step token budget shared by prefill chunks and decodes.
        policy: which waiting request is admitted next: "fcfs" (arrival order), "fair"
            (the client served least so far, by the Virtual Token Counter) or "priority"
            (the request's ``priority``, lower first, arrival order within a level).
        fairness_key: what "fair" calls a client: the request's "adapter" (the base model is
            one client too), or its "user" (the OpenAI field; requests without one are one
            anonymous client).
        input_token_weight, output_token_weight: what one prompt token and one generated
            token cost a client's counter under "fair" (before its adapter's rank factor).
    """

    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    policy: str = DEFAULT_SCHEDULING_POLICY
    fairness_key: str = DEFAULT_FAIRNESS_KEY
    input_token_weight: float = DEFAULT_INPUT_TOKEN_WEIGHT
    output_token_weight: float = DEFAULT_OUTPUT_TOKEN_WEIGHT

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(
                f"scheduling policy must be one of {', '.join(SCHEDULING_POLICIES)}; "
                f"got {self.policy!r}"
            )
        if self.fairness_key not in FAIRNESS_KEYS:
            raise ValueError(
                f"fairness key must be one of {', '.join(FAIRNESS_KEYS)}; got {self.fairness_key!r}"
            )
        weights = (self.input_token_weight, self.output_token_weight)
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise ValueError("token weights must be positive and finite")


@dataclass(frozen=True)
class LoraConfig:
    """Adapter serving limits.

    Attributes:
        max_lora_rank: adapters with a larger rank are refused.
        max_loras: the most distinct adapters in one batch (a mixture counts each of its
            components); requests past it wait for a later step. None: no cap but
            ``max_resident_loras``.
        max_resident_loras: the most adapters resident in the pool at once (rows of the
            kernels' page tables; the weights themselves take pool pages only while
            resident).
        host_cache_bytes: capacity of the host-memory tier of parsed adapters.
    """

    max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    max_loras: int | None = None
    max_resident_loras: int = DEFAULT_MAX_RESIDENT_LORAS
    host_cache_bytes: int = DEFAULT_HOST_CACHE_BYTES

    def __post_init__(self) -> None:
        if self.max_lora_rank <= 0 or self.max_resident_loras <= 0 or self.host_cache_bytes <= 0:
            raise ValueError(
                "max_lora_rank, max_resident_loras and host_cache_bytes must be positive"
            )
        if self.max_loras is not None and not 0 < self.max_loras <= self.max_resident_loras:
            raise ValueError(
                f"max_loras must be between 1 and max_resident_loras ({self.max_resident_loras})"
            )


@dataclass(frozen=True)
class GraphConfig:
    """How decode steps run (see ``engine/cuda_graph.py``).

    Attributes:
        mode: "graphs" captures the padded decode forward as CUDA graphs and replays them;
            "static" runs the same padded forward without capture; "eager" (vLLM's
            ``--enforce-eager``) runs every step as it comes.
        sizes: the batch sizes to capture; empty for the default ladder up to
            ``max_num_seqs``.
    """

    mode: str = "eager"
    sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in GRAPH_MODES:
            raise ValueError(
                f"graph mode must be one of {', '.join(GRAPH_MODES)}; got {self.mode!r}"
            )
        if any(s <= 0 for s in self.sizes):
            raise ValueError("CUDA graph sizes must be positive")


@dataclass(frozen=True)
class ParallelConfig:
    """How many devices the model is split across (``engine/parallel/group.py``).

    Attributes:
        tensor_parallel_size: worker processes, one per device; 1 runs the model in the
            engine's own process.
        timeout_s: how long a worker waits in a collective for the others before it fails.
    """

    tensor_parallel_size: int = 1
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be at least 1")
        if self.timeout_s <= 0:
            raise ValueError("the workers' collective timeout must be positive")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, grouped by concern."""

    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    lora: LoraConfig = field(default_factory=LoraConfig)
    graphs: GraphConfig = field(default_factory=GraphConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 0

    @classmethod
    def create(
        cls,
        model_dir: str | Path | None = None,
        *,
        dtype: str = "auto",
        quantization: str | None = None,
        load_format: str = "auto",
        device: str | None = None,
        max_model_len: int | None = None,
        num_pages: int | None = None,
        pool_memory: int | None = None,
        max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
        max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
        max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
        max_loras: int | None = None,
        max_resident_loras: int | None = None,
        scheduling_policy: str = DEFAULT_SCHEDULING_POLICY,
        fairness_key: str = DEFAULT_FAIRNESS_KEY,
        input_token_weight: float = DEFAULT_INPUT_TOKEN_WEIGHT,
        output_token_weight: float = DEFAULT_OUTPUT_TOKEN_WEIGHT,
        enforce_eager: bool = False,
        graph_mode: str | None = None,
        cuda_graph_sizes: tuple[int, ...] = (),
        enable_prefix_caching: bool = True,
        block_size: int = DEFAULT_BLOCK_SIZE,
        seed: int = 0,
        device_memory: int | None = None,
        tensor_parallel_size: int = 1,
        lora_modules: Sequence[tuple[str, str | Path]] = (),
        pinned_lora_modules: Sequence[str] = (),
    ) -> EngineConfig:
        """Build a config, resolving "auto" values from the checkpoint and the machine.

        The pool is sized by ``num_pages`` or, failing that, by ``pool_memory`` bytes; with
        neither, by what the device has left after the weights (see
        :func:`engine.sizing.size_pool`), at most enough for ``max_num_seqs`` full-length
        sequences beside every adapter of ``lora_modules``. Those are the adapters loaded at
        start-up (``(name, directory)``; ``pinned_lora_modules`` names the pinned ones),
        sized from their configs: the pool, default or given, must hold one full-length
        request beside those of them resident at once, or this raises ``ValueError`` before
        anything loads. ``device_memory`` is a CUDA device's total bytes (default: asked of the
        device; ``loraserve plan`` passes ``--gpu-memory``); it is ignored off CUDA.
        ``quantization`` None serves the checkpoint as it is stored. ``load_format="dummy"``
        needs only ``config.json`` (random weights, sized from it).

        Decode steps run under CUDA graphs on a GPU and eagerly on the CPU, unless
        ``enforce_eager`` or an explicit ``graph_mode`` says otherwise; the graphs' memory
        (:func:`engine.cuda_graph.graph_memory_bytes`) is set aside before a default pool is
        sized.
        """
        path = Path(model_dir) if model_dir is not None else DEMO_DIR / "model"
        if not (path / "config.json").is_file():
            raise ValueError(f"{path.name}: not a model directory (no config.json)")
        hf = json.loads((path / "config.json").read_text())
        arch = ModelArch.load(path)
        torch_dtype = resolve_dtype(dtype, path)
        quantization = resolve_quantization(quantization, hf, path)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if tensor_parallel_size > 1:
            # (a plan for a GPU this machine lacks gives device_memory: nothing to count)
            check_tensor_parallel(
                tensor_parallel_size, arch, quantization, dev, device_memory is None
            )
        model_len = min(max_model_len or arch.context_limit, arch.context_limit)
        mode = graph_mode or ("graphs" if dev.type == "cuda" else "eager")
        if enforce_eager or tensor_parallel_size > 1:  # workers run every step eagerly
            mode = "eager"
        graphs = GraphConfig(mode, capture_sizes(max_num_seqs, cuda_graph_sizes))
        if dev.type != "cuda":
            device_memory = None
        elif device_memory is None and num_pages is None and pool_memory is None:
            device_memory = torch.cuda.get_device_properties(dev).total_memory
        adapters = startup_adapters(
            arch,
            [(name, Path(adapter)) for name, adapter in lora_modules],
            pinned_lora_modules,
            max_lora_rank,
        )
        sizing = size_pool(
            model_dir=path,
            arch=arch,
            dtype=torch_dtype,
            quantization=quantization,
            load_format=load_format,
            device_memory=device_memory,
            graph_mode=mode,
            graph_sizes=graphs.sizes,
            max_lora_rank=max_lora_rank,
            max_model_len=model_len,
            max_num_seqs=max_num_seqs,
            num_pages=num_pages,
            pool_memory=pool_memory,
            tensor_parallel_size=tensor_parallel_size,
            startup_adapters=adapters,
            max_loras=max_loras,
        )
        return cls(
            model=ModelConfig(path, torch_dtype, dev, model_len, quantization, load_format),
            cache=CacheConfig(sizing.num_pages, enable_prefix_caching, block_size, sizing),
            scheduler=SchedulerConfig(
                max_num_seqs,
                max_num_batched_tokens,
                scheduling_policy,
                fairness_key,
                input_token_weight,
                output_token_weight,
            ),
            # By default the tables hold 256 adapters, or max_loras if it is larger.
            lora=LoraConfig(
                max_lora_rank,
                max_loras,
                max_resident_loras or max(DEFAULT_MAX_RESIDENT_LORAS, max_loras or 0),
            ),
            graphs=graphs,
            parallel=ParallelConfig(tensor_parallel_size),
            seed=seed,
        )

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)
