"""The contract between the scheduler and the model runner: one plain description per step.

The scheduler fills it; the runner turns it into tensors. Neither reaches into the other's
state: everything the runner needs about a request for this step is copied in here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adapters.placement import Placement
from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class ScheduledChunk:
    """The tokens of one request computed in this step.

    Attributes:
        request_id: whose tokens these are.
        token_ids: the tokens to run, at positions ``start_pos .. start_pos + len - 1``.
        start_pos: tokens of this request already in the KV cache.
        new_k_pages: the K page of each of this chunk's tokens.
        new_v_pages: the V page of each of this chunk's tokens (earlier tokens' pages were
            sent with earlier chunks; the runner keeps them).
        sample: True when the chunk reaches the request's last token, so the step samples
            the next token; a prefill chunk that stops short samples nothing.
        params: how to sample.
        generator: the request's private random stream (seeded requests), else None.
        banned_token_ids: ids the sampler must not pick (stop tokens before ``min_tokens``).
        adapter_slots: its adapter's slot, its row of the residency's ``LoraTables`` (empty
            for the base model), or the slot of each component of a mixture.
        adapter_weights: the weight of each slot (1.0 for a plain adapter).
        adapter_rank: the largest rank among those adapters (0 for the base model).
        output_token_ids: the tokens generated so far, on the first chunk after admission of
            a request with penalties (the runner counts later tokens itself); else empty.
        prompt_targets: with ``prompt_logprobs``, the prompt tokens this chunk's positions
            predict (position ``start_pos + i`` predicts ``prompt_targets[i]``); else empty.
        cached_k_pages, cached_v_pages: on the first chunk after an admission that reused
            cached blocks, the K and V pages of positions ``0 .. start_pos - 1`` (computed by
            earlier requests: the runner records them but computes nothing for them).
    """

    request_id: str
    token_ids: list[int]
    start_pos: int
    new_k_pages: list[int]
    new_v_pages: list[int]
    sample: bool
    params: SamplingParams
    generator: torch.Generator | None
    banned_token_ids: tuple[int, ...] = ()
    adapter_slots: tuple[int, ...] = ()
    adapter_weights: tuple[float, ...] = ()
    adapter_rank: int = 0
    output_token_ids: tuple[int, ...] = ()
    prompt_targets: tuple[int, ...] = ()
    cached_k_pages: list[int] = field(default_factory=list)
    cached_v_pages: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def seq_len(self) -> int:
        """Context length after this chunk."""
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's work: chunks in the order the runner will lay them out.

    Attributes:
        chunks: every request with tokens this step.
        preempted_ids: requests pushed back to the waiting queue by this step's schedule
            (their pages are gone; they restart from position 0).
        finished_ids: requests retired (finished or aborted) since the previous schedule.
        placements: adapters this schedule made resident, in the order they were placed:
            the runner writes them into the pool and the LoRA tables before its forward
            (the scheduler writes no device memory).
    """

    chunks: list[ScheduledChunk]
    preempted_ids: list[str]
    finished_ids: list[str]
    placements: tuple[Placement, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(frozen=True)
class ChunkResult:
    """What the runner computed for one chunk.

    Attributes:
        token: the sampled next token, for a chunk that samples; else None.
        logprob: the sampled token's log-probability and alternatives, when asked for.
        prompt_logprobs: one entry per ``prompt_targets`` token of the chunk.
    """

    token: int | None = None
    logprob: TokenLogprob | None = None
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
