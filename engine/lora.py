"""The LoRA path of a mixed-adapter batch: ``out += scaling · (x · Aᵀ) · Bᵀ`` per request.

The base matmul runs once for the whole batch (the model's own ``nn.Linear``); then, for each
target layer, a **shrink** kernel computes ``x · Aᵀ`` and an **expand** kernel accumulates
``scaling · y · Bᵀ`` into the base output, each reading every request's adapter pages
straight from the page pool. Decode tokens (one per request) use the per-token (BGMV) form;
prefill chunks use the segmented (SGMV) form, one segment per chunk. A batch with no adapter
request skips all of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from adapters.residency import TARGETS, LoraTables
from kernels import lora as kernels

TARGET_INDEX = {name: i for i, name in enumerate(TARGETS)}


@dataclass(frozen=True)
class LoraMetadata:
    """Which adapter each token of this forward uses.

    The batch is laid out decodes first, as in :class:`engine.attention.AttentionMetadata`.

    Attributes:
        num_decodes: leading tokens that are one-token decodes.
        token_adapters: (num_decodes,) int32 adapter slot of each decode token, -1 = none.
        seg_starts: (num_prefills + 1,) int32 offsets of each prefill chunk among the
            prefill tokens.
        seg_adapters: (num_prefills,) int32 adapter slot of each prefill chunk, -1 = none.
        max_rank: the largest rank among this batch's adapters (the kernels' tile).
        max_seg_len: the longest prefill chunk (sizes the segmented kernels' grid without
            reading ``seg_starts`` back from the device).
        tables: the residency's page tables.
    """

    num_decodes: int
    token_adapters: torch.Tensor
    seg_starts: torch.Tensor
    seg_adapters: torch.Tensor
    max_rank: int
    max_seg_len: int
    tables: LoraTables

    @property
    def num_prefills(self) -> int:
        return int(self.seg_adapters.shape[0])


Shrink = Callable[..., torch.Tensor]
Expand = Callable[..., None]


@dataclass(frozen=True)
class LoraBackend:
    """The four LoRA ops (see ``kernels/lora.py`` for their math), by implementation."""

    name: str
    shrink_bgmv: Shrink
    expand_bgmv: Expand
    shrink_sgmv: Shrink
    expand_sgmv: Expand

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
        tables = meta.tables
        t = TARGET_INDEX[target]
        ranks = tables.ranks[:, layer, t]
        scalings = tables.scalings[:, layer, t]
        a_pages, b_pages = tables.a_pages[target], tables.b_pages[target]
        nd = meta.num_decodes
        if nd:
            y = self.shrink_bgmv(x[:nd], pool, a_pages, ranks, meta.token_adapters, meta.max_rank)
            self.expand_bgmv(y, pool, b_pages, ranks, scalings, meta.token_adapters, out[:nd])
        if meta.num_prefills:
            seg_starts, seg_adapters = meta.seg_starts, meta.seg_adapters
            y = self.shrink_sgmv(
                x[nd:],
                pool,
                a_pages,
                ranks,
                seg_starts,
                seg_adapters,
                meta.max_rank,
                meta.max_seg_len,
            )
            self.expand_sgmv(
                y,
                pool,
                b_pages,
                ranks,
                scalings,
                seg_starts,
                seg_adapters,
                out[nd:],
                meta.max_seg_len,
            )


LORA_BACKENDS: dict[str, LoraBackend] = {
    # The references, without the value checks: the runner builds the metadata itself.
    "torch": LoraBackend(
        "torch",
        partial(kernels.lora_shrink_bgmv_ref, validate=False),
        partial(kernels.lora_expand_bgmv_ref, validate=False),
        partial(kernels.lora_shrink_sgmv_ref, validate=False),
        partial(kernels.lora_expand_sgmv_ref, validate=False),
    ),
    "triton": LoraBackend(
        "triton",
        kernels.lora_shrink_bgmv,
        kernels.lora_expand_bgmv,
        kernels.lora_shrink_sgmv,
        kernels.lora_expand_sgmv,
    ),
}
