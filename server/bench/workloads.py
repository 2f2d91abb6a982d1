"""Seeded request lists for ``loraserve bench`` (W2, W3, W4 and the shared-prefix workload:
see docs/benchmarks.md; the flooding-client workload of ``bench fairness`` is in
:mod:`server.bench.fairness_workload`).

A workload is data: requests with an arrival time, an adapter index, prompt token ids and an
exact output length, saved as JSON and replayed unchanged against every system compared.
Everything comes from one ``numpy.random.default_rng(seed)``, so a seed fixes the list.

Adapters and the sweep over n. Each request stores a draw ``x`` in [0, 1) beside its adapter,
and the adapter is a fixed function of (x, the request's index i, n adapters), the workload's
popularity law:

* ``power`` (W2, W4; S-LoRA): x ~ power(α), pdf α·x^(α−1) on [0, 1]; adapter = floor(n·x).
  α = 1 is uniform; smaller α skews toward adapter 0: P(adapter 0) = P(x < 1/n) = (1/n)^α.
* ``distinct`` (W3): adapter = i mod n; with Punica's n = N every request has its own
  adapter, and any 32 consecutive requests (one full closed-loop batch) differ when n ≥ 32.
* ``uniform`` (W3): x = (rank + 0.5) / N, rank = the request's place in a seeded permutation
  of the N requests; adapter = floor(n · rank / N): every adapter gets ⌊N/n⌋ or ⌈N/n⌉
  requests, in shuffled order (Punica's equal split, shuffled). Punica's n = ⌈√N⌉.
* ``skewed`` (W3): x ~ U[0, 1); adapter = the Zipf-1.5 inverse CDF over n adapters at x,
  P(k) ∝ (k + 1)^−1.5 (Punica's "skewed" is Zipf-1.5). Default n = ⌈√N⌉, as uniform, so the
  two differ only in popularity.
* ``identical`` (W3): adapter 0 (default n = 1).

The shared-prefix workload (``bench prefix``) spreads its requests with W3's ``uniform`` law.

n = 0 sends every request to the base model (adapter None). No draw depends on n, so
``Workload.with_num_adapters(m)`` equals the generator run with ``num_adapters=m``: a sweep
over n replays the same prompts, lengths and arrivals, and only the adapter column changes.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, replace
from itertools import pairwise
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

KINDS = ("W2", "W3", "W4", "shared-prefix", "fairness")
POPULARITIES = ("distinct", "uniform", "skewed", "identical")
W3_MAX_CONCURRENCY = 32  # Punica's batch size
_CHOSEN_POPULARITY = ("W3", "shared-prefix")  # kinds whose params name their adapter law
ZIPF_EXPONENT = 1.5
FORMAT_VERSION = 1
_BELOW_ONE = math.nextafter(1.0, 0.0)  # power(α) may return 1.0; floor(n·x) must stay < n


@dataclass(frozen=True)
class BenchRequest:
    """One request to replay.

    Attributes:
        arrival: when to send it, seconds after the start (0.0 in a closed loop).
        adapter: index into the workload's adapters; None is the base model.
        prompt: token ids, sent as they are.
        output_len: exactly this many tokens are generated (the client sends ``ignore_eos``
            and ``min_tokens = max_tokens = output_len``).
        x: the draw in [0, 1) that ``adapter`` derives from (module docstring), kept so the
            same request can be pointed at another number of adapters.
    """

    arrival: float
    adapter: int | None
    prompt: tuple[int, ...]
    output_len: int
    x: float = 0.0

    def __post_init__(self) -> None:
        if self.arrival < 0 or self.output_len < 1 or not self.prompt:
            raise ValueError(f"bad request: arrival {self.arrival}, output {self.output_len}")
        if self.adapter is not None and self.adapter < 0:
            raise ValueError(f"adapter index {self.adapter} < 0")
        if not 0.0 <= self.x < 1.0:
            raise ValueError(f"x = {self.x} outside [0, 1)")


@dataclass(frozen=True)
class Workload:
    """A seeded request list and how to replay it.

    Attributes:
        kind: "W2", "W3", "W4", "shared-prefix" or "fairness" (docs/benchmarks.md).
        params: every generator argument, for the record (stored JSON-normal: tuples become
            lists, so a saved workload loads back equal).
        num_adapters: n; request adapters index ``adapter_names()``.
        requests: in arrival order.
        max_concurrency: closed loop with this many requests in flight (W3: 32); None is
            open loop, each request sent at its arrival time.
    """

    kind: str
    params: dict[str, Any]
    num_adapters: int
    requests: tuple[BenchRequest, ...]
    max_concurrency: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {KINDS}")
        object.__setattr__(self, "params", json.loads(json.dumps(self.params)))
        if self.kind in _CHOSEN_POPULARITY and self.params.get("popularity") not in POPULARITIES:
            raise ValueError(f"{self.kind} needs params['popularity'] in {POPULARITIES}")
        if self.num_adapters < 0:
            raise ValueError(f"num_adapters = {self.num_adapters} < 0")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency = {self.max_concurrency} < 1")
        for prev, req in pairwise(self.requests):
            if req.arrival < prev.arrival:
                raise ValueError("requests must be in arrival order")
        if any(r.adapter is not None and r.adapter >= self.num_adapters for r in self.requests):
            raise ValueError(f"an adapter index is out of range for {self.num_adapters} adapters")

    @property
    def popularity(self) -> str:
        """The adapter law (module docstring): "power" for W2/W4, else ``params["popularity"]``."""
        return str(self.params["popularity"]) if self.kind in _CHOSEN_POPULARITY else "power"

    def adapter_names(self, prefix: str = "adapter-") -> list[str]:
        """The served name of adapter i is ``f"{prefix}{i}"``."""
        return [f"{prefix}{i}" for i in range(self.num_adapters)]

    def with_num_adapters(self, n: int) -> Workload:
        """The same requests with adapters re-drawn for n adapters from each stored x.

        Equal to the generator's output for ``num_adapters=n`` (same seed and arguments);
        n = 0 sends every request to the base model.
        """
        adapters = _assign(self.popularity, [r.x for r in self.requests], n)
        requests = tuple(
            replace(r, adapter=a) for r, a in zip(self.requests, adapters, strict=True)
        )
        params = {**self.params, "num_adapters": n}
        return replace(self, params=params, num_adapters=n, requests=requests)

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": FORMAT_VERSION,
                "kind": self.kind,
                "params": self.params,
                "num_adapters": self.num_adapters,
                "max_concurrency": self.max_concurrency,
                "requests": [
                    {
                        "arrival": r.arrival,
                        "adapter": r.adapter,
                        "x": r.x,
                        "output_len": r.output_len,
                        "prompt": list(r.prompt),
                    }
                    for r in self.requests
                ],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Workload:
        data = json.loads(text)
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unknown workload format version {data.get('version')!r}")
        requests = tuple(
            BenchRequest(
                arrival=float(r["arrival"]),
                adapter=r["adapter"],
                prompt=tuple(r["prompt"]),
                output_len=r["output_len"],
                x=float(r["x"]),
            )
            for r in data["requests"]
        )
        return cls(
            data["kind"], data["params"], data["num_adapters"], requests, data["max_concurrency"]
        )

    def save(self, path: str | PathLike[str]) -> None:
        """Write the workload as JSON; ``load`` gives back an equal workload (floats exact)."""
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | PathLike[str]) -> Workload:
        return cls.from_json(Path(path).read_text())


def _assign(law: str, xs: list[float], n: int) -> list[int | None]:
    """Each request's adapter for n adapters from its draw x (module docstring)."""
    if n == 0:
        return [None] * len(xs)
    x = np.asarray(xs, dtype=np.float64)
    if law == "power":
        idx = np.minimum(np.floor(n * x).astype(np.int64), n - 1)
    elif law == "distinct":
        idx = np.arange(len(xs)) % n
    elif law == "uniform":
        ranks = np.rint(x * len(xs) - 0.5).astype(np.int64)  # exact: x = (rank + 0.5) / N
        idx = ranks * n // len(xs)
    elif law == "skewed":
        weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** ZIPF_EXPONENT
        cdf = np.cumsum(weights) / weights.sum()
        idx = np.minimum(np.searchsorted(cdf, x, side="right"), n - 1)
    elif law == "identical":
        idx = np.zeros(len(xs), dtype=np.int64)
    else:
        raise ValueError(f"unknown popularity {law!r}")
    return [int(a) for a in idx]


def _check_range(name: str, bounds: tuple[int, int]) -> None:
    lo, hi = bounds
    if not 1 <= lo < hi:
        raise ValueError(f"{name} = {bounds}: need 1 <= lo < hi (lengths are drawn in [lo, hi))")


def _prompts(
    rng: np.random.Generator, lengths: npt.NDArray[np.int64], vocab_size: int, vocab_offset: int
) -> list[tuple[int, ...]]:
    """Token ids uniform in [vocab_offset, vocab_size): the low ids are special tokens."""
    if not 0 <= vocab_offset < vocab_size:
        raise ValueError(f"need 0 <= vocab_offset ({vocab_offset}) < vocab_size ({vocab_size})")
    ids = rng.integers(vocab_offset, vocab_size, size=int(lengths.sum()))
    return [tuple(chunk.tolist()) for chunk in np.split(ids, np.cumsum(lengths)[:-1])]


def synthetic_w2(
    *,
    num_adapters: int,
    alpha: float,
    rate: float,
    cv: float,
    num_requests: int,
    input_range: tuple[int, int] = (8, 512),
    output_range: tuple[int, int] = (8, 512),
    seed: int = 42,
    vocab_size: int,
    vocab_offset: int = 3,
) -> Workload:
    """S-LoRA's synthetic workload (W2), open loop.

    Adapter = floor(n·x), x ~ power(α). Inter-arrival gaps ~ Gamma(shape 1/cv², scale cv²/R):
    mean 1/R, coefficient of variation cv (cv = 1 is Poisson); request k arrives at the sum of
    the first k gaps. Input and output lengths are integers uniform in [lo, hi); prompt ids
    uniform in [vocab_offset, vocab_size).
    """
    if num_adapters < 0 or num_requests < 1 or rate <= 0 or cv <= 0 or alpha <= 0:
        raise ValueError("need num_adapters >= 0, num_requests >= 1 and rate, cv, alpha > 0")
    _check_range("input_range", input_range)
    _check_range("output_range", output_range)
    params = {
        "num_adapters": num_adapters,
        "alpha": alpha,
        "rate": rate,
        "cv": cv,
        "num_requests": num_requests,
        "input_range": input_range,
        "output_range": output_range,
        "seed": seed,
        "vocab_size": vocab_size,
        "vocab_offset": vocab_offset,
    }
    rng = np.random.default_rng(seed)
    # Gamma(k = 1/cv², θ = cv²/R): mean kθ = 1/R, std √k·θ = cv/R, so the gaps' cv is cv.
    gaps = rng.gamma(1.0 / cv**2, cv**2 / rate, size=num_requests)
    draws = np.minimum(rng.power(alpha, size=num_requests), _BELOW_ONE)
    inputs = rng.integers(*input_range, size=num_requests)
    outputs = rng.integers(*output_range, size=num_requests)
    prompts = _prompts(rng, inputs, vocab_size, vocab_offset)
    xs = [float(x) for x in draws]
    adapters = _assign("power", xs, num_adapters)
    requests = tuple(
        BenchRequest(float(t), a, p, int(o), x)
        for t, a, p, o, x in zip(np.cumsum(gaps), adapters, prompts, outputs, xs, strict=True)
    )
    return Workload("W2", params, num_adapters, requests, max_concurrency=None)


def churn_w4(
    *,
    num_adapters: int = 2000,
    alpha: float,
    rate: float,
    cv: float,
    num_requests: int,
    input_range: tuple[int, int] = (8, 512),
    output_range: tuple[int, int] = (8, 512),
    seed: int = 42,
    vocab_size: int,
    vocab_offset: int = 3,
) -> Workload:
    """Adapter churn (W4): W2's generator and law with far more adapters than fit at once.

    The request list alone does not make churn: what distinguishes W4 is the server side, a
    pool too small for all n adapters (e.g. 2000 × rank 64), so requests keep arriving for
    adapters that must be loaded, evicting others. Sweep α: a small α keeps a few adapters
    hot; α = 1 spreads requests over all n, most of them cold. Same seed and arguments give
    the same requests as ``synthetic_w2``.
    """
    w2 = synthetic_w2(
        num_adapters=num_adapters,
        alpha=alpha,
        rate=rate,
        cv=cv,
        num_requests=num_requests,
        input_range=input_range,
        output_range=output_range,
        seed=seed,
        vocab_size=vocab_size,
        vocab_offset=vocab_offset,
    )
    return replace(w2, kind="W4")


def default_num_adapters(popularity: str, num_requests: int) -> int:
    """Punica's adapter count for a W3 popularity over N requests (module docstring)."""
    if popularity == "distinct":
        return num_requests
    if popularity in ("uniform", "skewed"):
        return math.isqrt(num_requests - 1) + 1  # ⌈√N⌉
    if popularity == "identical":
        return 1
    raise ValueError(f"popularity {popularity!r} is not one of {POPULARITIES}")


def closed_loop_w3(
    *,
    num_requests: int = 1000,
    popularity: str,
    num_adapters: int | None = None,
    prompt_mean_log: float = math.log(18.0),
    prompt_sigma_log: float = 0.8,
    max_prompt: int = 2048,
    output_range: tuple[int, int] = (8, 512),
    seed: int = 42,
    vocab_size: int,
    vocab_offset: int = 3,
) -> Workload:
    """Punica's closed loop (W3): every request queued at 0, at most 32 in flight, FCFS.

    Prompt lengths are floor(exp(N(prompt_mean_log, prompt_sigma_log²))) clipped to
    [1, max_prompt] (Punica's log-normal: median ≈ 18 tokens); output lengths uniform in
    [lo, hi). ``num_adapters`` None takes Punica's count for the popularity
    (``default_num_adapters``); the popularity laws are in the module docstring.
    """
    if num_requests < 1 or max_prompt < 1 or prompt_sigma_log < 0:
        raise ValueError("need num_requests >= 1, max_prompt >= 1, prompt_sigma_log >= 0")
    _check_range("output_range", output_range)
    n = default_num_adapters(popularity, num_requests) if num_adapters is None else num_adapters
    params = {
        "num_requests": num_requests,
        "popularity": popularity,
        "num_adapters": n,
        "prompt_mean_log": prompt_mean_log,
        "prompt_sigma_log": prompt_sigma_log,
        "max_prompt": max_prompt,
        "output_range": output_range,
        "seed": seed,
        "vocab_size": vocab_size,
        "vocab_offset": vocab_offset,
    }
    rng = np.random.default_rng(seed)
    raw = np.floor(rng.lognormal(prompt_mean_log, prompt_sigma_log, size=num_requests))
    prompt_lens = np.clip(raw, 1, max_prompt).astype(np.int64)
    outputs = rng.integers(*output_range, size=num_requests)
    ranks = rng.permutation(num_requests)
    uniforms = rng.random(num_requests)
    prompts = _prompts(rng, prompt_lens, vocab_size, vocab_offset)
    draws = (ranks + 0.5) / num_requests if popularity == "uniform" else uniforms
    xs = [float(x) for x in draws]
    requests = tuple(
        BenchRequest(0.0, a, p, int(o), x)
        for a, p, o, x in zip(_assign(popularity, xs, n), prompts, outputs, xs, strict=True)
    )
    return Workload("W3", params, n, requests, max_concurrency=W3_MAX_CONCURRENCY)


def shared_prefix(
    *,
    num_requests: int = 64,
    num_adapters: int = 8,
    prefix_len: int = 1000,
    question_range: tuple[int, int] = (16, 49),
    output_range: tuple[int, int] = (16, 33),
    concurrency: int = 8,
    seed: int = 42,
    vocab_size: int,
    vocab_offset: int = 3,
) -> Workload:
    """One system prompt shared by every request, short questions over n adapters, closed loop.

    Every prompt begins with the same ``prefix_len`` token ids (the system prompt) and ends
    with its own question of q tokens, q uniform in ``question_range`` ([lo, hi)); the output
    length is uniform in ``output_range``. All ids are uniform in [vocab_offset, vocab_size).
    Adapters follow W3's ``uniform`` law (module docstring): each of the n adapters gets
    ⌊N/n⌋ or ⌈N/n⌉ of the N requests, in shuffled order; n = 0 sends all to the base model.

    Arrivals are a closed loop with ``concurrency`` requests in flight, like that many chat
    users each asking their next question once the last answer is complete: every request
    is queued at 0 and the client sends the next one, in list order, whenever one finishes.
    Not everything at once: then every request would be admitted before any system prompt
    had been computed, and each would compute it itself; in a closed loop only the first
    requests of each adapter (those sent before its system prompt is in the cache) miss.
    """
    if num_requests < 1 or num_adapters < 0 or prefix_len < 1 or concurrency < 1:
        raise ValueError(
            "need num_requests >= 1, num_adapters >= 0, prefix_len >= 1 and concurrency >= 1"
        )
    _check_range("question_range", question_range)
    _check_range("output_range", output_range)
    params = {
        "num_requests": num_requests,
        "num_adapters": num_adapters,
        "popularity": "uniform",
        "prefix_len": prefix_len,
        "question_range": question_range,
        "output_range": output_range,
        "concurrency": concurrency,
        "seed": seed,
        "vocab_size": vocab_size,
        "vocab_offset": vocab_offset,
    }
    rng = np.random.default_rng(seed)
    (system,) = _prompts(rng, np.array([prefix_len]), vocab_size, vocab_offset)
    question_lens = rng.integers(*question_range, size=num_requests)
    outputs = rng.integers(*output_range, size=num_requests)
    ranks = rng.permutation(num_requests)
    questions = _prompts(rng, question_lens, vocab_size, vocab_offset)
    xs = [float(x) for x in (ranks + 0.5) / num_requests]
    requests = tuple(
        BenchRequest(0.0, a, system + q, int(o), x)
        for a, q, o, x in zip(
            _assign("uniform", xs, num_adapters), questions, outputs, xs, strict=True
        )
    )
    return Workload("shared-prefix", params, num_adapters, requests, max_concurrency=concurrency)


def describe(workload: Workload) -> dict[str, Any]:
    """Empirical statistics of a workload, for the CLI to print beside what it asked for.

    ``top_adapter_share`` is the most-requested adapter's share of all requests;
    ``mean_rate`` (req/s) is N / last arrival and ``interarrival_cv`` std / mean of the gaps
    (the first gap measured from 0), both None in a closed loop.
    """
    reqs = workload.requests
    num = len(reqs)
    counts = Counter(r.adapter for r in reqs if r.adapter is not None)
    arrivals = np.array([r.arrival for r in reqs], dtype=np.float64)
    mean_rate: float | None = None
    cv: float | None = None
    if workload.max_concurrency is None and num > 0 and arrivals[-1] > 0:
        gaps = np.diff(arrivals, prepend=0.0)
        mean_rate = num / float(arrivals[-1])
        cv = float(np.std(gaps) / np.mean(gaps))
    inputs = [len(r.prompt) for r in reqs]
    outputs = [r.output_len for r in reqs]
    return {
        "kind": workload.kind,
        "requests": num,
        "num_adapters": workload.num_adapters,
        "adapters_used": len(counts),
        "base_requests": sum(r.adapter is None for r in reqs),
        "top_adapter_share": max(counts.values()) / num if counts else 0.0,
        "max_concurrency": workload.max_concurrency,
        "mean_rate": mean_rate,
        "interarrival_cv": cv,
        "mean_input_len": float(np.mean(inputs)) if num else 0.0,
        "mean_output_len": float(np.mean(outputs)) if num else 0.0,
        "total_input_tokens": sum(inputs),
        "total_output_tokens": sum(outputs),
    }
