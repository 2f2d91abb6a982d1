"""The adapter side of the engine: one object the scheduler asks about adapters.

Threads. The residency (which adapters are in the pool, where, pinned by whom) belongs to the
engine thread: only it reads or changes it. Everything else here is shared under locks.

* Control plane, any thread (HTTP handlers, worker threads, composition jobs):
  :meth:`AdapterManager.load`, :meth:`~AdapterManager.load_weights`,
  :meth:`~AdapterManager.register_mixture`, :meth:`~AdapterManager.unload`,
  :meth:`~AdapterManager.get`, :meth:`~AdapterManager.weights_of`,
  :meth:`~AdapterManager.has_pending_unloads` and :meth:`~AdapterManager.acquire`. They read
  the registry, the host cache and fixed numbers only. ``load`` validates an adapter fully
  (config, tensor names and shapes, values) in the caller's thread, so a bad adapter is
  refused before it is registered. Whether an adapter fits is checked against a fixed
  capacity, ``max_adapter_pages`` (the pool less what the smallest request needs beside its
  adapter), never against the pool's changing occupancy; what does not fit *now* waits on
  the engine thread, and what never fits there is refused with ``adapter_too_large``.
  ``acquire`` counts a reference at once and leaves the decision to start loading (which
  depends on residency) to the next :meth:`~AdapterManager.sync`. An adapter loaded
  ``pinned`` is checked against ``pin_capacity`` (the pool less one request at full length)
  with the other pins, so pins can never leave the pool without room for a request.
* Data plane, the engine thread only: :meth:`~AdapterManager.sync`,
  :meth:`~AdapterManager.release`, :meth:`~AdapterManager.ensure_resident`,
  :meth:`~AdapterManager.prefetch_into_pool`, :meth:`~AdapterManager.is_ready`,
  :meth:`~AdapterManager.slots`, :meth:`~AdapterManager.pin`,
  :meth:`~AdapterManager.unpin`, :meth:`~AdapterManager.reclaim`,
  :meth:`~AdapterManager.take_placements`, :meth:`~AdapterManager.discard`,
  :meth:`~AdapterManager.place_pinned`, :attr:`~AdapterManager.tables`, and the
  ``residency`` itself. Placing an adapter here is bookkeeping; the runner writes it into
  the pool from the step's placements.

Tiers: disk → host (:class:`HostCache`, filled by the :class:`Prefetcher` thread) → pool
(:class:`AdapterResidency`). A request holds its :class:`AdapterEntry` from the moment it is
queued until it finishes, so unloading a name never changes the weights a request started
with; the entry's pages and host copy are dropped once its last request is done.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from adapters.base_layout import BaseModelLayout
from adapters.errors import INVALID_MERGE, UNSUPPORTED_ADAPTER_FEATURE, AdapterError
from adapters.host_cache import HostCache
from adapters.identity import weights_digest
from adapters.kinds import LoadContext, read_adapter
from adapters.placement import Placement
from adapters.prefetch import Prefetcher
from adapters.registry import AdapterEntry, AdapterRegistry
from adapters.residency import AdapterResidency, LoraTables
from adapters.weights import ADALORA, LORA, AdapterWeights, BaseWeights

logger = logging.getLogger(__name__)
_LORA_ONLY = "a model split across tensor-parallel workers serves LoRA of those layers only"


# Adapters read from disk at once. More than one: a slow read (a cold network disk, a file
# stuck on a failing device) holds up its own adapter's requests, never another's reload.
_PREFETCH_WORKERS = 4

# Kinds whose update is a LoRA of the linear layers alone, which a mixture can sum.
MIXABLE_KINDS = (LORA, ADALORA)


class Readiness(enum.Enum):
    RESIDENT = "resident"  # in the pool: the request can run
    LOADING = "loading"  # not in host memory yet: try again next step
    NO_ROOM = "no_room"  # in host memory, but the pool cannot take it now


LoadFn = Callable[[Path], AdapterWeights]


class AdapterManager:
    """Registry, host cache, prefetch and residency behind one interface.

    Args:
        residency: the adapter tenant of the page pool (the engine thread's).
        layout: the base model's linear layers, to validate adapters against.
        max_lora_rank: the largest rank accepted.
        max_adapter_pages: the most pages an adapter, or a mixture's components together,
            may take; larger ones are refused when loaded.
        host_cache_bytes: the host tier's capacity.
        pin_capacity: the most pages pinned adapters may take together (the pool less what
            one request needs at full length); None: the pool less one token's KV.
        max_loras: the most distinct adapters in one batch (the scheduler's cap), which a
            mixture's components may not exceed; None: no cap but the slots.
        base: the served base weights, for kinds that read them at load (DoRA); None
            refuses those kinds.
        lora_only: serve LoRA of the decoder's linear layers only (a model split across
            tensor-parallel workers, which split nothing else); other adapters are refused.
    """

    def __init__(
        self,
        residency: AdapterResidency,
        layout: BaseModelLayout,
        max_lora_rank: int,
        max_adapter_pages: int,
        host_cache_bytes: int = 2 << 30,
        pin_capacity: int | None = None,
        max_loras: int | None = None,
        base: BaseWeights | None = None,
        lora_only: bool = False,
    ) -> None:
        self.residency = residency
        self.lora_only = lora_only
        self.layout = layout
        self.max_lora_rank = max_lora_rank
        self.max_adapter_pages = max_adapter_pages
        self.pin_capacity = max_adapter_pages if pin_capacity is None else pin_capacity
        # Fixed at construction: the control plane's view of the pool, never its state.
        self.cost = residency.cost
        self.max_slots = residency.max_slots
        self.max_loras = max_loras
        self.registry = AdapterRegistry()
        self.host_cache: HostCache[AdapterWeights] = HostCache(host_cache_bytes)
        # Where weights come from: the files, through the validating loader.
        context = LoadContext(layout, max_lora_rank, base=base)
        self.source: LoadFn = lambda path: self._read_adapter(path, context)
        self.prefetcher = Prefetcher(self._read, self.host_cache, _PREFETCH_WORKERS)
        self._unloads: list[AdapterEntry] = []
        self._acquired: list[AdapterEntry] = []  # acquired since the last sync()
        self._lock = threading.Lock()
        self._refs_lock = threading.Lock()  # reference counts change on several threads
        self._live: dict[int, AdapterEntry] = {}  # entries some request or the registry holds
        self._pin_lock = threading.Lock()  # a pin's check and its registration, together
        self._pinned: dict[int, AdapterEntry] = {}  # pinned entries not yet forgotten
        self._new_pins: list[AdapterEntry] = []  # pinned since the last sync()
        self._unplaced: list[AdapterEntry] = []  # pinned, not yet in the pool (engine thread)

    def _read_adapter(self, path: Path, context: LoadContext) -> AdapterWeights:
        try:
            return read_adapter(path, context)
        except AdapterError as e:
            if self.lora_only and e.code == UNSUPPORTED_ADAPTER_FEATURE:
                raise AdapterError(e.code, f"{e.message}; {_LORA_ONLY}") from None
            raise

    # -- control plane (any thread) -------------------------------------------------------

    def load(
        self, name: str, path: Path, replace: bool = False, pinned: bool = False
    ) -> AdapterEntry:
        """Validate and register an adapter; its weights go to the host cache. ``pinned``
        keeps it in the pool from the next step until it is unloaded.

        Raises:
            AdapterError: the adapter is invalid, the name is taken, or (``pin_refused``)
                the pins would leave no room for a request.
        """
        weights = self.source(path)
        entry = self._register(name, weights, replace, pinned, path=path)
        logger.info("loaded adapter %s (rank %d, %d pages)", name, weights.max_rank, entry.pages)
        return entry

    def load_weights(
        self, name: str, weights: AdapterWeights, replace: bool = False, pinned: bool = False
    ) -> AdapterEntry:
        """Register an adapter made in memory (a merge, a composition), already validated.

        Its weights stay with its entry, the host tier it reloads from after an eviction.

        Raises:
            AdapterError: the pool can never hold it, or the name is taken.
        """
        if weights.max_rank > self.max_lora_rank:
            raise AdapterError(
                "adapter_rank_too_large",
                f"adapter rank {weights.max_rank} exceeds the server's max_lora_rank "
                f"{self.max_lora_rank}",
            )
        entry = self._register(name, weights, replace, pinned, in_memory=True)
        logger.info("registered adapter %s (rank %d, in memory)", name, weights.max_rank)
        return entry

    def _register(
        self,
        name: str,
        weights: AdapterWeights,
        replace: bool,
        pinned: bool,
        path: Path | None = None,
        in_memory: bool = False,
    ) -> AdapterEntry:
        """Register validated weights (read from ``path``, or kept with the entry when
        ``in_memory``) and put them in the host tier."""
        if self.lora_only and not weights.is_lora_only:
            raise AdapterError(
                UNSUPPORTED_ADAPTER_FEATURE,
                f"{name!r} is a {weights.kind} adapter with more than LoRA on the decoder's "
                f"linear layers; {_LORA_ONLY}",
            )
        pages = self._check_fits(weights)
        with self._pinning(pinned, name, pages, replace):
            entry, old = self.registry.register(
                name,
                path,
                weights.max_rank,
                weights.nbytes,
                replace=replace,
                weights=weights if in_memory else None,
                digest=weights_digest(weights),
                kind=weights.kind,
                num_virtual_tokens=weights.num_virtual_tokens,
                lora_only=weights.is_lora_only,
                pages=pages,
                pinned=pinned,
                flops_ratio=self._flops_ratio(weights),
            )
            self.host_cache.put(entry.id, weights)
            self._track(entry, old)
        return entry

    def register_mixture(
        self, name: str, components: list[tuple[str, float]], replace: bool = False
    ) -> AdapterEntry:
        """Register a virtual adapter: y = Wx + Σᵢ wᵢ·sᵢ·Bᵢ(Aᵢx) over loaded adapters.

        Nothing is materialised; a request for it runs each component through the LoRA
        kernels with its weight, so it costs the sum of their ranks.

        Raises:
            AdapterError: ``model_not_found`` for an unknown component, ``invalid_merge``
                for a mixture of mixtures, a repeated component or a non-finite weight.
        """
        if not components:
            raise AdapterError(INVALID_MERGE, "a mixture needs at least one adapter")
        names = [n for n, _ in components]
        if len(set(names)) != len(names):
            raise AdapterError(INVALID_MERGE, "a mixture names each adapter at most once")
        entries = []
        for component, weight in components:
            entry = self.registry.get(component)
            if entry.is_mixture:
                raise AdapterError(
                    INVALID_MERGE, f"{component!r} is a mixture; mixtures cannot be nested"
                )
            if entry.kind not in MIXABLE_KINDS:
                raise AdapterError(
                    INVALID_MERGE,
                    f"{component!r} is a {entry.kind} adapter; a mixture combines LoRA "
                    f"adapters ({', '.join(MIXABLE_KINDS)})",
                )
            if not entry.lora_only:
                raise AdapterError(
                    INVALID_MERGE,
                    f"{component!r} has a LoRA on embed_tokens or lm_head; a mixture combines "
                    "LoRA on the decoder's linear layers only",
                )
            if not math.isfinite(weight):
                raise AdapterError(INVALID_MERGE, f"the weight of {component!r} is not finite")
            entries.append((entry, float(weight)))
        need = sum(e.pages for e, _ in entries)
        if need > self.max_adapter_pages:
            raise AdapterError(
                "adapter_too_large",
                f"the mixture needs {need} pages; an adapter may take {self.max_adapter_pages}",
            )
        most = min(self.max_slots, self.max_loras or self.max_slots)
        if len(entries) > most:
            raise AdapterError(
                INVALID_MERGE,
                f"a mixture of {len(entries)} adapters exceeds the {most} one batch may hold "
                "(--max-loras, --max-resident-loras)",
            )
        mixture, old = self.registry.register(
            name,
            None,
            max(e.max_rank for e, _ in entries),
            sum(e.nbytes for e, _ in entries),
            replace=replace,
            components=tuple(entries),
            pages=need,
            flops_ratio=sum(e.flops_ratio for e, _ in entries),
        )
        for entry, _ in entries:  # the mixture keeps its components alive
            self.acquire(entry)
        self._track(mixture, old)
        logger.info("registered mixture %s of %s", name, ", ".join(names))
        return mixture

    def weights_of(self, entry: AdapterEntry) -> AdapterWeights:
        """An adapter's weights, from memory or its files (any thread; may read the disk)."""
        cached = self.host_cache.get(entry.id)
        return cached if cached is not None else self._read(entry)

    def _check_fits(self, weights: AdapterWeights) -> int:
        """Refuse an adapter larger than the fixed capacity (the pool's occupancy is the
        engine thread's business: an adapter that fits waits there for room); returns the
        pages it takes."""
        pages = self.cost.pages(weights.modules, weights.blocks(self.layout.num_layers))
        if pages > self.max_adapter_pages:
            raise AdapterError(
                "adapter_too_large",
                f"the adapter needs {pages} pages; an adapter may take {self.max_adapter_pages}",
            )
        return pages

    def _flops_ratio(self, weights: AdapterWeights) -> float:
        ranks = {key: int(m.lora_a.shape[0]) for key, m in weights.modules.items()}
        return self.layout.flops_ratio(ranks)

    @contextlib.contextmanager
    def _pinning(self, pinned: bool, name: str, pages: int, replace: bool) -> Iterator[None]:
        """Hold the pins still while a pinned adapter is checked and registered: refuse it
        when the pins together would take more than ``pin_capacity`` pages or every slot
        but one."""
        if not pinned:
            yield
            return
        with self._pin_lock:
            with self._lock:
                others = [
                    e
                    for e in self._pinned.values()
                    if not e.unloading and not (replace and e.name == name)
                ]
            taken = sum(e.pages for e in others)
            if taken + pages > self.pin_capacity:
                raise AdapterError(
                    "pin_refused",
                    f"pinning {name!r} ({pages} pages) beside the pinned adapters' {taken} "
                    f"would leave too little of the pool for a request: pins may take "
                    f"{self.pin_capacity} pages together",
                )
            if len(others) + 1 >= self.max_slots:
                raise AdapterError(
                    "pin_refused",
                    f"pinning {name!r} would take the last free adapter slot of "
                    f"{self.max_slots} (--max-resident-loras)",
                )
            yield

    def _track(self, entry: AdapterEntry, old: AdapterEntry | None) -> None:
        with self._lock:
            self._live[entry.id] = entry
            if entry.pinned:
                self._pinned[entry.id] = entry
                self._new_pins.append(entry)  # placed by the next step's place_pinned()
            if old is not None:
                self._unloads.append(old)

    def _read(self, entry: AdapterEntry) -> AdapterWeights:
        """An adapter's weights for the host tier: from memory, or read from its files."""
        if entry.weights is not None:
            return entry.weights
        assert entry.path is not None, f"adapter {entry.name} has neither files nor weights"
        weights = self.source(entry.path)
        if entry.digest and weights_digest(weights) != entry.digest:
            # Its cached prompts, and requests already running, computed with the weights
            # read at load time: serving other weights under this entry would mix the two.
            raise AdapterError(
                "adapter_changed_on_disk",
                f"the files of adapter {entry.name!r} changed since it was loaded; load it "
                "again (with replace) to serve the new weights",
            )
        return weights

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

    def pinned_pages(self, beside: AdapterEntry | None = None) -> int:
        """Pages the pinned adapters hold that a request of ``beside`` cannot use: all of
        them but its own (any thread)."""
        own = {part.id for part in self.parts(beside)} if beside is not None else set()
        with self._lock:
            return sum(e.pages for e in self._pinned.values() if e.id not in own)

    def pinned_names(self) -> list[str]:
        with self._lock:
            return sorted(e.name for e in self._pinned.values() if not e.unloading)

    def has_pending_unloads(self) -> bool:
        """Whether unloads wait for the engine thread's next :meth:`sync`."""
        with self._lock:
            return bool(self._unloads)

    # -- data plane (the engine thread) ---------------------------------------------------

    def sync(self) -> None:
        """Start loading what was acquired and apply pending unloads (called by the engine
        thread at the start of a step)."""
        with self._lock:
            unloads, self._unloads = self._unloads, []
            acquired, self._acquired = self._acquired, []
            new_pins, self._new_pins = self._new_pins, []
        self._unplaced += [e for e in new_pins if not e.unloading]
        for entry in acquired:
            for part in self.parts(entry):
                if part.id not in self.residency and part.id not in self.host_cache:
                    self.prefetcher.request(part)
        for entry in unloads:
            with self._refs_lock:
                idle = entry.refs == 0
            if idle:
                self._forget(entry)

    def acquire(self, entry: AdapterEntry) -> None:
        """A request (or a mixture) naming ``entry`` was queued: count it now; the next
        :meth:`sync` starts loading it if it is neither resident nor in host memory.

        Any thread (a mixture is registered from a worker thread): whether it is resident
        is the engine thread's to ask.
        """
        with self._refs_lock:
            entry.refs += 1
        with self._lock:
            self._acquired.append(entry)

    def release(self, entry: AdapterEntry) -> None:
        """A request naming ``entry`` finished (the engine thread)."""
        with self._refs_lock:
            entry.refs -= 1
            forget = entry.refs == 0 and entry.unloading
        if forget:
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
        self.host_cache.drop(entry.id)
        self.prefetcher.forget(entry)
        with self._lock:
            self._live.pop(entry.id, None)
            self._pinned.pop(entry.id, None)

    def parts(self, entry: AdapterEntry) -> list[AdapterEntry]:
        """The adapters that must be resident for ``entry``: itself, or a mixture's components."""
        return [c for c, _ in entry.components] if entry.is_mixture else [entry]

    def ids(self, entry: AdapterEntry) -> list[int]:
        return [part.id for part in self.parts(entry)]

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
        need = self.cost.pages(weights.modules, blocks)
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
                with self._lock:
                    self._pinned.pop(entry.id, None)
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
            need = self.cost.pages(weights.modules, blocks)
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
                    with self._lock:
                        entry = self._pinned.get(placement.adapter_id)
                    if entry is not None:
                        self._unplaced.append(entry)
                self.residency.evict(placement.adapter_id)
