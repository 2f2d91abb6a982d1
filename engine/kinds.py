"""What adapter kinds beyond LoRA add to a forward, reading their rows from the page pool.

`adapters/weights.py` lists each kind's rows (a :class:`~adapters.weights.RowBlock` per
module or per adapter) and the residency places them in pool pages (``LoraTables.blocks``:
per slot, each block's pages). The runner lays a step's rows out grouped by adapter, so each
adapter's rows are a few contiguous runs; :class:`KindMetadata` lists, per block key, the
runs of rows whose adapter has that block. The model calls the functions here at each
linear layer, after the base matmul and the LoRA path:

Semantics (rows ``lo:hi`` of one adapter; ``out`` the layer's output columns of one target,
``b`` their bias or 0, vectors read from the pool in this layer):
    DoRA          out[lo:hi] = g ⊙ (out[lo:hi] − b) + b        (g = m / ‖W + s·B·A‖)
    IA³ (output)  out[lo:hi] = out[lo:hi] ⊙ l
    IA³ (input)   x[lo:hi] ⊙ l before the layer's matmul (a packed layer's slice: that
                  slice's columns recomputed for those rows, ``W_s (x ⊙ l) + b_s``)
Rows of other adapters are never touched, so a plain LoRA row computes exactly what it
would in a batch of its own. These are plain torch ops on any device; a step with such an
adapter runs eagerly (never a captured decode graph).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adapters.lora_tables import BlockTable, LoraTables
from engine.scheduler_output import ScheduledChunk
from kernels.lora import read_rows

# A packed layer's slice s recomputed for some rows: (x rows, s) -> (rows, slice width).
SliceForward = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class KindMetadata:
    """Which rows of this forward use an adapter with rows besides LoRA, and where those
    rows are in the pool. Built by the runner once per step from host data.

    Attributes:
        runs: block key (``"dora:q_proj"``, ``"ia3_in:down_proj"``, ...) to the runs
            ``(slot, lo, hi)`` of rows whose adapter has that block.
        blocks: per slot of those adapters, its block tables.
        cache: values read from the pool, keyed by what they are (a vector of one slot in
            one layer, a spread matrix of one slot): read once per step, and kept across
            steps where the runner passes the same dict (on the CPU, while the tables'
            generation is unchanged, so no slot's rows have moved or changed).
    """

    runs: dict[str, list[tuple[int, int, int]]]
    blocks: dict[int, dict[str, BlockTable]]
    cache: dict[Any, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def build(
        cls,
        chunks: Sequence[ScheduledChunk],
        tables: LoraTables,
        cache: dict[Any, Any] | None = None,
    ) -> KindMetadata | None:
        """From the step's chunks in row order; None when no adapter of the step has rows
        besides LoRA (a mixture's components are LoRA by construction)."""
        runs: dict[str, list[tuple[int, int, int]]] = {}
        blocks: dict[int, dict[str, BlockTable]] = {}
        lo = 0
        for c in chunks:
            hi = lo + c.num_tokens
            if len(c.adapter_slots) == 1 and tables.blocks[c.adapter_slots[0]]:
                slot = c.adapter_slots[0]
                blocks[slot] = tables.blocks[slot]
                for key in blocks[slot]:
                    key_runs = runs.setdefault(key, [])
                    if key_runs and key_runs[-1][0] == slot and key_runs[-1][2] == lo:
                        key_runs[-1] = (slot, key_runs[-1][1], hi)
                    else:
                        key_runs.append((slot, lo, hi))
            lo = hi
        return cls(runs, blocks, {} if cache is None else cache) if blocks else None

    def vector(self, pool: torch.Tensor, layer: int, slot: int, key: str) -> torch.Tensor:
        """The one row of block ``key`` of ``slot``'s adapter in this layer, (features,)."""
        cache_key = (layer, slot, key)
        hit = self.cache.get(cache_key)
        if hit is None:
            table = self.blocks[slot][key]
            features = table.pages.shape[1] * pool.shape[1]
            hit = read_rows(pool, table.pages[:1].to(pool.device), features)[0]
            self.cache[cache_key] = hit
        return hit  # type: ignore[no-any-return]


def scale_input(
    meta: KindMetadata, pool: torch.Tensor, layer: int, target: str, x: torch.Tensor
) -> torch.Tensor:
    """``x`` with IA³'s input scaling of ``target`` applied to its adapters' rows (a copy
    when any row changes; ``x`` itself otherwise). For an unpacked layer, before its
    matmul."""
    runs = meta.runs.get(f"ia3_in:{target}")
    if not runs:
        return x
    x = x.clone()
    features = x.shape[1]
    for slot, lo, hi in runs:
        x[lo:hi] *= meta.vector(pool, layer, slot, f"ia3_in:{target}")[:features]
    return x


def adjust_output(
    meta: KindMetadata,
    pool: torch.Tensor,
    layer: int,
    target: str,
    out: torch.Tensor,
    bias: torch.Tensor | None,
) -> None:
    """DoRA's and IA³'s output scaling of ``target`` on its adapters' rows of ``out`` (the
    target's columns, LoRA already added), in place."""
    features = out.shape[1]
    for slot, lo, hi in meta.runs.get(f"dora:{target}", ()):
        g = meta.vector(pool, layer, slot, f"dora:{target}")[:features]
        rows = out[lo:hi]
        if bias is None:
            rows.mul_(g)
        else:
            rows.sub_(bias).mul_(g).add_(bias)
    for slot, lo, hi in meta.runs.get(f"ia3_out:{target}", ()):
        out[lo:hi] *= meta.vector(pool, layer, slot, f"ia3_out:{target}")[:features]


def adjust_packed(
    meta: KindMetadata,
    pool: torch.Tensor,
    layer: int,
    targets: tuple[str, ...],
    x: torch.Tensor,
    out: torch.Tensor,
    column_offsets: tuple[int, ...],
    bias: torch.Tensor | None,
    slice_forward: SliceForward,
) -> None:
    """:func:`adjust_output` for each slice of a packed layer, and IA³'s input scaling of a
    slice (its columns recomputed from the scaled input for those rows), in place."""
    for s, (target, (lo_col, hi_col)) in enumerate(
        zip(targets, itertools.pairwise(column_offsets), strict=True)
    ):
        columns = out[:, lo_col:hi_col]
        key = f"ia3_in:{target}"
        for slot, lo, hi in meta.runs.get(key, ()):
            scaled = x[lo:hi] * meta.vector(pool, layer, slot, key)[: x.shape[1]]
            columns[lo:hi] = slice_forward(scaled, s)
        slice_bias = None if bias is None else bias[lo_col:hi_col]
        adjust_output(meta, pool, layer, target, columns, slice_bias)
