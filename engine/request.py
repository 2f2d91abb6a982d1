"""A request's state as it moves through the engine.

Lifecycle: WAITING (queued, or preempted and queued again) → RUNNING (has KV pages, gets
tokens scheduled each step) → FINISHED. A preempted request drops its pages and its
``num_computed_tokens`` falls to 0: on resumption its prompt and the tokens it already
generated are recomputed as one longer prefill, and generation continues where it stopped.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from adapters.registry import AdapterEntry
from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams

# The token id a prompt-tuned request's virtual positions carry in its token sequence: never
# embedded (the model reads the adapter's virtual embedding there), never shown to clients.
PLACEHOLDER_TOKEN_ID = 0


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One generation request and everything the engine tracks about it.

    Attributes:
        request_id: unique among unfinished requests.
        prompt_token_ids: the prompt.
        params: sampling and stopping.
        detokenizer: turns ``output_token_ids`` into released text.
        generator: the request's private random stream when ``params.seed`` is set.
        output_token_ids: tokens generated so far.
        num_computed_tokens: tokens whose K/V are in the cache (prompt first, then outputs).
        finish_reason: "stop" / "length" / "abort" once finished.
        adapter: the LoRA adapter it runs with, or None for the base model.
        error: why it was aborted, when the engine aborted it (e.g. its adapter failed to load).
        error_code: a stable code for ``error`` ("adapter_load_failed", "engine_error").
        first_scheduled_time: when it was first admitted to run (monotonic), for queue time.
        waited_for_adapter: it was first considered for admission before its adapter was in
            host memory or the pool (a prefetch miss); None until first considered.
        logprobs: per generated token, when the params ask for log-probabilities.
        prompt_logprobs: per prompt token (None for the first), when asked for.
        num_reported: how many output tokens earlier outputs carried (the next delta starts
            there).
        num_cached_tokens: prompt tokens reused from the prefix cache at its first admission.
        block_keys: the prefix cache's chain keys of its first full blocks, as far as computed.
        just_admitted: admitted (or readmitted) and not yet scheduled a chunk: its first chunk
            carries the pages of the tokens it starts with (from the prefix cache) and, with
            penalties, the tokens it generated before.
        priority: lower runs first under the "priority" policy (vLLM's field); 0 otherwise.
        client: whom the "fair" policy charges for it: its adapter's name ("" for the base
            model) or its user, as ``--fairness-key`` says.
        token_cost: what each of its tokens costs its client beyond the token weights: 1
            for the base model, more for an adapter by its rank (``engine/scheduling.py``).
        seq: its place in arrival order (set when the scheduler first queues it).
        num_placeholders: prompt tuning's n: placeholder tokens at the start of its token
            sequence (positions 0 .. n−1, computed with the adapter's virtual embeddings;
            `engine/virtual_tokens.py`). ``num_tokens``, ``token_ids`` and
            ``num_computed_tokens`` count them; ``prompt_token_ids`` never holds them.
        num_prefix_positions: prefix tuning's n: positions 0 .. n−1 before its token
            sequence, whose keys and values are the adapter's pages. Its token sequence (and
            ``num_computed_tokens``) starts at position n.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    adapter: AdapterEntry | None = None
    error: str | None = None
    error_code: str | None = None
    first_scheduled_time: float | None = None
    waited_for_adapter: bool | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_reported: int = 0  # output tokens already sent in a RequestOutput
    num_cached_tokens: int | None = None
    block_keys: list[bytes] = field(default_factory=list)
    just_admitted: bool = False
    priority: int = 0
    client: str = ""
    token_cost: float = 1.0
    seq: int = 0
    num_placeholders: int = 0
    num_prefix_positions: int = 0

    def __post_init__(self) -> None:
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def num_tokens(self) -> int:
        """Placeholders, prompt and generated tokens: what the KV cache must hold before the
        next sample."""
        return self.num_placeholders + len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_virtual_tokens(self) -> int:
        """Positions its adapter takes before its own tokens (prompt or prefix tuning): its
        own token j is at position ``num_virtual_tokens + j``."""
        return self.num_placeholders + self.num_prefix_positions

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens ``start:end`` of placeholders + prompt + output, without concatenating the
        whole list."""
        if self.num_placeholders:
            p = self.num_placeholders
            head = [PLACEHOLDER_TOKEN_ID] * max(min(end, p) - start, 0)
            return head + self._own_token_ids(max(start - p, 0), max(end - p, 0))
        return self._own_token_ids(start, end)

    def _own_token_ids(self, start: int, end: int) -> list[int]:
        prompt = self.prompt_token_ids
        if end <= len(prompt):
            return prompt[start:end]
        head = prompt[start:] if start < len(prompt) else []
        lo = max(start - len(prompt), 0)
        return head + self.output_token_ids[lo : end - len(prompt)]

    def take_output(self) -> RequestOutput:
        """The request's news since its previous output (and the whole record when done)."""
        finished = self.finished
        delta = self.detokenizer.release(finished)
        first = self.num_reported == 0
        start, end = self.num_reported, len(self.output_token_ids)
        self.num_reported = end
        logprobs = self.logprobs
        prompt_logprobs = self.prompt_logprobs if first or finished else None
        return RequestOutput(
            request_id=self.request_id,
            delta=delta,
            new_token_ids=self.output_token_ids[start:end],
            num_prompt_tokens=len(self.prompt_token_ids),
            num_output_tokens=end,
            finished=finished,
            finish_reason=self.finish_reason,
            error=self.error,
            error_code=self.error_code,
            queue_time=(
                None
                if self.first_scheduled_time is None
                else self.first_scheduled_time - self.arrival_time
            ),
            new_logprobs=None if logprobs is None else logprobs[start:end],
            prompt_token_ids=self.prompt_token_ids if first or finished else None,
            prompt_logprobs=None if prompt_logprobs is None else list(prompt_logprobs),
            text=self.detokenizer.released_text if finished else "",
            token_ids=list(self.output_token_ids) if finished else [],
            logprobs=None if logprobs is None or not finished else list(logprobs),
            num_cached_tokens=self.num_cached_tokens or 0,
        )
