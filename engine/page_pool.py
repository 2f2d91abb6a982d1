"""The unified page pool: one allocator for every tenant of GPU memory.

Layout. Each layer owns one preallocated tensor of shape ``[num_pages, page_width]``. A page
is the same row index in every layer's tensor: a fixed-width vector of
``page_width = num_kv_heads * head_dim`` elements per layer. Tenants see the same pages
through typed views:

* the KV cache (``engine/kv_cache_manager.py``) stores one token's K in one page and its V
  in another (the view ``[num_pages, num_kv_heads, head_dim]``);
* adapter weights store an adapter's rank-rows in pages, a rank-r adapter
  taking pages in proportion to r.

Ownership. The pool owns the storage, the free list and per-page reference counts; it never
knows which request or adapter holds a page. Each tenant registers a :class:`PageHolder` that
reports the pages it holds, so :meth:`PagePool.check_integrity` can prove that
free + held-by-each-tenant == all pages, and that every reference count matches its holders.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable
from typing import Protocol

import torch


class Tenant(enum.IntEnum):
    """Who a page is lent to. ``FREE`` pages sit on the free list."""

    FREE = 0
    KV = 1
    ADAPTER = 2


class OutOfPages(Exception):
    """Raised when an allocation asks for more pages than are free."""

    def __init__(self, requested: int, free: int) -> None:
        super().__init__(f"requested {requested} pages, {free} free")
        self.requested = requested
        self.free = free


class PageHolder(Protocol):
    """A tenant's bookkeeping, as seen by the integrity check."""

    def held_pages(self) -> Iterable[int]:
        """Every page reference the tenant holds (a page held twice appears twice)."""
        ...


class PagePool:
    """Per-layer page storage plus the one allocator that hands pages to every tenant.

    Args:
        num_layers: how many per-layer tensors to allocate.
        num_pages: pages per layer (a page index addresses the same row in every layer).
        page_width: elements per page per layer.
        dtype: element type of the storage.
        device: where the storage lives.
    """

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_width: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_pages <= 0 or page_width <= 0 or num_layers <= 0:
            raise ValueError("num_layers, num_pages and page_width must be positive")
        self.num_pages = num_pages
        self.page_width = page_width
        # One tensor per layer, (num_pages + 1, page_width). Zero-filled so that unwritten
        # pages never hold NaNs that a masked kernel lane could still multiply by zero. The
        # extra last row is the scratch page: never lent, it takes the K and V that padded
        # rows of a static-shape decode batch write (see engine/cuda_graph.py).
        self.layers: list[torch.Tensor] = [
            torch.zeros(num_pages + 1, page_width, dtype=dtype, device=device)
            for _ in range(num_layers)
        ]
        self.scratch_page = num_pages
        # Pop from the end: low page ids are handed out first.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._refcount: list[int] = [0] * num_pages
        self._tenant: list[Tenant] = [Tenant.FREE] * num_pages
        self._used: Counter[Tenant] = Counter()
        self._holders: dict[Tenant, PageHolder] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def num_used(self, tenant: Tenant) -> int:
        """Pages currently lent to ``tenant``."""
        return self._used[tenant]

    @property
    def page_bytes(self) -> int:
        """Bytes one page takes across all layers (the scratch page not counted anywhere)."""
        return len(self.layers) * self.page_width * self.layers[0].element_size()

    def register(self, tenant: Tenant, holder: PageHolder) -> None:
        """Declare the bookkeeping of a tenant so the integrity check can audit it."""
        if tenant is Tenant.FREE:
            raise ValueError("FREE is not a tenant")
        self._holders[tenant] = holder

    def allocate(self, n: int, tenant: Tenant) -> list[int]:
        """Take ``n`` pages off the free list for ``tenant``, each with one reference.

        Raises:
            OutOfPages: fewer than ``n`` pages are free; nothing is allocated.
        """
        if tenant is Tenant.FREE:
            raise ValueError("cannot allocate to FREE")
        if n > len(self._free):
            raise OutOfPages(n, len(self._free))
        pages = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        # Ascending order: a run of free pages (a fresh pool's, or any stretch freed together)
        # comes out contiguous, so an adapter's rows can be read as a view of the pool.
        pages.sort()
        for page in pages:
            self._refcount[page] = 1
            self._tenant[page] = tenant
        self._used[tenant] += n
        return pages

    def share(self, pages: Iterable[int]) -> None:
        """Add one reference to each page (for a second holder of the same content)."""
        for page in pages:
            if self._refcount[page] == 0:
                raise ValueError(f"page {page} is free; it cannot be shared")
            self._refcount[page] += 1

    def release(self, pages: Iterable[int]) -> None:
        """Drop one reference from each page; a page with none left returns to the free list."""
        for page in pages:
            count = self._refcount[page]
            if count == 0:
                raise ValueError(f"page {page} released twice")
            self._refcount[page] = count - 1
            if count == 1:
                self._used[self._tenant[page]] -= 1
                self._tenant[page] = Tenant.FREE
                self._free.append(page)

    def tenant(self, tenant: Tenant) -> TenantPages:
        """The typed view through which ``tenant`` takes and returns pages."""
        if tenant is Tenant.FREE:
            raise ValueError("FREE is not a tenant")
        return TenantPages(self, tenant)

    def check_integrity(self) -> None:
        """Assert the allocator's invariants and that every tenant's books match the pool's.

        * the free list holds distinct pages, each with no reference and no tenant;
        * every other page has references and a tenant;
        * free + pages of each tenant == all pages;
        * each tenant's holder holds exactly the references the pool counts for its pages.
        """
        free = set(self._free)
        assert len(free) == len(self._free), "a page is on the free list twice"
        per_tenant: Counter[Tenant] = Counter()
        for page in range(self.num_pages):
            tenant, count = self._tenant[page], self._refcount[page]
            if page in free:
                assert count == 0 and tenant is Tenant.FREE, f"free page {page} is in use"
            else:
                assert count > 0 and tenant is not Tenant.FREE, f"page {page} leaked"
                per_tenant[tenant] += 1
        assert len(free) + sum(per_tenant.values()) == self.num_pages
        for tenant in (Tenant.KV, Tenant.ADAPTER):
            assert per_tenant[tenant] == self._used[tenant], f"{tenant.name} page count drifted"
        for tenant, holder in self._holders.items():
            held = Counter(holder.held_pages())
            for page, count in held.items():
                assert self._tenant[page] is tenant, f"{tenant.name} holds page {page} it lacks"
                assert self._refcount[page] == count, f"page {page}: refcount != holders"
            assert len(held) == per_tenant[tenant], f"{tenant.name} holds pages not its own"


class TenantPages:
    """One tenant's view of the pool: allocations are always tagged with that tenant.

    Handing a tenant this view (rather than the pool) keeps it from mislabelling pages, and
    lets code outside ``engine`` (the adapter residency) take pages without importing it.
    """

    def __init__(self, pool: PagePool, tenant: Tenant) -> None:
        self._pool = pool
        self._tenant = tenant

    @property
    def layers(self) -> list[torch.Tensor]:
        return self._pool.layers

    @property
    def page_width(self) -> int:
        return self._pool.page_width

    @property
    def num_free(self) -> int:
        return self._pool.num_free

    def allocate(self, n: int) -> list[int]:
        return self._pool.allocate(n, self._tenant)

    def release(self, pages: Iterable[int]) -> None:
        self._pool.release(pages)
