"""Turns a :class:`SchedulerOutput` into tensors, runs the model and samples.

The runner sees only the step's plain description; it never reads scheduler or request
state. It lays the batch out decodes first (chunks of one token), then prefill chunks, each
part grouped by adapter (so every adapter's rows are contiguous segments for the LoRA path),
which is the layout :class:`engine.attention.AttentionMetadata` describes. Results are keyed
by request id, so the order never leaks out. All of a step's integer metadata reaches the
device in one copy (:class:`engine.step_upload.StepUpload`). Adapters placed by the step's
schedule are written into the pool first (:class:`engine.placement.PlacementWriter`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from adapters.lora_tables import LoraTables
from engine.attention import AttentionMetadata
from engine.cuda_graph import DecodeGraphs
from engine.embed_head import HeadLora
from engine.forward_batch import ForwardBatch
from engine.kinds import KindMetadata
from engine.lora import LoraBackend, LoraMetadata, LoraPass
from engine.model import CausalLM
from engine.page_tables import PageTables
from engine.placement import PlacementWriter
from engine.sampler import Sampler, token_logprobs
from engine.scheduler_output import ChunkResult, ScheduledChunk, SchedulerOutput
from engine.step_upload import StepUpload
from kernels.lora_grouped import Segment


@dataclass(frozen=True)
class StepInputs:
    """What one forward needs besides the weights: tokens, positions and metadata."""

    input_ids: torch.Tensor  # (num_tokens,) int32
    positions: torch.Tensor  # (num_tokens,) int32
    attn: AttentionMetadata
    lora: LoraMetadata | None
    last_rows: torch.Tensor  # (num_sampling_chunks,) int32: each sampling chunk's last row


class ModelRunner:
    """Executes one scheduled step on the model.

    Args:
        model: the loaded model.
        pools: the page pool's per-layer tensors.
        sampler: picks next tokens from logits.
        page_tables: the runner's copy of each running request's page table.
        lora_tables: where resident adapters' weights are (the device tensors written here,
            by the placements of each step; the host mirrors by the residency).
        lora_backend: the model's LoRA backend (whether it needs device segments).
        graphs: the static-shape decode path (CUDA graphs), or None to run every step eagerly.
    """

    def __init__(
        self,
        model: CausalLM,
        pools: list[torch.Tensor],
        sampler: Sampler,
        page_tables: PageTables,
        lora_tables: LoraTables,
        lora_backend: LoraBackend,
        graphs: DecodeGraphs | None = None,
    ) -> None:
        self.model = model
        self.pools = pools
        self.sampler = sampler
        self.page_tables = page_tables
        self.lora_tables = lora_tables
        self.lora_backend = lora_backend
        self.graphs = graphs
        self.device = pools[0].device
        self.placements = PlacementWriter(pools, lora_tables)
        self.upload = StepUpload(self.device)
        # Token counts of penalized requests, kept from step to step (never recounted).
        self._counts: dict[str, torch.Tensor] = {}
        # On the CPU, what KindMetadata read from the pool, kept while no slot changes.
        self._kind_cache: tuple[int, dict[Any, Any]] = (-1, {})

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> dict[str, ChunkResult]:
        """Run the step; return what each chunk produced (a token, log-probabilities)."""
        self.placements.apply(
            output.placements, (s for c in output.chunks for s in c.adapter_slots)
        )
        gone = output.finished_ids + output.preempted_ids
        self.page_tables.release(gone)
        for request_id in gone:
            self._counts.pop(request_id, None)
        if output.is_empty:
            return {}
        chunks = order_by_adapter(output.chunks)
        for c in chunks:
            if c.params.penalized and c.request_id not in self._counts:
                self._counts[c.request_id] = self._initial_counts(c)
        kinds = KindMetadata.build(chunks, self.lora_tables, self._kinds_cache())
        if kinds is None and self.graphs is not None and self.graphs.accepts(chunks):
            # Every chunk is one sampling token: the hidden rows are the rows to sample.
            hidden = self.graphs.run(chunks, self.page_tables.assign(chunks))
            results: dict[str, ChunkResult] = {}
            sampled_hidden = hidden
        else:
            step = self._prepare(chunks)
            batch = ForwardBatch(step.attn, self.pools, step.lora, kinds)
            hidden = self.model(step.input_ids, step.positions, batch)
            results = self._prompt_logprobs(chunks, hidden, kinds)
            sampled_hidden = hidden.index_select(0, step.last_rows)
        sampling = [c for c in chunks if c.sample]
        if not sampling:
            return results
        head = HeadLora.for_rows(kinds, self.pools, ((c.adapter_slots, 1) for c in sampling))
        logits = self.model.compute_logits(sampled_hidden, head)
        tokens = self.sampler(logits, sampling, [self._counts.get(c.request_id) for c in sampling])
        for row, (chunk, token) in enumerate(zip(sampling, tokens, strict=True)):
            counts = self._counts.get(chunk.request_id)
            if counts is not None:
                counts[token] += 1
            k = chunk.params.logprobs
            logprob = None if k is None else token_logprobs(logits[row : row + 1], [token], k)[0]
            previous = results.get(chunk.request_id, ChunkResult())
            results[chunk.request_id] = ChunkResult(token, logprob, previous.prompt_logprobs)
        return results

    def _initial_counts(self, chunk: ScheduledChunk) -> torch.Tensor:
        """A penalized request's generated-token counts (vocab_size,) at its first chunk after
        admission, from the tokens it generated before; ``execute`` adds each new token."""
        vocab_size = self.model.arch.vocab_size
        counts = torch.zeros(vocab_size, dtype=torch.float32, device=self.device)
        if chunk.output_token_ids:
            generated = torch.tensor(chunk.output_token_ids, device=self.device)
            counts += torch.bincount(generated, minlength=vocab_size)[:vocab_size]
        return counts

    def _kinds_cache(self) -> dict[Any, Any] | None:
        """The dict ``KindMetadata`` keeps what it reads in: on the CPU the same one from
        step to step until the tables' generation changes; elsewhere a fresh one per step
        (a copy kept outside the pool would hold device memory the pool does not count)."""
        if self.device.type != "cpu":
            return None
        generation = self.lora_tables.generation[0]
        if self._kind_cache[0] != generation:
            self._kind_cache = (generation, {})
        return self._kind_cache[1]

    def _prompt_logprobs(
        self, chunks: list[ScheduledChunk], hidden: torch.Tensor, kinds: KindMetadata | None
    ) -> dict[str, ChunkResult]:
        """Log-probabilities of the prompt tokens that chunks asking for them predict."""
        results = {}
        offset = 0
        for c in chunks:
            if c.prompt_targets and c.params.prompt_logprobs is not None:
                rows = hidden[offset : offset + len(c.prompt_targets)]
                head = HeadLora.for_rows(kinds, self.pools, [(c.adapter_slots, len(rows))])
                logits = self.model.compute_logits(rows, head)
                entries = token_logprobs(logits, list(c.prompt_targets), c.params.prompt_logprobs)
                results[c.request_id] = ChunkResult(prompt_logprobs=entries)
            offset += c.num_tokens
        return results

    def _prepare(self, chunks: list[ScheduledChunk]) -> StepInputs:
        """Pack the step's integers, upload them once, and view them as the metadata."""
        rows = self.page_tables.assign(chunks)
        max_len = self.page_tables.max_len
        ids: list[int] = []
        positions: list[int] = []
        new_k: list[int] = []
        new_v: list[int] = []
        table_index: list[int] = []  # flat (row, position) entries of the page tables
        # Pages that the tables record beside the new tokens' own: a request starting on
        # cached blocks records theirs at its first chunk.
        cached = any(c.cached_k_pages for c in chunks)
        table_k: list[int] = []  # with ``cached``: the K page of every table_index entry
        table_v: list[int] = []
        last_rows: list[int] = []
        for c, row in zip(chunks, rows, strict=True):
            ids.extend(c.token_ids)
            span = range(c.start_pos, c.seq_len)
            positions.extend(span)
            base = row * max_len
            if c.cached_k_pages:  # positions 0 .. start_pos - 1 come from the prefix cache
                table_index.extend(range(base, base + c.start_pos))
                table_k.extend(c.cached_k_pages)
                table_v.extend(c.cached_v_pages)
            table_index.extend(range(base + c.start_pos, base + c.seq_len))
            if cached:
                table_k.extend(c.new_k_pages)
                table_v.extend(c.new_v_pages)
            new_k.extend(c.new_k_pages)
            new_v.extend(c.new_v_pages)
            if c.sample:
                last_rows.append(len(ids) - 1)
        nd = sum(1 for c in chunks if c.num_tokens == 1)
        decodes, prefills = chunks[:nd], chunks[nd:]
        cu_seqlens = [0]
        for c in prefills:
            cu_seqlens.append(cu_seqlens[-1] + c.num_tokens)
        lora = _LoraPlan.build(chunks, self.lora_tables) if _has_lora(chunks) else None
        passes = lora.pass_sections() if lora and self.lora_backend.needs_device_passes else []
        views = self.upload.upload(
            [
                ids,
                positions,
                new_k,
                new_v,
                table_index,
                rows,
                [c.seq_len for c in decodes],
                cu_seqlens,
                [c.seq_len for c in prefills],
                last_rows,
                *([table_k, table_v] if cached else []),
                *passes,
            ]
        )
        (ids_t, pos_t, k_t, v_t, index_t, rows_t, d_lens, cu_t, p_lens, last_t) = views[:10]
        if cached:
            self.page_tables.write(index_t, views[10], views[11])
            views = views[:10] + views[12:]
        else:
            self.page_tables.write(index_t, k_t, v_t)
        decode_k, decode_v = self.page_tables.gather(
            rows_t[:nd], max((c.seq_len for c in decodes), default=0)
        )
        prefill_k, prefill_v = self.page_tables.gather(
            rows_t[nd:], max((c.seq_len for c in prefills), default=0)
        )
        attn = AttentionMetadata(
            new_k_pages=k_t,
            new_v_pages=v_t,
            num_decodes=nd,
            decode_seq_lens=d_lens,
            decode_k_pages=decode_k,
            decode_v_pages=decode_v,
            prefill_cu_seqlens=cu_t,
            prefill_seq_lens=p_lens,
            prefill_k_pages=prefill_k,
            prefill_v_pages=prefill_v,
        )
        meta = None if lora is None else lora.metadata(views[10:], self.device)
        return StepInputs(ids_t, pos_t, attn, meta, last_t)


def order_by_adapter(chunks: list[ScheduledChunk]) -> list[ScheduledChunk]:
    """Decodes first, then prefill chunks; within each, grouped by adapter (stable)."""
    return sorted(chunks, key=lambda c: (c.num_tokens != 1, c.adapter_slots, c.adapter_weights))


def _has_lora(chunks: list[ScheduledChunk]) -> bool:
    return any(c.adapter_rank for c in chunks)


@dataclass(frozen=True)
class _LoraPlan:
    """The step's adapter segments on the host, before any upload."""

    num_tokens: int
    segments: tuple[tuple[Segment, ...], ...]  # per pass, runs with an adapter
    runs: tuple[tuple[tuple[int, int, int, float], ...], ...]  # per pass, every run
    max_rank: int
    tables: LoraTables

    @classmethod
    def build(cls, chunks: list[ScheduledChunk], tables: LoraTables) -> _LoraPlan:
        num_passes = max(len(c.adapter_slots) for c in chunks)
        runs_per_pass = []
        for p in range(num_passes):
            runs: list[tuple[int, int, int, float]] = []  # (slot, lo, hi, weight)
            lo = 0
            for c in chunks:
                hi = lo + c.num_tokens
                slot = c.adapter_slots[p] if p < len(c.adapter_slots) else -1
                weight = c.adapter_weights[p] if p < len(c.adapter_weights) else 1.0
                if runs and runs[-1][0] == slot and runs[-1][3] == weight:
                    runs[-1] = (slot, runs[-1][1], hi, weight)
                else:
                    runs.append((slot, lo, hi, weight))
                lo = hi
            runs_per_pass.append(tuple(runs))
        return cls(
            num_tokens=sum(c.num_tokens for c in chunks),
            segments=tuple(tuple(r for r in runs if r[0] >= 0) for runs in runs_per_pass),
            runs=tuple(runs_per_pass),
            max_rank=max(c.adapter_rank for c in chunks),
            tables=tables,
        )

    def pass_sections(self) -> list[list[int]]:
        """Per pass, its ``seg_starts`` and ``seg_adapters`` (for the upload)."""
        sections = []
        for runs in self.runs:
            sections.append([0, *(hi for _, _, hi, _ in runs)])
            sections.append([slot for slot, _, _, _ in runs])
        return sections

    def metadata(self, pass_views: list[torch.Tensor], device: torch.device) -> LoraMetadata:
        slots = list(dict.fromkeys(slot for segs in self.segments for slot, _, _, _ in segs))
        ranks = {s: self.tables.host_ranks[s].tolist() for s in slots}
        scalings = {s: self.tables.host_scalings[s].tolist() for s in slots}
        passes = None
        if pass_views:
            passes = tuple(
                LoraPass(
                    seg_starts=pass_views[2 * p],
                    seg_adapters=pass_views[2 * p + 1],
                    token_weights=self._token_weights(runs, device),
                    max_seg_len=max(hi - lo for _, lo, hi, _ in runs),
                )
                for p, runs in enumerate(self.runs)
            )
        row_slots = tuple(
            (
                [slot for slot, lo, hi, _ in runs for _ in range(hi - lo)],
                [weight for _, lo, hi, weight in runs for _ in range(hi - lo)],
            )
            for runs in self.runs
        )
        return LoraMetadata(
            num_tokens=self.num_tokens,
            segments=self.segments,
            row_slots=row_slots,
            ranks=ranks,
            scalings=scalings,
            max_rank=self.max_rank,
            tables=self.tables,
            passes=passes,
        )

    def _token_weights(
        self, runs: tuple[tuple[int, int, int, float], ...], device: torch.device
    ) -> torch.Tensor | None:
        """(num_tokens, 1) mixture weights of one pass, or None when all are 1 (the usual
        case; only mixtures pay this second, small upload)."""
        if all(weight == 1.0 for slot, _, _, weight in runs if slot >= 0):
            return None
        per_row = [weight for _, lo, hi, weight in runs for _ in range(hi - lo)]
        return torch.tensor(per_row, dtype=torch.float32).view(-1, 1).to(device)
