"""LoRA shrink: y = x · Aᵀ for a batch mixing adapters, A read from the page pool.

The first half of a LoRA linear layer (`kernels/lora_expand.py` is the second). Every row of x
is multiplied by the A matrix of its own adapter, paged as `kernels/lora_layout.py` describes.
Two forms: segmented (SGMV, prefill: consecutive rows share an adapter) and per-token (BGMV,
decode: any adapter per row). The segmented form also comes packed: the slices of a packed
projection (q, k and v; gate and up) share x, and one launch shrinks x by every slice's A.

Semantics:
    a = adapter of row t: seg_adapters[s] for the segment s holding t (seg_starts[s] <= t <
        seg_starts[s + 1]), or token_adapters[t]; -1 means no LoRA.
    y[t, j] = sum_k float32(x[t, k]) * float32(A_a[j, k])   for j < ranks[a]
    y[t, j] = 0                                             for ranks[a] <= j < max_rank,
                                                             and for all j when a == -1
    y is (num_tokens, max_rank) float32: products are exact for 16-bit inputs and accumulate in
    float32 (summation order unspecified); the reference computes x[rows] @ A_aᵀ in float32.
    Packed (`lora_shrink_sgmv_packed`), for slices s = 0 .. num_slices - 1 side by side:
    y[t, s · max_rank + j] = y_s[t, j]    y_s: the above with A_a of a_pages[s], ranks[a, s]

Args (shared by every op here):
    x: (num_tokens, in_features), float32, bfloat16 or float16; unit stride along features.
    pool: (num_pages, page_width), x's dtype; a_pages: int32 (num_adapters, >= max_rank,
        ceil(in_features / page_width)); ranks: int32 (num_adapters,).
    max_rank: columns of y, >= every rank in the batch (checked for CPU tensors; the kernels
        clamp larger ranks to it on CUDA, where checking would sync).
    seg_starts, seg_adapters / token_adapters: see `kernels/lora_layout.py`.
    max_seg_len: longest segment, sizing the SGMV grid; read from seg_starts (one device sync)
        when None. The reference ignores it.
    Packed: a_pages is a sequence of num_slices such tables (for the kernel, views of one
        tensor: `packed_tables`), ranks int32 (num_adapters, num_slices).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels.lora_layout import (
    DTYPES,
    check_adapter_tables,
    check_launch,
    check_packed,
    check_segments,
    check_values,
    check_vector,
    gather_token_rows,
    num_chunks,
    packed_tables,
    read_rows,
    segments,
    token_ranks,
)
from kernels.triton_utils import HAS_TRITON, next_power_of_2

# ----------------------------------------------------------------------------------------------
# Torch references (also the CPU backend)
# ----------------------------------------------------------------------------------------------


def lora_shrink_sgmv_ref(
    x: torch.Tensor,
    pool: torch.Tensor,
    a_pages: torch.Tensor,
    ranks: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_adapters: torch.Tensor,
    max_rank: int,
    max_seg_len: int | None = None,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """y = x · Aᵀ per segment of rows sharing an adapter (see `Semantics`).

    One gather of A and one matmul per segment. ``validate=False`` skips the value checks
    (the engine builds its metadata itself); shapes are always checked.
    """
    _check_inputs(x, pool, a_pages, ranks, max_rank)
    check_segments(seg_starts, seg_adapters)
    if validate:
        check_values(ranks, max_rank, seg_adapters, seg_starts, x.shape[0])
    y = torch.zeros(x.shape[0], max_rank, dtype=torch.float32, device=x.device)
    for adapter, rank, lo, hi in segments(seg_starts, seg_adapters, ranks):
        lora_a = read_rows(pool, a_pages[adapter, :rank], x.shape[1]).float()  # (rank, in)
        y[lo:hi, :rank] = x[lo:hi].float() @ lora_a.T
    return y


def lora_shrink_sgmv_packed_ref(
    x: torch.Tensor,
    pool: torch.Tensor,
    a_pages: Sequence[torch.Tensor],
    ranks: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_adapters: torch.Tensor,
    max_rank: int,
    max_seg_len: int | None = None,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """y = x · A_sᵀ for every slice s, side by side: (num_tokens, num_slices · max_rank)."""
    check_packed(len(a_pages), ranks)
    return torch.cat(
        [
            lora_shrink_sgmv_ref(
                x, pool, table, ranks[:, s], seg_starts, seg_adapters, max_rank, validate=validate
            )
            for s, table in enumerate(a_pages)
        ],
        dim=1,
    )


def lora_shrink_bgmv_ref(
    x: torch.Tensor,
    pool: torch.Tensor,
    a_pages: torch.Tensor,
    ranks: torch.Tensor,
    token_adapters: torch.Tensor,
    max_rank: int,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """y = x · Aᵀ with one adapter per row (see `Semantics`).

    Every token's A rows are gathered at once and multiplied in one batched matmul, so the
    cost does not grow with the number of distinct adapters in the batch.
    """
    _check_inputs(x, pool, a_pages, ranks, max_rank)
    check_vector(token_adapters, torch.int32, x.shape[0], "token_adapters")
    if validate:
        check_values(ranks, max_rank, token_adapters)
    slots, keep = token_ranks(token_adapters, ranks, max_rank)
    lora_a = gather_token_rows(pool, a_pages, slots, keep, x.shape[1])  # (T, max_rank, in)
    y = torch.bmm(lora_a.float(), x.float().unsqueeze(-1)).squeeze(-1)  # (T, max_rank)
    return torch.where(keep, y, 0.0)  # rows past the rank read stale pages: drop them


def _check_inputs(
    x: torch.Tensor, pool: torch.Tensor, a_pages: torch.Tensor, ranks: torch.Tensor, max_rank: int
) -> None:
    assert x.dtype in DTYPES, f"unsupported dtype {x.dtype}"
    assert pool.dtype == x.dtype, f"pool dtype {pool.dtype} != x dtype {x.dtype}"
    assert x.dim() == 2, f"x must be (num_tokens, in_features), got {tuple(x.shape)}"
    check_adapter_tables(pool, a_pages, ranks, x.shape[1], max_rank, "a_pages")


# ----------------------------------------------------------------------------------------------
# Block sizes (tuning is data)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShrinkBlocks:
    block_m: int  # rows per SGMV program (a tl.dot dimension, >= 16); BGMV runs one row each
    max_block_r: int  # rank columns per program at most; a larger max_rank adds rank blocks
    block_k: int  # in_features per reduction step, within one page (capped at the page width)
    split_k: int  # programs splitting one reduction; > 1 adds partial sums with float32
    #   atomics into a zeroed y, so the summation order (last bits) varies from run to run
    num_warps: int
    num_stages: int


# Keyed by (device type, form). The CUDA rows are Punica/vLLM-style starting points, not yet
# tuned on H100: BGMV splits the reduction so a small decode batch still fills the SMs. The
# interpreter's small tiles make CPU tests cross row, rank-block and in-page boundaries.
SHRINK_BLOCKS: dict[tuple[str, str], ShrinkBlocks] = {
    ("cpu", "sgmv"): ShrinkBlocks(16, 32, 16, split_k=1, num_warps=1, num_stages=1),
    ("cpu", "bgmv"): ShrinkBlocks(1, 32, 32, split_k=1, num_warps=1, num_stages=1),
    ("cuda", "sgmv"): ShrinkBlocks(64, 64, 64, split_k=1, num_warps=4, num_stages=2),
    ("cuda", "bgmv"): ShrinkBlocks(1, 64, 128, split_k=8, num_warps=4, num_stages=2),
}


def _blocks_for(device: torch.device, form: str) -> ShrinkBlocks:
    key = (device.type, form)
    assert key in SHRINK_BLOCKS, f"no LoRA shrink block config for {key}"
    return SHRINK_BLOCKS[key]


# ----------------------------------------------------------------------------------------------
# Triton kernels (Linux only)
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels.triton_utils import dot_operand_dtype

    # Both kernels walk A page by page: per page, one page id per rank row, then contiguous
    # BLOCK_K-wide slices inside the page (masked at the page end and at in_features), so the
    # page width need not be a power of two. Rank rows j >= rank are masked, so their (garbage)
    # page ids are never used and their y columns come out zero.
    # The SGMV kernel serves the packed form too (one slice for the per-target op): slice s
    # reads the page table at a_pages_ptr + s * stride_pages_slice and writes y's columns
    # s * max_rank onwards; its programs re-read x's rows (from L2, in the same launch).
    @triton.jit
    def _shrink_sgmv_kernel(  # type: ignore[no-untyped-def]
        x_ptr, pool_ptr, a_pages_ptr, ranks_ptr, seg_starts_ptr, seg_adapters_ptr, y_ptr,
        in_features, page_width, a_chunks, max_rank, rank_blocks,
        stride_x_tok, stride_pool_page, stride_pages_slice, stride_pages_adapter,
        stride_pages_row, stride_ranks_adapter, stride_ranks_slice, stride_y_tok,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
    ):  # fmt: skip
        # One program: BLOCK_M rows of one segment x BLOCK_R rank columns of one slice x
        # 1/SPLIT_K of the sum. Axis 2 enumerates (slice, rank block, split).
        seg = tl.program_id(0)
        m_block = tl.program_id(1)
        slice_id = (tl.program_id(2) // (rank_blocks * SPLIT_K)).to(tl.int64)
        r_block = (tl.program_id(2) // SPLIT_K) % rank_blocks
        k_split = tl.program_id(2) % SPLIT_K
        seg_start = tl.load(seg_starts_ptr + seg)
        seg_len = tl.load(seg_starts_ptr + seg + 1) - seg_start
        if m_block * BLOCK_M >= seg_len:  # the grid covers the longest segment in the batch
            return
        adapter = tl.load(seg_adapters_ptr + seg)
        rank_ptr = ranks_ptr + adapter * stride_ranks_adapter + slice_id * stride_ranks_slice
        rank = tl.load(rank_ptr, mask=adapter >= 0, other=0)
        rank = tl.minimum(rank, max_rank)  # 0 for no LoRA; never past y's columns

        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # row within the segment
        offs_r = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = offs_m < seg_len
        r_mask = offs_r < rank
        rows = (seg_start + offs_m).to(tl.int64)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        if r_block * BLOCK_R < rank:  # else the tile is all zeros (also for no-LoRA rows)
            table = a_pages_ptr + slice_id * stride_pages_slice
            adapter_pages = table + adapter.to(tl.int64) * stride_pages_adapter
            page_rows = adapter_pages + offs_r * stride_pages_row  # (BLOCK_R,) table rows
            for chunk in range(0, a_chunks):
                pages = tl.load(page_rows + chunk, mask=r_mask, other=0).to(tl.int64)
                for k0 in range(k_split * BLOCK_K, page_width, SPLIT_K * BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)  # column within the page
                    x_cols = chunk * page_width + offs_k  # column of x
                    k_mask = (offs_k < page_width) & (x_cols < in_features)
                    x_ptrs = x_ptr + rows[:, None] * stride_x_tok + x_cols[None, :]
                    x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                    a_ptrs = pool_ptr + pages[:, None] * stride_pool_page + offs_k[None, :]
                    a = tl.load(a_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
                    acc = tl.dot(
                        x.to(DOT_DTYPE), tl.trans(a.to(DOT_DTYPE)), acc=acc, input_precision="ieee"
                    )  # (BLOCK_M, BLOCK_R)

        y_ptrs = y_ptr + rows[:, None] * stride_y_tok + slice_id * max_rank + offs_r[None, :]
        if SPLIT_K == 1:  # y is uninitialised: write every column, zeros included
            tl.store(y_ptrs, acc, mask=row_mask[:, None] & (offs_r < max_rank)[None, :])
        else:  # y is zeroed: add this split's partial sums
            tl.atomic_add(y_ptrs, acc, mask=row_mask[:, None] & r_mask[None, :])

    @triton.jit
    def _shrink_bgmv_kernel(  # type: ignore[no-untyped-def]
        x_ptr, pool_ptr, a_pages_ptr, ranks_ptr, token_adapters_ptr, y_ptr,
        in_features, page_width, a_chunks, max_rank,
        stride_x_tok, stride_pool_page, stride_pages_adapter, stride_pages_row, stride_ranks,
        stride_y_tok,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    ):  # fmt: skip
        # One program: one row x BLOCK_R rank columns x 1/SPLIT_K of the sum, as a GEMV (a
        # single row is below tl.dot's 16-row minimum). Rows sharing an adapter re-read its
        # A, which stays in L2 across a decode batch.
        token = tl.program_id(0).to(tl.int64)
        r_block = tl.program_id(1) // SPLIT_K
        k_split = tl.program_id(1) % SPLIT_K
        adapter = tl.load(token_adapters_ptr + token)
        rank = tl.load(ranks_ptr + adapter * stride_ranks, mask=adapter >= 0, other=0)
        rank = tl.minimum(rank, max_rank)  # 0 for no LoRA; never past y's columns

        offs_r = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        if r_block * BLOCK_R < rank:
            adapter_pages = a_pages_ptr + adapter.to(tl.int64) * stride_pages_adapter
            page_rows = adapter_pages + offs_r * stride_pages_row
            for chunk in range(0, a_chunks):
                pages = tl.load(page_rows + chunk, mask=r_mask, other=0).to(tl.int64)
                for k0 in range(k_split * BLOCK_K, page_width, SPLIT_K * BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    x_cols = chunk * page_width + offs_k
                    k_mask = (offs_k < page_width) & (x_cols < in_features)
                    x_ptrs = x_ptr + token * stride_x_tok + x_cols
                    x = tl.load(x_ptrs, mask=k_mask, other=0.0).to(tl.float32)  # (BLOCK_K,)
                    a_ptrs = pool_ptr + pages[:, None] * stride_pool_page + offs_k[None, :]
                    a = tl.load(a_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
                    acc += tl.sum(a.to(tl.float32) * x[None, :], axis=1)  # (BLOCK_R,)

        y_ptrs = y_ptr + token * stride_y_tok + offs_r
        if SPLIT_K == 1:
            tl.store(y_ptrs, acc, mask=offs_r < max_rank)
        else:
            tl.atomic_add(y_ptrs, acc, mask=r_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _new_y(x: torch.Tensor, columns: int, split_k: int) -> torch.Tensor:
    """y: written whole by single-split kernels, accumulated into by split ones."""
    alloc = torch.empty if split_k == 1 else torch.zeros
    return alloc(x.shape[0], columns, dtype=torch.float32, device=x.device)


def _block_r(max_rank: int, blocks: ShrinkBlocks, minimum: int) -> int:
    return max(minimum, min(next_power_of_2(max_rank), blocks.max_block_r))


def lora_shrink_sgmv(
    x: torch.Tensor,
    pool: torch.Tensor,
    a_pages: torch.Tensor,
    ranks: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_adapters: torch.Tensor,
    max_rank: int,
    max_seg_len: int | None = None,
) -> torch.Tensor:
    """Triton `lora_shrink_sgmv_ref`: y = x · Aᵀ per segment; returns y (num_tokens, max_rank)."""
    _check_inputs(x, pool, a_pages, ranks, max_rank)
    check_segments(seg_starts, seg_adapters)
    check_launch(x, (pool, a_pages, seg_starts, seg_adapters), (ranks,))
    if x.device.type == "cpu":
        check_values(ranks, max_rank, seg_adapters, seg_starts, x.shape[0])
    # One slice: the packed kernel's slice stride is never used.
    return _launch_sgmv(
        x, pool, a_pages, 0, ranks[:, None], seg_starts, seg_adapters, max_rank, max_seg_len
    )


def lora_shrink_sgmv_packed(
    x: torch.Tensor,
    pool: torch.Tensor,
    a_pages: Sequence[torch.Tensor],
    ranks: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_adapters: torch.Tensor,
    max_rank: int,
    max_seg_len: int | None = None,
) -> torch.Tensor:
    """Triton `lora_shrink_sgmv_packed_ref`, one launch for every slice: returns y
    (num_tokens, num_slices · max_rank), slice s in columns s · max_rank onwards."""
    check_packed(len(a_pages), ranks)
    for s, table in enumerate(a_pages):
        _check_inputs(x, pool, table, ranks[:, s], max_rank)
    first, slice_stride = packed_tables(a_pages, "a_pages")
    check_segments(seg_starts, seg_adapters)
    check_launch(x, (pool, first, seg_starts, seg_adapters), (ranks,))
    if x.device.type == "cpu":
        for s in range(len(a_pages)):
            check_values(ranks[:, s], max_rank, seg_adapters, seg_starts, x.shape[0])
    return _launch_sgmv(
        x, pool, first, slice_stride, ranks, seg_starts, seg_adapters, max_rank, max_seg_len
    )


def _launch_sgmv(
    x: torch.Tensor,
    pool: torch.Tensor,
    a_pages: torch.Tensor,
    slice_stride: int,
    ranks: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_adapters: torch.Tensor,
    max_rank: int,
    max_seg_len: int | None,
) -> torch.Tensor:
    """Launch the SGMV kernel on checked inputs: slice s's page table at ``a_pages`` plus
    ``s · slice_stride`` elements, its ranks in ``ranks[:, s]`` (num_adapters, num_slices)."""
    num_tokens, in_features = x.shape
    num_slices = ranks.shape[1]
    blocks = _blocks_for(x.device, "sgmv")
    y = _new_y(x, num_slices * max_rank, blocks.split_k)
    num_segments = seg_adapters.shape[0]
    if num_tokens == 0 or num_segments == 0 or max_rank == 0:
        return y
    if max_seg_len is None:
        max_seg_len = int(torch.diff(seg_starts).max())
    page_width = pool.shape[1]
    block_r = _block_r(max_rank, blocks, minimum=16)
    block_k = max(16, min(blocks.block_k, next_power_of_2(page_width)))
    rank_blocks = triton.cdiv(max_rank, block_r)
    grid = (
        num_segments,
        triton.cdiv(max_seg_len, blocks.block_m),
        num_slices * rank_blocks * blocks.split_k,
    )
    _shrink_sgmv_kernel[grid](
        x, pool, a_pages, ranks, seg_starts, seg_adapters, y,
        in_features, page_width, num_chunks(in_features, page_width), max_rank, rank_blocks,
        x.stride(0), pool.stride(0), slice_stride, a_pages.stride(0), a_pages.stride(1),
        ranks.stride(0), ranks.stride(1), y.stride(0),
        BLOCK_M=blocks.block_m, BLOCK_R=block_r, BLOCK_K=block_k, SPLIT_K=blocks.split_k,
        DOT_DTYPE=dot_operand_dtype(x.dtype),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip
    return y


def lora_shrink_bgmv(
    x: torch.Tensor,
    pool: torch.Tensor,
    a_pages: torch.Tensor,
    ranks: torch.Tensor,
    token_adapters: torch.Tensor,
    max_rank: int,
) -> torch.Tensor:
    """Triton `lora_shrink_bgmv_ref`: y = x · Aᵀ per row; returns y (num_tokens, max_rank)."""
    _check_inputs(x, pool, a_pages, ranks, max_rank)
    check_vector(token_adapters, torch.int32, x.shape[0], "token_adapters")
    check_launch(x, (pool, a_pages, token_adapters), (ranks,))
    num_tokens, in_features = x.shape
    if x.device.type == "cpu":
        check_values(ranks, max_rank, token_adapters)
    blocks = _blocks_for(x.device, "bgmv")
    y = _new_y(x, max_rank, blocks.split_k)
    if num_tokens == 0 or max_rank == 0:
        return y
    page_width = pool.shape[1]
    block_r = _block_r(max_rank, blocks, minimum=1)
    block_k = min(blocks.block_k, next_power_of_2(page_width))
    grid = (num_tokens, triton.cdiv(max_rank, block_r) * blocks.split_k)
    _shrink_bgmv_kernel[grid](
        x, pool, a_pages, ranks, token_adapters, y,
        in_features, page_width, num_chunks(in_features, page_width), max_rank,
        x.stride(0), pool.stride(0), a_pages.stride(0), a_pages.stride(1), ranks.stride(0),
        y.stride(0),
        BLOCK_R=block_r, BLOCK_K=block_k, SPLIT_K=blocks.split_k,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip
    return y
