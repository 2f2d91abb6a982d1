"""Paged attention as the model sees it: per-forward metadata and the backend that runs it.

A batch is laid out decodes first: the first ``num_decodes`` tokens each belong to a
different sequence with one new token; the remaining tokens are prefill chunks, packed.
The backend is a variation point (a pair of ops plus a registry): the torch references run on
the CPU, the Triton kernels on a GPU (or under the Triton interpreter in tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kernels import paged_attention as kernels


@dataclass(frozen=True)
class AttentionMetadata:
    """Where this forward's tokens read and write the KV cache.

    Attributes:
        new_k_pages: (num_tokens,) the page each new token's K is written to.
        new_v_pages: (num_tokens,) the page each new token's V is written to.
        num_decodes: how many leading tokens are single-token decodes.
        decode_seq_lens: (num_decodes,) int32 context length including the new token.
        decode_k_pages: (num_decodes, max_len) int32 K page of every position.
        decode_v_pages: (num_decodes, max_len) int32 V page of every position.
        prefill_cu_seqlens: (num_prefills + 1,) int32 offsets of each chunk among the
            prefill tokens.
        prefill_seq_lens: (num_prefills,) int32 context length after the chunk.
        prefill_k_pages: (num_prefills, max_len) int32.
        prefill_v_pages: (num_prefills, max_len) int32.
        cache: what a backend derives from this metadata once and reuses in every layer.
    """

    new_k_pages: torch.Tensor
    new_v_pages: torch.Tensor
    num_decodes: int
    decode_seq_lens: torch.Tensor
    decode_k_pages: torch.Tensor
    decode_v_pages: torch.Tensor
    prefill_cu_seqlens: torch.Tensor
    prefill_seq_lens: torch.Tensor
    prefill_k_pages: torch.Tensor
    prefill_v_pages: torch.Tensor
    cache: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def num_prefills(self) -> int:
        return int(self.prefill_seq_lens.shape[0])


DecodeFn = Callable[..., torch.Tensor]
PrefillFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class AttentionBackend:
    """A pair of paged-attention ops (see ``kernels/paged_attention.py`` for their math).

    Attributes:
        decode: ``(q, pool, k_pages, v_pages, seq_lens, scale, **plan) -> out``.
        prefill: ``(q, pool, k_pages, v_pages, cu_seqlens, seq_lens, scale, **plan) -> out``.
        plans: whether the ops take a ``plan`` (the torch references: their gather indices
            and masks, computed from the metadata once per forward instead of per layer).
    """

    name: str
    decode: DecodeFn
    prefill: PrefillFn
    plans: bool = False

    def forward(
        self, q: torch.Tensor, pool: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """Attention for a whole batch: ``q`` (num_tokens, num_heads, head_dim)."""
        nd = meta.num_decodes
        num_kv_heads, group = pool.shape[1], q.shape[1] // pool.shape[1]
        parts = []
        if nd:
            plan = self._plan(meta, "decode", lambda: kernels.plan_decode(
                meta.decode_k_pages, meta.decode_v_pages, meta.decode_seq_lens, num_kv_heads
            ))  # fmt: skip
            parts.append(
                self.decode(
                    q[:nd],
                    pool,
                    meta.decode_k_pages,
                    meta.decode_v_pages,
                    meta.decode_seq_lens,
                    scale,
                    **plan,
                )
            )
        if meta.num_prefills:
            plan = self._plan(meta, "prefill", lambda: kernels.plan_prefill(
                meta.prefill_k_pages, meta.prefill_v_pages, meta.prefill_cu_seqlens,
                meta.prefill_seq_lens, num_kv_heads, group,
            ))  # fmt: skip
            parts.append(
                self.prefill(
                    q[nd:],
                    pool,
                    meta.prefill_k_pages,
                    meta.prefill_v_pages,
                    meta.prefill_cu_seqlens,
                    meta.prefill_seq_lens,
                    scale,
                    **plan,
                )
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _plan(
        self, meta: AttentionMetadata, form: str, make: Callable[[], kernels.GatherPlan]
    ) -> dict[str, kernels.GatherPlan]:
        """``{"plan": ...}`` for ops that take one (made once per forward), else ``{}``."""
        if not self.plans:
            return {}
        plan = meta.cache.get(form)
        if plan is None:
            plan = meta.cache[form] = make()
        return {"plan": plan}


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    # The torch references: the CPU execution path.
    "torch": AttentionBackend(
        "torch",
        kernels.paged_decode_attention_ref,
        kernels.paged_prefill_attention_ref,
        plans=True,
    ),
    # The Triton kernels: GPUs, and the interpreter in tests.
    "triton": AttentionBackend(
        "triton", kernels.paged_decode_attention, kernels.paged_prefill_attention
    ),
}
