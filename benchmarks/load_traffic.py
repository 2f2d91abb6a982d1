"""The load test's traffic: what its clients send and what each answer must equal.

``Job`` is one request (model, prompt, length); :func:`make_jobs` the set a phase draws from,
:class:`Traffic` what a phase's clients choose from and check against (each job's output run
alone), :class:`LiveAdapter` the adapter replaced in place and which of its versions a request
may have run on, and :class:`Tally` what every client, churn and update task saw.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from engine.config import DEMO_DIR

BASE = "loraserve-demo"
ADAPTERS_DIR = DEMO_DIR / "adapters"
LENGTHS = ((16, False), (48, True))  # (max_tokens, ignore_eos): stop at EOS, or run long
Job = tuple[str, str, int, bool]  # (model, prompt without its "=", max_tokens, ignore_eos)

# Soak: one phase per policy; the fair one shares the engine between users.
POLICIES = ("fcfs", "fair", "priority")
PRIORITIES = (-2, 0, 0, 0, 3, 10)  # lower runs first
# 45 and 46 bytes: with BOS, two whole blocks of 16 that requests on the same model share.
# The longest prompt (a prefix, 12 characters and "="), the prefix-tuned adapter's 16 virtual
# tokens and 48 generated stay inside the demo's 128 positions.
PREFIXES = (
    "the quick brown fox jumps over the lazy dog; ",
    "pack my box with five dozen liquor jugs, then ",
)
LIVE = "live"  # the adapter replaced in place, alternating between these two weight sets
LIVE_SOURCES = ("upper", "swapcase")


@dataclass
class Tally:
    """What the clients (and the churn and update tasks) saw, over every phase."""

    completed: int = 0
    disconnected: int = 0
    expected_404: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    mismatches: list[str] = field(default_factory=list)
    tokens: int = 0
    cached_tokens: int = 0  # the prompt tokens completed requests' usage says were cached
    latencies: array[float] = field(default_factory=lambda: array("d"))
    ttfts: array[float] = field(default_factory=lambda: array("d"))
    integrity_checks: int = 0
    hot_loads: int = 0
    hot_unloads: int = 0
    updates: int = 0  # in-place replacements answered 200
    live_checked: int = 0  # completed requests on the replaced adapter
    live_ambiguous: int = 0  # of those, whose window met versions with different outputs

    @property
    def ended(self) -> int:
        return self.completed + self.disconnected


@dataclass
class Version:
    """One version of the live adapter: whose weights, and when a new request may get it."""

    source: str  # the demo adapter whose files it was loaded from
    since: float  # when its replacement was asked for (monotonic seconds)
    until: float = math.inf  # when the next replacement was answered; inf while served


@dataclass
class LiveAdapter:
    """An adapter replaced in place over and over, alternating two weight sets."""

    name: str
    sources: tuple[str, str]
    versions: list[Version] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.versions.append(Version(self.sources[0], -math.inf))  # loaded with the engine

    def begin(self) -> str:
        """A replacement is about to be asked for: returns the weights it brings."""
        now = time.monotonic()
        # Requests time out after 120 s: a window closed 300 s ago meets none still running.
        self.versions = [v for v in self.versions if v.until > now - 300]
        current = self.versions[-1].source
        source = self.sources[1] if current == self.sources[0] else self.sources[0]
        self.versions.append(Version(source, now))
        return source

    def end(self, ok: bool) -> None:
        """The replacement was answered: the previous version is no longer given out (or,
        refused, the new one never was)."""
        if ok:
            self.versions[-2].until = time.monotonic()
        else:
            self.versions.pop()

    def served(self, sent: float, first: float) -> list[str]:
        """The weights a request sent at ``sent`` whose first token came at ``first`` may
        have run on."""
        return [v.source for v in self.versions if v.since <= first and v.until >= sent]


@dataclass
class Traffic:
    """What one phase's clients choose from, and how they check what they get."""

    jobs: list[Job]
    alone: dict[Job, str]  # each job's output, run alone
    churn: dict[str, str]  # runtime-loaded name -> the demo adapter it copies
    live: LiveAdapter | None
    policy: str
    soak: bool

    def extra(self, rng: random.Random, user: str | None) -> dict[str, Any]:
        """The request fields the scheduling policies read (a priority other than 0 is
        refused by a server that does not schedule by priority)."""
        out: dict[str, Any] = {}
        if user is not None:
            out["user"] = user
        if self.policy == "priority":
            out["priority"] = rng.choice(PRIORITIES)
        return out


def on_model(model: str, job: Job) -> Job:
    return (model, *job[1:])


def body(job: Job, stream: bool, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    model, prompt, max_tokens, ignore_eos = job
    out: dict[str, Any] = {"model": model, "prompt": f"{prompt}=", "temperature": 0.0}
    out.update(max_tokens=max_tokens, ignore_eos=ignore_eos, stream=stream, **(extra or {}))
    if stream:
        out["stream_options"] = {"include_usage": True}
    return out


def demo_adapters() -> list[str]:
    return sorted(p.name for p in ADAPTERS_DIR.iterdir() if (p / "adapter_config.json").is_file())


def make_jobs(args: argparse.Namespace, models: list[str]) -> list[Job]:
    words = [f"w{i}" + "aBcDeFgHiJkL"[: 1 + i % 10] for i in range(args.num_words)]
    prompts = list(words)
    if args.soak:  # as many again behind the shared prefixes
        prompts += [PREFIXES[i % len(PREFIXES)] + w for i, w in enumerate(words)]
    return [(m, p, n, e) for m in models for p in prompts for n, e in LENGTHS]
