"""How one request is sampled and when it stops."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping, with the OpenAI/vLLM meaning of each field.

    Attributes:
        max_tokens: the most tokens to generate.
        temperature: 0 means greedy; otherwise logits are divided by it before sampling.
        top_p: keep the smallest set of tokens whose probability reaches top_p (1 = off).
        top_k: keep the k most likely tokens (0 or -1 = off).
        seed: a request-private random stream; the same seed gives the same text whatever
            else runs in the batch.
        stop: strings that end generation; the matched string is not part of the output.
        stop_token_ids: token ids that end generation, besides EOS.
        ignore_eos: keep generating past EOS (benchmarks use it for fixed output lengths).
        min_tokens: EOS and stop token ids cannot end generation before this many tokens.
        skip_special_tokens: leave special tokens out of the text.
        logprobs: with each generated token, return its log-probability and those of the
            ``logprobs`` most likely tokens (from the model's raw distribution), as vLLM does.
        prompt_logprobs: the same for every prompt token after the first.
        presence_penalty: subtracted from the logit of every token already generated.
        frequency_penalty: subtracted once per earlier occurrence in the generated text.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not self.temperature >= 0.0:
            raise ValueError("temperature must be non-negative")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < -1:
            raise ValueError("top_k must be -1, 0 (off) or positive")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be in [0, max_tokens]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be non-negative")
        if not -2.0 <= self.presence_penalty <= 2.0 or not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        # Lists are accepted for convenience and stored as tuples (hashable, immutable).
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
