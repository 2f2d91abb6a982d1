"""The LoRA path of a tensor-parallel worker: S-LoRA's partition, one all-reduce per layer.

Each worker holds ``A[:, part(in)]`` and ``B[part(out), :]`` of every adapter matrix
(`engine/parallel/sharding.py`), in pages 1/N as wide as one device's. Per target layer (or per
packed projection, all its slices at once) and pass:

    shrink      y_local = x_in · A_localᵀ                 (tokens, slices · max_rank), float32
    all-reduce  y = Σ_workers y_local                     tokens · slices · max_rank values
    expand      out[:, cols] += s · round(y) · B_localᵀ    the worker's own columns

where ``x_in`` is the worker's part of the input: ``x[:, part(hidden)]`` for the
column-parallel q, k, v, gate and up (whose input every worker has whole), ``x`` itself for
the row-parallel o and down (whose input is already the worker's part); and ``cols`` is the
whole local output for column-parallel targets, ``part(hidden)`` of the partial output for
row-parallel ones (the base layer's all-reduce then sums the N parts into place).

S-LoRA splits A of a column-parallel layer along its rank instead and all-gathers the
(tokens, r) intermediate; splitting along the input costs an all-reduce of the same size
(twice the bytes of an all-gather on a ring) but works for every rank, rank 1 and uneven
rank patterns included, and keeps each worker's pages at exactly 1/N. Both are small beside
the base layer's own all-reduce of (tokens, hidden): r ≤ 64 against thousands.

The shrink and expand are the segmented ops of `kernels/lora.py`: the Triton kernels on a
GPU, their torch references on the CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.lora import TARGET_INDEX, LoraBackend, LoraMetadata, packed_views
from engine.parallel.group import Collectives
from engine.parallel.sharding import ROW_PARALLEL
from kernels import lora as kernels


class ShardedLora(LoraBackend):
    """Segmented shrink, all-reduce of the rank-sized intermediate, segmented expand.

    Args:
        collectives: the worker's group.
        hidden_size: the model's hidden size (row-parallel outputs are split along it).
        triton: the Triton kernels (GPUs) rather than the torch references.
    """

    name = "sharded"
    needs_device_passes = True

    def __init__(self, collectives: Collectives, hidden_size: int, triton: bool) -> None:
        self.collectives = collectives
        self.hidden_part = collectives.shard.part(hidden_size)
        self.ops: Any = (
            (kernels.lora_shrink_sgmv_packed, kernels.lora_expand_sgmv_packed)
            if triton
            else (_no_checks(kernels.lora_shrink_sgmv_packed_ref),
                  _no_checks(kernels.lora_expand_sgmv_packed_ref))
        )  # fmt: skip

    def apply(
        self,
        meta: LoraMetadata,
        pool: torch.Tensor,
        layer: int,
        target: str,
        x: torch.Tensor,
        out: torch.Tensor,
    ) -> None:
        if target in ROW_PARALLEL:  # x is the worker's part; its columns of the partial sum
            columns = out[:, self.hidden_part]
            self._apply(meta, pool, layer, (target,), x, columns, (0, columns.shape[1]))
        else:
            self.apply_packed(meta, pool, layer, (target,), x, out, (0, out.shape[1]))

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
        # Column-parallel: every worker has x whole; each shrinks its part of the features.
        x_part = x[:, self.hidden_part].contiguous()
        self._apply(meta, pool, layer, targets, x_part, out, column_offsets)

    def _apply(
        self,
        meta: LoraMetadata,
        pool: torch.Tensor,
        layer: int,
        targets: tuple[str, ...],
        x: torch.Tensor,
        out: torch.Tensor,
        column_offsets: tuple[int, ...],
    ) -> None:
        assert meta.passes is not None, "the sharded backend needs the device passes"
        t = TARGET_INDEX[targets[0]]
        if not any(r > 0 for rs in meta.ranks.values() for r in rs[layer][t : t + len(targets)]):
            return  # no adapter of the batch touches these targets here (every worker agrees)
        ranks, scalings, a_pages, b_pages = packed_views(meta.tables, layer, targets)
        shrink, expand = self.ops
        for p in meta.passes:
            starts, adapters, longest = p.seg_starts, p.seg_adapters, p.max_seg_len
            y = shrink(x, pool, a_pages, ranks, starts, adapters, meta.max_rank, longest)
            y = self.collectives.all_reduce(y, "lora")  # every worker's part of x · Aᵀ, summed
            if p.token_weights is not None:
                y.mul_(p.token_weights)
            expand(
                y, pool, b_pages, ranks, scalings, starts, adapters, out, column_offsets, longest
            )


def _no_checks(op: Any) -> Any:
    """A reference op without its value checks (the engine builds its metadata itself)."""

    def run(*args: Any) -> Any:
        return op(*args, validate=False)

    return run
