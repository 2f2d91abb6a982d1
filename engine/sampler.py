"""Turns the logits of one step into next tokens, row by row with each request's settings.

Sampling uses the exponential-race form: with q ~ Exp(1) drawn independently per token,
argmax(p / q) is a draw from p. The noise for a seeded request comes only from its own
generator and depends only on the vocabulary size, so a seeded request samples the same
tokens whatever else is in the batch.
"""

from __future__ import annotations

import torch

from engine.outputs import TokenLogprob
from engine.scheduler_output import ScheduledChunk


class Sampler:
    """Samples one token per row; greedy rows take the argmax."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator  # for requests without a seed

    def __call__(
        self,
        logits: torch.Tensor,
        chunks: list[ScheduledChunk],
        counts: list[torch.Tensor | None] | None = None,
    ) -> list[int]:
        """Next token ids for ``logits`` (num_rows, vocab_size), one row per chunk.

        ``counts[row]`` (vocab_size,) float32: how often each token was generated so far by
        a request with presence or frequency penalties (None for the others).
        """
        logits = logits.clone()
        for row, chunk in enumerate(chunks):
            row_counts = None if counts is None else counts[row]
            if row_counts is not None:
                _penalize(logits[row], chunk, row_counts)
            if chunk.banned_token_ids:
                logits[row, list(chunk.banned_token_ids)] = -float("inf")
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, c in enumerate(chunks) if not c.params.greedy]
        if sampled:
            rows = torch.tensor(sampled, device=logits.device)
            probs = self._probabilities(logits[rows], [chunks[i] for i in sampled])
            noise = torch.stack([self._noise(chunks[i], probs.shape[1], probs) for i in sampled])
            tokens[rows] = (probs / noise).argmax(dim=-1)
        return [int(t) for t in tokens.tolist()]

    def _noise(self, chunk: ScheduledChunk, vocab_size: int, like: torch.Tensor) -> torch.Tensor:
        generator = chunk.generator or self.generator
        noise = torch.empty(vocab_size, dtype=torch.float32, device=generator.device)
        return noise.exponential_(generator=generator).to(like.device)

    @staticmethod
    def _probabilities(logits: torch.Tensor, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Softmax of temperature-scaled logits after top-k and top-p filtering."""
        device = logits.device
        temperature = torch.tensor([c.params.temperature for c in chunks], device=device)
        logits = logits / temperature[:, None]
        vocab_size = logits.shape[1]
        top_k = torch.tensor(
            [c.params.top_k if c.params.top_k > 0 else vocab_size for c in chunks], device=device
        )
        # top_p = 1 means off: no threshold, so float rounding in the cumsum cannot drop tokens.
        top_p = torch.tensor(
            [c.params.top_p if c.params.top_p < 1 else float("inf") for c in chunks],
            device=device,
        )
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab_size, device=device)[None, :]
        drop = ranks >= top_k[:, None]
        sorted_probs = sorted_logits.masked_fill(drop, -float("inf")).softmax(dim=-1)
        # Drop a token once the tokens ranked above it already reach top_p (the top one stays).
        drop |= (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, -float("inf"))
        filtered = torch.empty_like(logits).scatter_(1, order, sorted_logits)
        return filtered.softmax(dim=-1)


def _penalize(logits: torch.Tensor, chunk: ScheduledChunk, counts: torch.Tensor) -> None:
    """OpenAI's presence and frequency penalties over the generated tokens, in place."""
    params = chunk.params
    logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """Each row's log-probability of ``tokens[row]`` and its ``k`` most likely tokens.

    Args:
        logits: (num_rows, vocab_size) raw float32 logits.
        tokens: one token id per row.
        k: how many alternatives per row (0 for none).
    """
    logprobs = torch.log_softmax(logits, dim=-1)
    index = torch.tensor(tokens, device=logits.device)[:, None]
    chosen = logprobs.gather(1, index)[:, 0].tolist()
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], index[:, :0])
    return [
        TokenLogprob(token, value, list(zip(ids, values, strict=True)))
        for token, value, ids, values in zip(
            tokens, chosen, top_ids.tolist(), top_values.tolist(), strict=True
        )
    ]
