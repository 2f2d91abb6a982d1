"""LoRA on the input embeddings and the output head, in the forward, read from the page pool.

An adapter's embedding and head LoRA are four blocks of rows (``AdapterWeights.blocks``):
``embed_a`` (A, ``(r, vocab)``), ``embed_b`` (Bᵀ, ``(r, hidden)``), ``head_a`` (A,
``(r, hidden)``) and ``head_b`` (Bᵀ, ``(r, vocab)``), each *spread* over the layers' pools
(layer ℓ holds rows ℓ, ℓ + L, …), and the scaling ``s`` of each LoRA is its Bᵀ block's
``BlockTable.scaling``, a Python float on the host. :func:`spread_matrix` gathers a whole
matrix once per step and adapter (kept across steps on the CPU, see ``KindMetadata.cache``).

Semantics (rows ``lo:hi`` of one adapter; PEFT's order of operations, in the model's dtype,
the logits cast to float32 only afterwards, as `adapters/embed_head.py` quotes):
    embedding   x[lo:hi]      += (A[:, ids[lo:hi]]ᵀ @ Bᵀ) · s       after ``embed_tokens(ids)``
    head        logits[lo:hi] += ((h[lo:hi] @ Aᵀ) @ Bᵀ) · s         after ``lm_head(h)``
Rows of other adapters are never touched. Plain torch ops on any device; a step with such an
adapter runs eagerly (``KindMetadata`` is not None, so never a captured decode graph).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from engine.kinds import KindMetadata
from engine.virtual_tokens import gather_spread


def spread_matrix(
    meta: KindMetadata, pools: list[torch.Tensor], slot: int, key: str, features: int
) -> torch.Tensor:
    """Block ``key`` of ``slot``'s adapter read back whole, ``(rows, features)``, once per
    step (or while the cache lives: ``KindMetadata.cache``)."""
    cache_key = (slot, key)
    hit = meta.cache.get(cache_key)
    if hit is None:
        hit = gather_spread(pools, meta.blocks[slot][key], features)
        meta.cache[cache_key] = hit
    return hit  # type: ignore[no-any-return]


def add_embedding_lora(
    meta: KindMetadata,
    pools: list[torch.Tensor],
    input_ids: torch.Tensor,
    x: torch.Tensor,
    vocab_size: int,
) -> None:
    """Add each embedding-LoRA adapter's update to its rows of ``x`` (num_tokens, hidden),
    the embeddings of ``input_ids`` (num_tokens,), in place."""
    for slot, lo, hi in meta.runs.get("embed_a", ()):
        a = spread_matrix(meta, pools, slot, "embed_a", vocab_size)  # (r, vocab)
        b_t = spread_matrix(meta, pools, slot, "embed_b", x.shape[1])  # (r, hidden)
        after_a = a.t().index_select(0, input_ids[lo:hi].long())  # (rows, r)
        x[lo:hi] += (after_a @ b_t) * meta.blocks[slot]["embed_b"].scaling


@dataclass(frozen=True)
class HeadLora:
    """Which rows of one ``compute_logits`` call get which adapter's head LoRA.

    Attributes:
        meta: the step's kinds metadata (where the rows are, and the gather cache).
        pools: the page pool's per-layer tensors.
        runs: ``(slot, lo, hi)`` over the rows handed to ``compute_logits``.
    """

    meta: KindMetadata
    pools: list[torch.Tensor]
    runs: tuple[tuple[int, int, int], ...]

    @classmethod
    def for_rows(
        cls,
        meta: KindMetadata | None,
        pools: list[torch.Tensor],
        groups: Iterable[tuple[tuple[int, ...], int]],
    ) -> HeadLora | None:
        """From consecutive groups of rows, ``(adapter slots, number of rows)`` each (a
        chunk's slots and its sampled or prompt rows); None when no row has a head LoRA."""
        if meta is None:
            return None
        runs: list[tuple[int, int, int]] = []
        lo = 0
        for slots, n in groups:
            if len(slots) == 1 and "head_a" in meta.blocks.get(slots[0], {}):
                if runs and runs[-1][0] == slots[0] and runs[-1][2] == lo:
                    runs[-1] = (slots[0], runs[-1][1], lo + n)
                else:
                    runs.append((slots[0], lo, lo + n))
            lo += n
        return cls(meta, pools, tuple(runs)) if runs else None

    def add(self, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """Add each run's head LoRA to its rows of ``logits`` (rows, vocab), computed from
        ``hidden`` (rows, hidden_size), in place, in the model's dtype."""
        for slot, lo, hi in self.runs:
            a = spread_matrix(self.meta, self.pools, slot, "head_a", hidden.shape[1])
            b_t = spread_matrix(self.meta, self.pools, slot, "head_b", logits.shape[1])
            scaling = self.meta.blocks[slot]["head_b"].scaling
            logits[lo:hi] += ((hidden[lo:hi] @ a.t()) @ b_t) * scaling
