"""loraserve against the Hugging Face baselines: one request list, every system side by side.

    python benchmarks/compare.py --model DIR [--load-format dummy] [--systems ...] [--base]
        [--num-adapters N] ... --out DIR

One W2 request list (S-LoRA's synthetic workload) with every request arriving at once (a
rate of 1e6 req/s: throughput is each system's capacity) is replayed, one system after
another in one run, by:

* ``loraserve-http``: ``loraserve serve`` started as a subprocess on a free loopback port with
  the adapters as ``--lora-modules adapter-i=PATH``, driven over HTTP with streaming by
  :func:`server.bench.client.run_workload` (workload adapter i is the model ``adapter-i``),
  then stopped (SIGTERM, a bounded wait, then kill): :func:`server.bench.harness.running_server`;
* ``loraserve``: the same engine configuration in this process
  (:func:`server.bench.replay.run_loraserve`);
* ``peft-mixed``: PEFT mixed batches (:func:`benchmarks.baselines.run_peft_mixed`);
* ``peft``: the PEFT server, static batches of one adapter each
  (:func:`benchmarks.baselines.run_peft_server`).

With ``--base`` every selected system runs again with no adapters (n = 0, every request on
the base model): loraserve over HTTP and in-process, and transformers' ``generate`` (FCFS
static batches) for the Hugging Face baselines; ``lora_overhead`` then holds each loraserve
system's throughput with adapters over its throughput on the base.

Requests are greedy, with EOS ignored and ``min_tokens = max_tokens``, so every system
generates exactly the planned tokens; a request whose prompt plus output would exceed the
model's context has its output length clamped to fit
(:mod:`benchmarks.compare_inputs`). Every system runs with the same number of torch threads:
``torch.set_num_threads`` here, ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` in the server's
environment.

Writes ``compare.json`` (each system's summary, the ratios, the arguments, the machine:
:mod:`benchmarks.compare_report`), ``workload.json`` (the replayed list), ``compare.png``
(output tokens/s per system) and the server's log into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.baselines import as_system
from benchmarks.compare_inputs import compare_adapters, compare_workload, max_rank
from benchmarks.compare_report import compare_result, format_table, header_lines, plot_compare
from engine.arch import ModelArch
from engine.config import EngineConfig
from server.bench.cli import ATTENTION, add_model_args, int_list, token_range
from server.bench.client import check_fits, read_models, run_workload
from server.bench.commands import every_request_failed, torch_threads
from server.bench.harness import SERVED_BASE, ServerSpec, running_server
from server.bench.metrics import RequestRecord
from server.bench.replay import run_loraserve
from server.bench.workload import Workload

logger = logging.getLogger(__name__)

# --systems names, in the order they run; the table's labels.
SYSTEMS = {
    "loraserve-http": "loraserve HTTP",
    "loraserve": "loraserve in-process",
    "peft-mixed": "PEFT mixed batches",
    "peft": "PEFT server",
}
BASE_LABELS = {
    "loraserve-http": "loraserve HTTP (base)",
    "loraserve": "loraserve in-process (base)",
    "peft-mixed": "transformers generate (base)",
    "peft": "transformers generate (base)",
}


@dataclass
class CompareArgs:
    """What a comparison runs (:func:`parser` documents each flag)."""

    model_dir: Path
    out: Path
    num_requests: int = 64
    num_adapters: int = 8
    ranks: list[int] = field(default_factory=lambda: [4, 8, 16])
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    input_range: tuple[int, int] = (8, 120)
    output_range: tuple[int, int] = (8, 64)
    alpha: float = 1.0
    seed: int = 42
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    base: bool = False
    batch_size: int = 64
    max_num_seqs: int | None = None  # default: batch_size
    dtype: str = "auto"
    load_format: str = "auto"
    adapter_dir: Path | None = None  # existing adapters; None writes random ones under out
    threads: int = 1
    startup_timeout_s: float = 600.0
    progress: bool = True


@dataclass
class Run:
    """One system's replay: its key, label, number of adapters and request records."""

    key: str
    label: str
    n: int
    records: list[RequestRecord]
    wall_s: float


def run_compare(args: CompareArgs) -> dict[str, Any]:
    """Replay the request list through every selected system; returns what
    ``compare.json`` holds."""
    unknown = sorted(set(args.systems) - set(SYSTEMS))
    if unknown or not args.systems:
        raise ValueError(f"--systems takes some of {', '.join(SYSTEMS)}; got {args.systems}")
    if args.num_adapters < 1:
        raise ValueError("--num-adapters must be at least 1 (--base adds the n = 0 runs)")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # the caller's setting back


def _run(args: CompareArgs) -> dict[str, Any]:
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir.resolve()
    workload, clamped = compare_workload(args, ModelArch.load(model_dir))
    workload.save(args.out / "workload.json")
    adapters = compare_adapters(args, model_dir, workload.adapter_names())
    rank = max(max_rank(path) for _, path in adapters)
    max_num_seqs = args.max_num_seqs or args.batch_size
    config = EngineConfig.create(
        model_dir,
        dtype=args.dtype,
        load_format=args.load_format,
        max_num_seqs=max_num_seqs,
        max_lora_rank=rank,
        max_loras=len(adapters),
    )
    header = header_lines(args, workload, clamped, config, max_num_seqs)
    counts = [len(adapters), 0] if args.base else [len(adapters)]
    plan = _dedupe_base([(key, n) for n in counts for key in _order(args.systems)])
    runs: list[Run] = []
    server_log = args.out / "server.log"
    server_log.write_text("")
    with tqdm(plan, desc="compare", unit="system", disable=not args.progress) as bar:
        for key, n in bar:
            label = SYSTEMS[key] if n else BASE_LABELS[key]
            bar.set_postfix_str(label)
            logger.info("running %s", label)
            wl = workload if n else workload.with_num_adapters(0)
            served = adapters if n else []
            started = time.perf_counter()
            if key == "loraserve-http":
                records = run_http(model_dir, wl, served, args, max_num_seqs, rank, server_log)
            elif key == "loraserve":
                records = run_loraserve(config, wl, served)
            else:  # on the base both baselines are transformers' generate, FCFS batches
                baseline = as_system(key if n else "peft-mixed", model_dir, args.batch_size, True)
                records = baseline(config, wl, served)
            runs.append(Run(key, label, n, records, time.perf_counter() - started))
    result = compare_result(args, header, workload, runs)
    (args.out / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_compare(result, args.out / "compare.png")
    return result


def _order(selected: list[str]) -> list[str]:
    return [key for key in SYSTEMS if key in selected]


def _dedupe_base(plan: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """On the base, PEFT server and PEFT mixed are the same system: run it once."""
    out: list[tuple[str, int]] = []
    for key, n in plan:
        if (
            n == 0
            and key in ("peft", "peft-mixed")
            and any(k in ("peft", "peft-mixed") and m == 0 for k, m in out)
        ):
            continue
        out.append((key, n))
    return out


def server_spec(
    model_dir: Path,
    adapters: list[tuple[str, Path]],
    args: CompareArgs,
    max_num_seqs: int,
    rank: int,
) -> ServerSpec:
    """``loraserve serve`` with the in-process system's engine configuration."""
    return ServerSpec(
        model_dir=model_dir,
        dtype=args.dtype,
        load_format=args.load_format,
        max_num_seqs=max_num_seqs,
        max_lora_rank=rank,
        max_loras=args.num_adapters,
        max_waiting_requests=args.num_requests,
        threads=args.threads,
        adapters=tuple(adapters),
        startup_timeout_s=args.startup_timeout_s,
    )


def run_http(
    model_dir: Path,
    workload: Workload,
    adapters: list[tuple[str, Path]],
    args: CompareArgs,
    max_num_seqs: int,
    rank: int,
    log_path: Path,
) -> list[RequestRecord]:
    """Start ``loraserve serve``, replay ``workload`` over HTTP (streamed), stop it."""
    spec = server_spec(model_dir, adapters, args, max_num_seqs, rank)
    with running_server(spec, log_path) as url:
        names: list[str | None] = [name for name, _ in adapters]
        # the server's context may be shorter than config.json's (a sliding window, say)
        check_fits(workload, read_models(url), names, "the request list")
        records, _ = asyncio.run(run_workload(url, workload, names, SERVED_BASE, progress=False))
    return records


def parser() -> argparse.ArgumentParser:
    """The flags; the ranges are ``[LO, HI)``."""
    compare = argparse.ArgumentParser(
        prog="python benchmarks/compare.py",
        description="loraserve over HTTP and in-process against the PEFT baselines, one "
        "request list, side by side; writes compare.json, workload.json and compare.png",
    )
    add_model_args(compare)
    compare.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"some of {', '.join(SYSTEMS)} (default: all)",
    )
    compare.add_argument(
        "--base", action="store_true", help="also run every system on the base (n = 0)"
    )
    compare.add_argument("--num-requests", type=int, default=64, help="requests in the list")
    compare.add_argument("--num-adapters", type=int, default=8, help="adapters (n)")
    compare.add_argument(
        "--ranks", type=int_list, default=[4, 8, 16], help="random adapters' ranks, round-robin"
    )
    compare.add_argument("--targets", default=ATTENTION, help="modules the adapters adapt")
    compare.add_argument("--adapter-dir", type=Path, default=None, help="existing adapters")
    compare.add_argument("--alpha", type=float, default=1.0, help="power-law exponent")
    compare.add_argument(
        "--input-range", type=token_range, default=(8, 120), help="[LO, HI) prompt tokens"
    )
    compare.add_argument(
        "--output-range",
        type=token_range,
        default=(8, 64),
        help="[LO, HI) output tokens, clamped so prompt + output fit the context",
    )
    compare.add_argument("--seed", type=int, default=42, help="seeds the list and adapters")
    compare.add_argument("--batch-size", type=int, default=64, help="the baselines' batches")
    compare.add_argument("--max-num-seqs", type=int, default=None, help="default: --batch-size")
    compare.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for every system (default: $OMP_NUM_THREADS, else 1)",
    )
    compare.add_argument("--startup-timeout", type=float, default=600.0, help="seconds")
    compare.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/compare"), help="results dir"
    )
    return compare


def main(argv: list[str] | None = None) -> int:
    """Run the comparison the flags describe, print its table; 1 when a system completed
    none of its requests."""
    args = parser().parse_args(argv)
    result = run_compare(
        CompareArgs(
            model_dir=args.model,
            out=args.out,
            num_requests=args.num_requests,
            num_adapters=args.num_adapters,
            ranks=args.ranks,
            targets=args.targets.split(","),
            input_range=args.input_range,
            output_range=args.output_range,
            alpha=args.alpha,
            seed=args.seed,
            systems=[s for s in args.systems.split(",") if s],
            base=args.base,
            batch_size=args.batch_size,
            max_num_seqs=args.max_num_seqs,
            dtype=args.dtype,
            load_format=args.load_format,
            adapter_dir=args.adapter_dir,
            threads=torch_threads(args),
            startup_timeout_s=args.startup_timeout,
        )
    )
    print(format_table(result))
    print(f"wrote {args.out}/compare.json and {args.out}/compare.png")
    return every_request_failed("benchmarks/compare.py", result["systems"])


if __name__ == "__main__":
    sys.exit(main())
