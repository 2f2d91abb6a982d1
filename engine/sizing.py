"""What the engine allocates, computed from a checkpoint's config and the flags alone.

The one source of truth for memory sizes: :meth:`engine.config.EngineConfig.create` sizes
the pool with :func:`size_pool`, :class:`engine.llm_engine.LLMEngine` takes its adapter
limits from :func:`max_adapter_pages` and :func:`pin_capacity` and its adapter layout from
:func:`decoder_layout`, and ``loraserve plan`` (``engine/plan.py``) reports the very same
numbers without loading anything.

Semantics:
    page_bytes         = num_layers · num_kv_heads · head_dim · itemsize   (one row, every layer)
    kv_bytes_per_token = PAGES_PER_TOKEN · page_bytes                       (its K and its V)
    default pool bytes = on a GPU: ⌊0.85 · device memory⌋ − weights − 1 GiB − decode graphs;
                         on the CPU: 1 GiB (− decode graphs, if asked for)
                         then at most max_num_seqs · max_model_len tokens' KV
    num_pages          = num_pages, else ⌊pool bytes / page_bytes⌋ (the scratch page is extra)
    split across N tensor-parallel devices, every figure is one device's: page_bytes / N
    (its KV heads), the weights / N, and --pool-memory is each device's
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from adapters.base_layout import BaseModelLayout
from engine.cuda_graph import GraphShape, graph_memory_bytes
from engine.dummy import checkpoint_shapes
from engine.model import ModelArch
from engine.naming import is_quantized_linear
from engine.prefix_cache import PAGES_PER_TOKEN
from engine.quantization import QUANT_STATE_KEY, unpack_quant_state
from kernels.nf4 import NESTED_BLOCKSIZE, nf4_nbytes

# What the default pool leaves for activations and the allocator's own use, on a GPU (as
# vLLM's ``gpu_memory_utilization``).
GPU_MEMORY_FRACTION = 0.85
GPU_HEADROOM_BYTES = 1 << 30
# The default pool off a GPU: plenty for the small models that run there.
CPU_POOL_BYTES = 1 << 30


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class PageGeometry:
    """The shape of a page: one row of ``page_width`` elements in each layer's tensor."""

    num_layers: int
    page_width: int  # num_kv_heads · head_dim: one token's K (or V) in one layer
    itemsize: int

    @classmethod
    def from_config(cls, hf: dict[str, Any], dtype: torch.dtype) -> PageGeometry:
        num_heads = int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or hf["hidden_size"] // num_heads)
        width = int(hf.get("num_key_value_heads") or num_heads) * head_dim
        return cls(int(hf["num_hidden_layers"]), width, itemsize(dtype))

    @property
    def page_bytes(self) -> int:
        """Bytes one page takes across all layers (what ``PagePool.page_bytes`` reports)."""
        return self.num_layers * self.page_width * self.itemsize

    @property
    def kv_bytes_per_token(self) -> int:
        """2 × layers × KV heads × head dim × bytes: a token's K and V in every layer."""
        return PAGES_PER_TOKEN * self.page_bytes


def graph_shape(
    hf: dict[str, Any], dtype: torch.dtype, max_lora_rank: int, sizes: tuple[int, ...]
) -> GraphShape:
    """The widths that size the decode graphs' memory, from a checkpoint's config.json."""
    num_heads = int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or hf["hidden_size"] // num_heads)
    return GraphShape(
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        q_width=num_heads * head_dim,
        kv_width=int(hf.get("num_key_value_heads") or num_heads) * head_dim,
        max_lora_rank=max_lora_rank,
        sizes=sizes,
        itemsize=itemsize(dtype),
    )


# ---------------------------------------------------------------------------------------
# The base model's weights.


@dataclass(frozen=True)
class WeightMemory:
    """The base model's weights once loaded.

    Attributes:
        params: parameters of every weight (of a 4-bit weight, the values it packs).
        bytes: bytes they take, quantization included.
        quantized_params, quantized_bytes: the NF4 weights alone (their scales and maps in
            the bytes).
    """

    params: int
    bytes: int
    quantized_params: int = 0
    quantized_bytes: int = 0

    @property
    def bits_per_param(self) -> float:
        """Over every weight of the base."""
        return 8 * self.bytes / max(self.params, 1)

    @property
    def quantized_bits_per_param(self) -> float:
        """Over the NF4 weights alone (``QuantizationReport.bits_per_param``)."""
        return 8 * self.quantized_bytes / max(self.quantized_params, 1)


def weight_memory(
    model_dir: Path, dtype: torch.dtype, quantization: str, load_format: str = "auto"
) -> WeightMemory:
    """What the checkpoint's weights take once loaded.

    The tensors are read from the safetensors headers or, with dummy weights (or no
    safetensors at all), from the shapes ``config.json`` gives the model. Float tensors count
    in ``dtype``; each weight stored in 4 bits (bitsandbytes), or quantized to NF4 at load
    (the decoder's linear weights; blocksize 64, double quantization), counts as the
    :class:`~kernels.nf4.NF4Weight` it is loaded as.
    """
    size = itemsize(dtype)
    stored_nf4 = {} if load_format == "dummy" else _stored_nf4_weights(model_dir)
    params = total = q_params = q_bytes = 0
    for name, shape in _checkpoint_tensors(model_dir, load_format):
        head, infix, _ = name.partition(".weight.")
        if infix and head + ".weight" in stored_nf4:
            continue  # a packed weight's scales and maps: counted with it
        numel = math.prod(shape)
        if name in stored_nf4:
            numel, nbytes = stored_nf4[name]
        elif quantization == "nf4" and is_quantized_linear(name, shape):
            nbytes = nf4_nbytes(numel)
        else:
            params += numel
            total += numel * size
            continue
        params += numel
        q_params += numel
        total += nbytes
        q_bytes += nbytes
    return WeightMemory(params, total, q_params, q_bytes)


def _stored_nf4_weights(model_dir: Path) -> dict[str, tuple[int, int]]:
    """``<module>.weight`` to ``(params, bytes)`` of each weight a bitsandbytes checkpoint
    stores in 4 bits, from its quant state (a few bytes of JSON read per weight)."""
    found = {}
    suffix = ".weight." + QUANT_STATE_KEY
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if not name.endswith(suffix):
                    continue
                state = unpack_quant_state(f.get_tensor(name))
                numel = math.prod(int(d) for d in state["shape"])
                nested = "nested_blocksize" in state
                nested_blocksize = int(state.get("nested_blocksize", NESTED_BLOCKSIZE))
                nbytes = nf4_nbytes(numel, int(state["blocksize"]), nested, nested_blocksize)
                found[name.removesuffix("." + QUANT_STATE_KEY)] = (numel, nbytes)
    return found


def device_weights(weights: WeightMemory, split: int) -> WeightMemory:
    """One device's share of ``weights`` split across ``split`` tensor-parallel devices:
    1/N of each, an NF4 part's block scales in float32 (4.5 bits a parameter rather than
    double quantization's 4.127: a part's blocks no longer form the second level's whole
    groups, `engine/parallel/sharding.py`). The norms, whole on every device, are left out."""
    if split == 1:
        return weights
    q_params = weights.quantized_params // split
    q_bytes = nf4_nbytes(q_params, nested=False) if q_params else 0
    floats = (weights.bytes - weights.quantized_bytes) // split
    return WeightMemory(weights.params // split, floats + q_bytes, q_params, q_bytes)


def weight_bytes(
    model_dir: Path, dtype: torch.dtype, quantization: str, load_format: str = "auto"
) -> int:
    """Bytes the checkpoint's weights take once loaded (see :func:`weight_memory`)."""
    return weight_memory(model_dir, dtype, quantization, load_format).bytes


def _checkpoint_tensors(model_dir: Path, load_format: str) -> Iterator[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every tensor: from the safetensors headers, or from the model
    ``config.json`` describes (built on the meta device) with dummy weights or no files."""
    files = sorted(model_dir.glob("*.safetensors"))
    if load_format == "dummy" or not files:
        yield from checkpoint_shapes(model_dir)
        return
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, tuple(f.get_slice(name).get_shape())


# ---------------------------------------------------------------------------------------
# The pool.


@dataclass(frozen=True)
class PoolSizing:
    """How the pool's size was reached.

    Attributes:
        num_pages: pages in the pool (the scratch page not counted).
        page_bytes: one device's bytes of one page across all layers (a page split across
            ``tensor_parallel_size`` devices holds 1/N of its width on each).
        source: "num_pages", "pool_memory" (both given), "device" (a GPU's memory) or "cpu"
            (the CPU default).
        device_memory: the GPU's total bytes ("device" only).
        weight_bytes: the weights taken off the device's memory ("device" only).
        graph_bytes: the decode graphs' estimate taken off the default budget (0 eager).
        budget: the default budget after those, before the cap (None when given).
        cap_bytes: every running sequence at full length: the default budget's ceiling.
        tensor_parallel_size: the devices the model and every page are split across.
    """

    num_pages: int
    page_bytes: int
    source: str
    device_memory: int | None = None
    weight_bytes: int | None = None
    graph_bytes: int = 0
    budget: int | None = None
    cap_bytes: int | None = None
    tensor_parallel_size: int = 1

    @property
    def pool_bytes(self) -> int:
        return self.num_pages * self.page_bytes


def size_pool(
    *,
    model_dir: Path,
    hf: dict[str, Any],
    dtype: torch.dtype,
    quantization: str,
    load_format: str,
    device_memory: int | None,
    graph_mode: str,
    graph_sizes: tuple[int, ...],
    max_lora_rank: int,
    max_model_len: int,
    max_num_seqs: int,
    num_pages: int | None = None,
    pool_memory: int | None = None,
    tensor_parallel_size: int = 1,
) -> PoolSizing:
    """The pool's pages, by ``num_pages``, else ``pool_memory`` bytes, else the default
    budget (module docstring): ``device_memory`` is a GPU's total memory, None off a GPU.

    Raises:
        ValueError: the weights, or the decode graphs, leave no GPU memory for the pool.
    """
    split = tensor_parallel_size
    page_bytes = PageGeometry.from_config(hf, dtype).page_bytes // split
    if num_pages is not None:
        return PoolSizing(num_pages, page_bytes, "num_pages", tensor_parallel_size=split)
    if pool_memory is not None:
        return PoolSizing(
            pool_memory // page_bytes, page_bytes, "pool_memory", tensor_parallel_size=split
        )
    weights = None
    if device_memory is None:
        budget = CPU_POOL_BYTES
    else:
        whole = weight_memory(model_dir, dtype, quantization, load_format)
        weights = device_weights(whole, split).bytes
        budget = int(device_memory * GPU_MEMORY_FRACTION) - weights - GPU_HEADROOM_BYTES
        if budget <= 0:
            raise ValueError("the model leaves no GPU memory for the page pool")
    graphs = 0
    if graph_mode == "graphs":
        graphs = graph_memory_bytes(graph_shape(hf, dtype, max_lora_rank, graph_sizes))
        budget -= graphs
        if budget <= 0:
            raise ValueError(
                "the decode graphs leave no GPU memory for the page pool; "
                "pass --enforce-eager or fewer --max-num-seqs"
            )
    # Never more than every running sequence at full length needs.
    cap = PAGES_PER_TOKEN * max_model_len * max_num_seqs * page_bytes
    return PoolSizing(
        min(budget, cap) // page_bytes,
        page_bytes,
        "cpu" if device_memory is None else "device",
        device_memory,
        weights,
        graphs,
        budget,
        cap,
        split,
    )


# ---------------------------------------------------------------------------------------
# Adapters beside the KV cache.


def decoder_layout(arch: ModelArch) -> BaseModelLayout:
    """The target linear layers an adapter may touch, as the adapter loader sees them."""
    return BaseModelLayout.for_decoder(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_heads=arch.num_heads,
        num_kv_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        vocab_size=arch.vocab_size,
        tie_word_embeddings=arch.tie_word_embeddings,
    )


def max_adapter_pages(num_pages: int) -> int:
    """The most pages one adapter may take: an adapter's request needs at least the KV pages
    of one token beside it."""
    return num_pages - PAGES_PER_TOKEN


def pin_capacity(num_pages: int, max_model_len: int) -> int:
    """The most pages pinned adapters may take together: pins leave room for one request at
    the full context length."""
    return max(num_pages - PAGES_PER_TOKEN * max_model_len, 0)


def tokens_beside(num_pages: int, adapter_pages: int) -> int:
    """Tokens of KV cache the pool holds beside ``adapter_pages`` pages of adapters."""
    return max(num_pages - adapter_pages, 0) // PAGES_PER_TOKEN
