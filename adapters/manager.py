"""The adapter side of the engine: one object the scheduler asks about adapters.

Control plane (any thread): :meth:`AdapterManager.load` validates an adapter fully (config,
tensor names and shapes, values) in the caller's thread, so a bad adapter is refused before
it is registered; :meth:`unload` unregisters a name. Data plane (the engine thread only):
reference counts, prefetch, placement in the pool, pins and eviction.

Tiers: disk → host (:class:`HostCache`, filled by the :class:`Prefetcher` thread) → pool
(:class:`AdapterResidency`). A request holds its :class:`AdapterEntry` from the moment it is
queued until it finishes, so unloading a name never changes the weights a request started
with; the entry's pages and host copy are dropped once its last request is done.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from adapters.base_layout import BaseModelLayout
from adapters.errors import AdapterError
from adapters.host_cache import HostCache
from adapters.loader import LoraAdapterWeights, load_lora_adapter
from adapters.prefetch import Prefetcher
from adapters.registry import AdapterEntry, AdapterRegistry
from adapters.residency import AdapterResidency

logger = logging.getLogger(__name__)


class Readiness(enum.Enum):
    RESIDENT = "resident"  # in the pool: the request can run
    LOADING = "loading"  # not in host memory yet: try again next step
    NO_ROOM = "no_room"  # in host memory, but the pool cannot take it now


LoadFn = Callable[[Path], LoraAdapterWeights]


class AdapterManager:
    """Registry, host cache, prefetch and residency behind one interface.

    Args:
        residency: the adapter tenant of the page pool.
        layout: the base model's linear layers, to validate adapters against.
        max_lora_rank: the largest rank accepted.
        host_cache_bytes: the host tier's capacity.
        load: reads an adapter directory (tests substitute slow or failing sources).
    """

    def __init__(
        self,
        residency: AdapterResidency,
        layout: BaseModelLayout,
        max_lora_rank: int,
        host_cache_bytes: int = 2 << 30,
        load: LoadFn | None = None,
    ) -> None:
        self.residency = residency
        self.layout = layout
        self.max_lora_rank = max_lora_rank
        self.registry = AdapterRegistry()
        self.host_cache: HostCache[LoraAdapterWeights] = HostCache(host_cache_bytes)
        # Where weights come from: the files, through the validating loader. Replaceable
        # (tests substitute a deliberately slow or failing source).
        self.source: LoadFn = load or (lambda path: load_lora_adapter(path, layout, max_lora_rank))
        self.prefetcher = Prefetcher(lambda entry: self.source(entry.path), self.host_cache)
        self._unloads: list[AdapterEntry] = []
        self._lock = threading.Lock()
        self._live: dict[int, AdapterEntry] = {}  # entries some request or the registry holds

    # -- control plane (any thread) -------------------------------------------------------

    def load(self, name: str, path: Path, replace: bool = False) -> AdapterEntry:
        """Validate and register an adapter; its weights go to the host cache.

        Raises:
            AdapterError: the adapter is invalid, or the name is taken.
        """
        weights = self.source(path)
        pages = self.residency.pages_needed(weights.modules)
        if pages > self.residency.pages.num_free + self.residency.num_pages:
            raise AdapterError(
                "adapter_too_large", f"the adapter needs {pages} pages; the pool cannot hold it"
            )
        entry, old = self.registry.register(
            name, path, weights.max_rank, weights.nbytes, replace=replace
        )
        self.host_cache.put(entry.id, weights)
        with self._lock:
            self._live[entry.id] = entry
            if old is not None:
                self._unloads.append(old)
        logger.info("loaded adapter %s (rank %d, %d pages)", name, weights.max_rank, pages)
        return entry

    def unload(self, name: str) -> None:
        """Unregister ``name``; running requests finish on its weights, then they are freed.

        Raises:
            AdapterError: ``model_not_found`` when no such adapter is loaded.
        """
        entry = self.registry.unregister(name)
        with self._lock:
            self._unloads.append(entry)

    def get(self, name: str) -> AdapterEntry:
        return self.registry.get(name)

    def has_pending_unloads(self) -> bool:
        """Whether unloads wait for the engine thread's next :meth:`sync`."""
        with self._lock:
            return bool(self._unloads)

    # -- data plane (the engine thread) ---------------------------------------------------

    def sync(self) -> None:
        """Apply pending unloads (called by the engine thread at the start of a step)."""
        with self._lock:
            unloads, self._unloads = self._unloads, []
        for entry in unloads:
            if entry.refs == 0:
                self._forget(entry)

    def acquire(self, entry: AdapterEntry) -> None:
        """A request naming ``entry`` was queued: count it and start loading if needed."""
        entry.refs += 1
        if entry.id not in self.residency and entry.id not in self.host_cache:
            self.prefetcher.request(entry)

    def release(self, entry: AdapterEntry) -> None:
        """A request naming ``entry`` finished."""
        entry.refs -= 1
        if entry.refs == 0 and entry.unloading:
            self._forget(entry)

    def _forget(self, entry: AdapterEntry) -> None:
        if entry.id in self.residency:
            self.residency.evict(entry.id)
        self.host_cache.drop(entry.id)
        self.prefetcher.forget(entry)
        with self._lock:
            self._live.pop(entry.id, None)

    def ensure_resident(self, entry: AdapterEntry, keep: Iterable[int] = ()) -> Readiness:
        """Make ``entry`` resident if its weights are at hand and pages can be found.

        May evict unpinned adapters (least recently used first) other than those in ``keep``.

        Raises:
            AdapterError: ``adapter_load_failed`` when its files could not be loaded.
        """
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
        need = self.residency.pages_needed(weights.modules)
        if not self.residency.reclaim(need, keep=[entry.id, *keep], slot=True):
            return Readiness.NO_ROOM
        self.residency.place(entry.id, weights.modules)
        return Readiness.RESIDENT

    def prefetch_into_pool(self, entries: Iterable[AdapterEntry]) -> None:
        """Place host-ready adapters of queued requests into free pages (no eviction)."""
        for entry in entries:
            if entry.id in self.residency:
                continue
            weights = self.host_cache.get(entry.id)
            if weights is None:
                continue
            need = self.residency.pages_needed(weights.modules)
            if need > self.residency.pages.num_free or not self.residency.has_free_slot:
                break
            self.residency.place(entry.id, weights.modules)

    def is_ready(self, entry: AdapterEntry) -> bool:
        """Whether the adapter is in the pool or host memory (a prefetch hit)."""
        return entry.id in self.residency or entry.id in self.host_cache

    def slot(self, entry: AdapterEntry) -> tuple[int, int]:
        """The resident adapter's (slot, largest rank)."""
        resident = self.residency.get(entry.id)
        assert resident is not None, f"adapter {entry.name} is not resident"
        return resident.slot, resident.max_rank

    def pin(self, entry: AdapterEntry) -> None:
        self.residency.pin(entry.id)

    def unpin(self, entry: AdapterEntry) -> None:
        self.residency.unpin(entry.id)

    def reclaim(self, num_pages: int) -> bool:
        """Evict unpinned adapters until ``num_pages`` pages are free (for the KV cache)."""
        return self.residency.reclaim(num_pages)
