"""LoRA on the CPU for a batch whose rows are grouped by adapter: shrink and expand together.

The engine sorts each step's rows by adapter, so every adapter's rows form a few contiguous
*segments* (its decode rows, then its prefill chunks). On the CPU the fastest way through
such a batch is not a kernel but the right matmuls: each distinct adapter's A and Bᵀ are
gathered from the pool **once** per call (rank × features, never per token and never padded
to the batch's largest rank), then each segment runs its two matmuls on views. Two forms:

* **grouped** (`lora_grouped`): one shrink and one expand matmul per segment. Work is
  proportional to Σ rows·rank; op count to the number of segments. Wins when matmuls cost
  more than dispatching them (wide layers, large ranks, many adapters).
* **stacked** (`lora_stacked`): every distinct adapter's rows stacked into one matrix of
  Σ ranks rows; one shrink matmul for all rows, a coefficient mask keeping each row's own
  adapter's columns (scaled), one expand matmul. A constant handful of ops whatever the
  number of adapters, at the price of Σ ranks / rank more multiply-adds. Wins on tiny layers,
  where dispatch decides.

`choose_form` picks between them with a small cost model (`CPU_COSTS`, tuning as data).
For a packed projection (q, k and v sharing x) whose slices all take the stacked form,
`lora_stacked_packed` gathers every slice's A rows at once and runs one shrink for all of
them, then each slice's expand into its own output columns: the same math, fewer ops.

Semantics (both forms, for one target layer; float32 x and out):
    for every segment (slot, lo, hi, weight) with rank r = ranks[slot] > 0:
        A = A_slot[:r] (r, in), Bᵀ = Bᵀ_slot[:r] (r, out)   (pages as `kernels/lora_layout.py`)
        out[lo:hi] += (x[lo:hi] · Aᵀ) · Bᵀ · (scalings[slot] · weight)
    Rows of no segment are untouched. For a mixture a row appears in several segments (one
    per component, each with its weight); the updates add up. Products accumulate in float32
    in an unspecified order (the float32 round-off of the references of
    `kernels/lora_shrink.py` / `kernels/lora_expand.py`, which fold the weight into y).
    For bfloat16 / float16 both forms compute in float32 and round y to out's dtype before
    the expand and out once at the end, as the expand reference does.

Args (shared):
    x: (num_tokens, in_features); out: (num_tokens, out_features), x's dtype, updated in place.
    pool: (num_pages, page_width), x's dtype: one layer's page-pool tensor.
    a_pages / b_pages: int32 (num_slots, >= rank rows, chunks) page tables, as the other ops.
    segments: host list of (slot, lo, hi, weight), slot >= 0, lo < hi.
    scalings: host sequence (or mapping) indexed by slot (this layer's and target's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from kernels.lora_layout import read_rows

Segment = tuple[int, int, int, float]  # (slot, lo, hi, weight)


def read_adapter(
    pool: torch.Tensor,
    a_pages: torch.Tensor,
    b_pages: torch.Tensor,
    rank: int,
    in_features: int,
    out_features: int,
    a_first: int = -1,
    b_first: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapter's ``(Aᵀ (in, rank), Bᵀ (rank, out))`` for one target, from its page tables
    ``a_pages`` / ``b_pages`` (rank rows, chunks).

    When ``a_first`` (``b_first``) >= 0 the rows lie in consecutive pages from there on (row
    j, chunk c at page ``first + j · chunks + c``) and the result is a view of the pool: no
    copy, valid as long as the adapter stays there. Otherwise one index_select each.
    """
    return (
        _rows(pool, a_pages, a_first, rank, in_features).t(),
        _rows(pool, b_pages, b_first, rank, out_features),
    )


def _rows(
    pool: torch.Tensor, pages: torch.Tensor, first: int, rank: int, features: int
) -> torch.Tensor:
    """(rank, features): rows 0 .. rank - 1, a view when they start at page ``first``."""
    if first < 0:
        return read_rows(pool, pages[:rank], features)
    chunks = pages.shape[-1]
    # (rank · chunks, page_width) → (rank, chunks · page_width) → the first `features`
    return pool[first : first + rank * chunks].view(rank, -1)[:, :features]


def lora_grouped(
    x: torch.Tensor,
    out: torch.Tensor,
    segments: Sequence[Segment],
    weights: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
    scalings: Sequence[float] | Mapping[int, float],
) -> None:
    """out += LoRA(x), one shrink and one expand matmul per segment (see `Semantics`).

    ``weights[slot]``: the slot's ``(Aᵀ, Bᵀ)`` as :func:`read_adapter` returns them, for
    every slot of ``segments`` whose rank is above 0 (segments of other slots are skipped).
    """
    exact = out.dtype == torch.float32
    for slot, lo, hi, weight in segments:
        pair = weights.get(slot)
        if pair is None:
            continue
        lora_a_t, lora_b_t = pair
        if exact:
            y = torch.mm(x[lo:hi], lora_a_t)  # (rows, rank)
            out[lo:hi].addmm_(y, lora_b_t, alpha=float(scalings[slot]) * weight)
        else:
            y = x[lo:hi].float() @ lora_a_t.float()
            y_in = (y * weight).to(out.dtype).float()  # rounded as PEFT feeds lora_B
            delta = (y_in @ lora_b_t.float()) * float(scalings[slot])
            out[lo:hi] = (out[lo:hi].float() + delta).to(out.dtype)


@dataclass(frozen=True)
class StackedRows:
    """Where the stacked form's rows come from, built once per step and target.

    Attributes:
        a_index / b_index: int64 (Σ rows · chunks,): pool pages of every stacked adapter's A
            (resp. Bᵀ) rows, adapter after adapter.
        num_rows: Σ rows, the columns of the shrink's output.
    """

    a_index: torch.Tensor
    b_index: torch.Tensor
    num_rows: int


def stacked_rows(
    a_pages: torch.Tensor, b_pages: torch.Tensor, slots: Sequence[int], rows: Sequence[int]
) -> StackedRows:
    """The page indices of ``rows[i]`` rows of adapter ``slots[i]``, stacked in that order."""
    a = [a_pages[s, :r].reshape(-1) for s, r in zip(slots, rows, strict=True) if r > 0]
    b = [b_pages[s, :r].reshape(-1) for s, r in zip(slots, rows, strict=True) if r > 0]
    empty = torch.zeros(0, dtype=torch.int64, device=a_pages.device)
    return StackedRows(
        a_index=torch.cat(a).long() if a else empty,
        b_index=torch.cat(b).long() if b else empty,
        num_rows=sum(r for r in rows if r > 0),
    )


def lora_stacked(
    x: torch.Tensor,
    out: torch.Tensor,
    pool: torch.Tensor,
    stacked: StackedRows,
    coef: torch.Tensor,
) -> None:
    """out += LoRA(x) through one stacked shrink and one stacked expand (see `Semantics`).

    ``coef`` (num_tokens, stacked.num_rows) float32 holds each row's scaling · weight on the
    columns of its own adapter's rows below this layer's rank and 0 elsewhere, so stacked
    rows past a layer's rank must hold finite values (the engine's residency zero-fills
    them); then each row gets exactly its own adapters' updates.
    """
    if stacked.num_rows == 0:
        return
    in_features, out_features = x.shape[1], out.shape[1]
    # (num_rows, chunks · page_width) → the first in_features / out_features columns
    lora_a = pool.index_select(0, stacked.a_index).view(stacked.num_rows, -1)[:, :in_features]
    lora_b_t = pool.index_select(0, stacked.b_index).view(stacked.num_rows, -1)
    lora_b_t = lora_b_t[:, :out_features]
    if out.dtype == torch.float32:
        y = x @ lora_a.T  # (num_tokens, num_rows)
        y.mul_(coef)
        out.addmm_(y, lora_b_t)
    else:
        y = x.float() @ lora_a.float().T
        # weight folded before the rounding, scaling after, as the expand reference does
        y_in = y.to(out.dtype).float() * coef
        out.copy_((out.float() + y_in @ lora_b_t.float()).to(out.dtype))


def lora_stacked_packed(
    x: torch.Tensor,
    outs: Sequence[torch.Tensor],
    pool: torch.Tensor,
    stacked: Sequence[StackedRows],
    a_index: torch.Tensor,
    coef: torch.Tensor,
) -> None:
    """:func:`lora_stacked` for the slices of a packed projection, which share ``x``.

    ``outs[s]`` (num_tokens, its out_features) is slice s's output (a column view of the
    packed one) and ``stacked[s]`` its stacked rows; ``a_index`` is the slices' a_index
    concatenated and ``coef`` (num_tokens, Σ num_rows) their coefficients side by side, in
    slice order (callers keep both across layers). Every slice's A rows are gathered in one
    index_select and multiplied in one shrink matmul; each slice then expands its own columns
    of y into its output, as lora_stacked would.
    """
    sizes = [rows.num_rows for rows in stacked]
    num_rows = sum(sizes)
    if num_rows == 0:
        return
    # (Σ num_rows, chunks · page_width) → the first in_features columns
    lora_a = pool.index_select(0, a_index).view(num_rows, -1)[:, : x.shape[1]]
    exact = outs[0].dtype == torch.float32
    if exact:
        y = x @ lora_a.T  # (num_tokens, Σ num_rows)
        y.mul_(coef)
        coefs: Sequence[torch.Tensor | None] = [None] * len(stacked)
    else:
        y = x.float() @ lora_a.float().T
        coefs = torch.split(coef, sizes, dim=1)
    parts = zip(outs, stacked, torch.split(y, sizes, dim=1), coefs, strict=True)
    for out, rows, y_part, coef_part in parts:
        if rows.num_rows == 0:
            continue
        lora_b_t = pool.index_select(0, rows.b_index).view(rows.num_rows, -1)
        lora_b_t = lora_b_t[:, : out.shape[1]]
        if coef_part is None:
            out.addmm_(y_part, lora_b_t)
        else:  # weight folded before the rounding, scaling after, as in lora_stacked
            y_in = y_part.to(out.dtype).float() * coef_part
            out.copy_((out.float() + y_in @ lora_b_t.float()).to(out.dtype))


def stacked_coefficients(
    token_slots: torch.Tensor,
    token_coefs: torch.Tensor,
    column_slots: torch.Tensor,
    column_coefs: torch.Tensor,
) -> torch.Tensor:
    """The ``coef`` of :func:`lora_stacked` for several layers at once.

    Args:
        token_slots: int (num_passes, num_tokens): each row's adapter slot per pass, -1 none.
        token_coefs: float32 (num_passes, num_tokens): each row's weight per pass.
        column_slots: int (num_rows,): the slot of each stacked row.
        column_coefs: float32 (num_layers, num_rows): per layer, the stacked row's scaling
            where its row index is below the layer's rank, else 0.

    Returns:
        (num_layers, num_tokens, num_rows) float32.
    """
    # (num_tokens, num_rows): Σ over passes of weight where the row's slot is the column's
    match = (token_slots[:, :, None] == column_slots[None, None, :]).float()
    per_token = (match * token_coefs[:, :, None]).sum(0)
    return per_token[None, :, :] * column_coefs[:, None, :]


@dataclass(frozen=True)
class CpuCosts:
    """A tiny cost model of the CPU (seconds per op and per multiply-add), tuning as data.

    Attributes:
        per_op: the dispatch cost of one tensor op (index_select, view, matmul, ...).
        per_mac: seconds per float32 multiply-add in a skinny matmul.
    """

    per_op: float
    per_mac: float


# Measured on a 2-core x86 machine, one torch thread (benchmarks/lora_kernels.py --cpu-forms
# prints the crossover); the choice only moves speed, never results.
CPU_COSTS = CpuCosts(per_op=4e-6, per_mac=2.5e-11)

_OPS_PER_SEGMENT = 4  # slicing x and out, the shrink, the expand
_OPS_PER_ADAPTER = 6  # two gathers, their views and slices
_OPS_STACKED = 9  # two gathers, views, slices, shrink, mask, expand


def choose_form(
    num_tokens: int,
    segment_rows_ranks: Sequence[tuple[int, int]],
    num_adapters: int,
    stacked_rows_total: int,
    features: int,
    costs: CpuCosts = CPU_COSTS,
) -> str:
    """ "grouped" or "stacked", whichever the cost model says is cheaper.

    Args:
        num_tokens: rows of x.
        segment_rows_ranks: (rows, rank) of every segment with LoRA.
        num_adapters: distinct adapters among the segments.
        stacked_rows_total: Σ ranks of the stacked form.
        features: in_features + out_features of the target layer.
    """
    grouped_macs = sum(rows * rank for rows, rank in segment_rows_ranks) * features
    gathered = stacked_rows_total * features  # both forms gather every adapter once
    grouped_ops = _OPS_PER_SEGMENT * len(segment_rows_ranks) + _OPS_PER_ADAPTER * num_adapters
    grouped = costs.per_op * grouped_ops + costs.per_mac * (grouped_macs + gathered)
    stacked_macs = num_tokens * stacked_rows_total * features
    stacked = costs.per_op * _OPS_STACKED + costs.per_mac * (stacked_macs + gathered)
    return "stacked" if stacked < grouped else "grouped"
