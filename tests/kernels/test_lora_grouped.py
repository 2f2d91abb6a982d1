"""The CPU LoRA forms (grouped, stacked, stacked packed) against the naive per-token loop.

Batches come from `tests/kernels/test_lora.py` (shuffled pages, garbage in every other page,
mixed ranks including 0, rows without LoRA), with their rows sorted by adapter as the runner
lays them out; the forms must add exactly each row's own adapter's update.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from kernels import lora_layout
from kernels.lora_grouped import (
    CPU_COSTS,
    StackedRows,
    choose_form,
    lora_grouped,
    lora_stacked,
    lora_stacked_packed,
    read_adapter,
    stacked_coefficients,
    stacked_rows,
)
from tests.kernels.test_lora import (
    POPULARITIES,
    SHAPES,
    LoraBatch,
    decode_tokens,
    make_batch,
    naive_lora,
    prefill_segments,
)
from tests.kernels.test_lora_packed import GATE_UP, QKV, PackedBatch, make_packed, naive_packed

Segment = tuple[int, int, int, float]


def sorted_segments(segments: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The runner's layout: the same (length, adapter) items, grouped by adapter."""
    return sorted(segments, key=lambda s: s[1])


def runs(batch: LoraBatch, weight: float = 1.0) -> list[Segment]:
    """(slot, lo, hi, weight) of consecutive rows sharing an adapter, LoRA rows only."""
    out: list[Segment] = []
    for t, adapter in enumerate(batch.token_adapters.tolist()):
        if adapter < 0:
            continue
        if out and out[-1][0] == adapter and out[-1][2] == t:
            out[-1] = (adapter, out[-1][1], t + 1, weight)
        else:
            out.append((adapter, t, t + 1, weight))
    return out


def weights_of(batch: LoraBatch, slots: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Each slot's (Aᵀ, Bᵀ) read through its page table (slots of rank 0 left out)."""
    ranks = batch.ranks.tolist()
    in_features, out_features = batch.x.shape[1], batch.base_out.shape[1]
    return {
        s: read_adapter(
            batch.pool, batch.a_pages[s], batch.b_pages[s], ranks[s], in_features, out_features
        )
        for s in slots
        if ranks[s] > 0
    }


def run_grouped(batch: LoraBatch) -> torch.Tensor:
    out = batch.base_out.clone()
    segs = runs(batch)
    weights = weights_of(batch, sorted({s for s, _, _, _ in segs}))
    lora_grouped(batch.x, out, segs, weights, batch.scalings.tolist())
    return out


def run_stacked(batch: LoraBatch) -> torch.Tensor:
    """The stacked form as the engine drives it: one layer, rows of each used slot."""
    out = batch.base_out.clone()
    segs = runs(batch)
    ranks, scalings = batch.ranks.tolist(), batch.scalings.tolist()
    slots = list(dict.fromkeys(s for s, _, _, _ in segs))
    stacked = stacked_rows(batch.a_pages, batch.b_pages, slots, [ranks[s] for s in slots])
    column_slots = [s for s in slots for _ in range(ranks[s])]
    column_coefs = [[scalings[s] for s in column_slots]]  # one layer, every row below rank
    num_tokens, device = batch.x.shape[0], batch.x.device
    token_slots = torch.full((1, num_tokens), -1, dtype=torch.int32)
    token_coefs = torch.zeros(1, num_tokens)
    for slot, lo, hi, weight in segs:
        token_slots[0, lo:hi], token_coefs[0, lo:hi] = slot, weight
    coef = stacked_coefficients(
        token_slots.to(device),
        token_coefs.to(device),
        torch.tensor(column_slots, dtype=torch.int32, device=device),
        torch.tensor(column_coefs, device=device),
    )
    lora_stacked(batch.x, out, batch.pool, stacked, coef[0])
    return out


FORMS = {"grouped": run_grouped, "stacked": run_stacked}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("batch_size", [1, 3, 7, 133])
@pytest.mark.parametrize("popularity", POPULARITIES)
def test_forms_match_naive_loop(
    popularity: str, batch_size: int, shape: tuple[int, int, int], form: str
) -> None:
    for layout in (prefill_segments, decode_tokens):
        batch = make_batch(sorted_segments(layout(popularity, batch_size)), shape)
        _, expected = naive_lora(batch)  # on the CPU
        torch.testing.assert_close(FORMS[form](batch).cpu(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_forms_leave_rows_without_lora_bit_identical(form: str) -> None:
    batch = make_batch([(2, -1), (3, 0), (1, 2), (4, 6)], SHAPES["w48_in100_out72"])  # 6: rank 0
    out = FORMS[form](batch)
    assert torch.equal(out[:2], batch.base_out[:2])
    assert torch.equal(out[6:], batch.base_out[6:])
    assert not torch.equal(out[2:5], batch.base_out[2:5])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("form", FORMS)
def test_forms_low_precision(form: str, dtype: torch.dtype) -> None:
    batch = make_batch(sorted_segments(prefill_segments("uniform", 7)), (48, 100, 72), dtype)
    _, expected = naive_lora(batch)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(FORMS[form](batch).cpu(), expected, atol=tol, rtol=tol)


def test_grouped_mixture_segments_add_up() -> None:
    """A row in two segments (a mixture's components) gets both updates, each weighted."""
    batch = make_batch([(4, 0), (3, 2)], SHAPES["w64_in128_out160"])
    scalings = batch.scalings.tolist()
    out = batch.base_out.clone()
    mixture: list[Segment] = [(0, 0, 4, 0.25), (2, 0, 4, 0.75)]
    lora_grouped(batch.x, out, mixture, weights_of(batch, [0, 2]), scalings)
    x = batch.x[:4]
    expected = batch.base_out[:4].clone()
    for slot, weight in ((0, 0.25), (2, 0.75)):
        a, b = batch.lora_a[slot].to(x.device), batch.lora_b[slot].to(x.device)
        expected += (x @ a.T) @ b.T * scalings[slot] * weight
    torch.testing.assert_close(out[:4], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[4:], batch.base_out[4:])


def test_forms_never_gather_per_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither form materialises tokens × rank × features weights: each adapter's rows are
    read once per call, so the rows read do not grow with the number of tokens."""
    reads: list[int] = []
    real = lora_layout.read_rows

    def counting(pool: torch.Tensor, pages: torch.Tensor, features: int) -> torch.Tensor:
        reads.append(pages.shape[0])
        return real(pool, pages, features)

    import kernels.lora_grouped as grouped

    monkeypatch.setattr(grouped, "read_rows", counting)
    for batch_size in (8, 128):
        reads.clear()
        batch = make_batch([(batch_size, 0), (batch_size, 2)], SHAPES["w64_in128_out160"])
        run_grouped(batch)
        assert sum(reads) == 2 * (batch.ranks[0] + batch.ranks[2])  # A and Bᵀ, once each


def test_cost_model_crossover() -> None:
    """Tiny layers and few adapters: stacked; wide layers and many large adapters: grouped."""
    demo = choose_form(64, [(8, 8)] * 8, 8, 64, 128 + 128)
    assert demo == "stacked"
    wide = choose_form(64, [(2, 32)] * 32, 32, 32 * 32, 512 + 1536)
    assert wide == "grouped"
    assert CPU_COSTS.per_op > 0 and CPU_COSTS.per_mac > 0


def test_adapters_in_consecutive_pages_are_read_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """An adapter whose rows lie in consecutive pages is read as a view: no gather at all,
    the pool's own memory, and the same result as through its page table."""
    width, page_width, rank = 128, 64, 8
    chunks = width // page_width
    pool = torch.randn(2 * rank * chunks + 5, page_width)
    a_pages = torch.arange(3, 3 + rank * chunks, dtype=torch.int32).view(rank, chunks)
    b_pages = (a_pages + rank * chunks).contiguous()
    x, base = torch.randn(5, width), torch.randn(5, width)
    segments: list[Segment] = [(0, 1, 4, 1.0)]
    gathered = base.clone()
    pair = read_adapter(pool, a_pages, b_pages, rank, width, width)
    lora_grouped(x, gathered, segments, {0: pair}, [0.5])

    import kernels.lora_grouped as grouped

    def forbidden(*args: object) -> torch.Tensor:
        raise AssertionError("gathered rows that lie in consecutive pages")

    monkeypatch.setattr(grouped, "read_rows", forbidden)
    in_place = base.clone()
    view = read_adapter(pool, a_pages, b_pages, rank, width, width, 3, 3 + rank * chunks)
    assert view[0].untyped_storage().data_ptr() == pool.untyped_storage().data_ptr()
    lora_grouped(x, in_place, segments, {0: view}, [0.5])
    torch.testing.assert_close(in_place, gathered, atol=1e-6, rtol=1e-6)
    assert torch.equal(in_place[0], base[0]) and torch.equal(in_place[4], base[4])


def _stacked_slices(
    segments: list[tuple[int, int]], shape: tuple[int, int, tuple[int, ...]], dtype: torch.dtype
) -> tuple[PackedBatch, list[StackedRows], list[torch.Tensor]]:
    """A packed batch, and each slice's stacked rows and coefficients (one layer)."""
    batch = make_packed(segments, shape, dtype)
    spans = batch.seg_starts.tolist()
    segs = [
        (a, spans[i], spans[i + 1], 1.0)
        for i, a in enumerate(batch.seg_adapters.tolist())
        if a >= 0 and spans[i + 1] > spans[i]
    ]
    slots = list(dict.fromkeys(a for a, _, _, _ in segs))
    token_slots = torch.full((1, batch.x.shape[0]), -1, dtype=torch.int32)
    token_coefs = torch.zeros(1, batch.x.shape[0])
    for slot, lo, hi, weight in segs:
        token_slots[0, lo:hi], token_coefs[0, lo:hi] = slot, weight
    stacked, coefs = [], []
    for s in range(len(batch.a_pages)):
        ranks, scalings = batch.ranks[:, s].tolist(), batch.scalings[:, s].tolist()
        rows = [ranks[slot] for slot in slots]
        stacked.append(stacked_rows(batch.a_pages[s], batch.b_pages[s], slots, rows))
        column_slots = [slot for slot in slots for _ in range(ranks[slot])]
        device = batch.x.device
        coef = stacked_coefficients(
            token_slots.to(device),
            token_coefs.to(device),
            torch.tensor(column_slots, dtype=torch.int32, device=device),
            torch.tensor([[scalings[slot] for slot in column_slots]], device=device),
        )
        coefs.append(coef[0])
    return batch, stacked, coefs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [QKV, GATE_UP], ids=["qkv", "gate_up"])
@pytest.mark.parametrize("popularity", ["uniform", "skewed"])
def test_stacked_packed_is_stacked_slice_by_slice(
    popularity: str, shape: tuple[int, int, tuple[int, ...]], dtype: torch.dtype
) -> None:
    """One gather and one shrink for every slice of a packed projection: the same updates as
    the stacked form run per slice into column views (and as the naive loop)."""
    batch, stacked, coefs = _stacked_slices(prefill_segments(popularity, 7), shape, dtype)
    widths = [hi - lo for lo, hi in itertools.pairwise(batch.column_offsets)]
    expected = batch.base_out.clone()
    for s, columns in enumerate(expected.split(widths, dim=1)):
        lora_stacked(batch.x, columns, batch.pool, stacked[s], coefs[s])
    got = batch.base_out.clone()
    a_index = torch.cat([rows.a_index for rows in stacked])
    coef = torch.cat(coefs, dim=1)
    lora_stacked_packed(batch.x, got.split(widths, dim=1), batch.pool, stacked, a_index, coef)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    torch.testing.assert_close(got.cpu(), naive_packed(batch)[1], atol=tol, rtol=tol)
