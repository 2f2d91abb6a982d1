"""The middle residency tier: parsed adapters in host memory, least recently used first out.

Disk → **host** → pool. Entries are keyed by the registry's adapter id. The cache holds at
most ``max_bytes`` of tensors; putting past the cap drops the least recently used entries
(never the one just put). On a GPU machine the tensors are pinned, so host → device copies
can run asynchronously on a side stream.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, Protocol, TypeVar

import torch


class Sized(Protocol):
    @property
    def nbytes(self) -> int: ...

    def pin_memory(self) -> Sized: ...


W = TypeVar("W", bound=Sized)

# What the host tier holds by default: parsed adapters kept in memory off the pool.
DEFAULT_HOST_CACHE_BYTES = 2 << 30


class HostCache(Generic[W]):
    """A thread-safe, byte-capped LRU of parsed adapters (the prefetch thread fills it)."""

    def __init__(self, max_bytes: int, pin: bool | None = None) -> None:
        self.max_bytes = max_bytes
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._entries: OrderedDict[int, W] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __contains__(self, key: int) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key: int) -> W | None:
        """The entry, marked most recently used; None if absent."""
        with self._lock:
            weights = self._entries.get(key)
            if weights is not None:
                self._entries.move_to_end(key)
            return weights

    def put(self, key: int, weights: W) -> None:
        if self.pin:
            weights = weights.pin_memory()  # type: ignore[assignment]
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = weights
            self._bytes += weights.nbytes
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.nbytes

    def drop(self, key: int) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
