"""``loraserve bench``'s data side: workload statistics and the metric arithmetic.

No server and no clock: generators are checked against their laws (tolerances about four
standard errors of each estimate), metrics against hand-computed records.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.bench.generators import churn_w4, closed_loop_w3, synthetic_w2
from server.bench.metrics import SLO, RequestRecord, format_summary, latency_cdf, summarize
from server.bench.workload import BenchRequest, Workload, describe

VOCAB = 1000


def w2(**overrides: Any) -> Workload:
    args: dict[str, Any] = dict(
        num_adapters=10, alpha=1.0, rate=10.0, cv=1.0, num_requests=2000, vocab_size=VOCAB
    )
    args.update(overrides)
    return synthetic_w2(**args)


# ----------------------------------------------------------------------------------------------
# W2 / W4: S-LoRA's synthetic workload
# ----------------------------------------------------------------------------------------------


def test_alpha_one_is_near_uniform() -> None:
    n, num = 10, 5000
    counts = Counter(r.adapter for r in w2(num_adapters=n, num_requests=num).requests)
    assert set(counts) == set(range(n))
    expected = num / n
    sigma = math.sqrt(expected * (1 - 1 / n))
    assert all(abs(c - expected) < 4 * sigma for c in counts.values()), counts


def test_small_alpha_matches_the_power_law() -> None:
    n, alpha, num = 100, 0.1, 2000
    workload = w2(num_adapters=n, alpha=alpha, num_requests=num)
    counts = Counter(r.adapter for r in workload.requests)
    for k in (0, 1, 9):
        # P(floor(n·X) = k) = P(k/n ≤ X < (k+1)/n) = ((k+1)/n)^α − (k/n)^α
        p = ((k + 1) / n) ** alpha - (k / n) ** alpha
        assert abs(counts[k] / num - p) < 4 * math.sqrt(p * (1 - p) / num), (k, counts[k], p)
    assert abs(describe(workload)["top_adapter_share"] - (1 / n) ** alpha) < 0.05
    assert all(r.adapter == min(math.floor(n * r.x), n - 1) for r in workload.requests)


@pytest.mark.parametrize(("rate", "cv"), [(10.0, 1.0), (4.0, 0.5), (20.0, 2.0)])
def test_gamma_arrivals_have_the_asked_rate_and_cv(rate: float, cv: float) -> None:
    workload = w2(rate=rate, cv=cv, num_requests=4000, input_range=(8, 9), output_range=(8, 9))
    stats = describe(workload)
    assert stats["mean_rate"] == pytest.approx(rate, rel=0.1)
    assert stats["interarrival_cv"] == pytest.approx(cv, rel=0.1)
    arrivals = [r.arrival for r in workload.requests]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    assert workload.max_concurrency is None


def test_lengths_and_token_ids_are_uniform_in_range() -> None:
    workload = w2(input_range=(8, 16), output_range=(20, 40), vocab_offset=3)
    inputs = np.array([len(r.prompt) for r in workload.requests])
    outputs = np.array([r.output_len for r in workload.requests])
    assert set(inputs.tolist()) == set(range(8, 16))  # every length, hi excluded
    assert set(outputs.tolist()) == set(range(20, 40))
    assert inputs.mean() == pytest.approx(11.5, rel=0.03)
    assert outputs.mean() == pytest.approx(29.5, rel=0.03)
    ids = np.concatenate([r.prompt for r in workload.requests])
    assert ids.min() == 3 and ids.max() == VOCAB - 1
    assert abs(ids.mean() - (3 + VOCAB - 1) / 2) < 10


def test_same_seed_same_list_other_seed_other_list() -> None:
    assert w2(seed=7).to_json() == w2(seed=7).to_json()
    assert w2(seed=7).to_json() != w2(seed=8).to_json()


def test_save_load_round_trip(tmp_path: Path) -> None:
    workload = w2(num_requests=50, input_range=(8, 12), cv=3.0)
    workload.save(tmp_path / "w.json")
    loaded = Workload.load(tmp_path / "w.json")
    assert loaded == workload
    assert loaded.requests[17].arrival == workload.requests[17].arrival  # floats exact
    assert loaded.params["input_range"] == [8, 12]  # stored JSON-normal on both sides
    w3 = closed_loop_w3(num_requests=40, popularity="skewed", vocab_size=VOCAB)
    w3.save(tmp_path / "w3.json")
    assert Workload.load(tmp_path / "w3.json") == w3


def test_with_num_adapters_redraws_from_the_same_x() -> None:
    workload = w2(num_adapters=5, alpha=0.5, num_requests=300)
    for n in (1, 64, 2000):
        swept = workload.with_num_adapters(n)
        # the same list the generator makes for n: only the adapter column moves
        assert swept == w2(num_adapters=n, alpha=0.5, num_requests=300)
        assert [r.x for r in swept.requests] == [r.x for r in workload.requests]
        assert [r.prompt for r in swept.requests] == [r.prompt for r in workload.requests]
        assert all(r.adapter == math.floor(n * r.x) for r in swept.requests)
        assert swept.params["num_adapters"] == n and len(swept.adapter_names()) == n
    base = workload.with_num_adapters(0)
    assert all(r.adapter is None for r in base.requests) and base.adapter_names() == []
    assert base.with_num_adapters(5) == workload


def test_adapter_names() -> None:
    assert w2(num_adapters=3).adapter_names() == ["adapter-0", "adapter-1", "adapter-2"]
    assert w2(num_adapters=2).adapter_names("lora") == ["lora0", "lora1"]


def test_churn_is_w2s_law_with_many_adapters() -> None:
    args: dict[str, Any] = dict(alpha=0.5, rate=5.0, cv=1.0, num_requests=500, vocab_size=VOCAB)
    w4 = churn_w4(**args)
    assert w4.kind == "W4" and w4.num_adapters == 2000 and w4.params["num_adapters"] == 2000
    assert w4.params["alpha"] == 0.5 and w4.params["seed"] == 42
    assert w4.requests == synthetic_w2(num_adapters=2000, **args).requests
    assert describe(w4)["adapters_used"] > 100


def test_workload_rejects_bad_lists() -> None:
    request = BenchRequest(0.0, 3, (5, 6), 4)
    with pytest.raises(ValueError, match="out of range"):
        Workload("W2", {}, 3, (request,))
    with pytest.raises(ValueError, match="arrival order"):
        Workload("W2", {}, 4, (BenchRequest(1.0, 0, (5,), 1), BenchRequest(0.5, 0, (5,), 1)))
    with pytest.raises(ValueError, match="kind"):
        Workload("W9", {}, 4, (request,))
    with pytest.raises(ValueError):
        w2(cv=0.0)


# ----------------------------------------------------------------------------------------------
# W3: Punica's closed loop
# ----------------------------------------------------------------------------------------------


def w3(popularity: str, **overrides: Any) -> Workload:
    return closed_loop_w3(popularity=popularity, vocab_size=VOCAB, **overrides)


def test_w3_is_a_closed_loop_of_log_normal_prompts() -> None:
    workload = w3("uniform", max_prompt=100)
    assert workload.kind == "W3" and workload.max_concurrency == 32
    assert len(workload.requests) == 1000
    assert all(r.arrival == 0.0 for r in workload.requests)
    lens = np.array([len(r.prompt) for r in workload.requests])
    assert lens.min() >= 1 and lens.max() == 100  # clipped
    assert 15 <= np.median(lens) <= 21  # floor(exp(N(ln 18, 0.8²))): median ≈ 17.5
    assert describe(workload)["mean_rate"] is None


def test_w3_popularities() -> None:
    distinct = w3("distinct")
    assert distinct.num_adapters == 1000
    assert [r.adapter for r in distinct.requests] == list(range(1000))
    assert [r.adapter for r in distinct.with_num_adapters(40).requests[:80]] == [
        i % 40 for i in range(80)
    ]

    uniform = w3("uniform")
    assert uniform.num_adapters == 32  # ⌈√1000⌉
    for n in (32, 7, 1000):
        counts = Counter(r.adapter for r in uniform.with_num_adapters(n).requests)
        assert len(counts) == n and set(counts.values()) <= {1000 // n, -(-1000 // n)}
    first = [r.x for r in uniform.requests[:32]]
    assert first != sorted(first)  # shuffled, not in blocks

    skewed = w3("skewed")
    n = skewed.num_adapters
    share = 1.0 / sum((k + 1) ** -1.5 for k in range(n))  # Zipf-1.5: P(0)
    counts = Counter(r.adapter for r in skewed.requests)
    assert abs(counts[0] / 1000 - share) < 4 * math.sqrt(share * (1 - share) / 1000)
    assert counts[0] > counts[1] > counts[3]

    identical = w3("identical")
    assert identical.num_adapters == 1
    assert {r.adapter for r in identical.requests} == {0}
    assert w3("identical", num_adapters=5).adapter_names()[0] == "adapter-0"
    assert all(r.adapter is None for r in w3("skewed", num_adapters=0).requests)


def test_w3_with_num_adapters_matches_the_generator() -> None:
    for popularity in ("distinct", "uniform", "skewed", "identical"):
        assert w3(popularity, num_adapters=5).with_num_adapters(9) == w3(popularity, num_adapters=9)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def record(start: float, times: list[float], end: float, *, prompt: int = 10) -> RequestRecord:
    return RequestRecord("a", prompt, start, list(times), end, len(times), None)


def test_record_definitions() -> None:
    # the 3rd and 4th tokens came in one chunk
    r = record(0.0, [0.5, 0.6, 0.8, 0.8, 1.0], 1.1)
    assert r.ttft == 0.5
    assert r.tpot == pytest.approx((1.0 - 0.5) / 4)  # excludes the first token
    assert r.itls == pytest.approx([0.1, 0.2, 0.0, 0.2])
    assert r.e2el == 1.1
    one = record(1.0, [1.25], 1.3)
    assert one.tpot is None and one.itls == []
    assert RequestRecord("a", 3, 0.0).ttft is None


def test_summary_arithmetic() -> None:
    records = [
        record(0.0, [0.5, 0.6, 0.8, 0.8, 1.0], 1.1, prompt=10),
        record(1.0, [1.2, 1.5, 2.1], 2.2, prompt=20),
        record(2.0, [4.0], 4.0, prompt=30),
        RequestRecord("b", 40, 3.0, [3.5], 3.6, 1, error="HTTP 500"),
    ]
    s = summarize(records, 4.0, {})
    assert (s["completed"], s["failed"], s["duration_s"]) == (3, 1, 4.0)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (60, 9)
    assert s["request_throughput"] == 3 / 4
    assert s["output_throughput"] == 9 / 4
    assert s["total_token_throughput"] == 69 / 4
    expect = {
        "ttft": [0.5, 0.2, 2.0],
        "tpot": [0.5 / 4, 0.9 / 2],
        "itl": [0.1, 0.2, 0.0, 0.2, 0.3, 0.6],
        "e2el": [1.1, 1.2, 2.0],
    }
    for name, values in expect.items():
        ms = np.array(values) * 1000
        assert s[f"mean_{name}_ms"] == pytest.approx(np.mean(ms))
        assert s[f"median_{name}_ms"] == pytest.approx(np.median(ms))
        assert s[f"p90_{name}_ms"] == pytest.approx(np.percentile(ms, 90))
        assert s[f"p99_{name}_ms"] == pytest.approx(np.percentile(ms, 99))
    assert s["p90_itl_ms"] == pytest.approx(450.0)  # linear between 300 and 600


def test_slo_attainment_and_goodput() -> None:
    records = [
        record(0.0, [0.5, 0.55, 0.6], 0.6),  # TTFT 0.5 s, TPOT 50 ms
        record(0.0, [0.9, 1.2], 1.2),  # TTFT 0.9 s, TPOT 300 ms
        record(0.0, [2.0], 2.0),  # TTFT 2 s, one token: no TPOT
        RequestRecord("a", 5, 0.0, [0.1, 0.2], 0.2, 2, error="reset"),  # fast, but failed
        RequestRecord("a", 5, 0.0),  # no tokens
    ]
    slos = {
        "ttft<1s": SLO(ttft_s=1.0, tpot_s=None),
        "tight": SLO(ttft_s=1.0, tpot_s=0.05),
        "tpot": SLO(ttft_s=None, tpot_s=0.05),
        "none": SLO(None, None),
    }
    s = summarize(records, 2.0, slos)["slo"]
    assert s["ttft<1s"]["met"] == 2 and s["ttft<1s"]["attainment"] == 2 / 5
    assert s["tight"]["met"] == 1 and s["tight"]["goodput"] == 1 / 2.0
    assert s["tpot"]["met"] == 2  # the one-token request passes a TPOT-only check
    assert s["none"]["attainment"] == 3 / 5  # failed and token-less requests always miss
    assert s["tight"]["tpot_s"] == 0.05


def test_empty_inputs_give_zeros_and_none() -> None:
    s = summarize([], 0.0, {"slo": SLO(6.0, None)})
    assert s["completed"] == s["failed"] == s["total_output_tokens"] == 0
    assert s["request_throughput"] == s["output_throughput"] == 0.0
    assert s["mean_ttft_ms"] is None and s["p99_itl_ms"] is None
    assert s["slo"]["slo"] == {
        "ttft_s": 6.0,
        "tpot_s": None,
        "met": 0,
        "attainment": None,
        "goodput": 0.0,
    }
    only_failed = summarize([RequestRecord("a", 3, 0.0, error="x")], 1.0)
    assert only_failed["failed"] == 1 and only_failed["median_e2el_ms"] is None
    assert "n/a" in format_summary(s, "empty")
    assert latency_cdf([]) == ([], [])
    assert describe(Workload("W2", {}, 0, ()))["requests"] == 0


def test_format_summary_is_vllm_shaped() -> None:
    records = [record(0.0, [0.5, 0.6], 0.7), record(0.1, [0.4, 0.9], 1.0)]
    text = format_summary(summarize(records, 2.0, {"ttft<6s": SLO(6.0, None)}), "W2 run")
    lines = text.splitlines()
    assert lines[0] == "===================== W2 run ====================="
    assert lines[-1] == "=" * 50
    assert "Successful requests:                     2" in lines
    assert "Request throughput (req/s):              1.00" in lines
    assert "Mean TTFT (ms):                          400.00" in lines
    assert "P99 E2EL (ms):                           " + f"{np.percentile([700, 900], 99):.2f}" in (
        lines
    )
    assert "SLO ttft<6s attainment (%):              100.00" in lines
    for heading in ("Time to First Token", "Time per Output Token", "Inter-token Latency"):
        assert any(heading in line and line.startswith("-") for line in lines)
    assert format_summary(summarize(records, 2.0)).startswith("=" * 12 + " Serving Benchmark")


def test_latency_cdf() -> None:
    xs, ys = latency_cdf([3.0, 1.0, 2.0, 2.0])
    assert xs == [1.0, 2.0, 2.0, 3.0]
    assert ys == [0.25, 0.5, 0.75, 1.0]
