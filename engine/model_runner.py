"""Turns a :class:`SchedulerOutput` into tensors, runs the model and samples.

The runner sees only the step's plain description; it never reads scheduler or request
state. It lays the batch out decodes first (chunks of one token), then prefill chunks,
which is the layout :class:`engine.attention.AttentionMetadata` describes.
"""

from __future__ import annotations

import torch

from adapters.residency import LoraTables
from engine.attention import AttentionMetadata
from engine.batch import ChunkResult, ScheduledChunk, SchedulerOutput
from engine.forward_batch import ForwardBatch
from engine.lora import LoraMetadata, LoraPass
from engine.model import CausalLM
from engine.sampler import Sampler, token_logprobs
from engine.slot_tables import SlotTables


class ModelRunner:
    """Executes one scheduled step on the model.

    Args:
        model: the loaded model.
        pools: the page pool's per-layer tensors.
        sampler: picks next tokens from logits.
        slot_tables: the runner's copy of each running request's page table.
        lora_tables: where resident adapters' weights are (written by the residency).
    """

    def __init__(
        self,
        model: CausalLM,
        pools: list[torch.Tensor],
        sampler: Sampler,
        slot_tables: SlotTables,
        lora_tables: LoraTables,
    ) -> None:
        self.model = model
        self.pools = pools
        self.sampler = sampler
        self.slot_tables = slot_tables
        self.lora_tables = lora_tables
        self.device = pools[0].device

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> dict[str, ChunkResult]:
        """Run the step; return what each chunk produced (a token, log-probabilities)."""
        self.slot_tables.release(output.finished_ids + output.preempted_ids)
        if output.is_empty:
            return {}
        chunks = sorted(output.chunks, key=lambda c: c.num_tokens != 1)  # decodes first
        input_ids, positions, meta = self._prepare(chunks)
        batch = ForwardBatch(meta, self.pools, self._lora_metadata(chunks, meta.num_decodes))
        hidden = self.model(input_ids, positions, batch)
        results = self._prompt_logprobs(chunks, hidden)
        sampling = [c for c in chunks if c.sample]
        if not sampling:
            return results
        last = torch.tensor(_last_token_indices(chunks), device=self.device)
        logits = self.model.compute_logits(hidden[last])
        tokens = self.sampler(logits, sampling)
        for row, (chunk, token) in enumerate(zip(sampling, tokens, strict=True)):
            k = chunk.params.logprobs
            logprob = None if k is None else token_logprobs(logits[row : row + 1], [token], k)[0]
            previous = results.get(chunk.request_id, ChunkResult())
            results[chunk.request_id] = ChunkResult(token, logprob, previous.prompt_logprobs)
        return results

    def _prompt_logprobs(
        self, chunks: list[ScheduledChunk], hidden: torch.Tensor
    ) -> dict[str, ChunkResult]:
        """Log-probabilities of the prompt tokens that chunks asking for them predict."""
        results = {}
        offset = 0
        for c in chunks:
            if c.prompt_targets and c.params.prompt_logprobs is not None:
                rows = hidden[offset : offset + len(c.prompt_targets)]
                logits = self.model.compute_logits(rows)
                entries = token_logprobs(logits, list(c.prompt_targets), c.params.prompt_logprobs)
                results[c.request_id] = ChunkResult(prompt_logprobs=entries)
            offset += c.num_tokens
        return results

    def _prepare(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        rows = self.slot_tables.write(chunks)
        ids: list[int] = []
        positions: list[int] = []
        new_k: list[int] = []
        new_v: list[int] = []
        for c in chunks:
            ids.extend(c.token_ids)
            positions.extend(range(c.start_pos, c.seq_len))
            new_k.extend(c.new_k_slots)
            new_v.extend(c.new_v_slots)
        nd = sum(1 for c in chunks if c.num_tokens == 1)
        decodes, prefills = chunks[:nd], chunks[nd:]
        cu_seqlens = [0]
        for c in prefills:
            cu_seqlens.append(cu_seqlens[-1] + c.num_tokens)
        decode_k, decode_v = self._tables(rows[:nd], decodes)
        prefill_k, prefill_v = self._tables(rows[nd:], prefills)
        dev, long = self.device, torch.long
        meta = AttentionMetadata(
            new_k_slots=torch.tensor(new_k, dtype=long, device=dev),
            new_v_slots=torch.tensor(new_v, dtype=long, device=dev),
            num_decodes=nd,
            decode_seq_lens=self._int32([c.seq_len for c in decodes]),
            decode_k_slots=decode_k,
            decode_v_slots=decode_v,
            prefill_cu_seqlens=self._int32(cu_seqlens),
            prefill_seq_lens=self._int32([c.seq_len for c in prefills]),
            prefill_k_slots=prefill_k,
            prefill_v_slots=prefill_v,
        )
        return (
            torch.tensor(ids, dtype=long, device=dev),
            torch.tensor(positions, dtype=long, device=dev),
            meta,
        )

    def _lora_metadata(self, chunks: list[ScheduledChunk], nd: int) -> LoraMetadata | None:
        """Each token's adapter slots and weights, or None when no chunk uses an adapter."""
        max_rank = max(c.adapter_rank for c in chunks)
        if max_rank == 0:
            return None
        prefills = chunks[nd:]
        seg_starts = [0]
        for c in prefills:
            seg_starts.append(seg_starts[-1] + c.num_tokens)
        num_passes = max(len(c.adapter_slots) for c in chunks)
        passes = []
        for i in range(num_passes):
            slots = [c.adapter_slots[i] if i < len(c.adapter_slots) else -1 for c in chunks]
            weights = [c.adapter_weights[i] if i < len(c.adapter_weights) else 0.0 for c in chunks]
            token_weights = None
            if any(w != 1.0 for w, s in zip(weights, slots, strict=True) if s >= 0):
                per_token = [
                    w for c, w in zip(chunks, weights, strict=True) for _ in range(c.num_tokens)
                ]
                token_weights = torch.tensor(per_token, dtype=torch.float32, device=self.device)
            passes.append(LoraPass(self._int32(slots[:nd]), self._int32(slots[nd:]), token_weights))
        return LoraMetadata(
            num_decodes=nd,
            passes=tuple(passes),
            seg_starts=self._int32(seg_starts),
            max_rank=max_rank,
            max_seg_len=max((c.num_tokens for c in prefills), default=0),
            tables=self.lora_tables,
        )

    def _int32(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=self.device)

    def _tables(
        self, rows: list[int], chunks: list[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V tables of ``chunks``, as wide as the longest of them."""
        width = max((c.seq_len for c in chunks), default=0)
        return self.slot_tables.gather(rows, width)


def _last_token_indices(chunks: list[ScheduledChunk]) -> list[int]:
    """Row of each sampling chunk's last token in the packed batch."""
    indices, offset = [], 0
    for c in chunks:
        offset += c.num_tokens
        if c.sample:
            indices.append(offset - 1)
    return indices
