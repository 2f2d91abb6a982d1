"""Disk → host loading in a background thread, started as soon as a request is queued.

The engine thread never reads adapter files: when a request names an adapter that is not in
the host cache, :meth:`Prefetcher.request` hands the load to a worker thread and returns at
once; the scheduler admits the request once the weights are in host memory (and copies them
into the pool then). Requests for resident adapters keep running meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from adapters.host_cache import HostCache, Sized
from adapters.registry import AdapterEntry

logger = logging.getLogger(__name__)

W = TypeVar("W", bound=Sized)


@dataclass
class PrefetchStats:
    """The loads' counters, for metrics (prefetch hits and misses are counted per request,
    by the scheduler).

    Attributes:
        loads: completed disk → host loads.
        load_seconds: total time spent in completed loads.
    """

    loads: int = 0
    load_seconds: float = 0.0


class Prefetcher(Generic[W]):
    """Runs ``load(entry)`` in worker threads and puts the result in the host cache.

    Args:
        load: reads and validates an adapter's weights from its directory.
        cache: where loaded weights go.
        workers: concurrent loads.
    """

    def __init__(
        self, load: Callable[[AdapterEntry], W], cache: HostCache[W], workers: int = 1
    ) -> None:
        self._load = load
        self.cache = cache
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lora-prefetch")
        self._inflight: dict[int, Future[None]] = {}
        self._errors: dict[int, str] = {}
        self._lock = threading.Lock()
        self.stats = PrefetchStats()

    def request(self, entry: AdapterEntry) -> None:
        """Start loading ``entry`` unless it is cached, loading, or failed before."""
        with self._lock:
            if entry.id in self._inflight or entry.id in self._errors or entry.id in self.cache:
                return
            self._inflight[entry.id] = self._pool.submit(self._run, entry)

    def _run(self, entry: AdapterEntry) -> None:
        start = time.perf_counter()
        try:
            weights = self._load(entry)
        except Exception as e:  # any failure is reported to the requests that wanted it
            logger.warning("loading adapter %s failed: %s", entry.name, e)
            with self._lock:
                self._errors[entry.id] = str(e)
                del self._inflight[entry.id]
            return
        self.cache.put(entry.id, weights)
        with self._lock:
            self.stats.loads += 1
            self.stats.load_seconds += time.perf_counter() - start
            del self._inflight[entry.id]

    def error(self, entry: AdapterEntry) -> str | None:
        """Why the last load of ``entry`` failed, if it did."""
        with self._lock:
            return self._errors.get(entry.id)

    def forget(self, entry: AdapterEntry) -> None:
        """Drop a recorded failure, so a later request retries the load."""
        with self._lock:
            self._errors.pop(entry.id, None)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
