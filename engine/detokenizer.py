"""Incremental detokenization with stop strings.

Text is released as tokens arrive, with two holds:

* a token that ends inside a multi-byte character decodes to U+FFFD; nothing is released
  until a later token completes the character;
* with stop strings, the last ``len(longest stop) - 1`` characters are held back, since they
  may turn out to be the start of a stop string that must not reach the output.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# Decoding starts a few prompt tokens back so that the first generated token is rendered
# with its left context (spaces and merges depend on it).
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text, a delta at a time."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        stop: tuple[str, ...] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # The Rust tokenizer decodes directly, skipping transformers' per-call conversions;
        # only equivalent when transformers would not post-process the text.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        cleans = getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._backend_decode = backend.decode if backend is not None and not cleans else None
        self._ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        # [prefix_offset, read_offset) was decoded last time as context; from read_offset on,
        # tokens are not yet rendered into text.
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all decoded text, stop string removed once matched
        self._released = 0  # how much of self.text has been handed out
        self.stopped = False

    def add_token(self, token_id: int) -> None:
        """Append a token; sets :attr:`stopped` when the text now contains a stop string."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return  # an incomplete character (or a token that renders as nothing)
        new_text = full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        start = max(0, len(self.text) - self._hold)
        self.text += new_text
        if self._stop:
            self._find_stop(start)

    def _decode(self, ids: list[int]) -> str:
        if self._backend_decode is not None:
            return str(self._backend_decode(ids, skip_special_tokens=self._skip_special))
        text = self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)
        assert isinstance(text, str)
        return text

    def _find_stop(self, start: int) -> None:
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def release(self, finished: bool) -> str:
        """The text not handed out before; all of it once the request has finished."""
        end = len(self.text) if finished or self.stopped else len(self.text) - self._hold
        end = max(end, self._released)
        delta = self.text[self._released : end]
        self._released = end
        return delta

    @property
    def released_text(self) -> str:
        return self.text[: self._released]


class NoDetokenizer(IncrementalDetokenizer):
    """For a request whose text another process renders (the engine process leaves it to
    the API process): no text, so no stop strings either; token ids only."""

    def __init__(self) -> None:
        self.text = ""
        self.stopped = False

    def add_token(self, token_id: int) -> None:
        pass

    def release(self, finished: bool) -> str:
        return ""

    @property
    def released_text(self) -> str:
        return ""
