"""Teacher-forced scoring: how likely a completion is after a prompt, under an adapter.

A scoring request is an ordinary request whose prompt is prompt + completion (+ EOS), run
with ``prompt_logprobs=0`` and one generated token: the prefill computes the log-probability
of every given token in one pass (as ``echo`` + ``logprobs`` does over HTTP), so a batch of
examples for many adapters is scored in the same continuous batches as generation traffic.
Composition (``adapters/compose.py``) scores its examples this way.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

SCORING_PARAMS = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)


@dataclass(frozen=True)
class ScoringPrompt:
    """Token ids of prompt + completion; the last ``num_targets`` of them are scored."""

    token_ids: list[int]
    num_targets: int


def scoring_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, eos: int | None
) -> ScoringPrompt:
    """The prompt tokenized as a request's would be, the completion appended without
    special tokens, then ``eos`` (LoRAHub scores the end of the target too)."""
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    target = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if eos is not None:
        target.append(eos)
    return ScoringPrompt(prompt_ids + target, len(target))


def mean_nll(output: RequestOutput, num_targets: int) -> float:
    """Mean negative log-likelihood per scored token, from a finished scoring request."""
    if output.error is not None:
        raise ValueError(f"scoring failed: {output.error}")
    entries = output.prompt_logprobs
    assert entries is not None and len(entries) >= num_targets, "not a scoring request"
    scored = entries[len(entries) - num_targets :]
    return -sum(e.logprob for e in scored if e is not None) / num_targets
