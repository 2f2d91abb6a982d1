"""``loraserve plan``: what the engine will allocate, without allocating it.

From a model directory (or a preset's ``config.json``), the serving flags and a device's
memory, :func:`make_plan` computes what :class:`engine.llm_engine.LLMEngine` would allocate at
start-up: the weights (bytes and bits per parameter), the pool's pages, a token's KV bytes,
each adapter's pages, and so how many tokens of context fit beside how many resident
adapters. Every number comes from the engine's own code: the config from
:meth:`EngineConfig.create` (given ``device_memory`` in place of asking a GPU; its
``lora_modules``, the adapters a server loads at start-up, count in the default pool as
they do when serving), the sizes from ``engine/sizing.py``, an adapter's pages from the
residency's :class:`adapters.page_cost.PageCost` (real adapters read by
``adapters.kinds.read_adapter``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.base_layout import LINEAR_TARGETS, BaseModelLayout
from adapters.errors import AdapterError
from adapters.kinds import LoadContext, read_adapter
from adapters.page_cost import PageCost
from engine.arch import ModelArch
from engine.config import EngineConfig
from engine.prefix_cache import PAGES_PER_TOKEN
from engine.sizing import (
    PageGeometry,
    PoolSizing,
    pin_capacity,
    tokens_beside,
)
from engine.weight_memory import WeightMemory, device_weights, weight_memory

logger = logging.getLogger(__name__)

DEFAULT_RANKS = (8, 16, 32, 64)
# Resident adapters the grid shows, besides the most that leave one full-length request.
GRID_COUNTS = (1, 10, 100)

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_size(text: str) -> int:
    """Bytes from ``80GiB``, ``80GB``, ``512MiB`` or a plain number (powers of 1024 for
    KiB/MiB/GiB/TiB, of 1000 for KB/MB/GB/TB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (say 80GiB, 80GB or bytes)")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class AdapterPlan:
    """One adapter shape and what it takes.

    Attributes:
        name: ``rank 8`` for a rank of the grid, else the adapter directory's name.
        kind: the adapter's kind (``lora``, ``ia3``, ...: ``adapters/kinds.py``).
        rank: its largest rank (0 for a kind without LoRA matrices).
        targets: the linear layers its LoRA adapts.
        pages: pool pages it takes when resident (``AdapterEntry.pages``).
        fits: ``(resident adapters, tokens of KV cache that still fit beside them)``; the
            last count is the most that leave one request at ``max_model_len``.
    """

    name: str
    kind: str
    rank: int
    targets: tuple[str, ...]
    pages: int
    fits: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Plan:
    """What the engine allocates for one model and set of flags."""

    model: str
    dtype: str
    quantization: str
    max_model_len: int
    max_num_seqs: int
    max_lora_rank: int
    max_resident_loras: int
    graph_mode: str
    num_kv_heads: int
    head_dim: int
    geometry: PageGeometry
    weights: WeightMemory
    pool: PoolSizing
    adapters: tuple[AdapterPlan, ...]
    tensor_parallel_size: int = 1

    @property
    def kv_tokens(self) -> int:
        """Tokens the pool holds if it holds nothing but KV."""
        return self.pool.num_pages // PAGES_PER_TOKEN

    def to_json(self) -> dict[str, Any]:
        """The same numbers as the table, for machines."""
        w, p, g = self.weights, self.pool, self.geometry
        return {
            "model": self.model,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "max_lora_rank": self.max_lora_rank,
            "max_resident_loras": self.max_resident_loras,
            "graph_mode": self.graph_mode,
            "tensor_parallel_size": self.tensor_parallel_size,
            "weights": {
                "params": w.params,
                "bytes": w.bytes,
                "bits_per_param": w.bits_per_param,
                "quantized_params": w.quantized_params,
                "quantized_bytes": w.quantized_bytes,
                "quantized_bits_per_param": w.quantized_bits_per_param,
            },
            "pool": {
                "num_pages": p.num_pages,
                "page_bytes": p.page_bytes,
                "pool_bytes": p.pool_bytes,
                "scratch_pages": 1,
                "source": p.source,
                "device_memory": p.device_memory,
                "weight_bytes": p.weight_bytes,
                "graph_bytes": p.graph_bytes,
                "budget": p.budget,
                "cap_bytes": p.cap_bytes,
                "floor_pages": p.floor_pages,
                "startup_adapters": [
                    {"name": a.name, "pages": a.pages, "pinned": a.pinned}
                    for a in p.startup_adapters
                ],
                "num_layers": g.num_layers,
                "page_width": g.page_width,
            },
            "kv": {
                "bytes_per_token": g.kv_bytes_per_token,
                "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim,
                "tokens_if_only_kv": self.kv_tokens,
            },
            "adapters": [
                {
                    "name": a.name,
                    "kind": a.kind,
                    "rank": a.rank,
                    "targets": list(a.targets),
                    "pages": a.pages,
                    "bytes": a.pages * p.page_bytes,
                    "fits": [{"adapters": n, "tokens": t} for n, t in a.fits],
                }
                for a in self.adapters
            ],
        }


def make_plan(
    model_dir: str | Path | None = None,
    *,
    device_memory: int | None = None,
    ranks: Sequence[int] | None = None,
    targets: Sequence[str] | None = None,
    adapter_dirs: Iterable[Path] = (),
    **engine_args: Any,
) -> Plan:
    """What an engine built with ``EngineConfig.create(model_dir, **engine_args)`` allocates.

    ``device_memory`` is the GPU's total bytes (the plan is then for CUDA, as on that GPU);
    without it the device is ``engine_args["device"]`` or the machine's, as the engine's.
    The adapters are one per rank of ``ranks`` on ``targets`` (default: the ranks of
    :data:`DEFAULT_RANKS` up to ``max_lora_rank``, on every linear layer), then each of
    ``adapter_dirs``.

    Raises:
        ValueError: a bad flag, a rank above ``max_lora_rank``, an adapter that does not load.
    """
    if device_memory is not None:
        engine_args["device"] = "cuda"
    config = EngineConfig.create(model_dir, device_memory=device_memory, **engine_args)
    return plan_for(config, ranks=ranks, targets=targets, adapter_dirs=adapter_dirs)


def plan_for(
    config: EngineConfig,
    *,
    ranks: Sequence[int] | None = None,
    targets: Sequence[str] | None = None,
    adapter_dirs: Iterable[Path] = (),
) -> Plan:
    """The plan of an engine built from ``config`` (a running server's plan: its status
    route shows it beside what is live). Arguments as :func:`make_plan`'s."""
    mc = config.model
    arch = ModelArch.load(mc.model_dir)
    whole = PageGeometry.of(arch, mc.dtype)
    # Split across N devices, each holds 1/N of every page: the figures are one device's.
    split = config.parallel.tensor_parallel_size
    geometry = PageGeometry(whole.num_layers, whole.page_width // split, whole.itemsize)
    pool = config.cache.sizing or PoolSizing(
        config.cache.num_pages, geometry.page_bytes, "num_pages", tensor_parallel_size=split
    )
    layout = arch.layout()
    cost = PageCost.for_shapes(layout.linear_shapes, whole.page_width)  # pages: the same ids

    def fits(pages: int) -> tuple[tuple[int, int], ...]:
        most = min(
            config.lora.max_resident_loras, pin_capacity(pool.num_pages, mc.max_model_len) // pages
        )
        counts = [n for n in GRID_COUNTS if n < most] + ([most] if most else [])
        return tuple((n, tokens_beside(pool.num_pages, n * pages)) for n in counts)

    # (name, kind, rank, targets, pages) of each adapter to size.
    sized: list[tuple[str, str, int, tuple[str, ...], int]] = [
        (f"rank {r}", "lora", r, ts, cost.lora_pages(dict.fromkeys(ts, r)))
        for r, ts in _rank_shapes(ranks, targets, config.lora.max_lora_rank, layout)
    ]
    context = LoadContext(layout, config.lora.max_lora_rank, mc.dtype)
    for path in adapter_dirs:
        try:
            weights = read_adapter(path, context)
        except AdapterError as e:
            raise ValueError(f"{path}: {e.message}") from None
        pages = cost.pages(weights.modules, weights.blocks(layout.num_layers))
        sized.append((path.name, weights.kind, weights.max_rank, _ordered(weights.targets), pages))
    return Plan(
        model=mc.model_dir.name,
        dtype=str(mc.dtype).removeprefix("torch."),
        quantization=mc.quantization,
        max_model_len=mc.max_model_len,
        max_num_seqs=config.scheduler.max_num_seqs,
        max_lora_rank=config.lora.max_lora_rank,
        max_resident_loras=config.lora.max_resident_loras,
        graph_mode=config.graphs.mode,
        num_kv_heads=arch.num_kv_heads // split,
        head_dim=arch.head_dim,
        geometry=geometry,
        weights=device_weights(
            weight_memory(mc.model_dir, mc.dtype, mc.quantization, mc.load_format), split
        ),
        tensor_parallel_size=split,
        pool=pool,
        adapters=tuple(AdapterPlan(*a, fits(max(a[-1], 1))) for a in sized),
    )


def adapter_dirs_under(root: Path) -> list[Path]:
    """``root`` if it is a PEFT adapter directory, else each one directly under it."""
    if (root / "adapter_config.json").is_file():
        return [root]
    found = sorted(p for p in root.iterdir() if (p / "adapter_config.json").is_file())
    if not found:
        raise ValueError(f"{root}: no adapter directories (adapter_config.json) there")
    return found


def _rank_shapes(
    ranks: Sequence[int] | None,
    targets: Sequence[str] | None,
    max_lora_rank: int,
    layout: BaseModelLayout,
) -> list[tuple[int, tuple[str, ...]]]:
    chosen = _ordered(targets or layout.linear_shapes)
    unknown = set(chosen) - set(layout.linear_shapes)
    if unknown:
        raise ValueError(f"unknown targets {sorted(unknown)}; known: {', '.join(LINEAR_TARGETS)}")
    if ranks is None:
        ranks = [r for r in DEFAULT_RANKS if r <= max_lora_rank]
    for r in ranks:
        if not 0 < r <= max_lora_rank:
            raise ValueError(f"rank {r} is not between 1 and --max-lora-rank {max_lora_rank}")
    return [(r, chosen) for r in ranks]


def _ordered(targets: Iterable[str]) -> tuple[str, ...]:
    names = set(targets)
    return tuple(t for t in LINEAR_TARGETS if t in names) + tuple(
        sorted(names - set(LINEAR_TARGETS))
    )


def served_plan(config: EngineConfig) -> dict[str, Any] | None:
    """A serving engine's plan as JSON (:meth:`Plan.to_json`), or None, logged, when it
    cannot be made: a server never refuses to start over the plan it shows."""
    try:
        return plan_for(config).to_json()
    except (OSError, ValueError, KeyError) as e:
        logger.warning("no plan to show beside the live pool: %s", e)
        return None
