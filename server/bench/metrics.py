"""Per-request timings and the numbers ``vllm bench serve`` prints from them.

Definitions (times in seconds on one monotonic clock; reported in ms):

* TTFT = first token time − start.
* TPOT = (last token time − first token time) / (output_len − 1), for requests with at least
  two tokens: the decode pace, excluding the first token.
* ITL = every gap between consecutive token times, pooled over requests. A streamed chunk
  carrying k tokens gives k equal times, so its zero gaps count, as in vLLM.
* E2EL = end − start.

Latency statistics cover completed requests only (``error is None``); SLO attainment is over
all requests, a failed request counting as a miss. Percentiles are numpy's default (linear
interpolation). Statistics of an empty set are None; counts and throughputs are 0.

Failed requests are counted by kind, the HTTP status and the error envelope's ``code``
(``{"error": {"message", "type", "param", "code"}}``), a request that got no answer or lost
it mid-stream counting as a connection error; the summary keeps the first few distinct
messages, so that a run where everything failed says why.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np

PERCENTILES = (90, 99)  # beside mean and median
MAX_FAILURE_MESSAGES = 3  # distinct messages kept in a summary
CONNECTION_ERROR = "connection_error"  # ``error_code`` when no answer (or half of one) came
_METRICS = (
    ("ttft", "Time to First Token", "TTFT"),
    ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
    ("itl", "Inter-token Latency", "ITL"),
    ("e2el", "End-to-end Latency", "E2EL"),
)


@dataclass
class RequestRecord:
    """What a client saw of one request.

    Attributes:
        adapter: the model name it was sent to; None is the base model.
        prompt_len: prompt tokens.
        start: when it was sent (monotonic seconds).
        token_times: when each generated token arrived; a chunk of k tokens appends k equal
            times.
        end: when the response completed.
        output_len: tokens received.
        error: why it failed; None when it completed.
        cached_tokens: prompt tokens the server read from its prefix cache, as its usage
            reports them (``usage.prompt_tokens_details.cached_tokens``); None when it does
            not say.
        status: the HTTP status of the answer (200 for a stream that then carried an error);
            None when no answer came, or the request did not go over HTTP.
        error_code: why it failed, as a kind: the error envelope's ``code``, or
            ``CONNECTION_ERROR`` (refused, reset, a stream cut short), or
            ``"protocol_error"`` (an answer the client could not read); None when it
            completed, or when the server gave no code.
    """

    adapter: str | None
    prompt_len: int
    start: float
    token_times: list[float] = field(default_factory=list)
    end: float = 0.0
    output_len: int = 0
    error: str | None = None
    cached_tokens: int | None = None
    status: int | None = None
    error_code: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None

    @property
    def tpot(self) -> float | None:
        """None below two tokens: no decode step to time."""
        if self.output_len < 2 or not self.token_times:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (self.output_len - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in pairwise(self.token_times)]

    @property
    def e2el(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class SLO:
    """A latency objective; a None bound is not checked.

    A request meets it when it completed with at least one token, TTFT ≤ ``ttft_s`` and
    TPOT ≤ ``tpot_s`` (bounds inclusive, as vLLM's ``--goodput``); a one-token request has
    no TPOT and passes that check.
    """

    ttft_s: float | None
    tpot_s: float | None

    def met(self, record: RequestRecord) -> bool:
        ttft = record.ttft
        if not record.ok or ttft is None:
            return False
        if self.ttft_s is not None and ttft > self.ttft_s:
            return False
        tpot = record.tpot
        return self.tpot_s is None or tpot is None or tpot <= self.tpot_s


def _stats(name: str, values_s: Sequence[float]) -> dict[str, float | None]:
    """mean, median and ``PERCENTILES`` of ``values_s`` in ms; None for an empty set."""
    keys = [f"mean_{name}_ms", f"median_{name}_ms"] + [f"p{p}_{name}_ms" for p in PERCENTILES]
    if not values_s:
        return dict.fromkeys(keys, None)
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    stats = [np.mean(ms), np.median(ms), *np.percentile(ms, PERCENTILES)]
    return {k: float(v) for k, v in zip(keys, stats, strict=True)}


def failure_kind(status: int | None, code: str | None) -> str:
    """How a kind of failure is named: "HTTP 400 context_length_exceeded", "connection
    error", "HTTP 200, then server_error in the stream"; "error" for a request that failed
    without a status or a code (one run in-process)."""
    if code == CONNECTION_ERROR:
        return "connection error"
    if status is None:
        return code.replace("_", " ") if code else "error"
    if status == 200:
        return f"HTTP 200, then {code or 'an error'} in the stream"
    return f"HTTP {status}" + (f" {code}" if code else "")


def _failures(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """``failures``: one entry per kind (``failure_kind``'s name, status, code, count), the
    most frequent first; ``failure_messages``: the first ``MAX_FAILURE_MESSAGES`` distinct
    messages, each after its kind."""
    failed = [r for r in records if not r.ok]
    kinds = Counter((r.status, r.error_code) for r in failed)  # most_common: ties by first seen
    messages = dict.fromkeys(f"{failure_kind(r.status, r.error_code)}: {r.error}" for r in failed)
    return {
        "failures": [
            {"kind": failure_kind(status, code), "status": status, "code": code, "count": count}
            for (status, code), count in kinds.most_common()
        ],
        "failure_messages": list(messages)[:MAX_FAILURE_MESSAGES],
    }


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    slos: Mapping[str, SLO] | None = None,
) -> dict[str, Any]:
    """The fields of ``vllm bench serve`` (module docstring), plus one entry per SLO.

    Token totals count completed requests; throughputs divide by ``duration_s`` (0 when it
    is not positive). ``total_cached_tokens`` sums the prompt tokens the server reported
    reading from its prefix cache, None when no completed request's usage said.
    ``failures`` and ``failure_messages`` say why requests failed (``_failures``).
    ``summary["slo"][name]`` holds the SLO's bounds, ``met`` (requests), ``attainment``
    (met / all requests; None without requests) and ``goodput`` (met / s).
    """
    done = [r for r in records if r.ok]
    inputs = sum(r.prompt_len for r in done)
    outputs = sum(r.output_len for r in done)
    cached = [r.cached_tokens for r in done if r.cached_tokens is not None]

    def per_s(count: float) -> float:
        return count / duration_s if duration_s > 0 else 0.0

    summary: dict[str, Any] = {
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration_s,
        "total_input_tokens": inputs,
        "total_output_tokens": outputs,
        "total_cached_tokens": sum(cached) if cached else None,
        "request_throughput": per_s(len(done)),
        "output_throughput": per_s(outputs),
        "total_token_throughput": per_s(inputs + outputs),
        **_failures(records),
    }
    values: dict[str, list[float]] = {
        "ttft": [t for r in done if (t := r.ttft) is not None],
        "tpot": [t for r in done if (t := r.tpot) is not None],
        "itl": [gap for r in done for gap in r.itls],
        "e2el": [r.e2el for r in done],
    }
    for name, _, _ in _METRICS:
        summary.update(_stats(name, values[name]))
    summary["slo"] = {}
    for name, slo in (slos or {}).items():
        met = sum(slo.met(r) for r in records)
        summary["slo"][name] = {
            "ttft_s": slo.ttft_s,
            "tpot_s": slo.tpot_s,
            "met": met,
            "attainment": met / len(records) if records else None,
            "goodput": per_s(met),
        }
    return summary


def replay_span(records: Sequence[RequestRecord], fallback: float) -> float:
    """From the first send to the last answer: a replay's own duration (``fallback`` when
    nothing was answered)."""
    ends = [r.end for r in records if r.end]
    return max(ends) - min(r.start for r in records) if records and ends else fallback


def _line(label: str, value: object, digits: int = 2) -> str:
    if value is None:
        text = "n/a"
    elif isinstance(value, float):
        text = f"{value:.{digits}f}"
    else:
        text = str(value)
    return f"{label:<40} {text:<10}".rstrip()


def all_failed(summary: Mapping[str, Any]) -> bool:
    """Requests were sent and none completed: the run measured nothing."""
    return bool(summary["failed"]) and not summary["completed"]


def failure_lines(summary: Mapping[str, Any]) -> list[str]:
    """The failures' kinds with their counts, then the sample messages; none when nothing
    failed."""
    if not summary.get("failed"):
        return []
    total = summary["completed"] + summary["failed"]
    lines = [f"All {total} requests failed: nothing was measured."] if all_failed(summary) else []
    lines += [_line(f"{f['kind']}:", f["count"]) for f in summary.get("failures", [])]
    lines += [f"e.g. {message}" for message in summary.get("failure_messages", [])]
    return lines


def describe_failures(summary: Mapping[str, Any]) -> str:
    """One line for a table or a note: how many failed, of which kinds, and the first
    message ("" when none failed)."""
    if not summary.get("failed"):
        return ""
    total = summary["completed"] + summary["failed"]
    kinds = ", ".join(f"{f['kind']}: {f['count']}" for f in summary.get("failures", []))
    messages = summary.get("failure_messages", [])
    first = f"; e.g. {messages[0]}" if messages else ""
    return f"{summary['failed']} of {total} requests failed ({kinds}){first}"


def format_summary(summary: Mapping[str, Any], title: str = "Serving Benchmark Result") -> str:
    """``summarize``'s result as the text table ``vllm bench serve`` prints, with a section
    on the failed requests when some failed."""
    lines = [
        f"{' ' + title + ' ':=^50}",
        _line("Successful requests:", summary["completed"]),
        _line("Failed requests:", summary["failed"]),
        _line("Benchmark duration (s):", summary["duration_s"]),
        _line("Total input tokens:", summary["total_input_tokens"]),
        _line("Total generated tokens:", summary["total_output_tokens"]),
        _line("Request throughput (req/s):", summary["request_throughput"]),
        _line("Output token throughput (tok/s):", summary["output_throughput"]),
        _line("Total token throughput (tok/s):", summary["total_token_throughput"]),
    ]
    failures = failure_lines(summary)
    if failures:
        lines += [f"{'Failures':-^50}", *failures]
    for name, heading, short in _METRICS:
        lines.append(f"{heading:-^50}")
        lines.append(_line(f"Mean {short} (ms):", summary[f"mean_{name}_ms"]))
        lines.append(_line(f"Median {short} (ms):", summary[f"median_{name}_ms"]))
        for p in PERCENTILES:
            lines.append(_line(f"P{p} {short} (ms):", summary[f"p{p}_{name}_ms"]))
    slos: Mapping[str, Mapping[str, Any]] = summary.get("slo", {})
    if slos:
        lines.append(f"{'Service Level Objectives':-^50}")
    for name, slo in slos.items():
        attainment = slo["attainment"]
        percent = None if attainment is None else 100.0 * attainment
        lines.append(_line(f"SLO {name} attainment (%):", percent))
        lines.append(_line(f"SLO {name} goodput (req/s):", slo["goodput"]))
    lines.append("=" * 50)
    return "\n".join(lines)


def latency_cdf(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """The empirical CDF for a step plot: sorted values and the fraction ≤ each, (i+1)/N."""
    xs = sorted(float(v) for v in values)
    return xs, [(i + 1) / len(xs) for i in range(len(xs))]
