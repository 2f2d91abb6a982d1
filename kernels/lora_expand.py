"""LoRA expand: out += scaling · y · Bᵀ in place, for a batch mixing adapters.

The second half of a LoRA linear layer: `y` comes from `kernels/lora_shrink.py`, Bᵀ is read
from the page pool as `kernels/lora_layout.py` describes, and the product is added into the base
layer's output. Segmented (SGMV, prefill) and per-token (BGMV, decode) forms, as for shrink;
the segmented one also packed, adding every slice of a packed projection (q, k and v; gate
and up) into its own columns of the packed output in one launch.

Semantics:
    a = adapter of row t (its segment's, or token_adapters[t]); r = ranks[a]; s = scalings[a]
    y_in[t, j] = y[t, j] rounded to out's dtype        (a no-op for float32; PEFT also feeds
                                                        lora_B lora_A's output in that dtype)
    delta[t, o] = (sum_{j < r} float32(y_in[t, j]) * float32(B_a[o, j])) * s    in float32
    out[t, o] = float32(out[t, o]) + delta[t, o], rounded once to out's dtype
    Rows with a == -1 or r == 0 are not written at all. This is PEFT's order,
    lora_B(lora_A(x)) * scaling: for float32 the reference is exactly
    out[rows] += (y[rows, :r] @ B_aᵀ) * s. Columns j >= r of y are never read.
    Packed (`lora_expand_sgmv_packed`), with y's width R = num_slices · max_rank, for every
    slice s = 0 .. num_slices - 1 (columns c_s = column_offsets[s] .. column_offsets[s + 1]):
        out[:, c_s] += the above with y[:, s · max_rank : (s + 1) · max_rank], B_a of
                       b_pages[s], ranks[a, s] and scalings[a, s]

Args (shared by every op here):
    y: (num_tokens, >= max rank in the batch) float32, unit stride along ranks; the shrink
        ops return one. Its width bounds the ranks (clamped to it on CUDA, checked on CPU).
    pool: (num_pages, page_width), out's dtype; b_pages: int32 (num_adapters, >= y's width,
        ceil(out_features / page_width)); ranks: int32, scalings: float32 (num_adapters,).
    out: (num_tokens, out_features), float32, bfloat16 or float16, unit stride along features
        (any row stride: it may be a column slice of a fused projection's output).
    seg_starts, seg_adapters / token_adapters, max_seg_len: as in `kernels/lora_shrink.py`.
    Packed: b_pages a sequence of num_slices tables (for the kernel, views of one tensor:
        `packed_tables`), slice s's chunks those of its own width; ranks int32 and scalings
        float32 (num_adapters, num_slices); column_offsets (num_slices + 1,) host ints from
        0 to out's width (at most MAX_SLICES slices).
"""

import itertools
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

MAX_SLICES = 3  # the packed kernel takes each slice's end column as a scalar: q, k and v

# ----------------------------------------------------------------------------------------------
# Torch references (also the CPU backend)
# ----------------------------------------------------------------------------------------------


def lora_expand_sgmv_ref(
    y: torch.Tensor,
    pool: torch.Tensor,
    b_pages: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_adapters: torch.Tensor,
    out: torch.Tensor,
    max_seg_len: int | None = None,
    *,
    validate: bool = True,
) -> None:
    """out += scaling · y · Bᵀ per segment of rows sharing an adapter (see `Semantics`).

    One gather of Bᵀ and one matmul per segment, added into the segment's rows in place.
    ``validate=False`` skips the value checks; shapes are always checked.
    """
    _check_inputs(y, pool, b_pages, ranks, scalings, out)
    check_segments(seg_starts, seg_adapters)
    if validate:
        check_values(ranks, y.shape[1], seg_adapters, seg_starts, out.shape[0])
    for adapter, rank, lo, hi in segments(seg_starts, seg_adapters, ranks):
        lora_b_t = read_rows(pool, b_pages[adapter, :rank], out.shape[1]).float()  # (r, out)
        y_in = y[lo:hi, :rank].to(out.dtype).float()  # rounded like PEFT's lora_B input
        delta = (y_in @ lora_b_t) * float(scalings[adapter])  # (rows, out_features)
        out[lo:hi] = (out[lo:hi].float() + delta).to(out.dtype)


def lora_expand_sgmv_packed_ref(
    y: torch.Tensor,
    pool: torch.Tensor,
    b_pages: Sequence[torch.Tensor],
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_adapters: torch.Tensor,
    out: torch.Tensor,
    column_offsets: Sequence[int],
    max_seg_len: int | None = None,
    *,
    validate: bool = True,
) -> None:
    """out[:, c_s] += scaling_s · y_s · B_sᵀ for every slice s (see `Semantics`), in place."""
    max_rank = _check_packed_inputs(y, b_pages, ranks, scalings, out, column_offsets)
    for s, table in enumerate(b_pages):
        lo, hi = column_offsets[s], column_offsets[s + 1]
        lora_expand_sgmv_ref(
            y[:, s * max_rank : (s + 1) * max_rank], pool, table, ranks[:, s], scalings[:, s],
            seg_starts, seg_adapters, out[:, lo:hi], validate=validate,
        )  # fmt: skip


def lora_expand_bgmv_ref(
    y: torch.Tensor,
    pool: torch.Tensor,
    b_pages: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    token_adapters: torch.Tensor,
    out: torch.Tensor,
    *,
    validate: bool = True,
) -> None:
    """out += scaling · y · Bᵀ with one adapter per row (see `Semantics`).

    Every token's Bᵀ rows are gathered at once and multiplied in one batched matmul; rows
    without LoRA get an exact zero added, which leaves them unchanged.
    """
    _check_inputs(y, pool, b_pages, ranks, scalings, out)
    check_vector(token_adapters, torch.int32, out.shape[0], "token_adapters")
    if validate:
        check_values(ranks, y.shape[1], token_adapters)
    num_rows = y.shape[1]
    slots, keep = token_ranks(token_adapters, ranks, num_rows)
    # (num_tokens, num_rows, out_features); rows past the rank read stale pages: zero them
    lora_b_t = gather_token_rows(pool, b_pages, slots, keep, out.shape[1])
    lora_b_t = torch.where(keep[:, :, None], lora_b_t.float(), 0.0)
    y_in = y if out.dtype == torch.float32 else y.to(out.dtype).float()  # PEFT's rounding
    y_in = torch.where(keep, y_in, 0.0)
    delta = torch.bmm(y_in.unsqueeze(1), lora_b_t).squeeze(1)  # (num_tokens, out_features)
    scaling = scalings.index_select(0, slots).masked_fill(token_adapters < 0, 0.0)
    delta = delta * scaling[:, None]
    if out.dtype == torch.float32:
        out += delta
    else:
        out.copy_((out.float() + delta).to(out.dtype))


def _check_inputs(
    y: torch.Tensor,
    pool: torch.Tensor,
    b_pages: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    out: torch.Tensor,
) -> None:
    assert out.dtype in DTYPES, f"unsupported dtype {out.dtype}"
    assert pool.dtype == out.dtype, f"pool dtype {pool.dtype} != out dtype {out.dtype}"
    assert y.dtype == torch.float32, f"y must be float32, got {y.dtype}"
    assert y.dim() == 2 and out.dim() == 2, "y and out must be 2-D (num_tokens, features)"
    assert y.shape[0] == out.shape[0], f"y has {y.shape[0]} rows, out {out.shape[0]}"
    check_adapter_tables(pool, b_pages, ranks, out.shape[1], y.shape[1], "b_pages")
    check_vector(scalings, torch.float32, ranks.shape[0], "scalings")


def _check_packed_inputs(
    y: torch.Tensor,
    b_pages: Sequence[torch.Tensor],
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    out: torch.Tensor,
    column_offsets: Sequence[int],
) -> int:
    """The packed form's own shapes; returns each slice's columns of y (max_rank)."""
    num_slices = len(b_pages)
    check_packed(num_slices, ranks, scalings)
    assert 1 <= num_slices <= MAX_SLICES, f"{num_slices} slices; at most {MAX_SLICES}"
    assert len(column_offsets) == num_slices + 1, "column_offsets needs num_slices + 1 entries"
    assert column_offsets[0] == 0 and column_offsets[-1] == out.shape[1], (
        f"column_offsets {list(column_offsets)} must run from 0 to out's {out.shape[1]} columns"
    )
    assert all(lo <= hi for lo, hi in itertools.pairwise(column_offsets)), (
        "column_offsets must be non-decreasing"
    )
    assert y.dim() == 2 and y.shape[1] % num_slices == 0, (
        f"y's {y.shape[1]} columns do not split into {num_slices} slices"
    )
    return y.shape[1] // num_slices


# ----------------------------------------------------------------------------------------------
# Block sizes (tuning is data)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpandBlocks:
    block_m: int  # rows per SGMV program (a tl.dot dimension, >= 16); BGMV runs one row each
    max_block_r: int  # rank columns per reduction step at most
    block_n: int  # out_features per program, within one page (capped at the page width)
    num_warps: int
    num_stages: int


# Keyed by (device type, form). The CUDA rows are starting points, not yet tuned on H100. The
# interpreter's small tiles make CPU tests cross row, rank-block and in-page boundaries.
EXPAND_BLOCKS: dict[tuple[str, str], ExpandBlocks] = {
    ("cpu", "sgmv"): ExpandBlocks(16, 16, 16, num_warps=1, num_stages=1),
    ("cpu", "bgmv"): ExpandBlocks(1, 32, 64, num_warps=1, num_stages=1),
    ("cuda", "sgmv"): ExpandBlocks(64, 64, 64, num_warps=4, num_stages=2),
    ("cuda", "bgmv"): ExpandBlocks(1, 64, 128, num_warps=4, num_stages=2),
}


def _blocks_for(device: torch.device, form: str) -> ExpandBlocks:
    key = (device.type, form)
    assert key in EXPAND_BLOCKS, f"no LoRA expand block config for {key}"
    return EXPAND_BLOCKS[key]


# ----------------------------------------------------------------------------------------------
# Triton kernels (Linux only)
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels.triton_utils import dot_operand_dtype

    # Program axis `n_block` enumerates (page chunk, BLOCK_N slice inside the page), so every
    # program reads contiguous Bᵀ rows inside one page per rank row, masked at the page end and
    # at out_features: the page width need not be a power of two. Each output element belongs
    # to one program, so the read-modify-write of `out` needs no atomics.
    # The SGMV kernel serves the packed form too (one slice for the per-target op): axis 2
    # enumerates (slice, column program), every slice given the programs of the widest one.
    # Slice s adds into out's columns column_offsets[s] .. column_offsets[s + 1] (passed as
    # the end columns end0 .. end2: Triton takes no list of scalars), reading its page table
    # at b_pages_ptr + s * stride_pages_slice and y's columns from s * max_rank. Programs
    # past a narrower slice's width (GQA's k and v) return at once.
    @triton.jit
    def _expand_sgmv_kernel(  # type: ignore[no-untyped-def]
        y_ptr, pool_ptr, b_pages_ptr, ranks_ptr, scalings_ptr, seg_starts_ptr, seg_adapters_ptr,
        out_ptr,
        end0, end1, end2, page_width, blocks_per_page, column_programs, max_rank,
        stride_y_tok, stride_pool_page, stride_pages_slice, stride_pages_adapter,
        stride_pages_row, stride_ranks_adapter, stride_ranks_slice, stride_scalings_adapter,
        stride_scalings_slice, stride_out_tok,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
    ):  # fmt: skip
        # One program: BLOCK_M rows of one segment x BLOCK_N output columns of one slice, all
        # ranks.
        seg = tl.program_id(0)
        m_block = tl.program_id(1)
        slice_id = tl.program_id(2) // column_programs
        column_program = tl.program_id(2) % column_programs
        chunk = column_program // blocks_per_page
        first_col = tl.where(slice_id == 0, 0, tl.where(slice_id == 1, end0, end1))
        end_col = tl.where(slice_id == 0, end0, tl.where(slice_id == 1, end1, end2))
        out_features = end_col - first_col  # the slice's width
        seg_start = tl.load(seg_starts_ptr + seg)
        seg_len = tl.load(seg_starts_ptr + seg + 1) - seg_start
        adapter = tl.load(seg_adapters_ptr + seg)
        slice_id = slice_id.to(tl.int64)
        rank_ptr = ranks_ptr + adapter * stride_ranks_adapter + slice_id * stride_ranks_slice
        rank = tl.load(rank_ptr, mask=adapter >= 0, other=0)
        rank = tl.minimum(rank, max_rank)  # 0 for no LoRA; never past y's columns
        # past the segment, no LoRA, or past this slice's columns
        if (m_block * BLOCK_M >= seg_len) | (rank == 0) | (chunk * page_width >= out_features):
            return

        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # row within the segment
        offs_n = (column_program % blocks_per_page) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = offs_m < seg_len
        out_cols = chunk * page_width + offs_n  # column of the slice
        n_mask = (offs_n < page_width) & (out_cols < out_features)
        rows = (seg_start + offs_m).to(tl.int64)
        table = b_pages_ptr + slice_id * stride_pages_slice
        adapter_pages = table + adapter.to(tl.int64) * stride_pages_adapter + chunk
        y_slice = y_ptr + slice_id * max_rank
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < rank
            y_ptrs = y_slice + rows[:, None] * stride_y_tok + offs_r[None, :]
            y = tl.load(y_ptrs, mask=row_mask[:, None] & r_mask[None, :], other=0.0)
            y = y.to(out_ptr.dtype.element_ty).to(DOT_DTYPE)  # (BLOCK_M, BLOCK_R)
            pages = tl.load(adapter_pages + offs_r * stride_pages_row, mask=r_mask, other=0)
            b_ptrs = pool_ptr + pages.to(tl.int64)[:, None] * stride_pool_page + offs_n[None, :]
            b_t = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(y, b_t.to(DOT_DTYPE), acc=acc, input_precision="ieee")

        scaling_ptr = (
            scalings_ptr + adapter * stride_scalings_adapter + slice_id * stride_scalings_slice
        )
        scaling = tl.load(scaling_ptr)
        out_ptrs = out_ptr + rows[:, None] * stride_out_tok + (first_col + out_cols)[None, :]
        mask = row_mask[:, None] & n_mask[None, :]
        old = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, (old + acc * scaling).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _expand_bgmv_kernel(  # type: ignore[no-untyped-def]
        y_ptr, pool_ptr, b_pages_ptr, ranks_ptr, scalings_ptr, token_adapters_ptr, out_ptr,
        out_features, page_width, blocks_per_page, max_rank,
        stride_y_tok, stride_pool_page, stride_pages_adapter, stride_pages_row, stride_ranks,
        stride_scalings, stride_out_tok,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        # One program: one row x BLOCK_N output columns, as a GEMV over the ranks.
        token = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1) // blocks_per_page
        adapter = tl.load(token_adapters_ptr + token)
        rank = tl.load(ranks_ptr + adapter * stride_ranks, mask=adapter >= 0, other=0)
        rank = tl.minimum(rank, max_rank)  # 0 for no LoRA; never past y's columns
        if rank == 0:  # no LoRA: the row is left as it is
            return

        offs_n = (tl.program_id(1) % blocks_per_page) * BLOCK_N + tl.arange(0, BLOCK_N)
        out_cols = chunk * page_width + offs_n
        n_mask = (offs_n < page_width) & (out_cols < out_features)
        adapter_pages = b_pages_ptr + adapter.to(tl.int64) * stride_pages_adapter + chunk
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < rank
            y = tl.load(y_ptr + token * stride_y_tok + offs_r, mask=r_mask, other=0.0)
            y = y.to(out_ptr.dtype.element_ty).to(tl.float32)  # (BLOCK_R,)
            pages = tl.load(adapter_pages + offs_r * stride_pages_row, mask=r_mask, other=0)
            b_ptrs = pool_ptr + pages.to(tl.int64)[:, None] * stride_pool_page + offs_n[None, :]
            b_t = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            acc += tl.sum(y[:, None] * b_t.to(tl.float32), axis=0)  # (BLOCK_N,)

        scaling = tl.load(scalings_ptr + adapter * stride_scalings)
        out_ptrs = out_ptr + token * stride_out_tok + out_cols
        old = tl.load(out_ptrs, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, (old + acc * scaling).to(out_ptr.dtype.element_ty), mask=n_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _column_grid(out_features: int, page_width: int, block_n: int) -> tuple[int, int]:
    """(BLOCK_N slices per page, programs along the output columns)."""
    blocks_per_page = triton.cdiv(page_width, block_n)
    return blocks_per_page, num_chunks(out_features, page_width) * blocks_per_page


def lora_expand_sgmv(
    y: torch.Tensor,
    pool: torch.Tensor,
    b_pages: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_adapters: torch.Tensor,
    out: torch.Tensor,
    max_seg_len: int | None = None,
) -> None:
    """Triton `lora_expand_sgmv_ref`: out += scaling · y · Bᵀ per segment, in place."""
    _check_inputs(y, pool, b_pages, ranks, scalings, out)
    check_segments(seg_starts, seg_adapters)
    check_launch(out, (y, pool, b_pages, seg_starts, seg_adapters), (ranks, scalings))
    if out.device.type == "cpu":
        check_values(ranks, y.shape[1], seg_adapters, seg_starts, out.shape[0])
    # One slice: the packed kernel's slice stride is never used.
    _launch_sgmv(
        y, pool, b_pages, 0, ranks[:, None], scalings[:, None], seg_starts, seg_adapters, out,
        (0, out.shape[1]), max_seg_len,
    )  # fmt: skip


def lora_expand_sgmv_packed(
    y: torch.Tensor,
    pool: torch.Tensor,
    b_pages: Sequence[torch.Tensor],
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_adapters: torch.Tensor,
    out: torch.Tensor,
    column_offsets: Sequence[int],
    max_seg_len: int | None = None,
) -> None:
    """Triton `lora_expand_sgmv_packed_ref`: every slice's out[:, c_s] += scaling_s · y_s ·
    B_sᵀ, in place, in one launch."""
    max_rank = _check_packed_inputs(y, b_pages, ranks, scalings, out, column_offsets)
    for s, table in enumerate(b_pages):
        lo, hi = column_offsets[s], column_offsets[s + 1]
        y_s = y[:, s * max_rank : (s + 1) * max_rank]
        _check_inputs(y_s, pool, table, ranks[:, s], scalings[:, s], out[:, lo:hi])
    first, slice_stride = packed_tables(b_pages, "b_pages")
    check_segments(seg_starts, seg_adapters)
    check_launch(out, (y, pool, first, seg_starts, seg_adapters), (ranks, scalings))
    if out.device.type == "cpu":
        for s in range(len(b_pages)):
            check_values(ranks[:, s], max_rank, seg_adapters, seg_starts, out.shape[0])
    _launch_sgmv(
        y, pool, first, slice_stride, ranks, scalings, seg_starts, seg_adapters, out,
        tuple(column_offsets), max_seg_len,
    )  # fmt: skip


def _launch_sgmv(
    y: torch.Tensor,
    pool: torch.Tensor,
    b_pages: torch.Tensor,
    slice_stride: int,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_adapters: torch.Tensor,
    out: torch.Tensor,
    column_offsets: tuple[int, ...],
    max_seg_len: int | None,
) -> None:
    """Launch the SGMV kernel on checked inputs: slice s's page table at ``b_pages`` plus
    ``s · slice_stride`` elements, its ranks and scalings in column s of the
    (num_adapters, num_slices) ``ranks`` and ``scalings``, its columns of out from
    ``column_offsets[s]`` to ``column_offsets[s + 1]``."""
    num_tokens = out.shape[0]
    num_slices = ranks.shape[1]
    max_rank = y.shape[1] // num_slices
    widths = [hi - lo for lo, hi in itertools.pairwise(column_offsets)]
    num_segments = seg_adapters.shape[0]
    if num_tokens == 0 or num_segments == 0 or max_rank == 0 or max(widths) == 0:
        return
    if max_seg_len is None:
        max_seg_len = int(torch.diff(seg_starts).max())
    blocks = _blocks_for(out.device, "sgmv")
    page_width = pool.shape[1]
    block_r = max(16, min(next_power_of_2(max_rank), blocks.max_block_r))
    block_n = max(16, min(blocks.block_n, next_power_of_2(page_width)))
    blocks_per_page, column_programs = _column_grid(max(widths), page_width, block_n)
    grid = (
        num_segments,
        triton.cdiv(max_seg_len, blocks.block_m),
        num_slices * column_programs,
    )
    ends = [*column_offsets[1:], *[column_offsets[-1]] * (MAX_SLICES - num_slices)]
    _expand_sgmv_kernel[grid](
        y, pool, b_pages, ranks, scalings, seg_starts, seg_adapters, out,
        *ends, page_width, blocks_per_page, column_programs, max_rank,
        y.stride(0), pool.stride(0), slice_stride, b_pages.stride(0), b_pages.stride(1),
        ranks.stride(0), ranks.stride(1), scalings.stride(0), scalings.stride(1),
        out.stride(0),
        BLOCK_M=blocks.block_m, BLOCK_R=block_r, BLOCK_N=block_n,
        DOT_DTYPE=dot_operand_dtype(out.dtype),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip


def lora_expand_bgmv(
    y: torch.Tensor,
    pool: torch.Tensor,
    b_pages: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    token_adapters: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Triton `lora_expand_bgmv_ref`: out += scaling · y · Bᵀ per row, in place."""
    _check_inputs(y, pool, b_pages, ranks, scalings, out)
    check_vector(token_adapters, torch.int32, out.shape[0], "token_adapters")
    check_launch(out, (y, pool, b_pages, token_adapters), (ranks, scalings))
    num_tokens, out_features = out.shape
    max_rank = y.shape[1]
    if out.device.type == "cpu":
        check_values(ranks, max_rank, token_adapters)
    if num_tokens == 0 or max_rank == 0 or out_features == 0:
        return
    blocks = _blocks_for(out.device, "bgmv")
    page_width = pool.shape[1]
    block_r = min(next_power_of_2(max_rank), blocks.max_block_r)
    block_n = min(blocks.block_n, next_power_of_2(page_width))
    blocks_per_page, column_programs = _column_grid(out_features, page_width, block_n)
    _expand_bgmv_kernel[(num_tokens, column_programs)](
        y, pool, b_pages, ranks, scalings, token_adapters, out,
        out_features, page_width, blocks_per_page, max_rank,
        y.stride(0), pool.stride(0), b_pages.stride(0), b_pages.stride(1), ranks.stride(0),
        scalings.stride(0), out.stride(0),
        BLOCK_R=block_r, BLOCK_N=block_n,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip
