"""The GPU LoRA backend: the segmented (SGMV) shrink and expand kernels over the step's sorted
segments, one shrink and one expand launch per layer and pass for a packed projection's
slices (`kernels/lora_shrink.py`, `kernels/lora_expand.py`)."""

from __future__ import annotations

import torch

from engine.lora import TARGET_INDEX, LoraBackend, LoraMetadata, packed_views
from kernels import lora as kernels


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
