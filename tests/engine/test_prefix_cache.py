"""The prefix cache's books, unit by unit: chain keys, matching, sharing pages by reference,
eviction order, and the one least-recently-used order it shares with the adapters.

End-to-end exactness (caching on, off and PEFT agree) is in ``test_prefix_exact.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

from adapters.residency import AdapterResidency
from adapters.weights import LoraModuleWeights
from engine.kv_cache_manager import KVCacheManager
from engine.page_pool import PagePool, Tenant
from engine.prefix_cache import BASE_ROOT, PrefixCache, chain_keys

BLOCK = 2  # tokens per block: a block takes 2 · BLOCK = 4 pages (K and V per token)
SPAN = 2 * BLOCK


def keys_of(tokens: list[int], root: bytes = BASE_ROOT) -> list[bytes]:
    """The chain keys of every full block of ``tokens``."""
    return chain_keys([], root, lambda s, e: tokens[s:e], len(tokens) // BLOCK, BLOCK)


def make_kv(num_pages: int = 64) -> tuple[PagePool, KVCacheManager]:
    pool = PagePool(1, num_pages, 4, torch.float32, torch.device("cpu"))
    return pool, KVCacheManager(pool, BLOCK, enable_prefix_caching=True)


def compute(kv: KVCacheManager, rid: str, tokens: list[int], adapters: tuple[int, ...] = ()) -> int:
    """A request over ``tokens``: match, compute the rest, offer its blocks; returns the
    tokens it found cached (its last token is always computed, as the scheduler does)."""
    keys = keys_of(tokens)
    cached = kv.match(rid, keys[: (len(tokens) - 1) // BLOCK], adapters)
    kv.grow(rid, len(tokens))
    kv.commit(rid, keys, len(tokens), adapters, "")
    return cached


def audit(pool: PagePool, kv: KVCacheManager) -> None:
    pool.check_integrity()
    kv.check_integrity()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A clock that ticks once per reading, for the caches' and the residency's last-use
    times (equal readings would make the order between the two a tie)."""
    ticks = iter(range(1, 1_000_000))
    fake = SimpleNamespace(monotonic=lambda: float(next(ticks)))
    monkeypatch.setattr("engine.prefix_cache.time", fake)
    monkeypatch.setattr("adapters.residency.time", fake)
    yield


# -- keys ------------------------------------------------------------------------------------


def test_chain_keys_differ_by_root_and_by_any_token() -> None:
    tokens = [5, 6, 7, 8, 9, 10]
    base = keys_of(tokens)
    assert len(base) == 3 and len(set(base)) == 3
    assert keys_of(tokens) == base  # deterministic
    other_root = keys_of(tokens, root=b"\x01" * 32)
    assert not set(other_root) & set(base)
    changed = keys_of([5, 6, 7, 99, 9, 10])  # a token of block 1 differs
    assert changed[0] == base[0]
    assert changed[1] != base[1] and changed[2] != base[2]  # and every key after it
    # A key covers its whole prefix, not only its own block.
    assert keys_of([1, 2, 7, 8])[1] != keys_of([5, 6, 7, 8])[1]
    # Extending a chain keeps its keys (requests extend theirs as they grow).
    keys = keys_of(tokens[:4])
    assert chain_keys(keys, BASE_ROOT, lambda s, e: tokens[s:e], 3, BLOCK) == base


# -- match, insert, release --------------------------------------------------------------


def test_match_takes_the_longest_cached_run() -> None:
    pool, kv = make_kv()
    tokens = [5, 6, 7, 8, 9, 10, 11]
    assert compute(kv, "a", tokens) == 0
    kv.free("a")
    keys = keys_of(tokens)
    assert kv.num_cached_pages == 3 * SPAN
    assert compute(kv, "b", tokens) == 3 * BLOCK
    assert kv.match("c", [keys[0], keys[1], b"nope", keys[2]], ()) == 2 * BLOCK
    assert kv.match("d", [b"nope", *keys], ()) == 0
    audit(pool, kv)
    # Once a middle block is gone, the chain's later blocks are unreachable.
    prefix = kv.prefix
    assert prefix is not None
    for rid in "bcd":
        kv.free(rid)
    assert prefix.evict_oldest() == SPAN  # the tail first, then its parent
    assert prefix.evict_oldest() == SPAN
    assert kv.match("e", keys, ()) == BLOCK
    audit(pool, kv)


def test_insert_of_a_cached_key_returns_none_and_the_request_keeps_its_pages() -> None:
    pool, kv = make_kv()
    tokens = [5, 6, 7, 8, 9]
    # Two requests compute the same prompt at once: the first to finish a block caches it.
    kv.grow("a", 5)
    kv.grow("b", 5)
    keys = keys_of(tokens)
    kv.commit("a", keys, 5, (), "")
    kv.commit("b", keys, 5, (), "")
    prefix = kv.prefix
    assert prefix is not None
    assert len(prefix) == 2
    assert prefix.insert(keys[0], kv.token_pages("b", 0, 1)[0], (), "") is None
    audit(pool, kv)
    # b's pages were never cached: freeing it returns all 10 of them.
    free = pool.num_free
    kv.free("b")
    assert pool.num_free == free + 10
    kv.free("a")  # a's last token is not in a full block: 2 of its pages come back
    assert pool.num_free == free + 12
    assert kv.num_cached_pages == 2 * SPAN
    audit(pool, kv)


def test_release_queues_blocks_tail_first_and_evict_takes_the_least_recent() -> None:
    pool, kv = make_kv(num_pages=40)
    prefix = kv.prefix
    assert prefix is not None
    old, new = [5, 6, 7, 8, 9, 10], [20, 21, 22, 23]
    compute(kv, "old", old)
    compute(kv, "new", new)
    kv.free("old")
    kv.free("new")  # released later: more recently used
    assert pool.num_free == 40 - 5 * SPAN
    assert prefix.evict(40 - 4 * SPAN)  # one block: the tail of the older chain
    assert prefix.num_evicted == 1
    assert kv.match("x", keys_of(old), ()) == 2 * BLOCK
    kv.free("x")  # used again: now the more recent of the two chains
    assert prefix.evict(40 - 2 * SPAN)  # two more: the whole "new" chain, tail first
    assert kv.match("y", keys_of(new), ()) == 0
    assert kv.match("z", keys_of(old), ()) == 2 * BLOCK
    # Blocks in use are never evicted, however many pages are asked for.
    assert not prefix.evict(40)
    assert prefix.num_evicted == 3
    assert kv.match("w", keys_of(old), ()) == 2 * BLOCK
    audit(pool, kv)


def test_adapter_evicted_sends_its_unused_blocks_first(clock: None) -> None:
    pool, kv = make_kv()
    prefix = kv.prefix
    assert prefix is not None
    compute(kv, "a7", [5, 6, 7, 8], adapters=(7,))
    kv.free("a7")
    compute(kv, "base", [1, 2, 3, 4])
    kv.free("base")
    compute(kv, "a9", [9, 9, 9, 9, 9], adapters=(9,))
    kv.free("a9")
    in_use = [4, 4, 3, 3, 3]
    compute(kv, "busy", in_use, adapters=(9,))  # holds its blocks through the eviction
    oldest = prefix.oldest()
    assert oldest is not None and oldest > 0
    prefix.adapter_evicted(9)
    assert prefix.oldest() == float("-inf")
    prefix.evict_oldest()
    prefix.evict_oldest()  # adapter 9's two unused blocks went first, though newest
    assert kv.match("x", keys_of([9, 9, 9, 9, 9]), ()) == 0
    assert kv.match("y", keys_of([5, 6, 7, 8]), ()) == 2 * BLOCK
    assert kv.match("z", keys_of([1, 2, 3, 4]), ()) == 2 * BLOCK
    assert kv.match("u", keys_of(in_use)[:2], (9,)) == 2 * BLOCK  # still cached
    audit(pool, kv)


# -- shared pages ------------------------------------------------------------------------


def test_shared_pages_are_counted_and_never_freed_under_another_holder() -> None:
    pool, kv = make_kv(num_pages=48)
    prefix = kv.prefix
    assert prefix is not None
    prompt = [5, 6, 7, 8, 9]
    compute(kv, "a", prompt)
    shared = kv.token_pages("a", 0, 4)  # the K and V pages of the two cached blocks
    assert compute(kv, "b", [*prompt[:4], 30]) == 2 * BLOCK
    assert compute(kv, "c", [*prompt[:4], 31, 32]) == 2 * BLOCK
    assert kv.token_pages("b", 0, 4) == kv.token_pages("c", 0, 4) == shared
    audit(pool, kv)  # refcount 4 (cache, a, b, c) on each shared page
    # Three requests and the cache on 8 pages; each request's own pages beside them.
    assert pool.num_free == 48 - (2 * SPAN + 2 + 2 + 2 * 2)
    assert kv.num_cached_pages == 0  # every block has users
    for rid in ("a", "b"):
        free = pool.num_free
        kv.free(rid)
        audit(pool, kv)
        assert pool.num_free == free + 2  # only its own last token's pages
        assert kv.token_pages("c", 0, 4) == shared
    kv.free("c")  # c's third block was cached too: the cache now holds every page left
    audit(pool, kv)
    assert kv.num_cached_pages == 3 * SPAN
    assert pool.num_free == 48 - 3 * SPAN
    assert prefix.evict(48) and pool.num_free == 48
    audit(pool, kv)


def test_a_request_that_never_grows_lets_go_of_its_match() -> None:
    """Admission matches, then fails to grow: the scheduler frees the request at once."""
    pool, kv = make_kv()
    compute(kv, "a", [5, 6, 7, 8, 9])
    kv.free("a")
    assert kv.match("b", keys_of([5, 6, 7, 8]), ()) == 2 * BLOCK
    assert kv.num_cached_pages == 0
    kv.free("b")
    assert kv.num_cached_pages == 2 * SPAN
    audit(pool, kv)


def test_caching_off_has_no_prefix_cache() -> None:
    pool = PagePool(1, 16, 4, torch.float32, torch.device("cpu"))
    kv = KVCacheManager(pool, BLOCK, enable_prefix_caching=False)
    assert kv.prefix is None and kv.num_cached_pages == 0
    kv.grow("a", 5)
    kv.free("a")
    assert pool.num_free == 16
    audit(pool, kv)


# -- one eviction order with the adapters --------------------------------------------------


def wired(num_pages: int) -> tuple[PagePool, KVCacheManager, AdapterResidency, PrefixCache]:
    """A pool with the KV cache and the adapter residency, reclaimed in one order."""
    pool = PagePool(1, num_pages, 16, torch.float32, torch.device("cpu"))
    kv = KVCacheManager(pool, BLOCK, enable_prefix_caching=True)
    residency = AdapterResidency(
        pool.tenant(Tenant.ADAPTER), 1, {"q_proj": (16, 16)}, max_slots=4, max_lora_rank=8
    )
    pool.register(Tenant.ADAPTER, residency)
    assert kv.prefix is not None
    residency.spare = kv.prefix
    return pool, kv, residency, kv.prefix


def place(residency: AdapterResidency, adapter_id: int, rank: int = 2) -> None:
    """An adapter of ``2 · rank`` pages (one A row page and one Bᵀ row page per rank)."""
    module = LoraModuleWeights(torch.zeros(rank, 16), torch.zeros(16, rank), 1.0)
    residency.place(adapter_id, {(0, "q_proj"): module})


def test_reclaim_evicts_a_cached_block_before_a_more_recent_adapter(clock: None) -> None:
    pool, kv, residency, prefix = wired(32)
    compute(kv, "a", [5, 6, 7, 8, 9, 10])
    kv.free("a")  # three blocks, 12 pages, unused
    place(residency, 1)  # 4 pages, placed after the blocks were last used
    assert pool.num_free == 32 - 12 - 4
    assert residency.reclaim(24)  # two blocks go (the tail, then its parent); not the adapter
    assert 1 in residency and prefix.num_evicted == 2 and residency.num_evicted == 0
    assert kv.match("b", keys_of([5, 6, 7, 8, 9, 10]), ()) == BLOCK
    kv.free("b")
    residency.touch(1)  # the adapter again more recent than the last block
    assert residency.reclaim(28)
    assert 1 in residency and prefix.num_evicted == 3
    audit(pool, kv)


def test_reclaim_evicts_a_less_recent_adapter_before_cached_blocks(clock: None) -> None:
    pool, kv, residency, prefix = wired(32)
    place(residency, 1)
    place(residency, 2)
    compute(kv, "a", [5, 6, 7, 8])
    kv.free("a")  # two blocks, used after both adapters
    residency.touch(2)  # adapter 2 now the most recent of all
    assert residency.reclaim(32 - 8 - 8 + 4)  # one unit's worth: adapter 1 goes
    assert 1 not in residency and 2 in residency
    assert prefix.num_evicted == 0
    assert residency.reclaim(32 - 4 - 8 + 4)  # next: a block (the tail), before adapter 2
    assert 2 in residency and prefix.num_evicted == 1
    # A pinned adapter is never a victim: the blocks go, then reclaim gives up.
    residency.pin(2)
    assert not residency.reclaim(32)
    assert 2 in residency and len(prefix) == 0
    residency.unpin(2)
    audit(pool, kv)


def test_an_evicted_adapters_blocks_go_before_older_ones(clock: None) -> None:
    pool, kv, residency, prefix = wired(48)
    compute(kv, "base", [1, 2, 3, 4])
    kv.free("base")  # the oldest unit of all
    place(residency, 1)
    place(residency, 2)
    compute(kv, "one", [5, 6, 7, 8], adapters=(1,))
    kv.free("one")
    residency.touch(2)
    # Order by last use: base blocks, adapter 1, adapter 1's blocks, adapter 2.
    residency.evict(1)  # adapter 1 leaves: its blocks are useless until it returns
    assert prefix.oldest() == float("-inf")
    assert residency.reclaim(pool.num_free + 2 * SPAN)
    assert prefix.num_evicted == 2 and residency.num_evicted == 1
    assert kv.match("x", keys_of([5, 6, 7, 8]), (1,)) == 0
    assert kv.match("y", keys_of([1, 2, 3, 4]), ()) == 2 * BLOCK
    kv.free("x")
    kv.free("y")
    # The same through reclaim: adapter 2 is the least recent unit now; evicting it sends
    # its blocks ahead of the base blocks used after it.
    compute(kv, "two", [9, 9, 9, 9], adapters=(2,))
    kv.free("two")
    compute(kv, "base2", [4, 4, 3, 3])
    kv.free("base2")
    assert residency.get(2) is not None
    assert residency.reclaim(pool.num_free + 4)  # adapter 2 (4 pages) is older than them all
    assert 2 not in residency
    assert residency.reclaim(pool.num_free + 2 * SPAN)
    assert kv.match("z", keys_of([9, 9, 9, 9]), (2,)) == 0
    assert kv.match("w", keys_of([1, 2, 3, 4]), ()) == 2 * BLOCK  # older, still there
    assert kv.match("v", keys_of([4, 4, 3, 3]), ()) == 2 * BLOCK
    audit(pool, kv)


def test_an_adapter_placed_again_keeps_its_blocks_and_gets_them_back(clock: None) -> None:
    """Making room for an adapter takes its own stale blocks last (they are what its next
    request will reuse); once it is back, they are unused blocks again, recent ones."""
    pool, kv, residency, prefix = wired(40)
    place(residency, 1)
    compute(kv, "one", [5, 6, 7, 8], adapters=(1,))
    kv.free("one")  # adapter 1's two blocks, 8 pages
    compute(kv, "base", [1, 2, 3, 4])
    kv.free("base")  # two base blocks, used after them
    residency.evict(1)
    assert prefix.oldest() == float("-inf")
    assert prefix.oldest(keep=[1]) not in (None, float("-inf"))  # a base block
    # Placing adapter 1 again (4 pages) in a full pool takes a base block, not its own.
    compute(kv, "filler", list(range(10, 22)))  # 24 pages held by a running request
    assert pool.num_free == 40 - 8 - 8 - 24
    assert residency.reclaim(4, keep=[1], slot=True)
    place(residency, 1)
    assert prefix.num_evicted == 1  # the base chain's tail
    assert prefix.oldest() != float("-inf")  # adapter 1's blocks are not stale any more
    assert kv.match("again", keys_of([5, 6, 7, 8]), (1,)) == 2 * BLOCK
    kv.free("again")
    kv.free("filler")
    audit(pool, kv)


def test_a_pool_full_of_an_adapters_own_blocks_still_makes_room_for_it(clock: None) -> None:
    """``keep`` is a preference: when only the kept adapter's blocks are left, they go (a
    refusal would leave its next request waiting forever with nothing running)."""
    pool, kv, residency, prefix = wired(24)
    place(residency, 1)
    compute(kv, "one", [5, 6, 7, 8], adapters=(1,))
    kv.free("one")
    compute(kv, "two", [6, 6, 7, 7], adapters=(1,))
    kv.free("two")
    assert pool.num_free == 24 - 4 - 16
    # Growing a request of adapter 1 (kept: it must stay resident) takes its unused blocks.
    assert residency.reclaim(8, keep=[1])
    assert 1 in residency and prefix.num_evicted == 1
    # Out of the pool, its blocks are stale; placing it again may take them, last of all,
    # though prefetching (which takes only what is of no use) leaves them.
    residency.evict(1)
    assert not residency.reclaim_stale(pool.num_free + 4, keep=[1])
    assert prefix.oldest(keep=[1]) not in (None, float("-inf"))
    assert residency.reclaim(pool.num_free + 4, keep=[1], slot=True)
    assert prefix.num_evicted == 2
    audit(pool, kv)


def test_prefetch_takes_only_stale_blocks(clock: None) -> None:
    """``reclaim_stale`` (what prefetching into the pool may evict) frees the blocks of
    adapters out of the pool and nothing else."""
    pool, kv, residency, prefix = wired(24)
    place(residency, 1)
    compute(kv, "one", [5, 6, 7, 8], adapters=(1,))
    kv.free("one")
    compute(kv, "base", [1, 2, 3, 4])
    kv.free("base")
    assert pool.num_free == 24 - 4 - 8 - 8
    assert not residency.reclaim_stale(8)  # nothing is stale: nothing goes
    assert prefix.num_evicted == 0
    residency.evict(1)
    assert residency.reclaim_stale(8 + 4)  # one of adapter 1's blocks is enough
    assert prefix.num_evicted == 1
    assert not residency.reclaim_stale(24)  # then only base blocks are left: they stay
    assert prefix.num_evicted == 2
    assert kv.match("b", keys_of([1, 2, 3, 4]), ()) == 2 * BLOCK
    kv.free("b")
    audit(pool, kv)
