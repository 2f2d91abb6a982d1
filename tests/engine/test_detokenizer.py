"""Incremental detokenization: whole characters only, stop strings held back and removed."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from engine.detokenizer import IncrementalDetokenizer
from tests.tiny_models import save_byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    return save_byte_tokenizer(tmp_path_factory.mktemp("tok"))


def stream(
    tokenizer: PreTrainedTokenizerFast, text: str, stop: tuple[str, ...] = ()
) -> tuple[list[str], IncrementalDetokenizer]:
    prompt = tokenizer("x=").input_ids
    detok = IncrementalDetokenizer(tokenizer, prompt, stop)
    deltas = []
    for token in tokenizer(text, add_special_tokens=False).input_ids:
        detok.add_token(token)
        deltas.append(detok.release(finished=False))
        if detok.stopped:
            break
    deltas.append(detok.release(finished=True))
    return deltas, detok


def test_multibyte_characters_are_never_split(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "héllo 日本語 🤖!"
    deltas, _ = stream(tokenizer, text)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    # Each byte is a token, so the 4-byte emoji arrives whole in a single delta.
    assert "🤖" in deltas


def test_stop_string_is_held_back_then_removed(tokenizer: PreTrainedTokenizerFast) -> None:
    deltas, detok = stream(tokenizer, "abcSTOPdef", stop=("STOP",))
    assert detok.stopped
    assert "".join(deltas) == "abc"
    assert not any("S" in d for d in deltas)


def test_partial_stop_match_is_released_at_the_end(tokenizer: PreTrainedTokenizerFast) -> None:
    deltas, detok = stream(tokenizer, "abcST", stop=("STOP",))
    assert not detok.stopped
    assert "".join(deltas) == "abcST"
    assert deltas[-1].endswith("ST")  # held until the request finished


def test_earliest_of_several_stops_wins(tokenizer: PreTrainedTokenizerFast) -> None:
    deltas, _ = stream(tokenizer, "one two three", stop=("three", "two"))
    assert "".join(deltas) == "one "
