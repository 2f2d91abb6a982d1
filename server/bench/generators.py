"""The seeded request lists of docs/benchmarks.md: W2 (S-LoRA's synthetic serving), W3
(Punica's closed loop), W4 (adapter churn) and the shared-prefix list of ``bench prefix``.

Each generator returns a :class:`~server.bench.workload.Workload` (the popularity laws that
pick each request's adapter are described there). Everything comes from one
``numpy.random.default_rng(seed)``, so a seed fixes the list.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from server.bench.workload import POPULARITIES, BenchRequest, Workload, assign_adapters

W3_MAX_CONCURRENCY = 32  # Punica's batch size
_BELOW_ONE = math.nextafter(1.0, 0.0)  # power(α) may return 1.0; floor(n·x) must stay < n


def check_range(name: str, bounds: tuple[int, int]) -> None:
    """A ValueError unless ``bounds`` is a [lo, hi) length range with 1 <= lo < hi."""
    lo, hi = bounds
    if not 1 <= lo < hi:
        raise ValueError(f"{name} = {bounds}: need 1 <= lo < hi (lengths are drawn in [lo, hi))")


def draw_prompts(
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
    check_range("input_range", input_range)
    check_range("output_range", output_range)
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
    prompts = draw_prompts(rng, inputs, vocab_size, vocab_offset)
    xs = [float(x) for x in draws]
    adapters = assign_adapters("power", xs, num_adapters)
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
    """Punica's adapter count for a W3 popularity over N requests (:mod:`server.bench.workload`)."""
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
    (``default_num_adapters``); the popularity laws are in :mod:`server.bench.workload`.
    """
    if num_requests < 1 or max_prompt < 1 or prompt_sigma_log < 0:
        raise ValueError("need num_requests >= 1, max_prompt >= 1, prompt_sigma_log >= 0")
    check_range("output_range", output_range)
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
    prompts = draw_prompts(rng, prompt_lens, vocab_size, vocab_offset)
    draws = (ranks + 0.5) / num_requests if popularity == "uniform" else uniforms
    xs = [float(x) for x in draws]
    requests = tuple(
        BenchRequest(0.0, a, p, int(o), x)
        for a, p, o, x in zip(assign_adapters(popularity, xs, n), prompts, outputs, xs, strict=True)
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
    Adapters follow W3's ``uniform`` law (:mod:`server.bench.workload`): each of the n adapters gets
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
    check_range("question_range", question_range)
    check_range("output_range", output_range)
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
    (system,) = draw_prompts(rng, np.array([prefix_len]), vocab_size, vocab_offset)
    question_lens = rng.integers(*question_range, size=num_requests)
    outputs = rng.integers(*output_range, size=num_requests)
    ranks = rng.permutation(num_requests)
    questions = draw_prompts(rng, question_lens, vocab_size, vocab_offset)
    xs = [float(x) for x in (ranks + 0.5) / num_requests]
    requests = tuple(
        BenchRequest(0.0, a, system + q, int(o), x)
        for a, q, o, x in zip(
            assign_adapters("uniform", xs, num_adapters), questions, outputs, xs, strict=True
        )
    )
    return Workload("shared-prefix", params, num_adapters, requests, max_concurrency=concurrency)
