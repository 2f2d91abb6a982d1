"""What the engine reports about a request after each step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, with the most likely alternatives.

    Attributes:
        token_id: the token.
        logprob: its log-probability (raw model distribution, before sampling settings).
        top: the most likely tokens at that position, (token_id, logprob), best first.
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class RequestOutput:
    """A request's progress after one engine step.

    Attributes:
        request_id: the id given to ``add_request``.
        text: the whole generated text released so far (stop strings excluded).
        delta: the text released by this step (what a stream sends).
        token_ids: every generated token id so far.
        prompt_token_ids: the prompt as the engine saw it.
        finished: whether this is the request's last output.
        finish_reason: "stop", "length" or "abort" once finished, else None.
        error: why the engine aborted the request (e.g. its adapter failed to load).
        error_code: a stable code for ``error``: "adapter_load_failed" or "engine_error".
        queue_time: seconds from arrival to its first admission, once admitted.
        logprobs: with ``SamplingParams.logprobs``, one entry per generated token.
        prompt_logprobs: with ``SamplingParams.prompt_logprobs``, one entry per prompt token
            (None for the first, which nothing predicts).
    """

    request_id: str
    text: str
    delta: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    error: str | None = None
    error_code: str | None = None
    queue_time: float | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass(frozen=True)
class EngineStats:
    """Counters and gauges of the engine, for metrics (names follow vLLM's)."""

    num_running: int
    num_waiting: int
    num_pages: int
    free_pages: int
    kv_pages: int
    adapter_pages: int
    resident_adapters: int
    loaded_adapters: int
    num_preemptions: int
    prefetch_hits: int
    prefetch_misses: int
    adapter_loads: int
    adapter_evictions: int
    adapter_load_seconds: float
    prompt_tokens: int
    generation_tokens: int
    num_steps: int
    num_failed_steps: int
    weight_bytes: int = 0
    unquantized_weight_bytes: int = 0
    quantized_bits_per_param: float = 0.0
    quantization_freed_pages: int = 0

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the pool's pages holding KV cache."""
        return self.kv_pages / self.num_pages
