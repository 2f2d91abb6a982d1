"""Which pool pages hold each request's keys and values: the KV tenant's page lists.

The tensors themselves live in the page pool (``engine/page_pool.py``); this module only
hands out and takes back page ids, as vLLM's KV-cache manager does with blocks.

A token of a request takes two pages (its K and its V, in every layer). The request's page
list interleaves them: token t's K lives in ``pages[2t]`` and its V in ``pages[2t + 1]``.

With prefix caching, a request's list may begin with the pages of cached blocks
(``engine/prefix_cache.py``), shared with the cache and with other requests: each holder has
its own reference, so freeing a request never frees a page someone else holds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from engine.config import DEFAULT_BLOCK_SIZE
from engine.page_pool import PagePool, Tenant
from engine.prefix_cache import PAGES_PER_TOKEN, Block, PrefixCache

__all__ = ["PAGES_PER_TOKEN", "KVCacheManager"]


class KVCacheManager:
    """Grows and frees the per-request page lists of the KV cache, and the prefix cache.

    Args:
        pool: the page pool.
        block_size: tokens per prefix-cache block.
        enable_prefix_caching: keep and reuse full blocks (else ``prefix`` is None).
    """

    def __init__(
        self,
        pool: PagePool,
        block_size: int = DEFAULT_BLOCK_SIZE,
        enable_prefix_caching: bool = False,
    ) -> None:
        self._pool = pool
        self._pages: dict[str, list[int]] = {}
        self.pages = pool.tenant(Tenant.KV)
        self.block_size = block_size
        self.prefix = PrefixCache(pool, block_size) if enable_prefix_caching else None
        self._blocks: dict[str, list[Block]] = {}  # cached blocks a request holds, in order
        self._offered: dict[str, int] = {}  # leading blocks of a request matched or offered
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

    def match(self, request_id: str, keys: list[bytes], adapters: tuple[int, ...]) -> int:
        """Start a request that holds no pages on the cached blocks of the longest run of
        ``keys`` (its first blocks' chain keys); returns the tokens they cover."""
        assert self.prefix is not None and request_id not in self._pages
        blocks = self.prefix.match(keys, adapters)
        self._offered[request_id] = len(blocks)
        if blocks:
            pages = [page for block in blocks for page in block.pages]
            self._pool.share(pages)
            self._pages[request_id] = pages
            self._blocks[request_id] = blocks
        return len(blocks) * self.block_size

    def commit(
        self,
        request_id: str,
        keys: list[bytes],
        num_computed: int,
        adapters: tuple[int, ...],
        label: str,
    ) -> None:
        """Offer the cache the request's blocks that ``num_computed`` tokens fill, from the
        first not offered yet (``keys`` must reach the last of them)."""
        assert self.prefix is not None
        start = self._offered.get(request_id, 0)
        end = num_computed // self.block_size
        span = PAGES_PER_TOKEN * self.block_size
        pages = self._pages.get(request_id, [])
        for i in range(start, end):
            block = self.prefix.insert(keys[i], pages[i * span : (i + 1) * span], adapters, label)
            if block is not None:
                self._blocks.setdefault(request_id, []).append(block)
        self._offered[request_id] = max(start, end)

    def num_offered(self, request_id: str) -> int:
        """The request's leading blocks already matched or offered to the cache."""
        return self._offered.get(request_id, 0)

    def free(self, request_id: str) -> None:
        """Drop every page reference of the request (no-op if it holds none)."""
        pages = self._pages.pop(request_id, None)
        if pages:
            self.pages.release(pages)
        blocks = self._blocks.pop(request_id, None)
        if blocks:
            assert self.prefix is not None
            self.prefix.release(blocks)
        self._offered.pop(request_id, None)

    def token_pages(self, request_id: str, start: int, end: int) -> tuple[list[int], list[int]]:
        """The K pages and the V pages of the request's tokens ``start .. end - 1``."""
        pages = self._pages[request_id][PAGES_PER_TOKEN * start : PAGES_PER_TOKEN * end]
        return pages[0::2], pages[1::2]

    def num_requests(self) -> int:
        return len(self._pages)

    @property
    def num_cached_pages(self) -> int:
        """Pages only the prefix cache holds (free for the taking)."""
        return 0 if self.prefix is None else self.prefix.num_unused_pages

    def held_pages(self) -> Iterator[int]:
        for pages in self._pages.values():
            yield from pages
        if self.prefix is not None:
            yield from self.prefix.held_pages()

    def check_integrity(self) -> None:
        """Assert the prefix cache's books against the blocks the requests hold."""
        if self.prefix is None:
            assert not self._blocks
            return
        users: Counter[bytes] = Counter()
        for request_id, blocks in self._blocks.items():
            assert request_id in self._pages, "a request holds blocks but no pages"
            users.update(block.key for block in blocks)
        self.prefix.check_integrity(users)
