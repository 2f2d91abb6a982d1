"""The pages an adapter takes in the unified page pool.

For each target layer an adapter touches, with rank r (its largest over layers), A
``[r, in_features]`` and Bᵀ ``[r, out_features]`` take r rows each, a row cut into
``ceil(features / page_width)`` pages; a page id addresses the same row in every layer, so
these pages hold the adapter's weights in every layer at once. The count is fixed by the
model and the page width: the residency allocates it, the pool is sized by it, and ``plan``
reports it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from adapters.weights import RowBlock


class ModuleWeights(Protocol):
    """One LoRA module: ``lora_a`` (rank, in_features), ``lora_b`` (out_features, rank)."""

    @property
    def lora_a(self) -> torch.Tensor: ...

    @property
    def lora_b(self) -> torch.Tensor: ...

    @property
    def scaling(self) -> float: ...


@dataclass(frozen=True)
class PageCost:
    """Pages an adapter takes: for each target, its rank times the pages of one A row and
    one Bᵀ row. Fixed by the model and the page width, so any thread may ask.

    Attributes:
        chunks: per target, (pages of one A row, pages of one Bᵀ row).
        page_width: elements of a page in one layer (the width other rows are cut into).
    """

    chunks: Mapping[str, tuple[int, int]]
    page_width: int

    @classmethod
    def for_shapes(cls, shapes: Mapping[str, tuple[int, int]], page_width: int) -> PageCost:
        """The cost for target layers of these ``(in_features, out_features)``."""
        chunks = {
            t: (math.ceil(fan_in / page_width), math.ceil(fan_out / page_width))
            for t, (fan_in, fan_out) in shapes.items()
        }
        return cls(chunks, page_width)

    def pages(
        self, modules: Mapping[tuple[int, str], ModuleWeights], blocks: Sequence[RowBlock] = ()
    ) -> int:
        """Pages an adapter with these LoRA modules and other rows takes."""
        lora = self.lora_pages(ranks_by_target(modules))
        return lora + sum(self.block_pages(block) for block in blocks)

    def lora_pages(self, ranks: Mapping[str, int]) -> int:
        """Pages of the LoRA matrices of an adapter with these ranks by target (the largest
        over its layers): rank rows of A and of Bᵀ per target, for every layer at once."""
        return sum(rank * sum(self.chunks[t]) for t, rank in ranks.items())

    def block_pages(self, block: RowBlock) -> int:
        return block.num_rows * math.ceil(block.features / self.page_width)


def ranks_by_target(modules: Mapping[tuple[int, str], ModuleWeights]) -> dict[str, int]:
    """Each target's rank: the largest over the layers the adapter touches."""
    ranks: dict[str, int] = {}
    for (_, target), module in modules.items():
        ranks[target] = max(ranks.get(target, 0), int(module.lora_a.shape[0]))
    return ranks
