from __future__ import annotations

import pytest
import torch

from engine.kv_cache_manager import KVCacheManager
from engine.page_pool import OutOfPages, PagePool, Tenant


def make_pool(num_pages: int = 10) -> PagePool:
    return PagePool(2, num_pages, 8, torch.float32, torch.device("cpu"))


class Holder:
    def __init__(self) -> None:
        self.pages: list[int] = []

    def held_pages(self) -> list[int]:
        return self.pages


def test_allocate_release_keeps_counts() -> None:
    pool = make_pool()
    holder = Holder()
    pool.register(Tenant.ADAPTER, holder)
    holder.pages = pool.allocate(4, Tenant.ADAPTER)
    assert pool.num_free == 6 and pool.num_used(Tenant.ADAPTER) == 4
    assert len(set(holder.pages)) == 4
    pool.check_integrity()
    pool.release(holder.pages[:2])
    holder.pages = holder.pages[2:]
    assert pool.num_free == 8
    pool.check_integrity()


def test_out_of_pages_allocates_nothing() -> None:
    pool = make_pool(4)
    pool.allocate(3, Tenant.KV)
    with pytest.raises(OutOfPages) as info:
        pool.allocate(2, Tenant.KV)
    assert (info.value.requested, info.value.free) == (2, 1)
    assert pool.num_free == 1


def test_shared_page_returns_after_last_release() -> None:
    pool = make_pool()
    (page,) = pool.allocate(1, Tenant.ADAPTER)
    pool.share([page])
    pool.release([page])
    assert pool.num_free == 9
    pool.release([page])
    assert pool.num_free == 10
    with pytest.raises(ValueError, match="released twice"):
        pool.release([page])


def test_integrity_catches_a_leak_and_a_stray_holder() -> None:
    pool = make_pool()
    holder = Holder()
    pool.register(Tenant.KV, holder)
    pages = pool.allocate(2, Tenant.KV)
    holder.pages = pages[:1]  # the tenant forgot a page: a leak
    with pytest.raises(AssertionError):
        pool.check_integrity()
    holder.pages = [*pages, 9]  # the tenant claims a page it was never given
    with pytest.raises(AssertionError):
        pool.check_integrity()
    holder.pages = pages
    pool.check_integrity()


def test_kv_cache_gives_each_token_a_k_and_a_v_page() -> None:
    pool = make_pool(12)
    kv = KVCacheManager(pool)
    kv.grow("a", 3)
    kv.grow("b", 2)
    k, v = kv.token_pages("a", 0, 3)
    assert len(k) == len(v) == 3 and not set(k) & set(v)
    assert kv.pages_needed("a", 5) == 4
    with pytest.raises(OutOfPages):
        kv.grow("a", 5)  # 6 + 4 + 4 > 12
    assert len(kv.token_pages("a", 0, 3)[0]) == 3  # a failed grow keeps what the request had
    pool.check_integrity()
    kv.free("a")
    kv.free("b")
    assert pool.num_free == 12
    pool.check_integrity()
