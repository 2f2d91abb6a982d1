"""The CPU LoRA backend: each distinct adapter's A and Bᵀ gathered once per target and layer
(never per token), then either one pair of matmuls per segment or, where dispatch dominates,
one stacked pair for the whole batch (`kernels/lora_grouped.py`; a cost model picks per
target and step)."""

from __future__ import annotations

import itertools
from typing import Any

import torch

from adapters.base_layout import LINEAR_TARGETS
from engine.lora import TARGET_INDEX, LoraBackend, LoraMetadata
from kernels.lora_grouped import (
    StackedRows,
    choose_form,
    lora_grouped,
    lora_stacked,
    lora_stacked_packed,
    read_adapter,
    stacked_coefficients,
    stacked_rows,
)

# Stacked rows per target, all their A pages, each column's slot and per-layer scaling.
_StackPlan = tuple[tuple[StackedRows, ...], torch.Tensor, torch.Tensor, torch.Tensor]
_MAX_VIEWS = 1 << 16  # cached adapter views (small objects; cleared when full)


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
