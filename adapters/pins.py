"""Pinned adapters: kept in the pool from the step after they load until they are unloaded.

A pin is checked when its adapter is registered, on the caller's thread: the pins together
may take at most ``pin_capacity`` pages (the pool less one request at full length) and every
adapter slot but one, so pins can never leave the pool without room for a request. The
engine thread places each new pin at the start of a step
(:meth:`adapters.manager.AdapterManager.place_pinned`).

Not the residency's ``pin``/``unpin``, which count the running requests that hold a resident
adapter for as long as they run.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator

from adapters.errors import AdapterError
from adapters.registry import AdapterEntry


class Pins:
    """The pinned entries, and the check that admits a new one (safe from any thread).

    Args:
        capacity: the most pages pinned adapters may take together.
        max_slots: the adapter slots (``--max-resident-loras``); pins leave one free.
    """

    def __init__(self, capacity: int, max_slots: int) -> None:
        self.capacity = capacity
        self.max_slots = max_slots
        self._check_lock = threading.Lock()  # a pin's check and its registration, together
        self._lock = threading.Lock()
        self._pinned: dict[int, AdapterEntry] = {}  # pinned entries not yet forgotten
        self._new: list[AdapterEntry] = []  # pinned since the last take_new()

    @contextlib.contextmanager
    def admitting(self, pinned: bool, name: str, pages: int, replace: bool) -> Iterator[None]:
        """Hold the pins still while a pinned adapter is checked and registered: refuse it
        when the pins together would take more than ``capacity`` pages or every slot but
        one.

        Raises:
            AdapterError: ``pin_refused``.
        """
        if not pinned:
            yield
            return
        with self._check_lock:
            with self._lock:
                others = [
                    e
                    for e in self._pinned.values()
                    if not e.unloading and not (replace and e.name == name)
                ]
            taken = sum(e.pages for e in others)
            if taken + pages > self.capacity:
                raise AdapterError(
                    "pin_refused",
                    f"pinning {name!r} ({pages} pages) beside the pinned adapters' {taken} "
                    f"would leave too little of the pool for a request: pins may take "
                    f"{self.capacity} pages together",
                )
            if len(others) + 1 >= self.max_slots:
                raise AdapterError(
                    "pin_refused",
                    f"pinning {name!r} would take the last free adapter slot of "
                    f"{self.max_slots} (--max-resident-loras)",
                )
            yield

    def add(self, entry: AdapterEntry) -> None:
        """Record a registered pinned entry; the next step places it."""
        with self._lock:
            self._pinned[entry.id] = entry
            self._new.append(entry)

    def take_new(self) -> list[AdapterEntry]:
        """The entries pinned since the last call (the engine thread, once a step)."""
        with self._lock:
            new, self._new = self._new, []
        return new

    def get(self, adapter_id: int) -> AdapterEntry | None:
        """The pinned entry of ``adapter_id``, if it is pinned."""
        with self._lock:
            return self._pinned.get(adapter_id)

    def drop(self, adapter_id: int) -> None:
        """Forget a pin: its adapter was unloaded, or its files failed to load."""
        with self._lock:
            self._pinned.pop(adapter_id, None)

    def pages(self, excluding: Iterable[int] = ()) -> int:
        """Pages the pinned adapters keep, but those of the ids in ``excluding``: an adapter
        being unloaded (or replaced) no longer counts, since its pages go back to the pool
        once the requests still using it end."""
        skip = set(excluding)
        with self._lock:
            return sum(
                e.pages for e in self._pinned.values() if e.id not in skip and not e.unloading
            )

    def names(self) -> list[str]:
        """The names of the pinned adapters not being unloaded, sorted."""
        with self._lock:
            return sorted(e.name for e in self._pinned.values() if not e.unloading)
