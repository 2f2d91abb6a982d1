"""Turns a :class:`SchedulerOutput` into tensors, runs the model and samples.

The runner sees only the step's plain description; it never reads scheduler or request
state. It lays the batch out decodes first (chunks of one token), then prefill chunks,
which is the layout :class:`engine.attention.AttentionMetadata` describes.
"""

from __future__ import annotations

import torch

from engine.attention import AttentionMetadata
from engine.batch import ScheduledChunk, SchedulerOutput
from engine.model import CausalLM
from engine.sampler import Sampler


class ModelRunner:
    """Executes one scheduled step on the model.

    Args:
        model: the loaded model.
        pools: the page pool's per-layer tensors.
        sampler: picks next tokens from logits.
    """

    def __init__(self, model: CausalLM, pools: list[torch.Tensor], sampler: Sampler) -> None:
        self.model = model
        self.pools = pools
        self.sampler = sampler
        self.device = pools[0].device

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> dict[str, int]:
        """Run the step; return the sampled token of each chunk that samples."""
        chunks = sorted(output.chunks, key=lambda c: c.num_tokens != 1)  # decodes first
        input_ids, positions, meta = self._prepare(chunks)
        hidden = self.model(input_ids, positions, meta, self.pools)
        sampling = [c for c in chunks if c.sample]
        if not sampling:
            return {}
        last = torch.tensor(_last_token_indices(chunks), device=self.device)
        logits = self.model.compute_logits(hidden[last])
        tokens = self.sampler(logits, sampling)
        return {c.request_id: t for c, t in zip(sampling, tokens, strict=True)}

    def _prepare(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        ids: list[int] = []
        positions: list[int] = []
        new_k: list[int] = []
        new_v: list[int] = []
        for c in chunks:
            ids.extend(c.token_ids)
            positions.extend(range(c.start_pos, c.seq_len))
            new_k.extend(c.k_slots[c.start_pos :])
            new_v.extend(c.v_slots[c.start_pos :])
        num_decodes = sum(1 for c in chunks if c.num_tokens == 1)
        decodes, prefills = chunks[:num_decodes], chunks[num_decodes:]
        cu_seqlens = [0]
        for c in prefills:
            cu_seqlens.append(cu_seqlens[-1] + c.num_tokens)
        dev = self.device
        long = torch.long
        meta = AttentionMetadata(
            new_k_slots=torch.tensor(new_k, dtype=long, device=dev),
            new_v_slots=torch.tensor(new_v, dtype=long, device=dev),
            num_decodes=num_decodes,
            decode_seq_lens=self._int32([c.seq_len for c in decodes]),
            decode_k_slots=self._table([c.k_slots for c in decodes]),
            decode_v_slots=self._table([c.v_slots for c in decodes]),
            prefill_cu_seqlens=self._int32(cu_seqlens),
            prefill_seq_lens=self._int32([c.seq_len for c in prefills]),
            prefill_k_slots=self._table([c.k_slots for c in prefills]),
            prefill_v_slots=self._table([c.v_slots for c in prefills]),
        )
        return (
            torch.tensor(ids, dtype=long, device=dev),
            torch.tensor(positions, dtype=long, device=dev),
            meta,
        )

    def _int32(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=self.device)

    def _table(self, rows: list[list[int]]) -> torch.Tensor:
        """Pad page lists into a (num_rows, max_len) int32 table; padding is never read."""
        width = max((len(r) for r in rows), default=0)
        flat = [page for r in rows for page in (*r, *[0] * (width - len(r)))]
        return self._int32(flat).view(len(rows), width)


def _last_token_indices(chunks: list[ScheduledChunk]) -> list[int]:
    """Row of each sampling chunk's last token in the packed batch."""
    indices, offset = [], 0
    for c in chunks:
        offset += c.num_tokens
        if c.sample:
            indices.append(offset - 1)
    return indices
