"""Task definitions for the bundled demo model and its adapters.

Every task reads the same prompt, ``WORD=``, and answers with a transformation
of ``WORD`` followed by EOS. Words are 1 to ``MAX_WORD_LEN`` characters drawn
from ``ALPHABET`` (ASCII letters and digits).

The base model learns ``copy``; each adapter learns one other task. The tasks
are chosen so that a glance at an output tells which adapter produced it:

==========  ==========  ==========================================
task        ``aB3=``    rule
==========  ==========  ==========================================
copy        ``aB3``     the word unchanged (the base model)
upper       ``AB3``     letters upper-cased, digits unchanged
swapcase    ``Ab3``     the case of every letter flipped
caesar      ``dE3``     letters shifted 3 places within their case
reverse     ``3Ba``     characters in reverse order
lower       ``ab3``     letters lower-cased (a prefix-tuned adapter)
==========  ==========  ==========================================

Train/held-out split: a word is held out when a stable hash of it (CRC-32)
falls in one bucket out of ``HELD_OUT_BUCKETS``. Training samplers reject
held-out words and evaluation samplers keep only them, so no held-out word is
ever trained on, whichever seed either side uses.

This module is pure Python (no torch) so that the training script, the
evaluation script and the tests can all load it by file path.
"""

from __future__ import annotations

import random
import string
import zlib
from collections.abc import Callable

ALPHABET = string.ascii_letters + string.digits
MIN_WORD_LEN = 1
MAX_WORD_LEN = 12

# One word in HELD_OUT_BUCKETS is held out (12.5%).
HELD_OUT_BUCKETS = 8

# Seed of the held-out evaluation words; shared by evaluate.py and the tests.
HELD_OUT_SEED = 1234

# The character that ends every prompt; the chat template renders it too.
PROMPT_SEPARATOR = "="


def _caesar_char(char: str, shift: int) -> str:
    """Shift one ASCII letter ``shift`` places within its case; other chars pass."""
    if char in string.ascii_lowercase:
        return chr((ord(char) - ord("a") + shift) % 26 + ord("a"))
    if char in string.ascii_uppercase:
        return chr((ord(char) - ord("A") + shift) % 26 + ord("A"))
    return char


def copy(word: str) -> str:
    """The word unchanged (the base model's task)."""
    return word


def upper(word: str) -> str:
    """Letters upper-cased, digits unchanged: ``aB3`` -> ``AB3``."""
    return word.upper()


def lower(word: str) -> str:
    """Letters lower-cased, digits unchanged: ``aB3`` -> ``ab3``."""
    return word.lower()


def swapcase(word: str) -> str:
    """The case of every letter flipped: ``aB3`` -> ``Ab3``."""
    return word.swapcase()


def caesar(word: str) -> str:
    """Letters shifted 3 places within their case, wrapping: ``xYz9`` -> ``aBc9``."""
    return "".join(_caesar_char(char, 3) for char in word)


def reverse(word: str) -> str:
    """Characters in reverse order: ``aB3`` -> ``3Ba``."""
    return word[::-1]


TASKS: dict[str, Callable[[str], str]] = {
    "copy": copy,
    "upper": upper,
    "swapcase": swapcase,
    "caesar": caesar,
    "reverse": reverse,
    "lower": lower,
}

# The task the base model learns; every other task is an adapter.
BASE_TASK = "copy"
ADAPTER_TASKS: tuple[str, ...] = tuple(name for name in TASKS if name != BASE_TASK)


def format_prompt(word: str) -> str:
    """The prompt text for ``word`` (without BOS; the tokenizer adds it)."""
    return f"{word}{PROMPT_SEPARATOR}"


def target(task: str, word: str) -> str:
    """The completion text of ``task`` for ``word`` (without EOS)."""
    return TASKS[task](word)


def task_changes(task: str, word: str) -> bool:
    """Whether ``task`` maps ``word`` to something other than ``word``.

    The "base without adapter" accuracy is measured only on such words, so that
    a base model that copies gets no credit for words a task leaves alone.
    """
    return target(task, word) != word


def is_held_out(word: str) -> bool:
    """Whether ``word`` belongs to the held-out split (stable across runs)."""
    return zlib.crc32(word.encode("ascii")) % HELD_OUT_BUCKETS == 0


def _random_word(rng: random.Random) -> str:
    """One word: a length uniform in [MIN_WORD_LEN, MAX_WORD_LEN], then uniform chars."""
    length = rng.randint(MIN_WORD_LEN, MAX_WORD_LEN)
    return "".join(rng.choice(ALPHABET) for _ in range(length))


def sample_train_words(rng: random.Random, num_words: int) -> list[str]:
    """``num_words`` training words (repeats allowed), never a held-out word."""
    words: list[str] = []
    while len(words) < num_words:
        word = _random_word(rng)
        if not is_held_out(word):
            words.append(word)
    return words


def held_out_words(
    num_words: int,
    seed: int = HELD_OUT_SEED,
    task: str | None = None,
) -> list[str]:
    """``num_words`` distinct held-out words, deterministic for a given seed.

    Args:
        num_words: how many words to return.
        seed: seed of the sampler; the same seed gives the same list.
        task: when given, keep only words that ``task`` changes (for the
            "base without adapter" column).
    """
    rng = random.Random(seed)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < num_words:
        word = _random_word(rng)
        if word in seen or not is_held_out(word):
            continue
        if task is not None and not task_changes(task, word):
            continue
        seen.add(word)
        words.append(word)
    return words
