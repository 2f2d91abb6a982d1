"""The named adapters: registration, validation, references and the host tier, any thread.

The catalog is the control plane of the adapters: HTTP handlers, worker threads and
composition jobs call it, and it reads the registry, the host cache and fixed numbers only,
never the residency (the engine thread's, through :class:`~adapters.manager.AdapterManager`).
``load`` validates an adapter fully (config, tensor names and shapes, values) in the caller's
thread, so a bad adapter is refused before it is registered. Whether an adapter fits is
checked against a fixed capacity, ``max_adapter_pages`` (the pool less what the smallest
request needs beside its adapter), never against the pool's changing occupancy; what does not
fit *now* waits on the engine thread, and what never fits there is refused with
``adapter_too_large``. An adapter loaded ``pinned`` is checked against the other pins
(:class:`~adapters.pins.Pins`). ``acquire`` counts a reference at once and leaves the decision
to start loading (which depends on residency) to the engine thread: what it must act on
(adapters acquired, unloaded or pinned since its last step) waits here as :class:`Pending`
until it takes it.

Tiers: disk → host (:class:`HostCache`, filled by the :class:`Prefetcher` threads) → pool.
A request holds its :class:`AdapterEntry` from the moment it is queued until it finishes, so
unloading a name never changes the weights a request started with; the entry's pages and
host copy are dropped once its last request is done.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from adapters.base_layout import BaseModelLayout
from adapters.errors import INVALID_MERGE, UNSUPPORTED_ADAPTER_FEATURE, AdapterError
from adapters.host_cache import DEFAULT_HOST_CACHE_BYTES, HostCache
from adapters.identity import weights_digest
from adapters.kinds import LoadContext, read_adapter
from adapters.mixture import mixture_components
from adapters.page_cost import PageCost
from adapters.pins import Pins
from adapters.prefetch import Prefetcher
from adapters.registry import AdapterEntry, AdapterRegistry
from adapters.weights import AdapterWeights, BaseWeights

logger = logging.getLogger(__name__)
_LORA_ONLY = "a model split across tensor-parallel workers serves LoRA of those layers only"

# Adapters read from disk at once. More than one: a slow read (a cold network disk, a file
# stuck on a failing device) holds up its own adapter's requests, never another's reload.
_PREFETCH_WORKERS = 4

LoadFn = Callable[[Path], AdapterWeights]


class Pending(NamedTuple):
    """What the engine thread must act on, gathered since it last asked."""

    unloads: list[AdapterEntry]  # unloaded or replaced: forgotten once no request names them
    acquired: list[AdapterEntry]  # named by new requests or mixtures: load if not at hand
    pins: list[AdapterEntry]  # newly pinned: to be placed in the pool


class AdapterCatalog:
    """The registered adapters, their host copies, references and pins (any thread).

    Args:
        cost: the pages an adapter takes (the residency's, fixed).
        max_slots: the adapter slots (``--max-resident-loras``).
        layout: the base model's linear layers, to validate adapters against.
        max_lora_rank: the largest rank accepted.
        max_adapter_pages: the most pages an adapter, or a mixture's components together,
            may take; larger ones are refused when loaded.
        host_cache_bytes: the host tier's capacity.
        pin_capacity: the most pages pinned adapters may take together (the pool less what
            one request needs at full length); None: ``max_adapter_pages``.
        max_loras: the most distinct adapters in one batch (the scheduler's cap), which a
            mixture's components may not exceed; None: no cap but the slots.
        base: the served base weights, for kinds that read them at load (DoRA); None
            refuses those kinds.
        lora_only: serve LoRA of the decoder's linear layers only (a model split across
            tensor-parallel workers, which split nothing else); other adapters are refused.
    """

    def __init__(
        self,
        cost: PageCost,
        max_slots: int,
        layout: BaseModelLayout,
        max_lora_rank: int,
        max_adapter_pages: int,
        host_cache_bytes: int = DEFAULT_HOST_CACHE_BYTES,
        pin_capacity: int | None = None,
        max_loras: int | None = None,
        base: BaseWeights | None = None,
        lora_only: bool = False,
    ) -> None:
        self.lora_only = lora_only
        self.layout = layout
        self.max_lora_rank = max_lora_rank
        self.max_adapter_pages = max_adapter_pages
        # Fixed at construction: the control plane's view of the pool, never its state.
        self.cost = cost
        self.max_slots = max_slots
        self.max_loras = max_loras
        self.pins = Pins(max_adapter_pages if pin_capacity is None else pin_capacity, max_slots)
        self.registry = AdapterRegistry()
        self.host_cache: HostCache[AdapterWeights] = HostCache(host_cache_bytes)
        # Where weights come from: the files, through the validating loader.
        context = LoadContext(layout, max_lora_rank, base=base)
        self.source: LoadFn = lambda path: self._read_adapter(path, context)
        self.prefetcher = Prefetcher(self._read, self.host_cache, _PREFETCH_WORKERS)
        self._unloads: list[AdapterEntry] = []
        self._acquired: list[AdapterEntry] = []  # acquired since the last take_pending()
        self._lock = threading.Lock()
        self._refs_lock = threading.Lock()  # reference counts change on several threads

    def _read_adapter(self, path: Path, context: LoadContext) -> AdapterWeights:
        try:
            return read_adapter(path, context)
        except AdapterError as e:
            if self.lora_only and e.code == UNSUPPORTED_ADAPTER_FEATURE:
                raise AdapterError(e.code, f"{e.message}; {_LORA_ONLY}") from None
            raise

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
        with self.pins.admitting(pinned, name, pages, replace):
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

        Nothing is materialised (``adapters/mixture.py`` says what a mixture may combine).

        Raises:
            AdapterError: as :func:`~adapters.mixture.mixture_components`, or
                ``adapter_too_large`` / ``invalid_merge`` when the components together take
                more pages than an adapter may, or more adapters than one batch may hold.
        """
        entries = mixture_components(self.registry, components)
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
        logger.info("registered mixture %s of %s", name, ", ".join(n for n, _ in components))
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

    def _track(self, entry: AdapterEntry, old: AdapterEntry | None) -> None:
        with self._lock:
            if entry.pinned:
                self.pins.add(entry)  # placed by the next step's place_pinned()
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

    def has_pending_unloads(self) -> bool:
        """Whether unloads wait for the engine thread's next step
        (:meth:`~adapters.manager.AdapterManager.sync`)."""
        with self._lock:
            return bool(self._unloads)

    def acquire(self, entry: AdapterEntry) -> None:
        """A request (or a mixture) naming ``entry`` was queued: count it now; the engine
        thread's next :meth:`~adapters.manager.AdapterManager.sync` starts loading it if it
        is neither resident nor in host memory.

        Any thread (a mixture is registered from a worker thread): whether it is resident
        is the engine thread's to ask.
        """
        with self._refs_lock:
            entry.refs += 1
        with self._lock:
            self._acquired.append(entry)

    def release(self, entry: AdapterEntry) -> bool:
        """One request (or mixture) naming ``entry`` is done; returns whether the entry is to
        be forgotten now: unloaded, and named by nothing any more."""
        with self._refs_lock:
            entry.refs -= 1
            return entry.refs == 0 and entry.unloading

    def is_idle(self, entry: AdapterEntry) -> bool:
        """Whether nothing names ``entry`` now."""
        with self._refs_lock:
            return entry.refs == 0

    def take_pending(self) -> Pending:
        """What was acquired, unloaded or pinned since the last call (the engine thread, at
        the start of a step)."""
        with self._lock:
            unloads, self._unloads = self._unloads, []
            acquired, self._acquired = self._acquired, []
            return Pending(unloads, acquired, self.pins.take_new())

    def forget(self, entry: AdapterEntry) -> None:
        """Drop an unloaded entry nothing names any more: its host copy, any read of its
        files in flight, its pin (the engine thread; the pool's part is the manager's)."""
        self.host_cache.drop(entry.id)
        self.prefetcher.forget(entry)
        self.pins.drop(entry.id)

    def parts(self, entry: AdapterEntry) -> list[AdapterEntry]:
        """The adapters that must be resident for ``entry``: itself, or a mixture's components."""
        return [c for c, _ in entry.components] if entry.is_mixture else [entry]

    def ids(self, entry: AdapterEntry) -> list[int]:
        return [part.id for part in self.parts(entry)]
