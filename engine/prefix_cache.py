"""The prefix cache: keys and values of full blocks of computed tokens, kept in the pool after
their requests end, reused by later requests that start with the same tokens under the same
adapter.

Keys. A block is ``block_size`` tokens starting at a multiple of ``block_size``. Its key is a
hash chain, ``key(i) = sha256(key(i - 1) ‖ tokens of block i)``, rooted in what computed the
keys and values: the adapter's identity (``adapters.identity``: its name and a digest of its
weights, or a mixture's components and weights) or a fixed root for the base model. Two
requests share a block only when they computed the same tokens after the same tokens with the
same weights: another adapter, the base, a mixture and its components, and an adapter loaded
again under the same name with other weights all start other chains. SHA-256 rather than
Python's ``hash``: a key collision would hand one tenant another's keys and values, and
anyone who can send prompts could search for collisions of a short hash.

Pages. A cached block's pages are those its tokens took in the KV cache (two per token, K then
V, as a request's page list holds them), so they belong to the KV tenant. The cache holds one
reference to each of them and every request using the block one more; pages are never copied.
A request reuses at most its first ``num_tokens - 1`` tokens (the last is always computed, to
sample from) and only whole blocks, and a token's pages are written once, when it is computed:
no shared page is ever written again.

Eviction. A block no request uses is *unused*: it stays in the pool, its pages counted as
cached, until someone needs the space. Unused blocks go least recently used first (a
request's blocks are released tail first, so a chain shrinks from its end), in one order with
the adapters (``AdapterResidency.reclaim`` compares the two). The blocks of an adapter that
leaves the pool become *stale* and go before all others: without their adapter they are of
no use. Stale blocks are taken to make room for their own adapter (``keep``) only when no
other unused block is left, and when it is placed again they are unused blocks once more, as
recent as the placement (a request that needs the adapter is about to run, and likely to
share their prompt). ``keep`` is a preference, never a refusal: a pool full of one adapter's
unused blocks must still make room for that adapter's next request.
"""

from __future__ import annotations

import hashlib
import math
import time
from array import array
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from engine.page_pool import PagePool

# The root of the base model's chains (adapter identities are SHA-256 digests: never this).
BASE_ROOT = b"loraserve-base-model"

PAGES_PER_TOKEN = 2  # one for K, one for V (as in engine/kv_cache_manager.py)


def chain_keys(
    keys: list[bytes],
    root: bytes,
    tokens: Callable[[int, int], list[int]],
    num_blocks: int,
    block_size: int,
) -> list[bytes]:
    """Extend ``keys`` (the chain's first keys) to ``num_blocks`` keys; returns ``keys``.

    ``tokens(start, end)`` gives the token ids at positions ``start .. end - 1``.
    """
    parent = keys[-1] if keys else root
    for i in range(len(keys), num_blocks):
        block = array("i", tokens(i * block_size, (i + 1) * block_size))
        parent = hashlib.sha256(parent + block.tobytes()).digest()
        keys.append(parent)
    return keys


@dataclass(eq=False)
class Block:
    """One cached block.

    Attributes:
        key: its chain key.
        pages: its tokens' K and V pages, interleaved (``2 · block_size`` pages).
        adapters: the ids of the adapters its keys and values need resident (empty: base).
        label: the adapter's name ("" for the base model), for per-adapter page counts.
        users: requests holding it (each with a reference to its pages).
        last_used: when its last user let go, or its adapter came back to the pool
            (monotonic seconds).
    """

    key: bytes
    pages: list[int]
    adapters: tuple[int, ...]
    label: str
    users: int = 0
    last_used: float = 0.0


class PrefixCache:
    """Cached blocks by key, their users, and the unused ones in eviction order.

    Args:
        pool: the page pool (the cache adds and drops references to KV pages).
        block_size: tokens per block.
    """

    def __init__(self, pool: PagePool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self._blocks: dict[bytes, Block] = {}
        # Unused blocks, the first to go first: those of adapters out of the pool, then
        # the rest, least recently used first.
        self._stale: OrderedDict[bytes, Block] = OrderedDict()
        self._unused: OrderedDict[bytes, Block] = OrderedDict()
        self.pages_by_label: Counter[str] = Counter()
        self.num_unused_pages = 0
        self.queries = 0  # tokens looked up
        self.hits = 0  # tokens found
        self.num_evicted = 0  # blocks

    def __len__(self) -> int:
        return len(self._blocks)

    # -- lookups and insertions (for the KV cache) ------------------------------------------

    def match(self, keys: Iterable[bytes], adapters: tuple[int, ...]) -> list[Block]:
        """The cached blocks of the longest run of ``keys`` from the first, each taken by
        one more user (the caller adds the page references)."""
        found: list[Block] = []
        for key in keys:
            block = self._blocks.get(key)
            if block is None:
                break
            found.append(block)
        for block in found:
            self._use(block)
            block.adapters = adapters  # (the same ids: an identity names one entry)
        return found

    def insert(
        self, key: bytes, pages: list[int], adapters: tuple[int, ...], label: str
    ) -> Block | None:
        """Cache a block a request just computed, the request its first user; None when the
        key is cached already (the request keeps its own pages, uncached)."""
        if key in self._blocks:
            return None
        self.pool.share(pages)
        block = Block(key, pages, adapters, label, users=1)
        self._blocks[key] = block
        self.pages_by_label[label] += len(pages)
        return block

    def release(self, blocks: list[Block]) -> None:
        """Users let go of ``blocks`` (a request's, in chain order)."""
        now = time.monotonic()
        for block in reversed(blocks):  # the tail first: it goes before its parents
            block.users -= 1
            assert block.users >= 0, "a cached block released more often than taken"
            if block.users == 0:
                block.last_used = now
                self._unused[block.key] = block
                self.num_unused_pages += len(block.pages)

    def _use(self, block: Block) -> None:
        if block.users == 0:
            self._forget_unused(block)
        block.users += 1

    def _forget_unused(self, block: Block) -> None:
        queue = self._stale if block.key in self._stale else self._unused
        del queue[block.key]
        self.num_unused_pages -= len(block.pages)

    # -- eviction (for the unified reclaim) -------------------------------------------------

    def oldest(self, keep: Iterable[int] = ()) -> float | None:
        """When the next block to go was last used (-inf for a stale block, but one of an
        adapter in ``keep``); None when no block is unused. Stale blocks of an adapter in
        ``keep`` go last."""
        block = self._next(keep)
        if block is None:
            return None
        stale = block.key in self._stale and not set(keep).intersection(block.adapters)
        return -math.inf if stale else block.last_used

    def evict_oldest(self, keep: Iterable[int] = ()) -> int:
        """Drop the next unused block (stale blocks of ``keep`` last); returns the pages
        freed."""
        block = self._next(keep)
        assert block is not None, "no unused block to evict"
        self._forget_unused(block)
        del self._blocks[block.key]
        self.pages_by_label[block.label] -= len(block.pages)
        if not self.pages_by_label[block.label]:
            del self.pages_by_label[block.label]
        self.pool.release(block.pages)
        self.num_evicted += 1
        return len(block.pages)

    def _next(self, keep: Iterable[int]) -> Block | None:
        """Stale blocks of adapters not kept, then unused blocks (their adapters are in the
        pool: keeping them is the residency's business), then the kept adapters' stale
        blocks."""
        kept = set(keep)
        stale = iter(self._stale.values())
        for block in stale:
            if not kept.intersection(block.adapters):
                return block
        for block in self._unused.values():
            return block
        return next(iter(self._stale.values()), None)

    def evict(self, num_pages: int) -> bool:
        """Drop unused blocks, stale first, then least recently used, until ``num_pages``
        are free."""
        while self.pool.num_free < num_pages and self.num_unused_pages:
            self.evict_oldest()
        return self.pool.num_free >= num_pages

    def adapter_evicted(self, adapter_id: int) -> None:
        """An adapter left the pool: its unused blocks become stale (they go first)."""
        for block in [b for b in self._unused.values() if adapter_id in b.adapters]:
            del self._unused[block.key]
            self._stale[block.key] = block

    def adapter_placed(self, adapter_id: int) -> None:
        """An adapter came back to the pool: its stale blocks are unused blocks again, as
        recent as now."""
        now = time.monotonic()
        for block in [b for b in self._stale.values() if adapter_id in b.adapters]:
            del self._stale[block.key]
            block.last_used = now
            self._unused[block.key] = block

    # -- audit ------------------------------------------------------------------------------

    def held_pages(self) -> Iterator[int]:
        """The cache's own page references (one per page of every block)."""
        for block in self._blocks.values():
            yield from block.pages

    def check_integrity(self, users: Counter[bytes]) -> None:
        """Assert the books: ``users`` counts, per key, the requests holding each block."""
        for key, block in self._blocks.items():
            assert block.users == users[key], "a cached block's users drifted"
            unused = (key in self._unused) + (key in self._stale)
            assert unused == (block.users == 0), "unused blocks drifted"
        assert all(key in self._blocks for key in users), "a request holds an uncached block"
        unused_pages = sum(len(b.pages) for q in (self._unused, self._stale) for b in q.values())
        assert self.num_unused_pages == unused_pages
        assert sum(self.pages_by_label.values()) == sum(len(b.pages) for b in self._blocks.values())
