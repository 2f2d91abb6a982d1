"""The KV-cache tenant of the page pool: which pages hold each request's keys and values.

A token of a request takes two pages (its K and its V, in every layer). The request's page
list interleaves them: token t's K lives in ``pages[2t]`` and its V in ``pages[2t + 1]``.
"""

from __future__ import annotations

from collections.abc import Iterator

from engine.page_pool import PagePool, Tenant

PAGES_PER_TOKEN = 2  # one for K, one for V


class KVCache:
    """Grows and frees the per-request page lists of the KV cache."""

    def __init__(self, pool: PagePool) -> None:
        self._pages: dict[str, list[int]] = {}
        self.pages = pool.tenant(Tenant.KV)
        pool.register(Tenant.KV, self)

    def pages_needed(self, request_id: str, num_tokens: int) -> int:
        """Pages that :meth:`grow` would take to cover ``num_tokens`` tokens."""
        have = len(self._pages.get(request_id, ()))
        return max(0, PAGES_PER_TOKEN * num_tokens - have)

    def grow(self, request_id: str, num_tokens: int) -> None:
        """Make the request's pages cover its first ``num_tokens`` tokens.

        Raises:
            OutOfPages: not enough free pages; the request keeps what it had.
        """
        need = self.pages_needed(request_id, num_tokens)
        if need:
            new = self.pages.allocate(need)
            self._pages.setdefault(request_id, []).extend(new)

    def free(self, request_id: str) -> None:
        """Return every page of the request to the pool (no-op if it holds none)."""
        pages = self._pages.pop(request_id, None)
        if pages:
            self.pages.release(pages)

    def slots(self, request_id: str, start: int, end: int) -> tuple[list[int], list[int]]:
        """The K pages and the V pages of the request's tokens ``start .. end - 1``."""
        pages = self._pages[request_id][PAGES_PER_TOKEN * start : PAGES_PER_TOKEN * end]
        return pages[0::2], pages[1::2]

    def num_requests(self) -> int:
        return len(self._pages)

    def held_pages(self) -> Iterator[int]:
        for pages in self._pages.values():
            yield from pages
