"""The adapter side of the engine: one object the scheduler and the engine ask about adapters.

:class:`AdapterManager` stands in front of two owners:

* the catalog (:class:`~adapters.catalog.AdapterCatalog`): the named adapters, their
  validation, references, pins and host copies, safe from any thread (HTTP handlers, worker
  threads, composition jobs). The manager passes its methods through:
  :meth:`~AdapterManager.load`, :meth:`~AdapterManager.load_weights`,
  :meth:`~AdapterManager.register_mixture`, :meth:`~AdapterManager.unload`,
  :meth:`~AdapterManager.get`, :meth:`~AdapterManager.weights_of`,
  :meth:`~AdapterManager.acquire`, :meth:`~AdapterManager.pinned_pages`,
  :meth:`~AdapterManager.pinned_names` and :meth:`~AdapterManager.has_pending_unloads`.
* the residency (:class:`~adapters.residency.AdapterResidency`: which adapters are in the
  pool, in which slot, pinned by whom), which belongs to the engine thread: only it reads or
  changes it, through the operations here, run each step: :meth:`~AdapterManager.sync`,
  :meth:`~AdapterManager.release`, :meth:`~AdapterManager.ensure_resident`,
  :meth:`~AdapterManager.prefetch_into_pool`, :meth:`~AdapterManager.is_ready`,
  :meth:`~AdapterManager.slots`, :meth:`~AdapterManager.pin`,
  :meth:`~AdapterManager.unpin`, :meth:`~AdapterManager.reclaim`,
  :meth:`~AdapterManager.take_placements`, :meth:`~AdapterManager.discard`,
  :meth:`~AdapterManager.place_pinned` and :attr:`~AdapterManager.tables`. Placing an
  adapter here is bookkeeping; the runner writes it into the pool from the step's
  placements.

The scheduler asks the manager only, never the catalog or the residency behind it.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from pathlib import Path

from adapters.catalog import AdapterCatalog
from adapters.errors import AdapterError
from adapters.lora_tables import LoraTables
from adapters.placement import Placement
from adapters.registry import AdapterEntry
from adapters.residency import AdapterResidency
from adapters.weights import AdapterWeights

logger = logging.getLogger(__name__)


class Readiness(enum.Enum):
    RESIDENT = "resident"  # in the pool: the request can run
    LOADING = "loading"  # not in host memory yet: try again next step
    NO_ROOM = "no_room"  # in host memory, but the pool cannot take it now


class AdapterManager:
    """The catalog and the residency behind one interface.

    Args:
        residency: the adapter tenant of the page pool (the engine thread's).
        catalog: the named adapters, built over the same residency's page cost and slots.
    """

    def __init__(self, residency: AdapterResidency, catalog: AdapterCatalog) -> None:
        assert catalog.cost is residency.cost and catalog.max_slots == residency.max_slots
        self.residency = residency
        self.catalog = catalog
        # The catalog's parts that callers read (each fixed at construction).
        self.registry, self.host_cache = catalog.registry, catalog.host_cache
        self.prefetcher, self.layout = catalog.prefetcher, catalog.layout
        self.max_lora_rank = catalog.max_lora_rank
        self.max_adapter_pages = catalog.max_adapter_pages
        self.pin_capacity = catalog.pins.capacity
        self._unplaced: list[AdapterEntry] = []  # pinned, not yet in the pool

    # -- the catalog's (any thread) -------------------------------------------------------

    def load(
        self, name: str, path: Path, replace: bool = False, pinned: bool = False
    ) -> AdapterEntry:
        """See :meth:`AdapterCatalog.load`."""
        return self.catalog.load(name, path, replace, pinned)

    def load_weights(
        self, name: str, weights: AdapterWeights, replace: bool = False, pinned: bool = False
    ) -> AdapterEntry:
        """See :meth:`AdapterCatalog.load_weights`."""
        return self.catalog.load_weights(name, weights, replace, pinned)

    def register_mixture(
        self, name: str, components: list[tuple[str, float]], replace: bool = False
    ) -> AdapterEntry:
        """See :meth:`AdapterCatalog.register_mixture`."""
        return self.catalog.register_mixture(name, components, replace)

    def unload(self, name: str) -> None:
        """See :meth:`AdapterCatalog.unload`."""
        self.catalog.unload(name)

    def get(self, name: str) -> AdapterEntry:
        """The current entry of ``name`` (``model_not_found`` when none)."""
        return self.catalog.get(name)

    def weights_of(self, entry: AdapterEntry) -> AdapterWeights:
        """See :meth:`AdapterCatalog.weights_of`."""
        return self.catalog.weights_of(entry)

    def acquire(self, entry: AdapterEntry) -> None:
        """See :meth:`AdapterCatalog.acquire`."""
        self.catalog.acquire(entry)

    def has_pending_unloads(self) -> bool:
        """See :meth:`AdapterCatalog.has_pending_unloads`."""
        return self.catalog.has_pending_unloads()

    def pinned_pages(self, beside: AdapterEntry | None = None) -> int:
        """Pages the pinned adapters hold that a request of ``beside`` cannot use: all of
        them but its own (any thread)."""
        return self.catalog.pins.pages(self.ids(beside) if beside is not None else ())

    def pinned_names(self) -> list[str]:
        """The pinned adapters' names, sorted (any thread)."""
        return self.catalog.pins.names()

    def parts(self, entry: AdapterEntry) -> list[AdapterEntry]:
        """The adapters that must be resident for ``entry``: itself, or a mixture's components."""
        return self.catalog.parts(entry)

    def ids(self, entry: AdapterEntry) -> list[int]:
        """The ids of :meth:`parts`."""
        return self.catalog.ids(entry)

    # -- the residency's (the engine thread) ----------------------------------------------

    def sync(self) -> None:
        """Start loading what was acquired and apply pending unloads (called by the engine
        thread at the start of a step)."""
        unloads, acquired, new_pins = self.catalog.take_pending()
        self._unplaced += [e for e in new_pins if not e.unloading]
        for entry in acquired:
            for part in self.parts(entry):
                if part.id not in self.residency and part.id not in self.host_cache:
                    self.prefetcher.request(part)
        for entry in unloads:
            if self.catalog.is_idle(entry):
                self._forget(entry)

    def release(self, entry: AdapterEntry) -> None:
        """A request naming ``entry`` finished (the engine thread)."""
        if self.catalog.release(entry):
            self._forget(entry)

    def _forget(self, entry: AdapterEntry) -> None:
        for component, _ in entry.components:
            self.release(component)
        if entry in self._unplaced:
            self._unplaced.remove(entry)
        resident = self.residency.get(entry.id)
        if resident is not None:
            resident.pinned = False  # unloaded: the pin goes with it
            self.residency.evict(entry.id)
        self.catalog.forget(entry)

    def ensure_resident(self, entry: AdapterEntry, keep: Iterable[int] = ()) -> Readiness:
        """Make ``entry`` (every component of a mixture) resident if its weights are at hand
        and pages can be found.

        May evict unpinned adapters (least recently used first) other than those in ``keep``.

        Raises:
            AdapterError: ``adapter_load_failed`` when its files could not be loaded.
        """
        if entry.is_mixture:
            keep = [*keep, *self.ids(entry)]
            for part in self.parts(entry):
                readiness = self.ensure_resident(part, keep)
                if readiness is not Readiness.RESIDENT:
                    return readiness
            return Readiness.RESIDENT
        if entry.id in self.residency:
            self.residency.touch(entry.id)
            return Readiness.RESIDENT
        weights = self.host_cache.get(entry.id)
        if weights is None:
            error = self.prefetcher.error(entry)
            if error is not None:
                raise AdapterError("adapter_load_failed", f"adapter {entry.name!r}: {error}")
            self.prefetcher.request(entry)
            return Readiness.LOADING
        blocks = weights.blocks(self.layout.num_layers)
        need = self.residency.cost.pages(weights.modules, blocks)
        if not self.residency.reclaim(need, keep=[entry.id, *keep], slot=True):
            return Readiness.NO_ROOM
        self.residency.place(entry.id, weights.modules, blocks)
        return Readiness.RESIDENT

    def place_pinned(self) -> bool:
        """Place pinned adapters not yet in the pool, evicting what is not in use if need
        be; returns whether every pin is in place (until then, the scheduler admits nothing:
        pins count against the pool before requests do). A pinned adapter whose files fail
        to load loses its pin, with a warning, instead of holding admission forever."""
        if not self._unplaced:
            return True
        for entry in list(self._unplaced):
            if entry.unloading:
                self._unplaced.remove(entry)
                continue
            try:
                readiness = self.ensure_resident(entry)
            except AdapterError as e:
                logger.warning("adapter %s stays unpinned: %s", entry.name, e.message)
                self._unplaced.remove(entry)
                entry.pinned = False
                self.catalog.pins.drop(entry.id)
                continue
            if readiness is Readiness.RESIDENT:
                resident = self.residency.get(entry.id)
                assert resident is not None
                resident.pinned = True
                self._unplaced.remove(entry)
        return not self._unplaced

    def prefetch_into_pool(self, entries: Iterable[AdapterEntry]) -> None:
        """Place host-ready adapters of queued requests into free pages, or pages of no use
        now (cached blocks of adapters out of the pool); nothing in use is evicted."""
        for entry in (part for e in entries for part in self.parts(e)):
            if entry.id in self.residency:
                continue
            weights = self.host_cache.get(entry.id)
            if weights is None:
                continue
            blocks = weights.blocks(self.layout.num_layers)
            need = self.residency.cost.pages(weights.modules, blocks)
            if not self.residency.has_free_slot:
                break
            if not self.residency.reclaim_stale(need, keep=[entry.id]):
                break
            self.residency.place(entry.id, weights.modules, blocks)

    def is_ready(self, entry: AdapterEntry) -> bool:
        """Whether the adapter is in the pool or host memory (a prefetch hit)."""
        return all(p.id in self.residency or p.id in self.host_cache for p in self.parts(entry))

    def slots(self, entry: AdapterEntry) -> list[tuple[int, int, float]]:
        """(slot, largest rank, weight) of the resident adapter, or of each component."""
        weights = [w for _, w in entry.components] if entry.is_mixture else [1.0]
        out = []
        for part, weight in zip(self.parts(entry), weights, strict=True):
            resident = self.residency.get(part.id)
            assert resident is not None, f"adapter {part.name} is not resident"
            out.append((resident.slot, resident.max_rank, weight))
        return out

    def pin(self, entry: AdapterEntry) -> None:
        for part in self.parts(entry):
            self.residency.pin(part.id)

    def unpin(self, entry: AdapterEntry) -> None:
        for part in self.parts(entry):
            self.residency.unpin(part.id)

    def reclaim(self, num_pages: int, keep: AdapterEntry | None = None) -> bool:
        """Free pages for the KV cache until ``num_pages`` are free, evicting unpinned
        adapters (but ``keep``, or a mixture's components) and unused cached blocks, least
        recently used first; returns whether they are free."""
        return self.residency.reclaim(num_pages, keep=self.ids(keep) if keep is not None else ())

    @property
    def tables(self) -> LoraTables:
        """Where the resident adapters' rows are, by slot (their host fields are the
        residency's; the runner writes the device ones from the placements)."""
        return self.residency.tables

    def take_placements(self) -> tuple[Placement, ...]:
        """The placements made since the last call, for the step's output (the runner writes
        them into the pool)."""
        return self.residency.take_placements()

    def discard(self, placements: Iterable[Placement]) -> None:
        """Evict the adapters of placements the runner may not have applied (its step
        failed), unless running requests pin them: they are placed again, written, when
        next needed, instead of being read from pages that may never have been written."""
        for placement in placements:
            resident = self.residency.get(placement.adapter_id)
            if resident is not None and resident.slot == placement.slot and resident.pins == 0:
                if resident.pinned:  # placed again, written, by the next place_pinned()
                    resident.pinned = False
                    entry = self.catalog.pins.get(placement.adapter_id)
                    if entry is not None:
                        self._unplaced.append(entry)
                self.residency.evict(placement.adapter_id)
