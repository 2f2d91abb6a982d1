"""A placement: what the runner must write to make one adapter resident in its slot.

The residency (on the scheduler's side) decides where an adapter goes, pages and a slot, and
records the decision as a :class:`Placement`; the step's ``SchedulerOutput`` carries the
placements of that schedule to the runner, which writes them into the page pool and the
device page tables before its forward (``engine/placement.py``). The scheduler thus never
writes device memory, and the command is a plain description: it could cross a process
boundary or go to every tensor-parallel worker alike.

Semantics (what applying a placement of adapter slot ``s`` writes):
    for each target t in ``targets`` (rank R = ``a_pages.shape[0]``), for each layer l
    (r_l = rows of ``lora_a[l]``, 0 where it is None):
        A rows j < r_l    at pages a_pages[j, :] of layer l's pool  ← lora_a[l][j]
        Bᵀ rows j < r_l   at pages b_pages[j, :] of layer l's pool  ← lora_b[l][:, j]
        rows r_l <= j < R of both                                   ← zeros
    tables.a_pages[t][s, :R] ← a_pages;  tables.b_pages[t][s, :R] ← b_pages
    tables.ranks[s] ← ranks;  tables.scalings[s] ← scalings
    for each block, for each layer l with rows: row j at pages[j, :] of layer l's pool
Everything else in the slot's rows is stale and never read (``ranks`` says how far to read).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class TargetPlacement:
    """One target layer's rows of an adapter: where they go, and what they hold.

    Attributes:
        target: the linear layer's name (``q_proj``, ...).
        a_pages: ``(rank, ceil(in_features / page_width))`` int32, host: the pages of A's
            rows; ``rank`` is the adapter's largest rank for this target over its layers.
        b_pages: ``(rank, ceil(out_features / page_width))`` int32, host: those of Bᵀ's rows.
        lora_a: per layer, ``(rank_l, in_features)`` host weights, or None where the adapter
            leaves the layer untouched.
        lora_b: per layer, ``(out_features, rank_l)`` host weights (stored transposed), or None.
        in_features, out_features: the target layer's shape (the width of the zero rows).
    """

    target: str
    a_pages: torch.Tensor
    b_pages: torch.Tensor
    lora_a: tuple[torch.Tensor | None, ...]
    lora_b: tuple[torch.Tensor | None, ...]
    in_features: int
    out_features: int


@dataclass(frozen=True, eq=False)
class BlockPlacement:
    """An adapter's block of rows besides its LoRA matrices (``adapters.weights.RowBlock``).

    Attributes:
        key: what the rows are (``"dora:q_proj"``, ``"prefix"``, ...).
        pages: ``(rows, chunks)`` int32, host: row j of every layer at pages ``pages[j]``.
        rows: per layer, ``(n_rows, features)`` host rows (``n_rows`` ≤ ``rows``), or None.
    """

    key: str
    pages: torch.Tensor
    rows: tuple[torch.Tensor | None, ...]


@dataclass(frozen=True, eq=False)
class Placement:
    """Make adapter ``adapter_id`` resident in ``slot`` (see the module's Semantics).

    Attributes:
        adapter_id: the registry's id of the adapter (for logs and tests; the runner needs
            only the slot).
        slot: its row in the device page tables.
        targets: the rows to write, per target it touches.
        ranks: ``(num_layers, len(LINEAR_TARGETS))`` int32, host: the slot's new rank row (0 where
            untouched).
        scalings: ``(num_layers, len(LINEAR_TARGETS))`` float32, host: its scalings.
        blocks: its other rows (DoRA and IA³ vectors, virtual tokens, ...), each layer's
            rows written at the block's pages of that layer's pool.
    """

    adapter_id: int
    slot: int
    targets: tuple[TargetPlacement, ...]
    ranks: torch.Tensor
    scalings: torch.Tensor
    blocks: tuple[BlockPlacement, ...] = ()
