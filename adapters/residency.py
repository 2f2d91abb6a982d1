"""The adapter tenant of the unified page pool: which adapters are resident, and where.

Layout. For each target layer an adapter touches, with rank r (its largest over layers):

* A, ``[r, in_features]``, row by row: row j takes ``ceil(in_features / page_width)`` pages;
* Bᵀ, ``[r, out_features]``, row by row: row j takes ``ceil(out_features / page_width)``.

The pages are allocated once from the same free list as the KV cache; a page id addresses the
same row in every layer's tensor, so layer ℓ's A and B live at those pages in layer ℓ's pool.
A rank-r adapter thus takes pages in proportion to r; nothing is padded to a maximum rank
(:class:`~adapters.page_cost.PageCost` counts them).

Every resident adapter also gets a *slot*: a row in the device page tables the kernels read
(:class:`~adapters.lora_tables.LoraTables`), holding its page ids, and its rank and scaling
per (layer, target). Rank 0 marks a (layer, target) it does not touch; rows past a layer's
own rank (with a per-layer ``rank_pattern``) are allocated but never read.

Residency policy: adapters pinned by running requests, and adapters the operator pinned
(:attr:`Resident.pinned`: loaded with ``"pinned": true``), are never evicted; the rest are evicted
least recently used first when the KV cache or another adapter needs pages, in one order with
another tenant's spare pages when there is one (:class:`SparePages`: the prefix cache's unused
blocks), which also hears of every eviction.

Ownership. The residency is the scheduler's (the engine thread's) bookkeeping, and it lives
on the host: resident adapters, their pages and slots, and the host mirrors of the tables
(ranks, scalings, first pages, generation) that the runner plans a step from. It never
writes device memory: :meth:`AdapterResidency.place` records a placement
(:class:`adapters.placement.Placement`) that the step's output carries to the runner, the
only writer of adapter pages and of the device tables (``a_pages``, ``b_pages``,
``ranks``, ``scalings``).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from adapters.base_layout import LINEAR_TARGETS
from adapters.lora_tables import BlockTable, LoraTables
from adapters.page_cost import ModuleWeights, PageCost, ranks_by_target
from adapters.placement import BlockPlacement, Placement, TargetPlacement
from adapters.weights import RowBlock

logger = logging.getLogger(__name__)


class PageLender(Protocol):
    """The adapter tenant's view of the page pool (``engine.page_pool.TenantPages``)."""

    @property
    def layers(self) -> list[torch.Tensor]: ...

    @property
    def page_width(self) -> int: ...

    @property
    def num_free(self) -> int: ...

    def allocate(self, n: int) -> list[int]: ...

    def release(self, pages: Iterable[int]) -> None: ...


class SparePages(Protocol):
    """Pages another tenant gives up on demand, in its own least-recently-used order (the
    prefix cache's unused blocks, ``engine.prefix_cache.PrefixCache``)."""

    def oldest(self, keep: Iterable[int] = ()) -> float | None:
        """When the next unit to go was last used (``time.monotonic``; -inf for a unit of
        no use while its adapter is out of the pool, unless that adapter is in ``keep``);
        None if none. Units of no use that need an adapter in ``keep`` go last (a
        preference, never a refusal)."""
        ...

    def evict_oldest(self, keep: Iterable[int] = ()) -> int:
        """Give up that unit; returns the pages it freed."""
        ...

    def adapter_evicted(self, adapter_id: int) -> None:
        """An adapter left the pool (what depends on it may go first)."""
        ...

    def adapter_placed(self, adapter_id: int) -> None:
        """An adapter came back to the pool."""
        ...


@dataclass
class Resident:
    """A resident adapter: its slot, its pages, how many running requests pin it, whether
    the operator pinned it (kept in the pool until unloaded), and when it was last used
    (``time.monotonic``: placed, or last let go by a request)."""

    slot: int
    pages: list[int]
    max_rank: int
    pins: int = 0
    last_used: float = 0.0
    pinned: bool = False


class AdapterResidency:
    """Places adapters in pool pages, tracks them, evicts them.

    Args:
        pages: the adapter tenant's view of the pool.
        num_layers: layers of the base model.
        shapes: (in_features, out_features) of each target layer.
        max_slots: the most adapters resident at once (rows of the page tables).
        max_lora_rank: the largest rank an adapter may have.
    """

    def __init__(
        self,
        pages: PageLender,
        num_layers: int,
        shapes: Mapping[str, tuple[int, int]],
        max_slots: int,
        max_lora_rank: int,
    ) -> None:
        self.pages = pages
        self.num_layers = num_layers
        self.max_slots = max_slots
        self.shapes = dict(shapes)
        self.cost = PageCost.for_shapes(self.shapes, pages.page_width)
        self._chunks = dict(self.cost.chunks)
        device = pages.layers[0].device
        self.tables = LoraTables.allocate(
            self._chunks, num_layers, max_slots, max_lora_rank, device
        )
        self._resident: OrderedDict[int, Resident] = OrderedDict()  # LRU first
        self._free_slots = list(range(max_slots - 1, -1, -1))
        # Placements recorded since the last take_placements(), in order: each of an adapter
        # still resident (evict() drops those of the adapter it evicts).
        self._placements: list[Placement] = []
        self.num_placed = 0
        self.num_evicted = 0
        self.spare: SparePages | None = None  # reclaimed in one order with the adapters

    # -- queries --------------------------------------------------------------------------

    def get(self, adapter_id: int) -> Resident | None:
        return self._resident.get(adapter_id)

    def __contains__(self, adapter_id: int) -> bool:
        return adapter_id in self._resident

    def __len__(self) -> int:
        return len(self._resident)

    def residents(self) -> list[Resident]:
        return list(self._resident.values())

    @property
    def num_pages(self) -> int:
        return sum(len(r.pages) for r in self._resident.values())

    def pages_needed(
        self, modules: Mapping[tuple[int, str], ModuleWeights], blocks: Sequence[RowBlock] = ()
    ) -> int:
        """Pages an adapter with these modules and other rows takes."""
        return self.cost.pages(modules, blocks)

    def held_pages(self) -> Iterator[int]:
        for resident in self._resident.values():
            yield from resident.pages

    # -- placement ------------------------------------------------------------------------

    def place(
        self,
        adapter_id: int,
        modules: Mapping[tuple[int, str], ModuleWeights],
        blocks: Sequence[RowBlock] = (),
    ) -> Resident:
        """Give an adapter pages and a slot for its LoRA ``modules`` and its other rows
        (``blocks``), and record the :class:`Placement` that writes them there (host
        bookkeeping only: see :meth:`take_placements`).

        Raises:
            OutOfPages: (from the pool) too few free pages; nothing changed.
            RuntimeError: every slot is taken.
        """
        if not self._free_slots:
            raise RuntimeError("every adapter slot is in use")
        ranks = ranks_by_target(modules)
        pages = self.pages.allocate(self.pages_needed(modules, blocks))
        slot = self._free_slots.pop()
        tables = self.tables
        offset = 0
        targets = []
        host_ranks = torch.zeros(self.num_layers, len(LINEAR_TARGETS), dtype=torch.int32)
        host_scalings = torch.zeros(self.num_layers, len(LINEAR_TARGETS))
        for target, rank in ranks.items():
            a_chunks, b_chunks = self._chunks[target]
            a_list = pages[offset : offset + rank * a_chunks]
            offset += rank * a_chunks
            b_list = pages[offset : offset + rank * b_chunks]
            offset += rank * b_chunks
            tables.a_first[target][slot] = _first_if_consecutive(a_list)
            tables.b_first[target][slot] = _first_if_consecutive(b_list)
            per_layer = [modules.get((layer, target)) for layer in range(self.num_layers)]
            t = LINEAR_TARGETS.index(target)
            for layer, module in enumerate(per_layer):
                if module is not None:
                    host_ranks[layer, t] = int(module.lora_a.shape[0])
                    host_scalings[layer, t] = module.scaling
            in_features, out_features = self.shapes[target]
            targets.append(
                TargetPlacement(
                    target=target,
                    a_pages=torch.tensor(a_list, dtype=torch.int32).view(rank, a_chunks),
                    b_pages=torch.tensor(b_list, dtype=torch.int32).view(rank, b_chunks),
                    lora_a=tuple(None if m is None else m.lora_a for m in per_layer),
                    lora_b=tuple(None if m is None else m.lora_b for m in per_layer),
                    in_features=in_features,
                    out_features=out_features,
                )
            )
        tables.host_ranks[slot] = host_ranks
        tables.host_scalings[slot] = host_scalings
        placed_blocks = []
        for block in blocks:
            n = self.cost.block_pages(block)
            block_pages = torch.tensor(pages[offset : offset + n], dtype=torch.int32)
            block_pages = block_pages.view(block.num_rows, -1)
            offset += n
            tables.blocks[slot][block.key] = BlockTable(
                block_pages.long(),
                tuple(0 if r is None else int(r.shape[0]) for r in block.rows),
                block.scaling,
            )
            placed_blocks.append(BlockPlacement(block.key, block_pages, block.rows))
        self._placements.append(
            Placement(
                adapter_id, slot, tuple(targets), host_ranks, host_scalings, tuple(placed_blocks)
            )
        )
        resident = Resident(slot, pages, max(ranks.values(), default=0), last_used=time.monotonic())
        self._resident[adapter_id] = resident
        self.num_placed += 1
        tables.generation[0] += 1
        if self.spare is not None:
            self.spare.adapter_placed(adapter_id)
        return resident

    def take_placements(self) -> tuple[Placement, ...]:
        """The placements recorded since the last call, in order, for the runner to apply;
        each is of an adapter resident now, in the slot it names."""
        placements, self._placements = tuple(self._placements), []
        return placements

    def evict(self, adapter_id: int) -> None:
        """Free an adapter's pages and slot (host bookkeeping only). No running request may
        pin it; an operator's pin is for the caller to have lifted (an unload).

        The device tables are left as they are: a slot's rows are read only for the rows of
        a batch that name the slot, which no request does once its adapter is gone, and the
        next placement in the slot rewrites its whole rank and scaling rows. A placement of
        this adapter not yet taken by the runner is dropped: its pages and slot may be handed
        out again in this very schedule, and writing it would be wasted work.
        """
        resident = self._resident.pop(adapter_id)
        assert resident.pins == 0, "evicting an adapter that running requests use"
        self._placements = [p for p in self._placements if p.adapter_id != adapter_id]
        self.tables.host_ranks[resident.slot] = 0
        self.tables.host_scalings[resident.slot] = 0
        self.tables.blocks[resident.slot].clear()
        for firsts in (*self.tables.a_first.values(), *self.tables.b_first.values()):
            firsts[resident.slot] = -1
        self.pages.release(resident.pages)
        self._free_slots.append(resident.slot)
        self.num_evicted += 1
        self.tables.generation[0] += 1
        if self.spare is not None:
            self.spare.adapter_evicted(adapter_id)

    def reclaim(self, num_pages: int, keep: Iterable[int] = (), slot: bool = False) -> bool:
        """Free pages until ``num_pages`` are free (and, with ``slot``, a slot too).

        Two kinds of victim, least recently used first in one order: unpinned adapters not in
        ``keep``, and the spare tenant's units (the prefix cache's unused blocks). Only an
        adapter frees a slot. Returns whether enough is free now.
        """
        kept = set(keep)
        while True:
            short_of_slot = slot and not self._free_slots
            if self.pages.num_free >= num_pages and not short_of_slot:
                return True
            victim = next(
                (
                    i
                    for i, r in self._resident.items()
                    if r.pins == 0 and not r.pinned and i not in kept
                ),
                None,
            )
            spare = None if self.spare is None or short_of_slot else self.spare.oldest(kept)
            if spare is not None and (victim is None or spare <= self._resident[victim].last_used):
                assert self.spare is not None
                self.spare.evict_oldest(kept)
            elif victim is not None:
                self.evict(victim)
            else:
                return False

    def reclaim_stale(self, num_pages: int, keep: Iterable[int] = ()) -> bool:
        """Free pages only from the spare tenant's units of no use now (the cached blocks
        of adapters out of the pool, other than those in ``keep``) until ``num_pages`` are
        free; returns whether they are."""
        kept = set(keep)
        while self.pages.num_free < num_pages and self.spare is not None:
            if self.spare.oldest(kept) != -math.inf:
                break
            self.spare.evict_oldest(kept)
        return self.pages.num_free >= num_pages

    @property
    def has_free_slot(self) -> bool:
        return bool(self._free_slots)

    def touch(self, adapter_id: int) -> None:
        """Mark as most recently used."""
        self._resident.move_to_end(adapter_id)
        self._resident[adapter_id].last_used = time.monotonic()

    def pin(self, adapter_id: int) -> None:
        self._resident[adapter_id].pins += 1
        self.touch(adapter_id)

    def unpin(self, adapter_id: int) -> None:
        resident = self._resident[adapter_id]
        assert resident.pins > 0
        resident.pins -= 1
        if resident.pins == 0:
            self.touch(adapter_id)  # used until now


def _first_if_consecutive(pages: list[int]) -> int:
    """``pages[0]`` when the pages are consecutive and ascending, else -1."""
    if pages and pages[-1] - pages[0] == len(pages) - 1 and pages == sorted(pages):
        return pages[0]
    return -1
