"""LoRA adapter weights in the unified page pool: the layout, and what the LoRA ops share.

S-LoRA's unified paging keeps the KV cache and the adapter weights in one page pool per layer.
A page is one row of `page_width` elements (`num_kv_heads * head_dim` of the model, not
necessarily a power of two), so an adapter's matrices are stored as rows cut into pages:

Semantics (layout):
    W = page_width = pool.shape[1];  chunks(f) = ceil(f / W)
    For one target linear layer (in_features -> out_features) and adapter a of rank r:
        A_a[j, k]   = pool[a_pages[a, j, k // W], k % W]     (lora_a: (r, in_features))
        B_a[o, j]   = pool[b_pages[a, j, o // W], o % W]     (lora_b: (out_features, r), stored
                                                              transposed: one Bᵀ row per rank j)
    for j < r = ranks[a]. Page-table entries of rows j >= ranks[a] are never read and may hold
    anything. `write_rows` zero-fills the tail of each row's last page.

The ops live in `kernels/lora_shrink.py` (y = x · Aᵀ) and `kernels/lora_expand.py`
(out += scaling · y · Bᵀ), re-exported with the layout helpers by `kernels/lora.py`; their
`Semantics:` blocks give the exact math. This module holds the layout helpers (`write_rows`,
`read_rows`), the grouping of tokens by adapter that the torch references share, and the
checks shared by references and launchers.

Metadata shared by the ops (num_adapters: the adapters, or adapter slots, the batch indexes):
    ranks: int32 (num_adapters,), 0 allowed (the adapter does not touch this layer); any
        stride (a column of a (slots, layers, targets) table).
    scalings: float32 (num_adapters,), alpha / rank (or alpha / sqrt(rank) for rsLoRA); any
        stride.
    a_pages: int32 (num_adapters, max_rank_rows, chunks(in_features)).
    b_pages: int32 (num_adapters, max_rank_rows, chunks(out_features)).
    seg_starts: int32 (num_segments + 1,): row offsets of segments sharing one adapter,
        seg_starts[0] == 0, seg_starts[-1] == num_tokens (segmented / SGMV form).
    seg_adapters: int32 (num_segments,): adapter index of each segment, -1 for no LoRA.
    token_adapters: int32 (num_tokens,): adapter index of each row, -1 for no LoRA (per-token /
        BGMV form).

Packed forms (one launch for a packed projection's slices, e.g. q, k and v): per slice s, its
own page table a_pages[s] / b_pages[s] (a sequence of tables as above) and a column s of
    ranks: int32 (num_adapters, num_slices); scalings: float32 (num_adapters, num_slices);
        any strides (a (slots, layers, targets) table's [:, layer, t0 : t0 + num_slices]).
"""

from collections.abc import Iterator, Sequence

import torch

from kernels.triton_utils import can_launch_triton

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def num_chunks(features: int, page_width: int) -> int:
    """Pages one row of `features` elements occupies: ceil(features / page_width)."""
    return -(-features // page_width)


# ----------------------------------------------------------------------------------------------
# Layout helpers
# ----------------------------------------------------------------------------------------------


def write_rows(pool: torch.Tensor, pages: torch.Tensor, rows: torch.Tensor) -> None:
    """Write `rows` (n_rows, features) into `pool` (num_pages, W): row i into pages[i, :].

    `pages` is int32 or int64 (n_rows, ceil(features / W)) of distinct page ids (the allocator
    guarantees it; duplicates would make the copy order undefined). Values are cast to the
    pool's dtype; the tail of each row's last page is zero-filled. One index_copy_, no loop.
    """
    assert pool.dim() == 2 and rows.dim() == 2, "pool and rows must be 2-D"
    assert pages.dtype in (torch.int32, torch.int64), f"pages must be int32/64, not {pages.dtype}"
    n_rows, features = rows.shape
    page_width = pool.shape[1]
    chunks = num_chunks(features, page_width)
    assert pages.shape == (n_rows, chunks), (
        f"pages must have shape ({n_rows}, {chunks}), got {tuple(pages.shape)}"
    )
    padded = torch.zeros(n_rows, chunks * page_width, dtype=pool.dtype, device=pool.device)
    padded[:, :features] = rows
    # (n_rows * chunks, W): page i * chunks + c holds elements c*W .. c*W + W - 1 of row i
    pool.index_copy_(0, pages.reshape(-1).to(torch.int64), padded.view(-1, page_width))


def read_rows(pool: torch.Tensor, pages: torch.Tensor, features: int) -> torch.Tensor:
    """The inverse of `write_rows`: (n_rows, features) gathered from `pages` (n_rows, chunks)."""
    n_rows, chunks = pages.shape
    page_width = pool.shape[1]
    assert chunks == num_chunks(features, page_width), f"{chunks} pages cannot hold {features}"
    gathered = pool.index_select(0, pages.reshape(-1))  # (n_rows * chunks, W)
    return gathered.view(n_rows, chunks * page_width)[:, :features]


def token_ranks(
    token_adapters: torch.Tensor, ranks: torch.Tensor, num_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(slots, keep)`` for the per-token references.

    slots (num_tokens,): each token's adapter slot with -1 mapped to 0 (safe to gather
    with); keep (num_tokens, num_rows) bool: True for rows j < ranks[a], False everywhere
    for tokens without LoRA.
    """
    slots = token_adapters.clamp(min=0)
    rank = ranks.index_select(0, slots).masked_fill(token_adapters < 0, 0)  # (num_tokens,)
    keep = torch.arange(num_rows, device=ranks.device)[None, :] < rank[:, None]
    return slots, keep


def gather_token_rows(
    pool: torch.Tensor,
    pages: torch.Tensor,
    slots: torch.Tensor,
    keep: torch.Tensor,
    features: int,
) -> torch.Tensor:
    """Rows 0 .. num_rows - 1 of each token's adapter matrix: (num_tokens, num_rows, features).

    One gather of page-table rows and one of pool pages, whatever the number of distinct
    adapters. Table entries of rows not kept may hold anything, so they are pointed at page 0
    first; what those rows then hold is arbitrary, and callers mask them.
    """
    num_tokens, num_rows = keep.shape
    table = pages[:, :num_rows].index_select(0, slots)  # (num_tokens, num_rows, chunks)
    table = table.masked_fill(~keep[:, :, None], 0)
    gathered = pool.index_select(0, table.view(-1))  # (num_tokens * num_rows * chunks, W)
    width = table.shape[2] * pool.shape[1]
    return gathered.view(num_tokens, num_rows, width)[:, :, :features]


def segments(
    seg_starts: torch.Tensor, seg_adapters: torch.Tensor, ranks: torch.Tensor
) -> Iterator[tuple[int, int, int, int]]:
    """(adapter, rank, first row, end row) of every non-empty segment with LoRA: one host read
    of the (small) metadata for the whole call, none per segment."""
    starts = seg_starts.tolist()
    adapters = seg_adapters.tolist()
    seg_ranks = ranks.index_select(0, seg_adapters.long().clamp(min=0)).tolist()
    for s, (adapter, rank) in enumerate(zip(adapters, seg_ranks, strict=True)):
        if adapter >= 0 and rank > 0 and starts[s + 1] > starts[s]:
            yield adapter, rank, starts[s], starts[s + 1]


# ----------------------------------------------------------------------------------------------
# Checks shared by the references and the launchers
# ----------------------------------------------------------------------------------------------


def check_vector(t: torch.Tensor, dtype: torch.dtype, length: int, name: str) -> None:
    """`t` is a 1-D `dtype` tensor of `length` entries."""
    assert t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}"
    assert t.shape == (length,), f"{name} must have shape ({length},), got {tuple(t.shape)}"


def check_adapter_tables(
    pool: torch.Tensor,
    pages: torch.Tensor,
    ranks: torch.Tensor,
    features: int,
    max_rank: int,
    name: str,
) -> None:
    """Shapes of a page table (num_adapters, rank_rows, chunks(features)) and `ranks`."""
    assert pool.dim() == 2, f"pool must be (num_pages, page_width), got {tuple(pool.shape)}"
    assert pages.dtype == torch.int32, f"{name} must be int32, got {pages.dtype}"
    assert pages.dim() == 3, f"{name} must be (num_adapters, rank_rows, chunks)"
    num_adapters, rank_rows, chunks = pages.shape
    expected_chunks = num_chunks(features, pool.shape[1])
    assert chunks == expected_chunks, (
        f"{name} has {chunks} pages per row; {features} features need {expected_chunks}"
    )
    check_vector(ranks, torch.int32, num_adapters, "ranks")
    assert 0 <= max_rank <= rank_rows, f"max_rank {max_rank} outside {name}'s {rank_rows} rows"


def check_segments(seg_starts: torch.Tensor, seg_adapters: torch.Tensor) -> None:
    """int32 seg_starts (num_segments + 1,) and seg_adapters (num_segments,)."""
    assert seg_adapters.dim() == 1, "seg_adapters must be 1-D"
    check_vector(seg_starts, torch.int32, seg_adapters.shape[0] + 1, "seg_starts")
    check_vector(seg_adapters, torch.int32, seg_adapters.shape[0], "seg_adapters")


def check_launch(
    first: torch.Tensor, unit_stride: tuple[torch.Tensor, ...], any_stride: tuple[torch.Tensor, ...]
) -> None:
    """What every launcher needs: Triton for `first`'s device, all tensors on that device, and
    a unit last stride for `first` and `unit_stride` (the kernels index the last dim directly).
    """
    device = first.device
    assert can_launch_triton(device), f"no Triton for {device} tensors: use the *_ref ops"
    for t in (*unit_stride, *any_stride):
        assert t.device == device, f"tensors on different devices: {t.device} vs {device}"
    for t in (first, *unit_stride):
        assert t.stride(-1) == 1 or t.shape[-1] <= 1, "tensors need a unit last stride"


def packed_tables(tables: Sequence[torch.Tensor], name: str) -> tuple[torch.Tensor, int]:
    """``(tables[0], slice_stride)``: how the packed kernels address the slices' page tables.

    They take one pointer, to slice 0's table, and find slice s's table ``s · slice_stride``
    elements after it, so the tables must be views of one tensor at a constant distance, with
    equal strides and (adapters, rows); their chunks may differ (k and v narrower than q). The
    residency allocates every target's table as a view of one tensor, so q, k and v's are.
    """
    assert tables, f"{name}: no slices"
    first = tables[0]
    itemsize = first.element_size()
    step = (tables[1].data_ptr() - first.data_ptr()) // itemsize if len(tables) > 1 else 0
    storage = first.untyped_storage().data_ptr()
    for s, table in enumerate(tables):
        assert table.device == first.device, f"{name}: tables on different devices"
        assert table.untyped_storage().data_ptr() == storage, f"{name}: views of one tensor"
        assert table.stride() == first.stride(), f"{name}: tables with different strides"
        assert table.shape[:2] == first.shape[:2], f"{name}: tables of different sizes"
        assert table.data_ptr() - first.data_ptr() == s * step * itemsize, (
            f"{name}: slice tables must lie at a constant distance from each other"
        )
    return first, step


def check_packed(
    num_slices: int, ranks: torch.Tensor, scalings: torch.Tensor | None = None
) -> None:
    """The packed forms' per-slice metadata: (num_adapters, num_slices) ranks and scalings."""
    assert num_slices >= 1, "a packed op needs at least one slice"
    assert ranks.dtype == torch.int32, f"ranks must be int32, got {ranks.dtype}"
    assert ranks.dim() == 2 and ranks.shape[1] == num_slices, (
        f"ranks must be (num_adapters, {num_slices}), got {tuple(ranks.shape)}"
    )
    if scalings is not None:
        assert scalings.dtype == torch.float32, f"scalings must be float32, got {scalings.dtype}"
        assert scalings.shape == ranks.shape, "scalings and ranks must have the same shape"


def check_values(
    ranks: torch.Tensor,
    max_rank: int,
    adapters: torch.Tensor,
    seg_starts: torch.Tensor | None = None,
    num_tokens: int = 0,
) -> None:
    """Metadata values: segments tiling the rows, `adapters` (per token or per non-empty
    segment) in [-1, num_adapters), their ranks in [0, max_rank] (other adapters' may be
    anything).

    Reads the tensors, so launchers call it only for CPU tensors (no device sync); on CUDA the
    kernels clamp ranks above max_rank to it, and other bad values are undefined behaviour.
    """
    if seg_starts is not None:
        assert int(seg_starts[0]) == 0 and int(seg_starts[-1]) == num_tokens, (
            "seg_starts must run from 0 to num_tokens"
        )
        seg_lens = torch.diff(seg_starts)
        assert bool((seg_lens >= 0).all()), "seg_starts must be non-decreasing"
        adapters = adapters[seg_lens > 0]  # an empty segment's adapter is never read
    if adapters.numel():
        low, high = int(adapters.min()), int(adapters.max())
        assert low >= -1 and high < ranks.shape[0], "adapter index outside [-1, num_adapters)"
        used_ranks = ranks[adapters[adapters >= 0].long()]
        if used_ranks.numel():
            low_rank, high_rank = int(used_ranks.min()), int(used_ranks.max())
            assert low_rank >= 0 and high_rank <= max_rank, f"ranks outside [0, {max_rank}]"
