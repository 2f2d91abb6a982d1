"""LoRA shrink/expand: Triton kernels vs torch references vs a naive per-token loop.

The naive loop is the independent oracle: it follows the `Semantics:` blocks of
`kernels/lora_shrink.py` and `kernels/lora_expand.py` one token at a time, from the unpaged A
and B matrices, with matrix-vector products only. The references must match it to float32
round-off (they are the engine's CPU path); the kernels must match the references. Batches mix
adapters by Punica's popularity patterns (distinct, uniform, zipf, identical, skewed), ranks
1 to 64 (not only powers of two), rows without LoRA, and page widths that do not divide the
feature sizes; pages are shuffled and unused table entries hold garbage. Without CUDA the
kernels run under the Triton interpreter (tests/conftest.py), so kernel cases stay small.
"""

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch
from torch import Tensor

from kernels import lora_expand, lora_shrink
from kernels.lora import (
    lora_expand_bgmv,
    lora_expand_bgmv_ref,
    lora_expand_sgmv,
    lora_expand_sgmv_ref,
    lora_shrink_bgmv,
    lora_shrink_bgmv_ref,
    lora_shrink_sgmv,
    lora_shrink_sgmv_ref,
    read_rows,
    write_rows,
)
from kernels.triton_utils import HAS_TRITON
from tests.kernels.sm90 import CompileCase, compile_in_child

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# (page_width, in_features, out_features): widths dividing neither feature size, and a
# power-of-two width with several pages per row.
SHAPES = {"w48_in100_out72": (48, 100, 72), "w64_in128_out160": (64, 128, 160)}
# Ranks handed out to adapters in turn: mixed in every batch with more than a few adapters.
RANKS = [17, 1, 64, 3, 8, 5, 0, 33]
POPULARITIES = ["distinct", "uniform", "zipf", "identical", "skewed"]
LOW_PRECISION_TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3}


@dataclass(frozen=True)
class LoraBatch:
    """Inputs of one shrink + expand pair, named as in the kernel modules."""

    x: Tensor  # (num_tokens, in_features)
    base_out: Tensor  # (num_tokens, out_features): the base layer's output, never modified
    pool: Tensor  # (num_pages, page_width)
    a_pages: Tensor  # int32 (num_adapters, rank_rows, a_chunks)
    b_pages: Tensor  # int32 (num_adapters, rank_rows, b_chunks)
    ranks: Tensor  # int32 (num_adapters,)
    scalings: Tensor  # float32 (num_adapters,)
    seg_starts: Tensor  # int32 (num_segments + 1,)
    seg_adapters: Tensor  # int32 (num_segments,)
    token_adapters: Tensor  # int32 (num_tokens,): the same rows, per token
    max_rank: int
    lora_a: list[Tensor]  # per adapter, (rank, in_features) float32 on the CPU, unpaged
    lora_b: list[Tensor]  # per adapter, (out_features, rank)

    def shrink_sgmv_args(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int]:
        return (
            self.x, self.pool, self.a_pages, self.ranks, self.seg_starts, self.seg_adapters,
            self.max_rank,
        )  # fmt: skip

    def shrink_bgmv_args(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
        return self.x, self.pool, self.a_pages, self.ranks, self.token_adapters, self.max_rank

    def expand_sgmv_args(
        self, y: Tensor, out: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return (
            y, self.pool, self.b_pages, self.ranks, self.scalings, self.seg_starts,
            self.seg_adapters, out,
        )  # fmt: skip

    def expand_bgmv_args(
        self, y: Tensor, out: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return y, self.pool, self.b_pages, self.ranks, self.scalings, self.token_adapters, out


def int32(values: list[int]) -> Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def make_batch(
    segments: list[tuple[int, int]],
    shape: tuple[int, int, int],
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LoraBatch:
    """Rows in segments of `(length, adapter)`; adapter -1 means no LoRA.

    Adapter i has rank RANKS[i % len(RANKS)], its A rows and Bᵀ rows in random pages of a
    shuffled pool whose other pages (the KV cache's) hold large garbage. Table rows past an
    adapter's rank hold garbage page ids, and one extra adapter that no row uses has a rank
    above max_rank and a garbage table: the ops must read none of it.
    """
    page_width, in_features, out_features = shape
    gen = torch.Generator().manual_seed(seed)
    num_adapters = max((adapter for _, adapter in segments), default=-1) + 1
    ranks = [RANKS[i % len(RANKS)] for i in range(num_adapters)]
    used = {adapter for length, adapter in segments if length and adapter >= 0}
    max_rank = max([ranks[a] for a in used], default=0)
    a_chunks, b_chunks = -(-in_features // page_width), -(-out_features // page_width)
    num_pages = sum(ranks) * (a_chunks + b_chunks) + 11
    rank_rows = max(ranks, default=0) + 2
    table_shape = (num_adapters + 1, rank_rows)
    a_pages = torch.randint(-num_pages, 2 * num_pages, (*table_shape, a_chunks), generator=gen)
    b_pages = torch.randint(-num_pages, 2 * num_pages, (*table_shape, b_chunks), generator=gen)
    pool = 1e3 * torch.randn(num_pages, page_width, generator=gen).to(dtype)
    free_pages = torch.randperm(num_pages, generator=gen).tolist()
    lora_a, lora_b = [], []
    for adapter, rank in enumerate(ranks):
        a = torch.randn(rank, in_features, generator=gen) / math.sqrt(in_features)
        b = torch.randn(out_features, rank, generator=gen) / math.sqrt(max(rank, 1))
        for pages, rows, chunks in ((a_pages, a, a_chunks), (b_pages, b.T, b_chunks)):
            taken = [free_pages.pop() for _ in range(rank * chunks)]
            pages[adapter, :rank] = torch.tensor(taken).view(rank, chunks)
            write_rows(pool, pages[adapter, :rank], rows)
        lora_a.append(a.to(dtype).float())
        lora_b.append(b.to(dtype).float())
    seg_lens = [length for length, _ in segments]
    seg_starts = [0, *torch.tensor(seg_lens, dtype=torch.int64).cumsum(0).tolist()]
    num_tokens = seg_starts[-1]
    token_adapters = [adapter for length, adapter in segments for _ in range(length)]
    scalings = [2.0 / max(rank, 1) for rank in ranks] + [0.5]
    return LoraBatch(
        x=torch.randn(num_tokens, in_features, generator=gen).to(DEVICE, dtype),
        base_out=torch.randn(num_tokens, out_features, generator=gen).to(DEVICE, dtype),
        pool=pool.to(DEVICE),
        a_pages=a_pages.to(DEVICE, torch.int32),
        b_pages=b_pages.to(DEVICE, torch.int32),
        ranks=int32([*ranks, rank_rows + 5]),
        scalings=torch.tensor(scalings, dtype=torch.float32, device=DEVICE),
        seg_starts=int32(seg_starts),
        seg_adapters=int32([adapter for _, adapter in segments]),
        token_adapters=int32(token_adapters),
        max_rank=max_rank,
        lora_a=lora_a,
        lora_b=lora_b,
    )


def naive_lora(batch: LoraBatch) -> tuple[Tensor, Tensor]:
    """(y, out) of the `Semantics:` blocks, one token at a time, on the CPU."""
    x = batch.x.float().cpu()
    dtype = batch.base_out.dtype
    num_tokens = x.shape[0]
    y = torch.zeros(num_tokens, batch.max_rank)
    out = batch.base_out.cpu().clone()
    for token, adapter in enumerate(batch.token_adapters.tolist()):
        if adapter < 0 or batch.lora_a[adapter].shape[0] == 0:
            continue
        rank, scaling = batch.lora_a[adapter].shape[0], float(batch.scalings[adapter])
        y[token, :rank] = batch.lora_a[adapter] @ x[token]
        y_in = y[token, :rank].to(dtype).float()
        delta = (batch.lora_b[adapter] @ y_in) * scaling  # (out_features,)
        out[token] = (out[token].float() + delta).to(dtype)
    return y, out


# ----------------------------------------------------------------------------------------------
# Layouts: which adapter each segment (prefill request) or token (decode request) uses
# ----------------------------------------------------------------------------------------------


def popularity_adapters(popularity: str, num_items: int, rng: random.Random) -> list[int]:
    """An adapter per item; every fifth item of the mixed patterns has no LoRA (-1)."""
    if popularity == "distinct":
        adapters = list(range(num_items))
    elif popularity == "uniform":
        adapters = [rng.randrange(math.ceil(math.sqrt(num_items))) for _ in range(num_items)]
    elif popularity == "zipf":
        weights = [1 / (i + 1) ** 1.5 for i in range(num_items)]
        adapters = rng.choices(range(num_items), weights, k=num_items)
    elif popularity == "identical":
        return [0] * num_items
    else:  # skewed: one dominant adapter and a few rare ones
        adapters = [0 if rng.random() < 0.8 else rng.randrange(1, 6) for _ in range(num_items)]
    return [-1 if i % 5 == 4 else a for i, a in enumerate(adapters)]


def prefill_segments(popularity: str, num_segments: int, seed: int = 0) -> list[tuple[int, int]]:
    """Segment lengths 1..20 crossing the 16-row tiles (1..3 in large batches, to keep the
    naive loop short); skewed pairs one long segment of the dominant adapter with many one- and
    two-row segments of rare ones."""
    rng = random.Random(seed)
    adapters = popularity_adapters(popularity, num_segments, rng)
    if popularity == "skewed":
        lengths = [rng.randint(1, 2) for _ in range(num_segments)]
        adapters[0], lengths[0] = 0, 37
    else:
        choices = [1, 2, 5, 16, 17, 20] if num_segments < 16 else [1, 2, 3]
        lengths = [rng.choice(choices) for _ in range(num_segments)]
    return list(zip(lengths, adapters, strict=True))


def decode_tokens(popularity: str, num_tokens: int, seed: int = 0) -> list[tuple[int, int]]:
    """One-row segments: a decode batch, each request's adapter drawn independently."""
    adapters = popularity_adapters(popularity, num_tokens, random.Random(seed))
    return [(1, adapter) for adapter in adapters]


# ----------------------------------------------------------------------------------------------
# Layout helpers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("page_width", "features"), [(48, 100), (48, 72), (48, 96), (64, 160), (64, 5)]
)
@pytest.mark.parametrize("pages_dtype", [torch.int32, torch.int64], ids=str)
def test_write_rows_round_trips(page_width: int, features: int, pages_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    n_rows, chunks = 3, -(-features // page_width)
    pool = torch.randn(n_rows * chunks + 4, page_width, generator=gen).to(DEVICE)
    before = pool.clone()
    pages = torch.randperm(pool.shape[0], generator=gen)[: n_rows * chunks].view(n_rows, chunks)
    pages = pages.to(DEVICE, pages_dtype)
    rows = torch.randn(n_rows, features, generator=gen).to(DEVICE)
    write_rows(pool, pages, rows)
    assert torch.equal(read_rows(pool, pages, features), rows)
    tails = pool[pages[:, -1].long()][:, features - (chunks - 1) * page_width :]
    assert torch.equal(tails, torch.zeros_like(tails)), "the last page's tail must be zeroed"
    untouched = torch.ones(pool.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[pages.flatten().long()] = False
    assert torch.equal(pool[untouched], before[untouched])


def test_write_rows_casts_to_the_pool_dtype_and_checks_shapes() -> None:
    pool = torch.zeros(6, 48, dtype=torch.bfloat16, device=DEVICE)
    rows = torch.randn(2, 100, device=DEVICE)
    pages = torch.tensor([[5, 0, 3], [1, 4, 2]], dtype=torch.int32, device=DEVICE)
    write_rows(pool, pages, rows)
    assert torch.equal(read_rows(pool, pages, 100), rows.to(torch.bfloat16))
    with pytest.raises(AssertionError):
        write_rows(pool, pages[:, :2], rows)  # 100 features need 3 pages of 48
    with pytest.raises(AssertionError):
        write_rows(pool, pages.float(), rows)


# ----------------------------------------------------------------------------------------------
# References vs the naive loop
# ----------------------------------------------------------------------------------------------


def run_refs(batch: LoraBatch, form: str) -> tuple[Tensor, Tensor]:
    out = batch.base_out.clone()
    if form == "sgmv":
        y = lora_shrink_sgmv_ref(*batch.shrink_sgmv_args())
        lora_expand_sgmv_ref(*batch.expand_sgmv_args(y, out))
    else:
        y = lora_shrink_bgmv_ref(*batch.shrink_bgmv_args())
        lora_expand_bgmv_ref(*batch.expand_bgmv_args(y, out))
    return y, out


def run_kernels(batch: LoraBatch, form: str) -> tuple[Tensor, Tensor]:
    out = batch.base_out.clone()
    if form == "sgmv":
        y = lora_shrink_sgmv(*batch.shrink_sgmv_args())
        lora_expand_sgmv(*batch.expand_sgmv_args(y, out))
    else:
        y = lora_shrink_bgmv(*batch.shrink_bgmv_args())
        lora_expand_bgmv(*batch.expand_bgmv_args(y, out))
    return y, out


EXPAND_OPS: dict[tuple[str, bool], Callable[..., None]] = {
    ("sgmv", False): lora_expand_sgmv_ref,
    ("sgmv", True): lora_expand_sgmv,
    ("bgmv", False): lora_expand_bgmv_ref,
    ("bgmv", True): lora_expand_bgmv,
}


def assert_matches(got: tuple[Tensor, Tensor], expected: tuple[Tensor, Tensor], tol: float) -> None:
    (y, out), (expected_y, expected_out) = got, expected
    assert y.dtype == torch.float32 and out.dtype == expected_out.dtype
    torch.testing.assert_close(y.cpu(), expected_y.cpu(), atol=tol, rtol=tol)
    torch.testing.assert_close(out.cpu(), expected_out.cpu(), atol=tol, rtol=tol)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("batch_size", [1, 3, 7, 133])
@pytest.mark.parametrize("popularity", POPULARITIES)
def test_refs_match_naive_loop(
    popularity: str, batch_size: int, shape: tuple[int, int, int]
) -> None:
    prefill = make_batch(prefill_segments(popularity, batch_size), shape)
    assert_matches(run_refs(prefill, "sgmv"), naive_lora(prefill), tol=1e-5)
    decode = make_batch(decode_tokens(popularity, batch_size), shape)
    assert_matches(run_refs(decode, "bgmv"), naive_lora(decode), tol=1e-5)
    # The per-token form over a prefill batch: the same rows, adapters given per token.
    assert_matches(run_refs(prefill, "bgmv"), naive_lora(prefill), tol=1e-5)


def test_refs_leave_rows_without_lora_bit_identical() -> None:
    batch = make_batch([(3, 0), (2, -1), (4, 6), (1, 2)], SHAPES["w48_in100_out72"])  # 6: rank 0
    _, out = run_refs(batch, "sgmv")
    assert torch.equal(out[3:9], batch.base_out[3:9])
    assert not torch.equal(out[:3], batch.base_out[:3])


@pytest.mark.parametrize("dtype", LOW_PRECISION_TOL.keys(), ids=str)
def test_refs_low_precision_compute_in_float32(dtype: torch.dtype) -> None:
    batch = make_batch(prefill_segments("uniform", 7), SHAPES["w48_in100_out72"], dtype)
    tol = LOW_PRECISION_TOL[dtype]
    assert_matches(run_refs(batch, "sgmv"), naive_lora(batch), tol=tol)
    assert_matches(run_refs(batch, "bgmv"), naive_lora(batch), tol=tol)


# ----------------------------------------------------------------------------------------------
# Kernels vs the references
# ----------------------------------------------------------------------------------------------

# Each popularity meets batch sizes 1, 3 and 7 in both forms, alternating shapes. The
# interpreter runs one program at a time, so 133 rows run only as one decode batch.
KERNEL_CASES = [
    pytest.param(form, popularity, size, shape, id=f"{form}-{popularity}-{size}-{shape_id}")
    for form in ("sgmv", "bgmv")
    for i, popularity in enumerate(POPULARITIES)
    for j, size in enumerate([1, 3, 7, 133])
    if size < 133 or (form == "bgmv" and popularity == "uniform")
    for shape_id, shape in [list(SHAPES.items())[(i + j) % 2]]
]


@requires_triton
@pytest.mark.parametrize(("form", "popularity", "batch_size", "shape"), KERNEL_CASES)
def test_kernels_match_refs(
    form: str, popularity: str, batch_size: int, shape: tuple[int, int, int]
) -> None:
    layout = prefill_segments if form == "sgmv" else decode_tokens
    batch = make_batch(layout(popularity, batch_size), shape)
    assert_matches(run_kernels(batch, form), run_refs(batch, form), tol=1e-5)


@pytest.mark.parametrize(
    "use_triton", [False, pytest.param(True, marks=requires_triton)], ids=["ref", "triton"]
)
def test_ops_on_a_rank_one_batch(use_triton: bool) -> None:
    """max_rank 1: a one-column y (and, on GPUs, ints of value 1 specialised by Triton)."""
    batch = make_batch([(3, 1), (1, -1), (2, 1)], SHAPES["w64_in128_out160"])
    assert batch.max_rank == 1
    for form in ("sgmv", "bgmv"):
        run = run_kernels if use_triton else run_refs
        assert_matches(run(batch, form), naive_lora(batch), tol=1e-5)


@requires_triton
@pytest.mark.parametrize("dtype", LOW_PRECISION_TOL.keys(), ids=str)
def test_kernels_low_precision(dtype: torch.dtype) -> None:
    batch = make_batch([(17, 0), (2, 1), (1, -1), (3, 2)], SHAPES["w48_in100_out72"], dtype)
    tol = LOW_PRECISION_TOL[dtype]
    for form in ("sgmv", "bgmv"):
        assert_matches(run_kernels(batch, form), run_refs(batch, form), tol=tol)


@requires_triton
@pytest.mark.parametrize("blocks", ["cuda", "split_k"])
def test_kernels_with_other_block_sizes(blocks: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA table's tiles (64 rows, 128-wide reductions, an 8-way split of the BGMV
    reduction), and a 3-way split of the SGMV reduction, all under the interpreter."""
    for form in ("sgmv", "bgmv"):
        shrink = lora_shrink.SHRINK_BLOCKS[("cuda", form)]
        if blocks == "split_k":
            shrink = lora_shrink.ShrinkBlocks(16, 16, 16, split_k=3, num_warps=1, num_stages=1)
        monkeypatch.setitem(lora_shrink.SHRINK_BLOCKS, ("cpu", form), shrink)
        expand = lora_expand.EXPAND_BLOCKS[("cuda", form)]
        monkeypatch.setitem(lora_expand.EXPAND_BLOCKS, ("cpu", form), expand)
    # SGMV: a segment longer than the 64-row CUDA tile; BGMV: a decode batch.
    rows = 70 if blocks == "cuda" else 20
    prefill = make_batch([(rows, 0), (3, 2), (1, -1), (2, 1)], SHAPES["w48_in100_out72"])
    assert_matches(run_kernels(prefill, "sgmv"), run_refs(prefill, "sgmv"), tol=1e-5)
    if blocks == "cuda":  # the split_k case's GEMV twin is the CUDA BGMV row
        decode = make_batch(decode_tokens("skewed", 7), SHAPES["w64_in128_out160"])
        assert_matches(run_kernels(decode, "bgmv"), run_refs(decode, "bgmv"), tol=1e-5)


@requires_triton
def test_sgmv_kernels_take_a_max_seg_len_hint() -> None:
    batch = make_batch([(2, 1), (33, 0), (1, -1)], SHAPES["w64_in128_out160"])
    y = lora_shrink_sgmv(*batch.shrink_sgmv_args(), max_seg_len=33)
    out = batch.base_out.clone()
    lora_expand_sgmv(*batch.expand_sgmv_args(y, out), max_seg_len=33)
    assert_matches((y, out), run_refs(batch, "sgmv"), tol=1e-5)


def _strided(batch: LoraBatch) -> LoraBatch:
    """The same inputs as views: x and out column slices of fused projections, the pool a
    slice of wider pages, ranks and scalings columns of per-layer tables, page tables with
    spare rows."""
    num_tokens, in_features = batch.x.shape
    fused_x = torch.zeros(num_tokens, in_features + 7, dtype=batch.x.dtype, device=DEVICE)
    fused_x[:, 3 : 3 + in_features] = batch.x
    out_features = batch.base_out.shape[1]
    fused_out = torch.zeros(num_tokens, 2 * out_features, dtype=batch.x.dtype, device=DEVICE)
    fused_out[:, out_features:] = batch.base_out
    num_pages, page_width = batch.pool.shape
    wide_pool = torch.zeros(num_pages, page_width + 5, dtype=batch.pool.dtype, device=DEVICE)
    wide_pool[:, :page_width] = batch.pool
    per_layer = torch.zeros(batch.ranks.shape[0], 3, device=DEVICE)
    per_layer[:, 1] = batch.scalings
    per_layer_ranks = per_layer.to(torch.int32)
    per_layer_ranks[:, 2] = batch.ranks
    num_adapters, rank_rows, _ = batch.a_pages.shape

    def spare_rows(pages: Tensor) -> Tensor:
        table = torch.zeros(num_adapters, rank_rows + 4, pages.shape[2], dtype=torch.int32)
        table[:, :rank_rows] = pages.cpu()
        return table.to(DEVICE)[:, :rank_rows]

    return replace(
        batch,
        x=fused_x[:, 3 : 3 + in_features],
        base_out=fused_out[:, out_features:],
        pool=wide_pool[:, :page_width],
        ranks=per_layer_ranks[:, 2],
        scalings=per_layer[:, 1],
        a_pages=spare_rows(batch.a_pages),
        b_pages=spare_rows(batch.b_pages),
    )


@pytest.mark.parametrize(
    "use_triton", [False, pytest.param(True, marks=requires_triton)], ids=["ref", "triton"]
)
@pytest.mark.parametrize("form", ["sgmv", "bgmv"])
def test_ops_accept_strided_views(form: str, use_triton: bool) -> None:
    batch = make_batch([(5, 0), (2, -1), (3, 1), (1, 0)], SHAPES["w48_in100_out72"])
    strided = _strided(batch)
    assert not strided.x.is_contiguous() and not strided.ranks.is_contiguous()
    expected = run_refs(batch, form)
    y, out = (run_kernels if use_triton else run_refs)(strided, form)
    assert_matches((y, out), expected, tol=1e-5)
    # expand reads a y wider than max_rank, through a strided view
    wide_y = torch.full((y.shape[0], y.shape[1] + 3), float("nan"), device=DEVICE)
    wide_y[:, : y.shape[1]] = y
    out = strided.base_out.clone()
    args = strided.expand_sgmv_args if form == "sgmv" else strided.expand_bgmv_args
    EXPAND_OPS[form, use_triton](*args(wide_y[:, : y.shape[1]], out))
    torch.testing.assert_close(out, expected[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "use_triton", [False, pytest.param(True, marks=requires_triton)], ids=["ref", "triton"]
)
@pytest.mark.parametrize(
    "segments", [[], [(0, 0)], [(3, -1), (2, -1)], [(2, 6), (1, -1)]], ids=str
)  # no rows; an empty segment; no LoRA rows; only a rank-0 adapter (max_rank 0)
def test_ops_on_batches_without_lora_work(
    segments: list[tuple[int, int]], use_triton: bool
) -> None:
    batch = make_batch(segments, SHAPES["w48_in100_out72"])
    run = run_kernels if use_triton else run_refs
    for form in ("sgmv", "bgmv"):
        y, out = run(batch, form)
        assert y.shape == (batch.x.shape[0], batch.max_rank)
        assert torch.equal(y, torch.zeros_like(y))
        assert torch.equal(out, batch.base_out)


def _bad_inputs() -> dict[str, tuple[LoraBatch, str]]:
    """case -> (inputs, which ops must reject them: "shrink", "expand" or "both")."""
    batch = make_batch([(2, 0), (1, 1), (3, -1)], SHAPES["w48_in100_out72"])
    wrong_chunks = make_batch([(2, 0), (1, 1)], (48, 150, 72))  # 4 pages per A row, not 3
    return {
        "pool_dtype": (replace(batch, pool=batch.pool.half()), "both"),
        "x_dtype": (replace(batch, x=batch.x.double()), "shrink"),
        "x_stride": (replace(batch, x=batch.x.T.contiguous().T), "shrink"),
        "int64_a_pages": (replace(batch, a_pages=batch.a_pages.long()), "shrink"),
        "int64_b_pages": (replace(batch, b_pages=batch.b_pages.long()), "expand"),
        "a_chunks": (replace(batch, a_pages=wrong_chunks.a_pages), "shrink"),
        "b_chunks": (replace(batch, b_pages=batch.b_pages[:, :, :1]), "expand"),
        "table_adapters": (
            replace(batch, ranks=batch.ranks[:2], scalings=batch.scalings[:2]),
            "both",
        ),
        "max_rank_over_rows": (replace(batch, max_rank=batch.a_pages.shape[1] + 1), "shrink"),
        "rank_over_max_rank": (replace(batch, max_rank=1), "both"),
        "int64_ranks": (replace(batch, ranks=batch.ranks.long()), "both"),
        "scalings_dtype": (replace(batch, scalings=batch.scalings.double()), "expand"),
        "adapter_out_of_range": (
            replace(
                batch,
                seg_adapters=int32([0, 9, -1]),
                token_adapters=int32([0, 0, 9, -1, -1, -1]),
            ),
            "both",
        ),
        "metadata_length": (
            replace(
                batch, seg_starts=batch.seg_starts[:-1], token_adapters=batch.token_adapters[:-1]
            ),
            "both",
        ),
        "segments_short": (
            replace(batch, seg_starts=int32([0, 2, 3, 5])),
            "both",
        ),
    }


# Bad values rather than shapes or types: the launchers read them back (check_values) only
# from CPU tensors, since on a GPU that would cost a device sync per launch.
VALUE_CASES = ("rank_over_max_rank", "segments_short", "adapter_out_of_range")
BAD_INPUT_CASES = [
    pytest.param(case, form, use_triton, marks=[requires_triton] if use_triton else [])
    for case in _bad_inputs()
    for form in ("sgmv", "bgmv")
    for use_triton in (False, True)
    # the references take any strides; per-token ops never read segments
    if (use_triton or case != "x_stride") and (form == "sgmv" or case != "segments_short")
]


@pytest.mark.parametrize(("case", "form", "use_triton"), BAD_INPUT_CASES)
def test_ops_reject_bad_inputs(case: str, form: str, use_triton: bool) -> None:
    if use_triton and DEVICE.type == "cuda" and case in VALUE_CASES:
        pytest.skip("values are checked on the CPU only (lora_layout.check_values)")
    bad, broken = _bad_inputs()[case]
    if broken in ("shrink", "both"):
        with pytest.raises(AssertionError):
            (run_kernels if use_triton else run_refs)(bad, form)
    if broken in ("expand", "both"):
        y = torch.zeros(6, max(bad.max_rank, 1), device=DEVICE)
        out = bad.base_out.clone()
        args = bad.expand_sgmv_args if form == "sgmv" else bad.expand_bgmv_args
        with pytest.raises(AssertionError):
            EXPAND_OPS[form, use_triton](*args(y, out))


def sm90_cases() -> list[CompileCase]:
    """Every LoRA kernel in bfloat16 with the CUDA block table."""
    import triton.language as tl

    shrink, expand = lora_shrink.SHRINK_BLOCKS, lora_expand.EXPAND_BLOCKS
    types = {"x_ptr": "*bf16", "pool_ptr": "*bf16", "out_ptr": "*bf16"}
    types |= {"y_ptr": "*fp32", "scalings_ptr": "*fp32"}  # the rest are int32
    s, e = shrink[("cuda", "sgmv")], expand[("cuda", "sgmv")]
    sgmv = [
        ("shrink_sgmv", lora_shrink._shrink_sgmv_kernel, s.num_warps,
         {"BLOCK_M": s.block_m, "BLOCK_R": s.max_block_r, "BLOCK_K": s.block_k,
          "SPLIT_K": s.split_k, "DOT_DTYPE": tl.bfloat16}),
        ("expand_sgmv", lora_expand._expand_sgmv_kernel, e.num_warps,
         {"BLOCK_M": e.block_m, "BLOCK_R": e.max_block_r, "BLOCK_N": e.block_n,
          "DOT_DTYPE": tl.bfloat16}),
    ]  # fmt: skip
    s, e = shrink[("cuda", "bgmv")], expand[("cuda", "bgmv")]
    bgmv = [
        ("shrink_bgmv", lora_shrink._shrink_bgmv_kernel, s.num_warps,
         {"BLOCK_R": s.max_block_r, "BLOCK_K": s.block_k, "SPLIT_K": s.split_k}),
        ("expand_bgmv", lora_expand._expand_bgmv_kernel, e.num_warps,
         {"BLOCK_R": e.max_block_r, "BLOCK_N": e.block_n}),
    ]  # fmt: skip
    return [
        CompileCase(name, kernel, constexprs, types, {"num_warps": warps})
        for name, kernel, warps, constexprs in sgmv + bgmv
    ]


@requires_triton
@pytest.mark.slow
def test_kernels_compile_for_h100() -> None:
    """The interpreter accepts code the GPU compiler rejects: compile each kernel for sm_90."""
    compile_in_child(
        "from tests.kernels.test_lora import sm90_cases; "
        "from tests.kernels.sm90 import compile_cases; compile_cases(sm90_cases())"
    )
