"""A seeded request list as data: :class:`Workload` and its :class:`BenchRequest`.

A workload is what every system compared replays unchanged: requests with an arrival time,
an adapter index, prompt token ids and an exact output length, saved as JSON (:meth:`Workload.save`,
:meth:`Workload.load`). :mod:`server.bench.generators` draws W2, W3, W4 and the shared-prefix
list; :mod:`server.bench.fairness_workload` the flooding-client list of ``bench fairness``.

Adapters and the sweep over n. Each request stores a draw ``x`` in [0, 1) beside its adapter,
and the adapter is a fixed function of (x, the request's index i, n adapters), the workload's
popularity law (:func:`assign_adapters`):

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
from collections import Counter
from dataclasses import dataclass, replace
from itertools import pairwise
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("W2", "W3", "W4", "shared-prefix", "fairness")
POPULARITIES = ("distinct", "uniform", "skewed", "identical")
_CHOSEN_POPULARITY = ("W3", "shared-prefix")  # kinds whose params name their adapter law
ZIPF_EXPONENT = 1.5
FORMAT_VERSION = 1


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
        adapters = assign_adapters(self.popularity, [r.x for r in self.requests], n)
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


def assign_adapters(law: str, xs: list[float], n: int) -> list[int | None]:
    """Each request's adapter for n adapters from its draw x, by popularity ``law`` (module
    docstring)."""
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
