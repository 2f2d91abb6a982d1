"""``loraserve bench sweep``: loraserve over numbers of adapters, one request list.

One W2 request list (S-LoRA's synthetic workload) is generated for the largest n and saved;
loraserve replays it in this process with n adapters for each n of ``--adapters`` (n = 0 is
the base model, the ceiling for the LoRA overhead). For n adapters each request keeps its own
power-law draw, so the lists for different n differ only in which adapter a request names.
A rate sweep (``--rates``) replays the list at other arrival rates, for SLO attainment
against the rate.

:func:`run_sweep` also replays the same lists through any other :data:`System` it is given,
after loraserve at each n: ``benchmarks/sweep_baselines.py`` passes the Hugging Face
baselines that way, which are benchmark code and not installed.

Writes ``sweep.json`` (every summary, the arguments, the machine) and PNG plots: throughput
against n for every system, loraserve's LoRA overhead throughput(n) / throughput(0),
latency CDFs at the largest n, and SLO attainment against the rate.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engine.arch import ModelArch
from engine.config import EngineConfig
from server.bench.generators import synthetic_w2
from server.bench.make_adapters import make_random_adapters
from server.bench.metrics import SLO, RequestRecord, latency_cdf, summarize
from server.bench.replay import System, run_loraserve
from server.bench.workload import Workload

DEFAULT_SLOS = {"ttft<6s": SLO(ttft_s=6.0, tpot_s=None), "ttft<1s,tpot<50ms": SLO(1.0, 0.05)}


@dataclass
class SweepArgs:
    """What ``loraserve bench sweep`` runs (``server.bench.cli`` documents each flag)."""

    model_dir: Path
    out: Path
    adapters: list[int]
    ranks: list[int]
    targets: list[str]
    num_requests: int
    rate: float
    cv: float
    alpha: float
    input_range: tuple[int, int]
    output_range: tuple[int, int]
    seed: int = 42
    rates: list[float] = field(default_factory=list)
    dtype: str = "auto"
    quantization: str | None = None
    load_format: str = "auto"
    batch_size: int = 32
    kernels: str | None = None
    adapter_dir: Path | None = None
    distinct_adapters: int | None = None
    enforce_eager: bool = False
    tensor_parallel_size: int = 1


def run_sweep(args: SweepArgs, others: dict[str, System] | None = None) -> dict[str, Any]:
    """Run loraserve, and each of ``others`` (by its label in the results), over every n and
    rate of the sweep; returns what ``sweep.json`` holds."""
    args.out.mkdir(parents=True, exist_ok=True)
    config = EngineConfig.create(
        args.model_dir,
        dtype=args.dtype,
        quantization=args.quantization,
        load_format=args.load_format,
        max_num_seqs=args.batch_size,
        max_lora_rank=max(args.ranks),
        max_loras=max(1, min(max(args.adapters), 256)),
        enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size,
    )

    def loraserve(
        config: EngineConfig, workload: Workload, adapters: list[tuple[str, Path]]
    ) -> list[RequestRecord]:
        return run_loraserve(config, workload, adapters, args.kernels)

    systems: dict[str, System] = {"loraserve": loraserve, **(others or {})}
    vocab = ModelArch.load(args.model_dir).vocab_size
    top = max(args.adapters)

    def w2(rate: float) -> Workload:
        return synthetic_w2(
            num_adapters=max(top, 1),
            alpha=args.alpha,
            rate=rate,
            cv=args.cv,
            num_requests=args.num_requests,
            input_range=args.input_range,
            output_range=args.output_range,
            seed=args.seed,
            vocab_size=vocab,
        )

    workload = w2(args.rate)
    workload.save(args.out / "workload.json")
    adapter_dir = args.adapter_dir or args.out / "adapters"
    paths = (
        make_random_adapters(
            args.model_dir,
            adapter_dir,
            top,
            args.ranks,
            args.targets,
            args.seed,
            distinct=args.distinct_adapters,
        )
        if top
        else []
    )
    names = workload.adapter_names()[:top]
    runs: list[dict[str, Any]] = []
    records_at_top: dict[str, list[RequestRecord]] = {}
    # loraserve at every n first, then the others n by n.
    plan = [("loraserve", n) for n in args.adapters]
    plan += [(system, n) for n in args.adapters for system in others or {}]
    with tqdm(plan, desc="sweep", unit="run") as bar:
        for system, n in bar:
            bar.set_postfix_str(f"{system} n={n}")
            adapters = list(zip(names[:n], paths[:n], strict=True))
            started = time.perf_counter()
            records = systems[system](config, workload.with_num_adapters(n), adapters)
            duration = time.perf_counter() - started
            summary = summarize(records, _duration(records, duration), DEFAULT_SLOS)
            runs.append({"system": system, "n": n, "rate": args.rate, **summary})
            # What has run so far, in case the sweep is cut short (the GPU suite's timeouts).
            _write(args, workload, runs, [])
            if n == top:
                records_at_top[system] = records
    rate_runs = []
    rate_plan = [(rate, system) for rate in args.rates for system in systems]
    adapters = list(zip(names, paths, strict=True))
    for rate, system in tqdm(rate_plan, desc="rate sweep", unit="run", disable=not rate_plan):
        records = systems[system](config, w2(rate).with_num_adapters(top), adapters)
        summary = summarize(records, _duration(records, 0.0), DEFAULT_SLOS)
        rate_runs.append({"system": system, "n": top, "rate": rate, **summary})
    result = _write(args, workload, runs, rate_runs)
    plot_sweep(result, records_at_top, args.out)
    return result


def _write(
    args: SweepArgs, workload: Workload, runs: list[dict[str, Any]], rate_runs: list[dict[str, Any]]
) -> dict[str, Any]:
    """Write ``sweep.json`` with the runs so far; returns what it holds."""
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": _machine(),
        "workload": workload.params,
        "runs": runs,
        "rate_sweep": rate_runs,
        "ratios": _ratios(runs),
    }
    (args.out / "sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _duration(records: list[RequestRecord], fallback: float) -> float:
    """From the first send to the last token: the replay's own span."""
    starts = [r.start for r in records]
    ends = [r.end for r in records if r.end]
    return max(ends) - min(starts) if starts and ends else fallback


def _ratios(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """loraserve against each baseline at each n, and its LoRA overhead, from one run."""
    tput = {(r["system"], r["n"]): r["output_throughput"] for r in runs}
    out: dict[str, Any] = {}
    base = tput.get(("loraserve", 0))
    for (system, n), value in tput.items():
        if system == "loraserve":
            if base and n:
                out[f"loraserve lora overhead n={n}"] = value / base
            continue
        mine = tput.get(("loraserve", n))
        if mine and value:
            out[f"loraserve / {system} n={n}"] = mine / value
    return out


def _machine() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
    }


def plot_sweep(
    result: dict[str, Any], records_at_top: dict[str, list[RequestRecord]], out: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    systems = list(dict.fromkeys(r["system"] for r in runs))
    fig, ax = plt.subplots(figsize=(6, 4))
    for system in systems:
        rows = sorted((r for r in runs if r["system"] == system), key=lambda r: r["n"])
        ax.plot([r["n"] for r in rows], [r["output_throughput"] for r in rows], "o-", label=system)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("adapters n (0: base model)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title("Throughput against the number of adapters (W2)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "throughput_vs_n.png", dpi=120)
    plt.close(fig)

    mine = sorted((r for r in runs if r["system"] == "loraserve"), key=lambda r: r["n"])
    base = next((r["output_throughput"] for r in mine if r["n"] == 0), None)
    if base:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ns = [r["n"] for r in mine if r["n"]]
        ax.plot(ns, [r["output_throughput"] / base for r in mine if r["n"]], "o-")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.2)
        ax.set_xlabel("adapters n")
        ax.set_ylabel("throughput(n) / throughput(0)")
        ax.set_title("loraserve's LoRA overhead", fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "lora_overhead.png", dpi=120)
        plt.close(fig)

    if records_at_top:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for system, records in records_at_top.items():
            ok = [r for r in records if r.error is None and r.token_times]
            xs, ys = latency_cdf([r.token_times[0] - r.start for r in ok])
            axes[0].plot(xs, ys, label=system)
            xs, ys = latency_cdf([r.end - r.start for r in ok])
            axes[1].plot(xs, ys, label=system)
        for a, title in zip(
            axes, ("time to first token (s)", "end-to-end latency (s)"), strict=True
        ):
            a.set_xlabel(title)
            a.set_ylabel("fraction of requests")
            a.grid(alpha=0.3)
        axes[1].legend(fontsize=8)
        fig.suptitle("Latency CDFs at the largest n", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "latency_cdf.png", dpi=120)
        plt.close(fig)

    rate_runs = result["rate_sweep"]
    if rate_runs:
        fig, ax = plt.subplots(figsize=(7.5, 4))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for k, system in enumerate(dict.fromkeys(r["system"] for r in rate_runs)):
            rows = sorted((r for r in rate_runs if r["system"] == system), key=lambda r: r["rate"])
            for slo, style in zip(DEFAULT_SLOS, ("o-", "s--"), strict=True):
                ax.plot(
                    [r["rate"] for r in rows],
                    [r["slo"][slo]["attainment"] for r in rows],
                    style,
                    color=colors[k % len(colors)],
                    label=f"{system}, {slo}",
                )
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("SLO attainment")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.set_title("SLO attainment against the request rate (solid: TTFT < 6 s)", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "slo_vs_rate.png", dpi=120)
        plt.close(fig)
