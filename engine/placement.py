"""The runner's side of adapter placement: writing adapters into the pool and the tables.

The scheduler decides where an adapter goes; the step's output carries that decision as
:class:`adapters.placement.Placement` commands, and :class:`PlacementWriter` applies them at
the start of the runner's step, before the forward. It is the only writer of adapter pages
and of the device page tables (``a_pages``, ``b_pages``, ``ranks``, ``scalings``).

On the CPU a placement is written at once, in order. On CUDA the copies run on a side stream,
from the host tier's pinned memory, so that they do not hold up the host or the compute
stream:

* the side stream first waits for the work already queued on the compute stream: pages and
  slots a placement reuses may still be read by an earlier step's forward;
* each placement records an event once its copies are queued;
* the compute stream waits (on the device, never the host) for the events of the slots the
  step's batch uses, so the forward reads written weights; copies of prefetched adapters the
  step does not use overlap its forward;
* at the next step's start the compute stream waits for every event still outstanding, so a
  page written by a copy is never reused (by the KV cache, another adapter) before the copy
  is done.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from adapters.lora_tables import LoraTables
from adapters.placement import Placement, TargetPlacement
from kernels.lora import write_rows


class PlacementWriter:
    """Applies placements to the pool and the device page tables.

    Args:
        pools: the page pool's per-layer tensors, ``(num_pages, page_width)`` each.
        tables: the page tables the LoRA kernels read (their device tensors are written here).
    """

    def __init__(self, pools: list[torch.Tensor], tables: LoraTables) -> None:
        self.pools = pools
        self.tables = tables
        self.device = pools[0].device
        self.num_applied = 0
        self._stream: torch.cuda.Stream | None = None  # the side stream of the copies
        if self.device.type == "cuda":
            # torch.cuda's Stream and Event constructors are untyped.
            self._stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        # Slot → the event after the copies of its latest placement, until the compute
        # stream has waited for it.
        self._events: dict[int, torch.cuda.Event] = {}

    def apply(self, placements: Sequence[Placement], used_slots: Iterable[int]) -> None:
        """Write ``placements`` in order; the step's forward, which uses ``used_slots``,
        queued after this call, reads them written."""
        if self._stream is None:
            for placement in placements:
                self._write(placement)
            self.num_applied += len(placements)
            return
        compute = torch.cuda.current_stream(self.device)
        self.wait()  # the previous step's prefetches
        if placements:
            self._stream.wait_stream(compute)
            with torch.cuda.stream(self._stream):
                for placement in placements:
                    self._write(placement)
                    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                    event.record(self._stream)
                    self._events[placement.slot] = event
            self.num_applied += len(placements)
        for slot in set(used_slots):
            used = self._events.pop(slot, None)
            if used is not None:
                compute.wait_event(used)

    def wait(self) -> None:
        """Make the current stream wait (on the device) for every copy still outstanding,
        so what it runs next reads the placed adapters written (a no-op on the CPU)."""
        if self._stream is None:
            return
        compute = torch.cuda.current_stream(self.device)
        for event in self._events.values():
            compute.wait_event(event)
        self._events.clear()

    def _write(self, placement: Placement) -> None:
        """Queue (on the current stream) or run (on the CPU) one placement's writes.

        Host tensors reach the device by asynchronous copies from pinned memory; the caching
        host allocator keeps that memory until the copy is done. On the CPU they are used as
        they are.
        """
        slot, tables = placement.slot, self.tables
        for target in placement.targets:
            a_pages = _upload(target.a_pages, self.device)  # (rank, chunks(in_features))
            b_pages = _upload(target.b_pages, self.device)  # (rank, chunks(out_features))
            rank = a_pages.shape[0]
            tables.a_pages[target.target][slot, :rank].copy_(a_pages)
            tables.b_pages[target.target][slot, :rank].copy_(b_pages)
            for layer, pool in enumerate(self.pools):
                self._write_layer(pool, target, layer, a_pages, b_pages)
        for block in placement.blocks:
            pages = _upload(block.pages, self.device)
            for pool, rows in zip(self.pools, block.rows, strict=True):
                if rows is not None:
                    write_rows(
                        pool, pages[: rows.shape[0]], rows.to(self.device, non_blocking=True)
                    )
        tables.ranks[slot].copy_(_upload(placement.ranks, self.device))
        tables.scalings[slot].copy_(_upload(placement.scalings, self.device))

    def _write_layer(
        self,
        pool: torch.Tensor,
        target: TargetPlacement,
        layer: int,
        a_pages: torch.Tensor,
        b_pages: torch.Tensor,
    ) -> None:
        """One layer's A and Bᵀ rows of one target, zeros past the layer's own rank."""
        lora_a, lora_b = target.lora_a[layer], target.lora_b[layer]
        rank = 0
        if lora_a is not None and lora_b is not None:
            rank = lora_a.shape[0]
            write_rows(pool, a_pages[:rank], _upload(lora_a, self.device))
            lora_b_t = _upload(lora_b, self.device).t()  # (rank, out_features)
            write_rows(pool, b_pages[:rank], lora_b_t)
        # Rows past this layer's rank are never used, but the CPU's stacked LoRA form
        # multiplies them by zero: make them zeros, not a former tenant's values.
        num_zero = a_pages.shape[0] - rank
        if num_zero:
            for pages, features in ((a_pages, target.in_features), (b_pages, target.out_features)):
                zeros = torch.zeros(num_zero, features, dtype=pool.dtype, device=pool.device)
                write_rows(pool, pages[rank:], zeros)


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device`` (itself on the CPU), copied without blocking the host.

    A copy from pageable memory may make the host wait for the stream, so small host tensors
    (page tables, rank rows) are staged in pinned memory first; the host tier's weights are
    pinned already.
    """
    if device.type == "cuda" and not host.is_pinned():
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
