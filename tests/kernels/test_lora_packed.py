"""Packed LoRA shrink/expand (one launch for q, k and v): kernels vs references vs a naive loop,
and vs the per-target ops slice by slice.

A packed batch has one x, one pool and, per slice, its own page tables (views of one stacked
tensor, as the residency allocates them), ranks and scalings; the slices' output widths differ
(GQA: k and v narrower than q) and divide no page width. Each adapter's rank differs from slice
to slice, 0 included (an adapter touching q but not k). The naive loop follows the `Semantics:`
blocks of `kernels/lora_shrink.py` and `kernels/lora_expand.py` token by token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
from torch import Tensor

from kernels import lora_expand, lora_shrink
from kernels.lora import (
    lora_expand_sgmv,
    lora_expand_sgmv_packed,
    lora_expand_sgmv_packed_ref,
    lora_shrink_sgmv,
    lora_shrink_sgmv_packed,
    lora_shrink_sgmv_packed_ref,
    write_rows,
)
from kernels.triton_utils import HAS_TRITON
from tests.kernels.sm90 import CompileCase, compile_in_child
from tests.kernels.test_lora import (
    DEVICE,
    LOW_PRECISION_TOL,
    POPULARITIES,
    RANKS,
    decode_tokens,
    int32,
    prefill_segments,
)

requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# (page_width, in_features, per-slice out_features): q, k, v of a GQA layer, and gate, up.
QKV = (48, 100, (96, 40, 40))
GATE_UP = (64, 128, (160, 160))


@dataclass(frozen=True)
class PackedBatch:
    """Inputs of one packed shrink + expand pair, named as in the kernel modules."""

    x: Tensor  # (num_tokens, in_features)
    base_out: Tensor  # (num_tokens, Σ widths): the packed base output, never modified
    pool: Tensor  # (num_pages, page_width)
    a_pages: list[Tensor]  # per slice, int32 (num_adapters, rank_rows, a_chunks), one stack
    b_pages: list[Tensor]  # per slice, int32 (num_adapters, rank_rows, its b_chunks)
    ranks: Tensor  # int32 (num_adapters, num_slices), a strided view
    scalings: Tensor  # float32 (num_adapters, num_slices), a strided view
    seg_starts: Tensor
    seg_adapters: Tensor
    max_rank: int
    column_offsets: tuple[int, ...]
    lora_a: list[list[Tensor]]  # per slice, per adapter, (rank, in_features) float32
    lora_b: list[list[Tensor]]  # per slice, per adapter, (out_features, rank)

    def shrink_args(self) -> tuple[Any, ...]:
        return (
            self.x, self.pool, self.a_pages, self.ranks, self.seg_starts, self.seg_adapters,
            self.max_rank,
        )  # fmt: skip

    def expand_args(self, y: Tensor, out: Tensor) -> tuple[Any, ...]:
        return (
            y, self.pool, self.b_pages, self.ranks, self.scalings, self.seg_starts,
            self.seg_adapters, out, self.column_offsets,
        )  # fmt: skip


def slice_rank(adapter: int, s: int) -> int:
    """Adapter ``adapter``'s rank in slice ``s``: RANKS shifted per slice, so 0 shows up in
    some slices of an adapter that has others."""
    return RANKS[(adapter + 3 * s) % len(RANKS)]


def make_packed(
    segments: list[tuple[int, int]],
    shape: tuple[int, int, tuple[int, ...]],
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> PackedBatch:
    """Rows in segments of ``(length, adapter)`` (-1: no LoRA); pages shuffled among garbage;
    table rows past a rank and an extra unused adapter hold garbage (as in test_lora)."""
    page_width, in_features, widths = shape
    num_slices = len(widths)
    gen = torch.Generator().manual_seed(seed)
    num_adapters = max((a for _, a in segments), default=-1) + 1
    ranks = [[slice_rank(a, s) for s in range(num_slices)] for a in range(num_adapters)]
    used = {a for length, a in segments if length and a >= 0}
    batch_max = max([r for a in used for r in ranks[a]], default=0)
    a_chunks = -(-in_features // page_width)
    b_chunks = [-(-w // page_width) for w in widths]
    num_pages = sum(sum(r) for r in ranks) * (a_chunks + max(b_chunks)) + 11
    rank_rows = max([r for rr in ranks for r in rr], default=0) + 2
    table = (num_slices, num_adapters + 1, rank_rows)
    a_stack = torch.randint(-num_pages, 2 * num_pages, (*table, a_chunks), generator=gen)
    b_stack = torch.randint(-num_pages, 2 * num_pages, (*table, max(b_chunks)), generator=gen)
    pool = 1e3 * torch.randn(num_pages, page_width, generator=gen).to(dtype)
    free = torch.randperm(num_pages, generator=gen).tolist()
    lora_a: list[list[Tensor]] = [[] for _ in widths]
    lora_b: list[list[Tensor]] = [[] for _ in widths]
    for adapter in range(num_adapters):
        for s, width in enumerate(widths):
            rank = ranks[adapter][s]
            a = torch.randn(rank, in_features, generator=gen) / math.sqrt(in_features)
            b = torch.randn(width, rank, generator=gen) / math.sqrt(max(rank, 1))
            for stack, rows, chunks in ((a_stack, a, a_chunks), (b_stack, b.T, b_chunks[s])):
                taken = torch.tensor([free.pop() for _ in range(rank * chunks)])
                stack[s, adapter, :rank, :chunks] = taken.view(rank, chunks)
                write_rows(pool, stack[s, adapter, :rank, :chunks], rows)
            lora_a[s].append(a.to(dtype).float())
            lora_b[s].append(b.to(dtype).float())
    a_stack, b_stack = a_stack.to(DEVICE, torch.int32), b_stack.to(DEVICE, torch.int32)
    # Ranks and scalings as the engine passes them: [:, layer, t0 : t0 + num_slices] of a
    # (slots, layers, targets) table.
    rank_table = torch.zeros(num_adapters + 1, 2, num_slices + 2, dtype=torch.int32)
    rank_table[:num_adapters, 1, 1 : 1 + num_slices] = torch.tensor(ranks, dtype=torch.int32).view(
        num_adapters, num_slices
    )
    rank_table[num_adapters, 1, 1 : 1 + num_slices] = rank_rows + 5  # never used
    scaling_table = torch.zeros(num_adapters + 1, 2, num_slices + 2)
    scaling_table[:, 1, 1 : 1 + num_slices] = torch.rand(num_adapters + 1, num_slices) + 0.5
    seg_lens = [length for length, _ in segments]
    seg_starts = [0, *torch.tensor(seg_lens, dtype=torch.int64).cumsum(0).tolist()]
    num_tokens = seg_starts[-1]
    offsets = [0, *torch.tensor(widths).cumsum(0).tolist()]
    return PackedBatch(
        x=torch.randn(num_tokens, in_features, generator=gen).to(DEVICE, dtype),
        base_out=torch.randn(num_tokens, offsets[-1], generator=gen).to(DEVICE, dtype),
        pool=pool.to(DEVICE),
        a_pages=[a_stack[s] for s in range(num_slices)],
        b_pages=[b_stack[s, :, :, : b_chunks[s]] for s in range(num_slices)],
        ranks=rank_table.to(DEVICE)[:, 1, 1 : 1 + num_slices],
        scalings=scaling_table.to(DEVICE)[:, 1, 1 : 1 + num_slices],
        seg_starts=int32(seg_starts),
        seg_adapters=int32([a for _, a in segments]),
        max_rank=batch_max,
        column_offsets=tuple(int(o) for o in offsets),
        lora_a=lora_a,
        lora_b=lora_b,
    )


def naive_packed(batch: PackedBatch) -> tuple[Tensor, Tensor]:
    """(y, out) of the `Semantics:` blocks, token by token and slice by slice, on the CPU."""
    x = batch.x.float().cpu()
    dtype = batch.base_out.dtype
    num_slices, r = len(batch.a_pages), batch.max_rank
    y = torch.zeros(x.shape[0], num_slices * r)
    out = batch.base_out.cpu().clone()
    starts, seg_adapters = batch.seg_starts.tolist(), batch.seg_adapters.tolist()
    adapters = [a for s, a in enumerate(seg_adapters) for _ in range(starts[s], starts[s + 1])]
    for token, adapter in enumerate(adapters):
        if adapter < 0:
            continue
        for s in range(num_slices):
            lora_a, lora_b = batch.lora_a[s][adapter], batch.lora_b[s][adapter]
            rank = lora_a.shape[0]
            if rank == 0:
                continue
            y[token, s * r : s * r + rank] = lora_a @ x[token]
            y_in = y[token, s * r : s * r + rank].to(dtype).float()
            delta = (lora_b @ y_in) * float(batch.scalings[adapter, s])
            lo, hi = batch.column_offsets[s], batch.column_offsets[s + 1]
            out[token, lo:hi] = (out[token, lo:hi].float() + delta).to(dtype)
    return y, out


def run_refs(batch: PackedBatch) -> tuple[Tensor, Tensor]:
    out = batch.base_out.clone()
    y = lora_shrink_sgmv_packed_ref(*batch.shrink_args())
    lora_expand_sgmv_packed_ref(*batch.expand_args(y, out))
    return y, out


def run_kernels(batch: PackedBatch, max_seg_len: int | None = None) -> tuple[Tensor, Tensor]:
    out = batch.base_out.clone()
    y = lora_shrink_sgmv_packed(*batch.shrink_args(), max_seg_len)
    lora_expand_sgmv_packed(*batch.expand_args(y, out), max_seg_len)
    return y, out


def run_per_target(batch: PackedBatch) -> tuple[Tensor, Tensor]:
    """The per-target kernels, one shrink and one expand per slice."""
    out = batch.base_out.clone()
    ys = []
    for s, (a_pages, b_pages) in enumerate(zip(batch.a_pages, batch.b_pages, strict=True)):
        lo, hi = batch.column_offsets[s], batch.column_offsets[s + 1]
        args = (batch.seg_starts, batch.seg_adapters)
        y = lora_shrink_sgmv(batch.x, batch.pool, a_pages, batch.ranks[:, s], *args, batch.max_rank)
        lora_expand_sgmv(
            y, batch.pool, b_pages, batch.ranks[:, s], batch.scalings[:, s], *args, out[:, lo:hi]
        )
        ys.append(y)
    return torch.cat(ys, dim=1), out


def assert_matches(got: tuple[Tensor, Tensor], expected: tuple[Tensor, Tensor], tol: float) -> None:
    (y, out), (expected_y, expected_out) = got, expected
    assert y.dtype == torch.float32 and out.dtype == expected_out.dtype
    torch.testing.assert_close(y.cpu(), expected_y.cpu(), atol=tol, rtol=tol)
    torch.testing.assert_close(out.cpu(), expected_out.cpu(), atol=tol, rtol=tol)


SHAPES = {"qkv": QKV, "gate_up": GATE_UP}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("batch_size", [1, 3, 7, 133])
@pytest.mark.parametrize("popularity", POPULARITIES)
def test_refs_match_naive_loop(
    popularity: str, batch_size: int, shape: tuple[int, int, tuple[int, ...]]
) -> None:
    for layout in (prefill_segments, decode_tokens):
        batch = make_packed(layout(popularity, batch_size), shape)
        assert_matches(run_refs(batch), naive_packed(batch), tol=1e-5)


# Each popularity meets batch size 1 as prefill segments and as decode rows, and batch size 7
# as one of the two (alternating, so each layout meets 7 rows of every other popularity),
# alternating shapes (3 and 133 rows only against the references: the interpreter runs one
# program at a time, several seconds a case at 7 rows, and test_lora runs the same kernels
# over 133 decode rows).
KERNEL_CASES = [
    pytest.param(layout, popularity, size, shape, id=f"{layout}-{popularity}-{size}-{shape_id}")
    for k, layout in enumerate(("prefill", "decode"))
    for i, popularity in enumerate(POPULARITIES)
    for j, size in enumerate([1, 7])
    if size == 1 or (i + k) % 2 == 0
    for shape_id, shape in [list(SHAPES.items())[(i + j) % 2]]
]


@requires_triton
@pytest.mark.parametrize(("layout", "popularity", "batch_size", "shape"), KERNEL_CASES)
def test_kernels_match_refs_and_the_per_target_ops(
    layout: str, popularity: str, batch_size: int, shape: tuple[int, int, tuple[int, ...]]
) -> None:
    segments = (prefill_segments if layout == "prefill" else decode_tokens)(popularity, batch_size)
    batch = make_packed(segments, shape)
    got = run_kernels(batch)
    assert_matches(got, run_refs(batch), tol=1e-5)
    # The same kernel, one launch per slice: the same bits.
    per_target = run_per_target(batch)
    assert torch.equal(got[0], per_target[0]) and torch.equal(got[1], per_target[1])


@requires_triton
def test_kernels_as_a_cuda_graph_calls_them() -> None:
    """One row per segment, max_seg_len 1 and a max_rank above every rank of the batch (the
    server's --max-lora-rank): the grid needs no device read, and the result is the same."""
    batch = make_packed([(1, a) for a in (0, 2, -1, 0, 1, 5, 3)], QKV)
    batch = replace(batch, max_rank=batch.a_pages[0].shape[1])  # every row of the tables
    assert batch.max_rank > int(batch.ranks[:6].max())
    assert_matches(run_kernels(batch, max_seg_len=1), run_refs(batch), tol=1e-5)


@requires_triton
@pytest.mark.parametrize("dtype", LOW_PRECISION_TOL.keys(), ids=str)
def test_kernels_low_precision(dtype: torch.dtype) -> None:
    batch = make_packed([(17, 0), (2, 1), (1, -1), (3, 2)], QKV, dtype)
    tol = LOW_PRECISION_TOL[dtype]
    assert_matches(run_refs(batch), naive_packed(batch), tol=tol)
    assert_matches(run_kernels(batch), run_refs(batch), tol=tol)


@requires_triton
@pytest.mark.parametrize("blocks", ["cuda", "split_k"])
def test_kernels_with_other_block_sizes(blocks: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA table's tiles, and a 3-way split of the shrink's reduction (atomics into a
    zeroed y: every slice's columns of it)."""
    shrink = lora_shrink.SHRINK_BLOCKS[("cuda", "sgmv")]
    if blocks == "split_k":
        shrink = lora_shrink.ShrinkBlocks(16, 16, 16, split_k=3, num_warps=1, num_stages=1)
    monkeypatch.setitem(lora_shrink.SHRINK_BLOCKS, ("cpu", "sgmv"), shrink)
    expand = lora_expand.EXPAND_BLOCKS[("cuda", "sgmv")]
    monkeypatch.setitem(lora_expand.EXPAND_BLOCKS, ("cpu", "sgmv"), expand)
    rows = 70 if blocks == "cuda" else 20
    batch = make_packed([(rows, 0), (3, 2), (1, -1), (2, 1)], QKV)
    assert_matches(run_kernels(batch), run_refs(batch), tol=1e-5)


@pytest.mark.parametrize(
    "use_triton", [False, pytest.param(True, marks=requires_triton)], ids=["ref", "triton"]
)
@pytest.mark.parametrize(
    "segments", [[], [(0, 0)], [(3, -1), (2, -1)]], ids=str
)  # no rows; an empty segment; no LoRA rows
def test_batches_without_lora_work(segments: list[tuple[int, int]], use_triton: bool) -> None:
    batch = make_packed(segments, QKV)
    y, out = (run_kernels if use_triton else run_refs)(batch)
    assert y.shape == (batch.x.shape[0], 3 * batch.max_rank)
    assert torch.equal(y, torch.zeros_like(y))
    assert torch.equal(out, batch.base_out)


def _bad_inputs() -> dict[str, tuple[PackedBatch, str, bool]]:
    """case -> (inputs, which op must reject them, whether the references do too)."""
    batch = make_packed([(2, 0), (1, 1), (3, -1)], QKV)
    copied_a = [t.clone() for t in batch.a_pages]  # equal tables, but not views of one tensor
    uneven = [batch.b_pages[0], batch.b_pages[2], batch.b_pages[1]]  # not a constant stride
    offsets = batch.column_offsets
    return {
        "separate_a_tables": (replace(batch, a_pages=copied_a), "shrink", False),
        "uneven_b_tables": (replace(batch, b_pages=uneven), "expand", False),
        "ranks_width": (replace(batch, ranks=batch.ranks[:, :2]), "both", True),
        "ranks_dtype": (replace(batch, ranks=batch.ranks.long()), "both", True),
        "scalings_shape": (replace(batch, scalings=batch.scalings[:, :2]), "expand", True),
        "offsets_short": (replace(batch, column_offsets=offsets[:-1]), "expand", True),
        "offsets_past_out": (
            replace(batch, column_offsets=(*offsets[:-1], offsets[-1] + 1)),
            "expand",
            True,
        ),
        "wrong_b_chunks": (
            replace(batch, column_offsets=(0, 40, 136, 176)),  # q 40 wide: 1 page, not 2
            "expand",
            True,
        ),
        "four_slices": (  # more than MAX_SLICES
            replace(
                batch,
                b_pages=[*batch.b_pages, batch.b_pages[2]],
                ranks=torch.cat([batch.ranks, batch.ranks[:, 2:]], dim=1),
                scalings=torch.cat([batch.scalings, batch.scalings[:, 2:]], dim=1),
                column_offsets=(*offsets, offsets[-1]),
            ),
            "expand",
            True,
        ),
    }


BAD_CASES = [
    pytest.param(case, use_triton, marks=[requires_triton] if use_triton else [])
    for case, (_, _, refs_too) in _bad_inputs().items()
    for use_triton in ((False, True) if refs_too else (True,))
]


@pytest.mark.parametrize(("case", "use_triton"), BAD_CASES)
def test_ops_reject_bad_inputs(case: str, use_triton: bool) -> None:
    bad, broken, _ = _bad_inputs()[case]
    shrink = lora_shrink_sgmv_packed if use_triton else lora_shrink_sgmv_packed_ref
    expand = lora_expand_sgmv_packed if use_triton else lora_expand_sgmv_packed_ref
    if broken in ("shrink", "both"):
        with pytest.raises(AssertionError):
            shrink(*bad.shrink_args())
    if broken in ("expand", "both"):
        y = torch.zeros(bad.x.shape[0], 3 * bad.max_rank, device=DEVICE)
        with pytest.raises(AssertionError):
            expand(*bad.expand_args(y, bad.base_out.clone()))


def sm90_cases() -> list[CompileCase]:
    """The SGMV kernels, which serve the packed ops, in float16 with the CUDA block table and
    with a split shrink (test_lora compiles them in bfloat16)."""
    import triton.language as tl

    s, e = lora_shrink.SHRINK_BLOCKS[("cuda", "sgmv")], lora_expand.EXPAND_BLOCKS[("cuda", "sgmv")]
    types = {"x_ptr": "*fp16", "pool_ptr": "*fp16", "out_ptr": "*fp16"}
    types |= {"y_ptr": "*fp32", "scalings_ptr": "*fp32"}  # the rest are int32
    shrink = {"BLOCK_M": s.block_m, "BLOCK_R": s.max_block_r, "BLOCK_K": s.block_k}
    expand = {"BLOCK_M": e.block_m, "BLOCK_R": e.max_block_r, "BLOCK_N": e.block_n}
    return [
        CompileCase(
            f"shrink_sgmv_packed_split{split}",
            lora_shrink._shrink_sgmv_kernel,
            {**shrink, "SPLIT_K": split, "DOT_DTYPE": tl.float16},
            types,
            {"num_warps": s.num_warps, "num_stages": s.num_stages},
        )
        for split in (1, 4)
    ] + [
        CompileCase(
            "expand_sgmv_packed",
            lora_expand._expand_sgmv_kernel,
            {**expand, "DOT_DTYPE": tl.float16},
            types,
            {"num_warps": e.num_warps, "num_stages": e.num_stages},
        )
    ]


@requires_triton
@pytest.mark.slow
def test_packed_kernels_compile_for_h100() -> None:
    compile_in_child(
        "from tests.kernels.test_lora_packed import sm90_cases; "
        "from tests.kernels.sm90 import compile_cases; compile_cases(sm90_cases())"
    )
