"""What the engine allocates, computed from a checkpoint's config and the flags alone.

The one source of truth for memory sizes: :meth:`engine.config.EngineConfig.create` sizes
the pool with :func:`size_pool`, :class:`engine.llm_engine.LLMEngine` takes its adapter
limits from :func:`max_adapter_pages` and :func:`pin_capacity`, and ``loraserve plan``
(``engine/plan.py``) reports the very same numbers without loading anything. Shapes come from
:class:`engine.arch.ModelArch`; a startup adapter's pages from
:func:`adapters.footprint.adapter_pages`.

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

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.errors import AdapterError
from adapters.footprint import adapter_pages
from engine.arch import ModelArch
from engine.cuda_graph import GraphShape, graph_memory_bytes
from engine.prefix_cache import PAGES_PER_TOKEN
from engine.weight_memory import device_weights, itemsize, weight_memory

# What the default pool leaves for activations and the allocator's own use, on a GPU (as
# vLLM's ``gpu_memory_utilization``).
GPU_MEMORY_FRACTION = 0.85
GPU_HEADROOM_BYTES = 1 << 30
# The default pool off a GPU: plenty for the small models that run there.
CPU_POOL_BYTES = 1 << 30


@dataclass(frozen=True)
class PageGeometry:
    """The shape of a page: one row of ``page_width`` elements in each layer's tensor."""

    num_layers: int
    page_width: int  # num_kv_heads · head_dim: one token's K (or V) in one layer
    itemsize: int

    @classmethod
    def of(cls, arch: ModelArch, dtype: torch.dtype) -> PageGeometry:
        return cls(arch.num_layers, arch.kv_width, itemsize(dtype))

    @property
    def page_bytes(self) -> int:
        """Bytes one page takes across all layers (what ``PagePool.page_bytes`` reports)."""
        return self.num_layers * self.page_width * self.itemsize

    @property
    def kv_bytes_per_token(self) -> int:
        """2 × layers × KV heads × head dim × bytes: a token's K and V in every layer."""
        return PAGES_PER_TOKEN * self.page_bytes


def graph_shape(
    arch: ModelArch, dtype: torch.dtype, max_lora_rank: int, sizes: tuple[int, ...]
) -> GraphShape:
    """The widths that size the decode graphs' memory."""
    return GraphShape(
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        q_width=arch.q_width,
        kv_width=arch.kv_width,
        max_lora_rank=max_lora_rank,
        sizes=sizes,
        itemsize=itemsize(dtype),
    )


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
    arch: ModelArch,
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
    page_bytes = PageGeometry.of(arch, dtype).page_bytes // split
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
        graphs = graph_memory_bytes(graph_shape(arch, dtype, max_lora_rank, graph_sizes))
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
    arch: ModelArch,
    modules: Sequence[tuple[str, Path]],
    pinned: Sequence[str],
    max_lora_rank: int,
) -> tuple[StartupAdapter, ...]:
    """``modules`` (name, adapter directory) with their pages, from their configs alone.

    Raises:
        ValueError: ``adapter NAME: ...``, for an adapter its loader would refuse by its
            config (a rank above ``max_lora_rank``, a target the base lacks, ...).
    """
    layout = arch.layout()
    found = []
    for name, path in modules:
        try:
            # the whole page's width: a tensor-parallel split divides every page alike
            pages = adapter_pages(Path(path), layout, arch.kv_width, max_lora_rank)
        except AdapterError as e:
            raise ValueError(f"adapter {name}: {e.message}") from None
        found.append(StartupAdapter(name, pages, name in pinned))
    return tuple(found)


# ---------------------------------------------------------------------------------------
# Adapters beside the KV cache.


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
