"""What an adapter takes once resident, from its files' metadata alone.

:func:`adapter_pages` counts the pool pages a PEFT adapter needs without reading a tensor:
its kind, ranks, targets and virtual tokens come from ``adapter_config.json``, AdaLoRA's
pruned ranks and IA³'s vectors from the safetensors header. Every kind is rebuilt as the
loader would build it, on the meta device, so the count is the residency's own arithmetic
(:class:`~adapters.page_cost.PageCost`). The engine sizes its pool for the adapters it
loads at start-up this way, before any weight is read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

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
from adapters.page_cost import PageCost
from adapters.peft_config import LoraAdapterConfig
from adapters.peft_targets import plan_modules
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


def adapter_pages(path: Path, layout: BaseModelLayout, page_width: int, max_lora_rank: int) -> int:
    """Pages the PEFT adapter in ``path`` takes once resident, as the residency counts them
    (:class:`~adapters.page_cost.PageCost` over its modules and row blocks), without reading
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
