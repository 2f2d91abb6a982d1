"""The LoRA path of a mixed-adapter batch: ``out += scaling · (x · Aᵀ) · Bᵀ`` per request.

The base matmul runs once for the whole batch (the model's own linear layer); then, for each
target layer, the LoRA backend adds every row's own adapter's update, reading adapter
weights straight from the page pool. A packed projection (q, k and v as one matmul; gate and
up) hands the backend all its slices at once, each a target of its own (an adapter targets
q_proj, never "qkv_proj"), with the columns of the packed output that are that target's.
The runner lays each step's rows out **grouped by adapter** (decodes first, then prefill
chunks, each part sorted by adapter), so every adapter's rows form at most a few contiguous
segments; :class:`LoraMetadata` lists them.

* ``torch`` (the CPU path): each distinct adapter's A and Bᵀ are gathered once per target
  and layer, never per token; then either one pair of matmuls per segment or, where
  dispatch dominates, one stacked pair for the whole batch (`kernels/lora_grouped.py`; a
  cost model picks per target and step).
* ``triton``: the segmented (SGMV) shrink and expand kernels over the sorted segments, one
  shrink and one expand launch per layer and pass for a packed projection's slices.

A batch with no adapter request skips all of it.
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from adapters.base_layout import LINEAR_TARGETS
from adapters.residency import LoraTables
from kernels import lora as kernels
from kernels.lora_grouped import (
    Segment,
    StackedRows,
    choose_form,
    lora_grouped,
    lora_stacked,
    lora_stacked_packed,
    read_adapter,
    stacked_coefficients,
    stacked_rows,
)

TARGET_INDEX = {name: i for i, name in enumerate(LINEAR_TARGETS)}
# Stacked rows per target, all their A pages, each column's slot and per-layer scaling.
_StackPlan = tuple[tuple[StackedRows, ...], torch.Tensor, torch.Tensor, torch.Tensor]
_MAX_VIEWS = 1 << 16  # cached adapter views (small objects; cleared when full)


@dataclass(frozen=True)
class LoraPass:
    """One component of each row's adapter, as device tensors for the segmented kernels: the
    first pass carries every request's adapter (or the first component of its mixture),
    later passes the further components of mixtures.

    Attributes:
        seg_starts: (num_segments + 1,) int32 row offsets of runs of rows sharing this
            pass's adapter and weight.
        seg_adapters: (num_segments,) int32 adapter slot of each run, -1 = none.
        token_weights: (num_tokens, 1) float32 mixture weight of each row, or None when
            every weight of the pass is 1.
        max_seg_len: the longest run (sizes the kernels' grid without a device read).
    """

    seg_starts: torch.Tensor
    seg_adapters: torch.Tensor
    token_weights: torch.Tensor | None
    max_seg_len: int


@dataclass(frozen=True)
class LoraMetadata:
    """Which adapter (or adapters, for a mixture) each row of this forward uses.

    Built by the runner once per step, from host data only. A mixture y = Wx + Σᵢ wᵢ·sᵢ·Bᵢ(Aᵢx)
    contributes one segment per component (pass i: its i-th component, weight wᵢ).

    Attributes:
        num_tokens: rows of the forward.
        segments: per pass, the runs ``(slot, lo, hi, weight)`` of rows sharing an adapter
            slot and weight (rows of no adapter in that pass appear in none).
        row_slots: per pass, each row's slot (-1: none) and weight, on the host.
        ranks: per distinct slot, its rank per (layer, target), on the host.
        scalings: per distinct slot, its scaling per (layer, target), on the host.
        max_rank: the largest rank among this batch's adapters.
        tables: the residency's page tables.
        passes: the same segments as device tensors, for the segmented kernels; built only
            by backends that launch kernels (None for the CPU path).
        cache: per-step values a backend derives once per target and reuses in every layer.
    """

    num_tokens: int
    segments: tuple[tuple[Segment, ...], ...]
    row_slots: tuple[tuple[list[int], list[float]], ...]
    ranks: dict[int, list[list[int]]]
    scalings: dict[int, list[list[float]]]
    max_rank: int
    tables: LoraTables
    passes: tuple[LoraPass, ...] | None = None
    cache: dict[Any, Any] = field(default_factory=dict, compare=False)

    @property
    def slots(self) -> list[int]:
        """The distinct adapter slots, in order of first use."""
        return list(self.ranks)


class LoraBackend(abc.ABC):
    """Adds the LoRA updates of one target, or of a packed projection's targets, in one layer
    (a variation point: torch, triton)."""

    name: str
    needs_device_passes: bool = False  # whether the runner must build ``LoraMetadata.passes``

    @abc.abstractmethod
    def apply(
        self,
        meta: LoraMetadata,
        pool: torch.Tensor,
        layer: int,
        target: str,
        x: torch.Tensor,
        out: torch.Tensor,
    ) -> None:
        """Add the LoRA delta of ``target`` in ``layer`` to ``out`` in place.

        Args:
            meta: this forward's adapter assignment.
            pool: the layer's page-pool tensor, (num_pages, page_width).
            x: (num_tokens, in_features) the layer's input.
            out: (num_tokens, out_features) the base layer's output.
        """

    @abc.abstractmethod
    def apply_packed(
        self,
        meta: LoraMetadata,
        pool: torch.Tensor,
        layer: int,
        targets: tuple[str, ...],
        x: torch.Tensor,
        out: torch.Tensor,
        column_offsets: tuple[int, ...],
    ) -> None:
        """Add the LoRA deltas of a packed projection's slices to ``out`` in place:
        ``targets[s]``'s into columns ``column_offsets[s] .. column_offsets[s + 1]``.

        Args:
            targets: consecutive in :data:`LINEAR_TARGETS` (q, k, v; gate, up), sharing ``x``.
            out: (num_tokens, column_offsets[-1]) the packed base layer's output.
            column_offsets: (len(targets) + 1,) from 0 to out's width.
        """


class TorchLora(LoraBackend):
    """The CPU path: adapters gathered once per call, matmuls per segment or stacked."""

    name = "torch"

    def __init__(self, force_form: str | None = None) -> None:
        self.force_form = force_form  # tests and benchmarks pin a form; None: the cost model
        # Views of adapters whose rows lie in consecutive pages, kept across steps: keyed by
        # where they are, so a view is reused only while it still reads those very pages.
        self._views: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        # The stacked form's rows and per-layer scalings by (targets, slots, rows), valid
        # while the tables' generation is unchanged.
        self._plans: dict[tuple[Any, ...], _StackPlan] = {}
        self._generation = -1

    def apply(
        self,
        meta: LoraMetadata,
        pool: torch.Tensor,
        layer: int,
        target: str,
        x: torch.Tensor,
        out: torch.Tensor,
    ) -> None:
        self._add(meta, pool, layer, target, x, out)

    def apply_packed(
        self,
        meta: LoraMetadata,
        pool: torch.Tensor,
        layer: int,
        targets: tuple[str, ...],
        x: torch.Tensor,
        out: torch.Tensor,
        column_offsets: tuple[int, ...],
    ) -> None:
        # Into column views of out. When every slice takes the stacked form, one gather and
        # one shrink serve them all; otherwise slice by slice, each with its own form and
        # views, exactly as a separate layer would. (Slices, not one torch.split: autograd
        # forbids writing into split's views in place, should anyone run the model with it.)
        if not any(self._touched(meta, TARGET_INDEX[target]) for target in targets):
            return  # e.g. attention-only adapters on gate_up_proj: not even the views
        outs = [out[:, lo:hi] for lo, hi in itertools.pairwise(column_offsets)]
        ts = tuple(TARGET_INDEX[target] for target in targets)
        features = [x.shape[1] + columns.shape[1] for columns in outs]
        if all(self._form(meta, t, f) == "stacked" for t, f in zip(ts, features, strict=True)):
            stacked, a_index, coef = self._stacked(meta, ts)
            if coef.numel():
                lora_stacked_packed(x, outs, pool, stacked, a_index, coef[layer])
            return
        for target, columns in zip(targets, outs, strict=True):
            self._add(meta, pool, layer, target, x, columns)

    @staticmethod
    def _touched(meta: LoraMetadata, t: int) -> bool:
        """Whether any adapter of the step touches target ``t`` in any layer (once a step)."""
        key = ("touched", t)
        touched = meta.cache.get(key)
        if touched is None:
            ranks = meta.ranks.values()
            touched = meta.cache[key] = any(r[t] > 0 for per_layer in ranks for r in per_layer)
        return bool(touched)

    def _add(
        self,
        meta: LoraMetadata,
        pool: torch.Tensor,
        layer: int,
        target: str,
        x: torch.Tensor,
        out: torch.Tensor,
    ) -> None:
        t = TARGET_INDEX[target]
        tables = meta.tables
        a_pages, b_pages = tables.a_pages[target], tables.b_pages[target]
        if self._form(meta, t, x.shape[1] + out.shape[1]) == "stacked":
            (stacked,), _, coef = self._stacked(meta, (t,))
            if stacked.num_rows:
                lora_stacked(x, out, pool, stacked, coef[layer])
            return
        a_first, b_first = tables.a_first[target], tables.b_first[target]
        weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        scalings: dict[int, float] = {}
        for slot, per_layer in meta.ranks.items():
            rank = per_layer[layer][t]
            if rank <= 0:
                continue
            scalings[slot] = meta.scalings[slot][layer][t]
            a0, b0 = a_first[slot], b_first[slot]
            key = (pool.data_ptr(), t, a0, b0, rank, slot)
            pair = self._views.get(key) if a0 >= 0 and b0 >= 0 else None
            if pair is None:
                pair = read_adapter(
                    pool, a_pages[slot], b_pages[slot], rank, x.shape[1], out.shape[1], a0, b0
                )
                if a0 >= 0 and b0 >= 0:
                    if len(self._views) >= _MAX_VIEWS:
                        self._views.clear()
                    self._views[key] = pair
            weights[slot] = pair
        for segments in meta.segments:
            lora_grouped(x, out, segments, weights, scalings)

    def _form(self, meta: LoraMetadata, t: int, features: int) -> str:
        if self.force_form is not None:
            return self.force_form
        key = ("form", t)
        form = meta.cache.get(key)
        if form is None:
            rank = {slot: max(r[t] for r in per_layer) for slot, per_layer in meta.ranks.items()}
            runs = [(hi - lo, rank[slot]) for segs in meta.segments for slot, lo, hi, _ in segs]
            used = [rank[s] for s in meta.slots if rank[s] > 0]
            form = choose_form(meta.num_tokens, runs, len(used), sum(used), features)
            meta.cache[key] = form
        return str(form)

    def _stacked(
        self, meta: LoraMetadata, ts: tuple[int, ...]
    ) -> tuple[tuple[StackedRows, ...], torch.Tensor, torch.Tensor]:
        """The stacked rows of targets ``ts`` (one, or a packed layer's slices), all their A
        pages in one index, and their per-layer coefficients side by side
        (num_layers, num_tokens, Σ rows; empty when no adapter of the batch touches them).

        Which rows are stacked and their per-layer scalings depend only on the batch's set of
        adapters and the tables, so they are kept across steps (until an adapter is placed or
        evicted); each step only matches its rows to them, once.
        """
        key = ("stacked", ts)
        hit = meta.cache.get(key)
        if hit is not None:
            return hit  # type: ignore[no-any-return]
        slots = meta.slots
        # each slot's rows per target, any layer
        rows = tuple(tuple(max(r[t] for r in meta.ranks[s]) for s in slots) for t in ts)
        generation = meta.tables.generation[0]
        if generation != self._generation:
            self._plans.clear()
            self._generation = generation
        plan_key = (ts, tuple(slots), rows)
        plan = self._plans.get(plan_key)
        if plan is None:
            plan = self._plans[plan_key] = self._stack(meta, ts, slots, rows)
        stacked, a_index, column_slots, column_coefs = plan
        coef = torch.zeros(0)
        if column_slots.numel():
            token_slots, token_coefs = self._token_rows(meta, column_slots.device)
            coef = stacked_coefficients(token_slots, token_coefs, column_slots, column_coefs)
        meta.cache[key] = (stacked, a_index, coef)
        return stacked, a_index, coef

    @staticmethod
    def _token_rows(meta: LoraMetadata, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's slot and weight per pass, (num_passes, num_tokens), once a step."""
        key = ("token_rows",)
        hit = meta.cache.get(key)
        if hit is None:
            hit = meta.cache[key] = (
                torch.tensor([s for s, _ in meta.row_slots], dtype=torch.int32).to(device),
                torch.tensor([w for _, w in meta.row_slots]).to(device),
            )
        return hit  # type: ignore[no-any-return]

    @staticmethod
    def _stack(
        meta: LoraMetadata,
        ts: tuple[int, ...],
        slots: list[int],
        rows: tuple[tuple[int, ...], ...],
    ) -> _StackPlan:
        """Per target its stacked rows; all their A pages in one index; each column's slot
        and scaling per layer (0 past the layer's rank), targets side by side: (Σ rows,)
        int32 and (num_layers, Σ rows) float32."""
        tables = meta.tables
        stacked = tuple(
            stacked_rows(
                tables.a_pages[LINEAR_TARGETS[t]], tables.b_pages[LINEAR_TARGETS[t]], slots, list(r)
            )
            for t, r in zip(ts, rows, strict=True)
        )
        column_slots: list[int] = []
        column_coefs: list[list[float]] = []  # per column, per layer
        for t, target_rows in zip(ts, rows, strict=True):
            for slot, num_rows in zip(slots, target_rows, strict=True):
                per_layer = [
                    (r[t], s[t]) for r, s in zip(meta.ranks[slot], meta.scalings[slot], strict=True)
                ]
                for j in range(num_rows):
                    column_slots.append(slot)
                    column_coefs.append([s if j < r else 0.0 for r, s in per_layer])
        device = tables.ranks.device
        num_layers = len(meta.ranks[slots[0]]) if slots else 0
        coefs = torch.tensor(column_coefs, dtype=torch.float32).reshape(
            len(column_slots), num_layers
        )
        a_index = torch.cat([s.a_index for s in stacked])
        return (
            stacked,
            a_index,
            torch.tensor(column_slots, dtype=torch.int32).to(device),
            coefs.T.contiguous().to(device),
        )


class TritonLora(LoraBackend):
    """The GPU path: segmented (SGMV) shrink and expand over the sorted segments, one launch
    of each per pass for a target or for all of a packed projection's slices."""

    name = "triton"
    needs_device_passes = True

    def apply(
        self,
        meta: LoraMetadata,
        pool: torch.Tensor,
        layer: int,
        target: str,
        x: torch.Tensor,
        out: torch.Tensor,
    ) -> None:
        assert meta.passes is not None, "the triton backend needs the device passes"
        tables = meta.tables
        t = TARGET_INDEX[target]
        ranks = tables.ranks[:, layer, t]
        scalings = tables.scalings[:, layer, t]
        a_pages, b_pages = tables.a_pages[target], tables.b_pages[target]
        for p in meta.passes:
            starts, adapters, longest = p.seg_starts, p.seg_adapters, p.max_seg_len
            y = kernels.lora_shrink_sgmv(
                x, pool, a_pages, ranks, starts, adapters, meta.max_rank, longest
            )
            if p.token_weights is not None:
                y.mul_(p.token_weights)
            kernels.lora_expand_sgmv(
                y, pool, b_pages, ranks, scalings, starts, adapters, out, longest
            )

    def apply_packed(
        self,
        meta: LoraMetadata,
        pool: torch.Tensor,
        layer: int,
        targets: tuple[str, ...],
        x: torch.Tensor,
        out: torch.Tensor,
        column_offsets: tuple[int, ...],
    ) -> None:
        assert meta.passes is not None, "the triton backend needs the device passes"
        ranks, scalings, a_pages, b_pages = packed_views(meta.tables, layer, targets)
        for p in meta.passes:
            starts, adapters, longest = p.seg_starts, p.seg_adapters, p.max_seg_len
            y = kernels.lora_shrink_sgmv_packed(
                x, pool, a_pages, ranks, starts, adapters, meta.max_rank, longest
            )  # (num_tokens, num_slices · max_rank)
            if p.token_weights is not None:
                y.mul_(p.token_weights)
            kernels.lora_expand_sgmv_packed(
                y, pool, b_pages, ranks, scalings, starts, adapters, out, column_offsets, longest
            )


def packed_views(
    tables: LoraTables, layer: int, targets: tuple[str, ...]
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """What the packed segmented ops take for ``targets`` (consecutive in :data:`LINEAR_TARGETS`) in
    ``layer``: (max_slots, num_slices) views of the ranks and scalings (the slices' columns of
    the per-layer tables), and each slice's A and Bᵀ page tables."""
    t = TARGET_INDEX[targets[0]]
    end = t + len(targets)
    assert LINEAR_TARGETS[t:end] == targets, f"{targets} are not consecutive in {LINEAR_TARGETS}"
    return (
        tables.ranks[:, layer, t:end],
        tables.scalings[:, layer, t:end],
        [tables.a_pages[target] for target in targets],
        [tables.b_pages[target] for target in targets],
    )


# Factories: each engine gets its own backend (the CPU one caches views of its pool).
LORA_BACKENDS: dict[str, Callable[[], LoraBackend]] = {"torch": TorchLora, "triton": TritonLora}
