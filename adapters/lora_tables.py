"""The device tables the LoRA kernels read, by slot: where each resident adapter's pages are.

A slot is a row of every table here: its A and Bᵀ page ids per target, and its rank and
scaling per (layer, target); rank 0 marks a (layer, target) the adapter does not touch. The
residency (`adapters/residency.py`) hands out slots and keeps the host fields; the runner
(`engine/placement.py`) writes the device tensors, applying the residency's placements.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from adapters.base_layout import LINEAR_TARGETS


@dataclass(frozen=True)
class LoraTables:
    """Where resident adapters' weights are, by slot (device tensors the kernels read).

    Attributes:
        a_pages: per target, ``(max_slots, max_lora_rank, ceil(in_features / page_width))``
            int32: the pages of each row of A.
        b_pages: per target, ``(max_slots, max_lora_rank, ceil(out_features / page_width))``
            int32: the pages of each row of Bᵀ.
        ranks: ``(max_slots, num_layers, len(LINEAR_TARGETS))`` int32; 0 where untouched.
        scalings: ``(max_slots, num_layers, len(LINEAR_TARGETS))`` float32.
        host_ranks, host_scalings: host mirrors of those two (distinct tensors, even on a
            CPU device), so the runner plans a step without reading the device.
        a_first, b_first: per target, per slot (host lists): the first page of the adapter's
            rows when they lie in consecutive pages in order (A row j chunk c at page
            ``first + j · chunks + c``), so they can be read as a view of the pool without a
            gather; -1 otherwise.
        generation: a one-element list, bumped whenever a slot's adapter changes (placed or
            evicted): what is derived from the tables and kept across steps keys on it.
        blocks: per slot (host), its adapter's rows besides the LoRA matrices, by key
            (`adapters/weights.py`): where they are in the pool. Empty for plain LoRA.

    Writers: the device tensors (the first four) only by the runner, applying placements;
    the host fields only by the residency, when the scheduler places or evicts. Between a
    schedule and the runner's writes the two disagree for the slots placed in that
    schedule, which no one reads in between.
    """

    a_pages: dict[str, torch.Tensor]
    b_pages: dict[str, torch.Tensor]
    ranks: torch.Tensor
    scalings: torch.Tensor
    host_ranks: torch.Tensor
    host_scalings: torch.Tensor
    a_first: dict[str, list[int]]
    b_first: dict[str, list[int]]
    generation: list[int]
    blocks: list[dict[str, BlockTable]]

    @classmethod
    def allocate(
        cls,
        chunks: Mapping[str, tuple[int, int]],
        num_layers: int,
        max_slots: int,
        max_lora_rank: int,
        device: torch.device,
    ) -> LoraTables:
        """Empty tables for targets whose A and Bᵀ rows take ``chunks`` pages each.

        Every target's page tables are views of one tensor per matrix (target i at [i], its
        own chunks first), so the packed LoRA kernels reach q, k and v's tables (gate and
        up's) from one pointer (`kernels.lora_layout.packed_tables`).
        """
        ranks = torch.zeros(
            max_slots, num_layers, len(LINEAR_TARGETS), dtype=torch.int32, device=device
        )
        scalings = torch.zeros(max_slots, num_layers, len(LINEAR_TARGETS), device=device)
        stacked = (len(LINEAR_TARGETS), max_slots, max_lora_rank)
        a_chunks = max((a for a, _ in chunks.values()), default=0)
        b_chunks = max((b for _, b in chunks.values()), default=0)
        a_stack = torch.zeros(*stacked, a_chunks, dtype=torch.int32, device=device)
        b_stack = torch.zeros(*stacked, b_chunks, dtype=torch.int32, device=device)
        return cls(
            a_pages={t: a_stack[LINEAR_TARGETS.index(t), ..., :a] for t, (a, _) in chunks.items()},
            b_pages={t: b_stack[LINEAR_TARGETS.index(t), ..., :b] for t, (_, b) in chunks.items()},
            ranks=ranks,
            scalings=scalings,
            host_ranks=torch.zeros_like(ranks, device="cpu"),
            host_scalings=torch.zeros_like(scalings, device="cpu"),
            a_first={t: [-1] * max_slots for t in chunks},
            b_first={t: [-1] * max_slots for t in chunks},
            generation=[0],
            blocks=[{} for _ in range(max_slots)],
        )


@dataclass(frozen=True)
class BlockTable:
    """Where a resident adapter's block of rows is (`adapters/weights.py`'s ``RowBlock``).

    Attributes:
        pages: ``(rows, ceil(features / page_width))`` int64, host: row j of layer ℓ at
            pages ``pages[j]`` of layer ℓ's pool.
        rows: per layer, how many of those rows hold something.
        scaling: the block's ``RowBlock.scaling``.
    """

    pages: torch.Tensor
    rows: tuple[int, ...]
    scaling: float = 1.0
