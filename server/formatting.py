"""Response bodies and stream chunks of ``/v1/completions`` and ``/v1/chat/completions``.

A renderer turns what the engine released for one choice (a text delta and new log-prob
entries) into the route's chunk, and the finished choices into the full response. Both
routes share the streaming and collecting logic in :mod:`server.generation`.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from transformers import PreTrainedTokenizerBase

from engine.outputs import TokenLogprob

Json = dict[str, Any]


@dataclass(frozen=True)
class Logprob:
    """One token's log-prob as the API shows it: None for a prompt's first token."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]]

    @classmethod
    def of(cls, entry: TokenLogprob) -> Logprob:
        return cls(entry.token_id, entry.logprob, entry.top)


class TokenText:
    """Token id → its text, cached (log-probs name every token and its alternatives)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._decode = lru_cache(maxsize=65536)(
            lambda token_id: str(tokenizer.decode([token_id], skip_special_tokens=False))
        )

    def __call__(self, token_id: int) -> str:
        return str(self._decode(token_id))


@dataclass
class Choice:
    """What one choice has produced so far."""

    index: int
    prompt_index: int
    text: str = ""
    num_tokens: int = 0
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # of the prompt, from the prefix cache
    logprobs: list[Logprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    error_code: str = "engine_error"


def usage(choices: list[Choice], n: int) -> Json:
    """Token counts; each prompt counts once however many choices share it.

    ``prompt_tokens_details.cached_tokens`` (OpenAI's shape, present even when 0): the
    prompt tokens whose keys and values came from the prefix cache, counted like the prompt
    tokens, from each prompt's first choice (so never more than ``prompt_tokens``).
    """
    first = [c for c in choices if c.index % n == 0]
    prompt = sum(c.num_prompt_tokens for c in first)
    cached = sum(c.num_cached_tokens for c in first)
    completion = sum(c.num_tokens for c in choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class Renderer(ABC):
    """Shared fields of one response: its id, creation time and model name."""

    object_name = ""
    chunk_object_name = ""

    def __init__(self, prefix: str, model: str, token_text: TokenText) -> None:
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.token_text = token_text

    def _envelope(self, obj: str, choices: list[Json]) -> Json:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def usage_chunk(self, totals: Json) -> Json:
        body = self._envelope(self.chunk_object_name, [])
        body["usage"] = totals
        return body

    @abstractmethod
    def chunk(self, index: int, text: str, entries: list[Logprob], finish: str | None) -> Json:
        """One streamed chunk for choice ``index``."""

    @abstractmethod
    def response(self, choices: list[Choice], totals: Json) -> Json:
        """The whole non-streamed response."""


class CompletionRenderer(Renderer):
    """``text_completion`` objects; log-probs in the legacy ``tokens`` / ``top_logprobs`` form."""

    object_name = chunk_object_name = "text_completion"

    def __init__(self, model: str, token_text: TokenText, logprobs: bool) -> None:
        super().__init__("cmpl", model, token_text)
        self.with_logprobs = logprobs
        self._offsets: dict[int, int] = {}  # per choice: characters before the next token

    def logprobs(self, index: int, entries: list[Logprob]) -> Json | None:
        if not self.with_logprobs:
            return None
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top: list[dict[str, float] | None] = []
        offsets: list[int] = []
        offset = self._offsets.get(index, 0)
        for entry in entries:
            text = self.token_text(entry.token_id)
            tokens.append(text)
            token_logprobs.append(entry.logprob)
            # The first prompt token has no distribution to show (OpenAI's null).
            first = entry.logprob is None
            top.append(None if first else {self.token_text(t): lp for t, lp in entry.top})
            offsets.append(offset)
            offset += len(text)
        self._offsets[index] = offset
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top,
            "text_offset": offsets,
        }

    def chunk(self, index: int, text: str, entries: list[Logprob], finish: str | None) -> Json:
        choice = {
            "index": index,
            "text": text,
            "logprobs": self.logprobs(index, entries),
            "finish_reason": finish,
        }
        return self._envelope(self.chunk_object_name, [choice])

    def response(self, choices: list[Choice], totals: Json) -> Json:
        body = self._envelope(
            self.object_name,
            [
                {
                    "index": c.index,
                    "text": c.text,
                    "logprobs": self.logprobs(c.index, list(c.logprobs)),
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ],
        )
        body["usage"] = totals
        return body


class ChatRenderer(Renderer):
    """``chat.completion`` objects; log-probs in the ``content`` list form."""

    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, model: str, token_text: TokenText, logprobs: bool) -> None:
        super().__init__("chatcmpl", model, token_text)
        self.with_logprobs = logprobs
        self._started: set[int] = set()  # choices whose role chunk was sent

    def _entry(self, token_id: int, logprob: float | None) -> Json:
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def logprobs(self, entries: list[Logprob]) -> Json | None:
        if not self.with_logprobs:
            return None
        content = []
        for e in entries:
            if e.logprob is None:
                continue
            item = self._entry(e.token_id, e.logprob)
            item["top_logprobs"] = [self._entry(t, lp) for t, lp in e.top]
            content.append(item)
        return {"content": content}

    def chunk(self, index: int, text: str, entries: list[Logprob], finish: str | None) -> Json:
        delta: Json = {}
        if index not in self._started:
            self._started.add(index)
            delta["role"] = "assistant"
        if text or "role" in delta:
            delta["content"] = text
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": self.logprobs(entries) if entries else None,
            "finish_reason": finish,
        }
        return self._envelope(self.chunk_object_name, [choice])

    def response(self, choices: list[Choice], totals: Json) -> Json:
        body = self._envelope(
            self.object_name,
            [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": self.logprobs(list(c.logprobs)),
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ],
        )
        body["usage"] = totals
        return body
