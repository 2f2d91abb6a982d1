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
class LoraPass:
    """One component of each token's adapter: the first pass carries every request's adapter
    (or the first component of its mixture), later passes the further components of mixtures.

    Attributes:
        token_adapters: (num_decodes,) int32 adapter slot of each decode token, -1 = none.
        seg_adapters: (num_prefills,) int32 adapter slot of each prefill chunk, -1 = none.
        token_weights: (num_tokens,) float32 mixture weight of each token's component, or
            None when every weight of the pass is 1.
    """

    token_adapters: torch.Tensor
    seg_adapters: torch.Tensor
    token_weights: torch.Tensor | None = None


@dataclass(frozen=True)
class LoraMetadata:
    """Which adapter (or adapters, for a mixture) each token of this forward uses.

    The batch is laid out decodes first, as in :class:`engine.attention.AttentionMetadata`.
    A mixture y = Wx + Σᵢ wᵢ·sᵢ·Bᵢ(Aᵢx) runs one pass per component: pass i shrinks with
    the i-th component's A for every token that has one, scales the result by wᵢ, and
    expands with its B. Batches without mixtures run one pass.

    Attributes:
        num_decodes: leading tokens that are one-token decodes.
        passes: one or more :class:`LoraPass`.
        seg_starts: (num_prefills + 1,) int32 offsets of each prefill chunk among the
            prefill tokens.
        max_rank: the largest rank among this batch's adapters (the kernels' tile).
        max_seg_len: the longest prefill chunk (sizes the segmented kernels' grid without
            reading ``seg_starts`` back from the device).
        tables: the residency's page tables.
    """

    num_decodes: int
    passes: tuple[LoraPass, ...]
    seg_starts: torch.Tensor
    max_rank: int
    max_seg_len: int
    tables: LoraTables

    @property
    def num_prefills(self) -> int:
        return int(self.seg_starts.shape[0]) - 1


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
        nd, max_rank, max_seg = meta.num_decodes, meta.max_rank, meta.max_seg_len
        for p in meta.passes:
            weights = None if p.token_weights is None else p.token_weights.view(-1, 1)
            if nd:
                y = self.shrink_bgmv(x[:nd], pool, a_pages, ranks, p.token_adapters, max_rank)
                if weights is not None:
                    y.mul_(weights[:nd])
                self.expand_bgmv(y, pool, b_pages, ranks, scalings, p.token_adapters, out[:nd])
            if meta.num_prefills:
                starts, adapters = meta.seg_starts, p.seg_adapters
                y = self.shrink_sgmv(
                    x[nd:], pool, a_pages, ranks, starts, adapters, max_rank, max_seg
                )
                if weights is not None:
                    y.mul_(weights[nd:])
                self.expand_sgmv(
                    y, pool, b_pages, ranks, scalings, starts, adapters, out[nd:], max_seg
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
