"""The flooding-client workload of ``loraserve bench fairness``: one client sends far more
than its share while the others send a modest, steady load.

Clients are adapters (the fair policy's default ``--fairness-key adapter``): adapter
:data:`FLOODER` (0) is the flooding client, adapters 1 … n−1 are the modest ones.

* The flooder is a closed loop of ``flood_concurrency`` requests in flight: its
  ``flood_requests`` requests are queued at 0 and each is sent, in list order, as soon as one
  of its earlier ones is answered, like a batch job with that many workers. Its
  concurrency, well above the server's ``--max-num-seqs``, keeps a queue of its requests
  waiting in the server whatever the machine's speed: the server stays overloaded for as
  long as the flooder has requests left.
* Each modest client is an open loop: a Poisson process of ``modest_rate`` requests per second
  over [``modest_start_s``, ``modest_start_s + duration_s``), independent of the others, so
  its requests arrive at the same times in every system, whatever the flooder gets. They
  start once the flood is under way: at 0 the flooder's first ``flood_concurrency``
  requests arrive at once, the server admits a full batch of them together, and no place
  frees until that batch finishes, together too; a request arriving then waits for it
  whatever the policy (a policy orders admissions, it does not interrupt running
  requests). From then on the flooder's requests finish one by one, as they would in a
  flood that had been going on for a while.

Every request draws its prompt length from ``input_range`` and its output length from
``output_range`` (both ``[lo, hi)``), the same laws for every client, so clients differ only
in how much they ask; prompt ids are uniform in [vocab_offset, vocab_size). Outputs are
exact (greedy, EOS ignored, ``min_tokens = max_tokens``), so every system does the same work.

The list is a :class:`~server.bench.workload.Workload` of kind "fairness" (saved as JSON
like the others): the flooder's requests first, all at arrival 0, then the modest clients'
requests merged in arrival order. ``max_concurrency`` is None (the modest clients are an
open loop) and ``params["flood_concurrency"]`` says how to replay the flooder;
``bench serve --workload`` would send the flooder's requests all at once instead. Each
request's ``x`` is (adapter + 0.5) / n, so the workload's "power" law gives its adapter back.
"""

from __future__ import annotations

import numpy as np

from server.bench.generators import check_range, draw_prompts
from server.bench.workload import BenchRequest, Workload

FLOODER = 0  # the flooding client's adapter index
GROUPS = ("flooder", "modest")


def client_group(adapter: int | None) -> str:
    """ "flooder" for adapter :data:`FLOODER`, "modest" for every other client."""
    return "flooder" if adapter == FLOODER else "modest"


def flooding(
    *,
    num_adapters: int = 8,
    flood_requests: int = 8000,
    flood_concurrency: int = 128,
    modest_rate: float = 1.0,
    modest_start_s: float = 5.0,
    duration_s: float = 50.0,
    input_range: tuple[int, int] = (16, 64),
    output_range: tuple[int, int] = (16, 48),
    seed: int = 42,
    vocab_size: int,
    vocab_offset: int = 3,
) -> Workload:
    """The flooding-client list (module docstring): adapter 0 floods in a closed loop, adapters
    1 … n−1 each send a Poisson stream of ``modest_rate`` req/s for ``duration_s`` seconds
    from ``modest_start_s``."""
    if num_adapters < 2:
        raise ValueError("num_adapters must be at least 2: a flooder and a modest client")
    if flood_requests < 1 or flood_concurrency < 1:
        raise ValueError("flood_requests and flood_concurrency must be at least 1")
    if modest_rate <= 0 or duration_s <= 0 or modest_start_s < 0:
        raise ValueError("modest_rate and duration_s must be positive, modest_start_s >= 0")
    check_range("input_range", input_range)
    check_range("output_range", output_range)
    params = {
        "num_adapters": num_adapters,
        "flooder": FLOODER,
        "flood_requests": flood_requests,
        "flood_concurrency": flood_concurrency,
        "modest_rate": modest_rate,
        "modest_start_s": modest_start_s,
        "duration_s": duration_s,
        "input_range": input_range,
        "output_range": output_range,
        "seed": seed,
        "vocab_size": vocab_size,
        "vocab_offset": vocab_offset,
    }
    rng = np.random.default_rng(seed)
    arrivals: list[tuple[float, int]] = [(0.0, FLOODER)] * flood_requests
    modest: list[tuple[float, int]] = []
    for adapter in range(1, num_adapters):
        # Enough exponential gaps to pass duration_s with near certainty; the rest are cut.
        mean = modest_rate * duration_s
        gaps = rng.exponential(1.0 / modest_rate, size=int(mean + 10 * np.sqrt(mean) + 10))
        modest += [(modest_start_s + float(t), adapter) for t in np.cumsum(gaps) if t < duration_s]
    arrivals += sorted(modest)
    count = len(arrivals)
    inputs = rng.integers(*input_range, size=count)
    outputs = rng.integers(*output_range, size=count)
    prompts = draw_prompts(rng, inputs, vocab_size, vocab_offset)
    requests = tuple(
        BenchRequest(t, a, p, int(o), (a + 0.5) / num_adapters)
        for (t, a), p, o in zip(arrivals, prompts, outputs, strict=True)
    )
    return Workload("fairness", params, num_adapters, requests, max_concurrency=None)
