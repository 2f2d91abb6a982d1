"""The LoRA path of a mixed-adapter batch: ``out += scaling · (x · Aᵀ) · Bᵀ`` per request.

The base matmul runs once for the whole batch (the model's own linear layer); then, for each
target layer, the LoRA backend adds every row's own adapter's update, reading adapter
weights straight from the page pool. A packed projection (q, k and v as one matmul; gate and
up) hands the backend all its slices at once, each a target of its own (an adapter targets
q_proj, never "qkv_proj"), with the columns of the packed output that are that target's.
The runner lays each step's rows out **grouped by adapter** (decodes first, then prefill
chunks, each part sorted by adapter), so every adapter's rows form at most a few contiguous
segments; :class:`LoraMetadata` lists them.

This module holds what every backend shares: the step's adapter assignment
(:class:`LoraMetadata`, :class:`LoraPass`) and the :class:`LoraBackend` ABC. The backends
live apart, and the registry by name in `engine/lora_backends.py`:

* ``torch`` (the CPU path, `engine/lora_torch.py`): each distinct adapter's A and Bᵀ are
  gathered once per target and layer, never per token; then either one pair of matmuls per
  segment or, where dispatch dominates, one stacked pair for the whole batch
  (`kernels/lora_grouped.py`; a cost model picks per target and step).
* ``triton`` (`engine/lora_triton.py`): the segmented (SGMV) shrink and expand kernels over
  the sorted segments, one shrink and one expand launch per layer and pass for a packed
  projection's slices.

A batch with no adapter request skips all of it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import torch

from adapters.base_layout import LINEAR_TARGETS
from adapters.lora_tables import LoraTables
from kernels.lora_grouped import Segment

TARGET_INDEX = {name: i for i, name in enumerate(LINEAR_TARGETS)}


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
        row_slots: per pass, each row's adapter slot (-1: none) and weight, on the host.
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
