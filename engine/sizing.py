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
                         + every startup adapter's pages
    floor              = max_model_len tokens' KV + the startup adapters resident at once to
                         serve each in turn: every pinned one and the largest other one (the
                         max_loras largest others, with max_loras)
    num_pages          = num_pages, else ⌊pool bytes / page_bytes⌋ (the scratch page is extra),
                         never below the floor: the CPU default rises to it; a GPU that
                         cannot give it, or a given size below it with startup adapters, is
                         refused before any weight loads, naming the flag and the value
    split across N tensor-parallel devices, every figure is one device's: page_bytes / N
    (its KV heads), the weights / N, and --pool-memory is each device's
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig

from adapters.base_layout import BaseModelLayout
from adapters.embed_head import plan_embed_head
from adapters.errors import (
    ADAPTER_NOT_FOUND,
    ADAPTER_RANK_TOO_LARGE,
    INVALID_ADAPTER,
    UNSUPPORTED_ADAPTER_FEATURE,
    AdapterError,
)
from adapters.kinds import config_kind
from adapters.loader import read_config_json, weights_file
from adapters.peft_config import LoraAdapterConfig
from adapters.peft_targets import plan_modules
from adapters.residency import PageCost
from adapters.safetensors_file import read_header
from adapters.weights import (
    ADALORA,
    DORA,
    IA3,
    LORA,
    PREFIX_TUNING,
    PROMPT_TUNING,
    AdapterWeights,
    Ia3Vector,
    LoraModuleWeights,
)
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
        cap_bytes: every running sequence at full length beside every startup adapter: the
            default budget's ceiling.
        tensor_parallel_size: the devices the model and every page are split across.
        startup_adapters: the adapters loaded at start-up, with their pages.
        floor_pages: the fewest pages that serve: one request at the full context length
            beside the startup adapters resident at once (:func:`resident_at_once`).
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
    startup_adapters: tuple[StartupAdapter, ...] = ()
    floor_pages: int = 0

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
    startup_adapters: Sequence[StartupAdapter] = (),
    max_loras: int | None = None,
) -> PoolSizing:
    """The pool's pages, by ``num_pages``, else ``pool_memory`` bytes, else the default
    budget (module docstring): ``device_memory`` is a GPU's total memory, None off a GPU.

    Raises:
        ValueError: the weights, or the decode graphs, leave no GPU memory for the pool; or
            the pool (given, or all a GPU leaves) is below the floor (module docstring).
    """
    split = tensor_parallel_size
    page_bytes = PageGeometry.from_config(hf, dtype).page_bytes // split
    adapters = tuple(startup_adapters)
    floor = PoolFloor(PAGES_PER_TOKEN * max_model_len, resident_at_once(adapters, max_loras))
    if num_pages is not None or pool_memory is not None:
        if num_pages is not None:
            given, source = num_pages, "num_pages"
        else:
            assert pool_memory is not None
            given, source = pool_memory // page_bytes, "pool_memory"
        if adapters and given < floor.pages:
            raise ValueError(_too_small(floor, max_model_len, page_bytes, num_pages, pool_memory))
        return PoolSizing(
            given,
            page_bytes,
            source,
            tensor_parallel_size=split,
            startup_adapters=adapters,
            floor_pages=floor.pages,
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
    # Never more than every running sequence at full length needs, beside every adapter
    # loaded at start-up (so that they stay resident together).
    cap_pages = PAGES_PER_TOKEN * max_model_len * max_num_seqs + sum(a.pages for a in adapters)
    cap = cap_pages * page_bytes
    pages = min(budget, cap) // page_bytes
    if pages < floor.pages:
        if device_memory is not None:
            raise ValueError(
                f"{floor.describe(max_model_len)}; the GPU leaves room for {pages} pages of "
                f"{page_bytes} bytes after the weights, the headroom and the decode graphs: "
                "pass a smaller --max-model-len" + (" or --enforce-eager" if graphs else "")
            )
        pages = floor.pages  # the CPU's 1 GiB is a default, not a limit
    return PoolSizing(
        pages,
        page_bytes,
        "cpu" if device_memory is None else "device",
        device_memory,
        weights,
        graphs,
        budget,
        cap,
        split,
        adapters,
        floor.pages,
    )


def _too_small(
    floor: PoolFloor,
    max_model_len: int,
    page_bytes: int,
    num_pages: int | None,
    pool_memory: int | None,
) -> str:
    """Why a pool of the given size is refused, and the flag's value that would do."""
    need = floor.describe(max_model_len)
    if num_pages is not None:
        return (
            f"{need}; --num-pages {num_pages} cannot hold them: "
            f"pass --num-pages {floor.pages} or more"
        )
    assert pool_memory is not None
    return (
        f"{need}; --pool-memory {pool_memory} holds {pool_memory // page_bytes} pages of "
        f"{page_bytes} bytes: pass --pool-memory {floor.pages * page_bytes} or more"
    )


# ---------------------------------------------------------------------------------------
# Startup adapters: their pages, from their configs, before anything loads.


@dataclass(frozen=True)
class StartupAdapter:
    """An adapter loaded at start-up (``--lora-modules``, or the demo's).

    Attributes:
        name: the name it is served under.
        pages: pool pages it takes once resident (:func:`adapter_pages`).
        pinned: kept resident until unloaded (``--pinned-lora-modules``).
    """

    name: str
    pages: int
    pinned: bool = False


def resident_at_once(
    adapters: Sequence[StartupAdapter], max_loras: int | None
) -> tuple[StartupAdapter, ...]:
    """The startup adapters the pool must hold together to serve each of them in turn:
    every pinned one (they never leave) and the largest other one, or the ``max_loras``
    largest others (what one step may need)."""
    pinned = [a for a in adapters if a.pinned]
    others = sorted((a for a in adapters if not a.pinned), key=lambda a: a.pages, reverse=True)
    return (*others[: max_loras or 1], *pinned)


@dataclass(frozen=True)
class PoolFloor:
    """The fewest pages that serve: one request at the full context length beside the
    startup adapters resident at once.

    Attributes:
        kv_pages: one full-length request's K and V.
        adapters: the startup adapters held beside it (:func:`resident_at_once`).
    """

    kv_pages: int
    adapters: tuple[StartupAdapter, ...]

    @property
    def pages(self) -> int:
        return self.kv_pages + sum(a.pages for a in self.adapters)

    def describe(self, max_model_len: int) -> str:
        """What the floor is made of, naming the adapters (a start-up error's first half)."""
        request = f"one request of --max-model-len {max_model_len} tokens"
        if not self.adapters:
            return f"{request} needs {self.kv_pages} pages of KV"
        if len(self.adapters) == 1:
            (only,) = self.adapters
            who = f"adapter {only.name}: the adapter needs {only.pages} pages"
        else:
            names = ", ".join(a.name + (" (pinned)" if a.pinned else "") for a in self.adapters)
            held = sum(a.pages for a in self.adapters)
            who = f"adapters {names}: resident at once they need {held} pages"
        return f"{who}, beside {request} ({self.kv_pages} pages of KV): {self.pages} pages in all"


def startup_adapters(
    model_dir: Path,
    modules: Sequence[tuple[str, Path]],
    pinned: Sequence[str],
    page_width: int,
    max_lora_rank: int,
) -> tuple[StartupAdapter, ...]:
    """``modules`` (name, adapter directory) with their pages, from their configs alone.

    Raises:
        ValueError: ``adapter NAME: ...``, for an adapter its loader would refuse by its
            config (a rank above ``max_lora_rank``, a target the base lacks, ...).
    """
    if not modules:
        return ()
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    layout = decoder_layout(ModelArch.from_config(config))
    found = []
    for name, path in modules:
        try:
            pages = adapter_pages(Path(path), layout, page_width, max_lora_rank)
        except AdapterError as e:
            raise ValueError(f"adapter {name}: {e.message}") from None
        found.append(StartupAdapter(name, pages, name in pinned))
    return tuple(found)


def adapter_pages(path: Path, layout: BaseModelLayout, page_width: int, max_lora_rank: int) -> int:
    """Pages the PEFT adapter in ``path`` takes once resident, as the residency counts them
    (:class:`~adapters.residency.PageCost` over its modules and row blocks), without reading
    a tensor: ranks, targets and virtual tokens come from ``adapter_config.json``; AdaLoRA's
    pruned ranks and IA³'s vectors from the safetensors header (shapes only). The tensors
    are stand-ins on the meta device, so the count runs the residency's own arithmetic.

    Raises:
        AdapterError: a config (or header) the loader refuses, a rank above
            ``max_lora_rank``, a kind that is not served.
    """
    if not path.is_dir():
        raise AdapterError(ADAPTER_NOT_FOUND, "adapter directory not found")
    raw = read_config_json(path)
    shapes = _adapter_shapes(path, raw, layout, max_lora_rank)
    cost = PageCost.for_shapes(layout.linear_shapes, page_width)
    return cost.pages(shapes.modules, shapes.blocks(layout.num_layers))


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(shape, device="meta")


def _meta_lora(rank: int, in_features: int, out_features: int) -> LoraModuleWeights:
    # lora_a (rank, in_features), lora_b (out_features, rank)
    return LoraModuleWeights(_meta(rank, in_features), _meta(out_features, rank), 1.0)


def _adapter_shapes(
    path: Path, raw: Mapping[str, Any], layout: BaseModelLayout, max_lora_rank: int
) -> AdapterWeights:
    """The adapter as the loader would read it, every tensor on the meta device."""
    kind = config_kind(raw)
    name = path.absolute().name
    if kind in (LORA, DORA):
        config = LoraAdapterConfig.from_dict(raw)
        if config.max_rank > max_lora_rank:
            raise AdapterError(
                ADAPTER_RANK_TOO_LARGE,
                f"adapter rank {config.max_rank} exceeds the server's max_lora_rank "
                f"{max_lora_rank}",
            )
        plan = plan_modules(config, layout, embed_head=True)
        ends = plan_embed_head(config, layout)
        vocab, hidden = ends.vocab_size, ends.hidden_size
        embedding = head = None
        if ends.embedding is not None:  # lora_a (rank, vocab), lora_b (hidden, rank)
            embedding = _meta_lora(ends.embedding[0], vocab, hidden)
        if ends.head is not None:  # lora_a (rank, hidden), lora_b (vocab, rank); tied too
            head = _meta_lora(ends.head[0], hidden, vocab)
        return AdapterWeights(
            name=name,
            config=config,
            modules={k: _meta_lora(p.rank, p.in_features, p.out_features) for k, p in plan.items()},
            kind=kind,
            # DoRA: one scale per output feature of every adapted module
            dora={k: _meta(p.out_features) for k, p in plan.items()} if kind == DORA else {},
            embedding=embedding,
            head=head,
        )
    if kind in (PROMPT_TUNING, PREFIX_TUNING):
        n = raw.get("num_virtual_tokens")
        if type(n) is not int or n <= 0:
            raise AdapterError(
                INVALID_ADAPTER,
                "adapter_config.json: num_virtual_tokens must be a positive integer",
            )
        if kind == PROMPT_TUNING:  # (n, hidden_size)
            tokens = _meta(n, layout.hidden_size)
            return AdapterWeights(
                name=name, config=raw, modules={}, kind=kind, virtual_tokens=tokens
            )
        prefix = _meta(layout.num_layers, 2, n, layout.kv_width)  # (layers, K|V, n, kv_width)
        return AdapterWeights(name=name, config=raw, modules={}, kind=kind, prefix=prefix)
    if kind in (ADALORA, IA3):
        return _header_shapes(path, raw, kind, layout, max_lora_rank)
    raise AdapterError(
        UNSUPPORTED_ADAPTER_FEATURE,
        "adapter_config.json: its peft_type is not served (served: LORA, DoRA, ADALORA, IA3, "
        "PROMPT_TUNING, PREFIX_TUNING)",
    )


def _header_shapes(
    path: Path, raw: Mapping[str, Any], kind: str, layout: BaseModelLayout, max_lora_rank: int
) -> AdapterWeights:
    """AdaLoRA's and IA³'s modules from the safetensors header: AdaLoRA's ranks after
    pruning are its ``lora_A`` rows; an IA³ vector ``(1, in)`` scales a module's input,
    ``(out, 1)`` its output. Keys the base has no module for are left to the loader."""
    header, _ = read_header(weights_file(path))
    where = {module_path: (layer, target) for layer, target, module_path in layout.modules()}
    modules: dict[tuple[int, str], LoraModuleWeights] = {}
    ia3: dict[tuple[int, str], Ia3Vector] = {}
    for key, (_, shape) in header.items():
        module_path, _, part = key.removeprefix("base_model.model.").rpartition(".")
        if module_path not in where or len(shape) != 2:
            continue
        layer, target = where[module_path]
        if kind == ADALORA and part == "lora_A" and shape[0] > 0:
            if shape[0] > max_lora_rank:
                raise AdapterError(
                    ADAPTER_RANK_TOO_LARGE,
                    f"adapter rank {shape[0]} exceeds the server's max_lora_rank {max_lora_rank}",
                )
            in_features, out_features = layout.linear_shapes[target]
            modules[layer, target] = _meta_lora(shape[0], in_features, out_features)
        elif kind == IA3 and part == "ia3_l":
            feedforward = shape[0] == 1  # (1, in_features); else (out_features, 1)
            ia3[layer, target] = Ia3Vector(_meta(math.prod(shape)), feedforward)
    return AdapterWeights(
        name=path.absolute().name, config=raw, modules=modules, kind=kind, ia3=ia3
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
