"""``loraserve bench``: serve, sweep, compare, prefix, fairness and make-adapters.

loraserve bench serve --url URL [--workload FILE | W2 parameters] [--out FILE]
loraserve bench sweep --model DIR [--load-format dummy] --adapters 0,1,8,64 ... --out DIR
loraserve bench make-adapters --model DIR --n N --ranks 8,16,32,64 --targets ... --out DIR
loraserve bench compare --model DIR [--load-format dummy] [--systems ...] [--base] --out DIR
loraserve bench prefix --model DIR [--load-format dummy] [--prefix-len 1000] [--smoke] --out DIR
loraserve bench fairness --model DIR [--load-format dummy] [--flood-requests N] [--smoke] --out DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
from pathlib import Path

from server.bench.metrics import SLO, format_summary, summarize
from server.bench.workloads import Workload, closed_loop_w3, describe, synthetic_w2

# The commands import their heavier parts (httpx, torch, peft) when they run, so that the
# rest of the command line (``loraserve serve``) does not depend on them.

ATTENTION = "q_proj,k_proj,v_proj,o_proj"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _range(text: str) -> tuple[int, int]:
    lo, hi = _ints(text)
    if not 0 < lo < hi:
        raise argparse.ArgumentTypeError(f"a range is LO,HI with 0 < LO < HI; got {text!r}")
    return lo, hi


def _workload_args(parser: argparse.ArgumentParser) -> None:
    w = parser.add_argument_group("workload (W2 unless --workload or --kind says otherwise)")
    w.add_argument("--kind", choices=["W2", "W3"], default="W2")
    w.add_argument("--num-requests", type=int, default=200)
    w.add_argument("--num-adapters", type=int, default=None, help="default: the server's")
    w.add_argument("--alpha", type=float, default=1.0, help="power-law exponent (1: uniform)")
    w.add_argument("--rate", type=float, default=10.0, help="requests per second (W2)")
    w.add_argument("--cv", type=float, default=1.0, help="arrival coefficient of variation")
    w.add_argument("--input-range", type=_range, default=(8, 512))
    w.add_argument("--output-range", type=_range, default=(8, 512))
    w.add_argument("--vocab-size", type=int, default=259, help="prompt ids are drawn below it")
    w.add_argument("--seed", type=int, default=42)


def add_bench_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    bench = commands.add_parser("bench", help="throughput benchmarks (S-LoRA's workloads)")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    serve = sub.add_parser("serve", help="drive a running server over HTTP with a workload")
    serve.add_argument("--url", default="http://127.0.0.1:8000")
    serve.add_argument("--workload", type=Path, default=None, help="a saved request list")
    serve.add_argument("--save-workload", type=Path, default=None)
    serve.add_argument("--adapters", default=None, help="model names for adapter 0, 1, ...")
    serve.add_argument("--api-key", default=None)
    serve.add_argument("--slo-ttft", type=float, default=6.0, help="seconds")
    serve.add_argument("--slo-tpot", type=float, default=None, help="seconds")
    serve.add_argument("--out", type=Path, default=None, help="JSON results")
    _workload_args(serve)
    serve.set_defaults(run=_serve)

    sweep = sub.add_parser("sweep", help="loraserve and the PEFT baselines on one request list")
    sweep.add_argument("--model", type=Path, required=True, help="a model dir or a preset")
    sweep.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    sweep.add_argument("--dtype", default="auto")
    sweep.add_argument("--quantization", choices=["none", "nf4"], default=None)
    sweep.add_argument("--adapters", type=_ints, default=[0, 1, 8, 64], help="values of n")
    sweep.add_argument("--ranks", type=_ints, default=[8])
    sweep.add_argument("--targets", default=ATTENTION)
    sweep.add_argument("--distinct-adapters", type=int, default=None)
    sweep.add_argument("--baselines", default="peft,peft-mixed,merge-swap")
    sweep.add_argument("--rates", default="", help="a rate sweep for SLO attainment")
    sweep.add_argument("--batch-size", type=int, default=32)
    sweep.add_argument("--kernels", default=None)
    sweep.add_argument(
        "--enforce-eager", action="store_true", help="no CUDA graphs for loraserve's decodes"
    )
    sweep.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="loraserve split across N devices"
    )
    sweep.add_argument("--out", type=Path, default=Path("benchmarks/results/sweep"))
    _workload_args(sweep)
    sweep.set_defaults(run=_sweep)

    _add_compare_parser(sub)
    _add_prefix_parser(sub)
    _add_fairness_parser(sub)

    make = sub.add_parser("make-adapters", help="random PEFT adapters shaped for a base")
    make.add_argument("--model", type=Path, required=True, help="a dir with config.json")
    make.add_argument("--n", type=int, required=True)
    make.add_argument("--ranks", type=_ints, default=[8, 16, 32, 64])
    make.add_argument("--targets", default=ATTENTION)
    make.add_argument("--distinct", type=int, default=None, help="write only this many dirs")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--out", type=Path, required=True)
    make.set_defaults(run=_make_adapters)


def _add_compare_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    compare = sub.add_parser(
        "compare",
        help="loraserve over HTTP and in-process against the PEFT baselines, one request list",
    )
    compare.add_argument("--model", type=Path, required=True, help="a model dir or a preset")
    compare.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    compare.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )
    compare.add_argument(
        "--systems",
        default="loraserve-http,loraserve,peft-mixed,peft",
        help="some of loraserve-http, loraserve, peft-mixed, peft (default: all)",
    )
    compare.add_argument(
        "--base", action="store_true", help="also run every system on the base (n = 0)"
    )
    compare.add_argument("--num-requests", type=int, default=64)
    compare.add_argument("--num-adapters", type=int, default=8)
    compare.add_argument("--ranks", type=_ints, default=[4, 8, 16], help="round-robin")
    compare.add_argument("--targets", default=ATTENTION)
    compare.add_argument("--adapter-dir", type=Path, default=None, help="existing adapters")
    compare.add_argument("--alpha", type=float, default=1.0, help="power-law exponent")
    compare.add_argument("--input-range", type=_range, default=(8, 120))
    compare.add_argument("--output-range", type=_range, default=(8, 64))
    compare.add_argument("--seed", type=int, default=42)
    compare.add_argument("--batch-size", type=int, default=64, help="the baselines' batches")
    compare.add_argument("--max-num-seqs", type=int, default=None, help="default: --batch-size")
    compare.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for every system (default: $OMP_NUM_THREADS, else 1)",
    )
    compare.add_argument("--startup-timeout", type=float, default=600.0, help="seconds")
    compare.add_argument("--out", type=Path, default=Path("benchmarks/results/compare"))
    compare.set_defaults(run=_compare)


def _add_prefix_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    prefix = sub.add_parser(
        "prefix",
        help="prefix caching on against off over HTTP: a shared system prompt over 8 adapters",
    )
    prefix.add_argument("--model", type=Path, required=True, help="a model dir or a preset")
    prefix.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    prefix.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )
    # Sizes default to None: --smoke's or PrefixArgs' defaults (in the help) fill them in.
    prefix.add_argument("--num-requests", type=int, default=None, help="default 64")
    prefix.add_argument(
        "--concurrency", type=int, default=None, help="clients in a closed loop (default 8)"
    )
    prefix.add_argument("--num-adapters", type=int, default=None, help="default 8")
    prefix.add_argument(
        "--prefix-len", type=int, default=None, help="system prompt tokens (default 1000)"
    )
    prefix.add_argument(
        "--question-range", type=_range, default=None, help="[lo, hi) tokens (default 16,49)"
    )
    prefix.add_argument(
        "--output-range", type=_range, default=None, help="[lo, hi) tokens (default 16,33)"
    )
    prefix.add_argument("--ranks", type=_ints, default=None, help="round-robin (default 4,8,16)")
    prefix.add_argument("--targets", default=ATTENTION)
    prefix.add_argument("--seed", type=int, default=42)
    prefix.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the server (default: $OMP_NUM_THREADS, else 1)",
    )
    prefix.add_argument(
        "--on-flags",
        type=shlex.split,
        default=None,
        help="loraserve serve flags of the caching-on system (default: none; caching is on "
        "by default), e.g. --on-flags='--block-size 32'",
    )
    prefix.add_argument(
        "--off-flags",
        type=shlex.split,
        default=None,
        help="flags of the caching-off system (default: --no-enable-prefix-caching; "
        "--off-flags= runs both with the same flags, on a server without that flag)",
    )
    prefix.add_argument(
        "--server-flags", type=shlex.split, default=None, help="flags of both systems"
    )
    prefix.add_argument(
        "--smoke",
        action="store_true",
        help="a handful of short requests over 2 adapters, the engine in the server's process: "
        "checks the pipeline in seconds, not for numbers",
    )
    prefix.add_argument("--startup-timeout", type=float, default=600.0, help="seconds")
    prefix.add_argument("--out", type=Path, default=Path("benchmarks/results/prefix"))
    prefix.set_defaults(run=_prefix)


def _add_fairness_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    fairness = sub.add_parser(
        "fairness",
        help="one client flooding, the others modest: fcfs, fair and priority scheduling over "
        "HTTP, one run",
        description="Adapter 0 floods (a closed loop of --flood-concurrency requests in "
        "flight, --flood-requests in all); adapters 1..n-1 each send a Poisson stream of "
        "--modest-rate req/s for --duration seconds from --modest-start. The same list is "
        "replayed through loraserve serve --scheduling-policy fcfs, fair and priority (modest "
        "requests sent with priority 0, the flooder's with 1); reports TTFT, E2E latency and "
        "served tokens per client group, the throughput, and the ratios fcfs/fair of the "
        "modest clients' TTFT p99 and fair/fcfs of the output throughput. Writes fairness.json, "
        "fairness_series.json, workload.json, fairness_ttft.png, fairness_tokens.png, "
        "fairness_summary.png and the servers' logs into --out.",
    )
    fairness.add_argument("--model", type=Path, required=True, help="a model dir or a preset")
    fairness.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    fairness.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )
    # Sizes default to None: --smoke's or FairnessArgs' defaults (in the help) fill them in.
    fairness.add_argument(
        "--num-adapters", type=int, default=None, help="clients: 1 flooder + n-1 modest (8)"
    )
    fairness.add_argument(
        "--flood-requests", type=int, default=None, help="the flooder's requests (8000)"
    )
    fairness.add_argument(
        "--flood-concurrency", type=int, default=None, help="the flooder's requests in flight (128)"
    )
    fairness.add_argument(
        "--modest-rate", type=float, default=None, help="req/s of each modest client (1.0)"
    )
    fairness.add_argument(
        "--duration", type=float, default=None, help="seconds the modest clients send for (50)"
    )
    fairness.add_argument(
        "--modest-start",
        type=float,
        default=None,
        help="seconds after the flood's start that the modest clients begin (5)",
    )
    fairness.add_argument(
        "--input-range", type=_range, default=None, help="[lo, hi) prompt tokens (16,64)"
    )
    fairness.add_argument(
        "--output-range", type=_range, default=None, help="[lo, hi) output tokens (16,48)"
    )
    fairness.add_argument(
        "--max-num-seqs", type=int, default=None, help="the servers' --max-num-seqs (32)"
    )
    fairness.add_argument("--rank", type=int, default=None, help="every adapter's rank (8)")
    fairness.add_argument("--targets", default=ATTENTION)
    fairness.add_argument("--seed", type=int, default=42)
    fairness.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the servers (default: $OMP_NUM_THREADS, else 1)",
    )
    fairness.add_argument(
        "--server-flags", type=shlex.split, default=None, help="flags of every system"
    )
    fairness.add_argument(
        "--smoke",
        action="store_true",
        help="a few seconds of each system (2 modest clients, short requests, the engine in "
        "the server's process): checks the pipeline, not for numbers",
    )
    fairness.add_argument("--startup-timeout", type=float, default=600.0, help="seconds")
    fairness.add_argument("--out", type=Path, default=Path("benchmarks/results/fairness"))
    fairness.set_defaults(run=_fairness)


def _workload(args: argparse.Namespace, num_adapters: int) -> Workload:
    if getattr(args, "workload", None) is not None:
        return Workload.load(args.workload)
    if args.kind == "W3":
        return closed_loop_w3(
            num_requests=args.num_requests,
            num_adapters=num_adapters,
            popularity="uniform",
            max_prompt=args.input_range[1],
            output_range=args.output_range,
            seed=args.seed,
            vocab_size=args.vocab_size,
        )
    return synthetic_w2(
        num_adapters=num_adapters,
        alpha=args.alpha,
        rate=args.rate,
        cv=args.cv,
        num_requests=args.num_requests,
        input_range=args.input_range,
        output_range=args.output_range,
        seed=args.seed,
        vocab_size=args.vocab_size,
    )


def _serve(args: argparse.Namespace) -> int:
    import httpx

    from server.bench.client import run_workload

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    listed = httpx.get(args.url.rstrip("/") + "/v1/models", headers=headers, timeout=30).json()
    ids = [m["id"] for m in listed["data"]]
    base = next(m["id"] for m in listed["data"] if not m.get("parent"))
    adapters = args.adapters.split(",") if args.adapters else [i for i in ids if i != base]
    workload = _workload(args, args.num_adapters or len(adapters))
    if args.save_workload:
        workload.save(args.save_workload)
    print(f"workload: {json.dumps(describe(workload))}")
    models: list[str | None] = list(adapters)
    records, duration = asyncio.run(run_workload(args.url, workload, models, base, args.api_key))
    name = f"TTFT<={args.slo_ttft:g}s" + (f",TPOT<={args.slo_tpot:g}s" if args.slo_tpot else "")
    slos = {name: SLO(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot)}
    summary = summarize(records, duration, slos)
    print(format_summary(summary, f"{workload.kind} against {args.url}"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": summary, "workload": workload.params}, indent=1))
        print(f"wrote {args.out}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from server.bench.sweep import SweepArgs, run_sweep  # needs peft for the baselines

    result = run_sweep(
        SweepArgs(
            model_dir=args.model,
            out=args.out,
            adapters=args.adapters,
            ranks=args.ranks,
            targets=args.targets.split(","),
            num_requests=args.num_requests,
            rate=args.rate,
            cv=args.cv,
            alpha=args.alpha,
            input_range=args.input_range,
            output_range=args.output_range,
            seed=args.seed,
            baselines=[b for b in args.baselines.split(",") if b],
            rates=[float(r) for r in args.rates.split(",") if r],
            dtype=args.dtype,
            quantization=args.quantization,
            load_format=args.load_format,
            batch_size=args.batch_size,
            kernels=args.kernels,
            distinct_adapters=args.distinct_adapters,
            enforce_eager=args.enforce_eager,
            tensor_parallel_size=args.tensor_parallel_size,
        )
    )
    for run in result["runs"]:
        print(
            f"{run['system']:20s} n={run['n']:<5d} {run['request_throughput']:8.2f} req/s "
            f"{run['output_throughput']:9.1f} tok/s  median TTFT {run['median_ttft_ms']:8.1f} ms"
        )
    for name, ratio in result["ratios"].items():
        print(f"{name}: {ratio:.2f}x")
    print(f"wrote {args.out}/sweep.json and plots")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from server.bench.compare import CompareArgs, format_table, run_compare  # needs peft

    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS") or 1)
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
            threads=threads,
            startup_timeout_s=args.startup_timeout,
        )
    )
    print(format_table(result))
    print(f"wrote {args.out}/compare.json and {args.out}/compare.png")
    return 0


def _prefix(args: argparse.Namespace) -> int:
    from server.bench.prefix import SMOKE, PrefixArgs, run_prefix
    from server.bench.prefix_report import format_ratios, format_system

    sizes = {
        key: value
        for key in (
            "num_requests",
            "concurrency",
            "num_adapters",
            "prefix_len",
            "question_range",
            "output_range",
            "ranks",
            "on_flags",
            "off_flags",
            "server_flags",
        )
        if (value := getattr(args, key)) is not None
    }
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS") or 1)
    result = run_prefix(
        PrefixArgs(
            model_dir=args.model,
            out=args.out,
            targets=args.targets.split(","),
            seed=args.seed,
            dtype=args.dtype,
            load_format=args.load_format,
            threads=threads,
            startup_timeout_s=args.startup_timeout,
            **({**SMOKE, **sizes} if args.smoke else sizes),
        ),
        on_system=lambda entry: print(format_system(entry), flush=True),
    )
    for note in result["notes"]:
        print(f"note: {note}")
    print(format_ratios(result))
    print(f"wrote {args.out}/prefix.json and {args.out}/prefix.png")
    return 0


def _fairness(args: argparse.Namespace) -> int:
    from server.bench.fairness import SMOKE, FairnessArgs, run_fairness
    from server.bench.fairness_report import format_ratios, format_system

    renamed = {"duration": "duration_s", "modest_start": "modest_start_s"}
    sizes = {
        renamed.get(key, key): value
        for key in (
            "num_adapters",
            "flood_requests",
            "flood_concurrency",
            "modest_rate",
            "duration",
            "modest_start",
            "input_range",
            "output_range",
            "max_num_seqs",
            "rank",
            "server_flags",
        )
        if (value := getattr(args, key)) is not None
    }
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS") or 1)
    result = run_fairness(
        FairnessArgs(
            model_dir=args.model,
            out=args.out,
            targets=args.targets.split(","),
            seed=args.seed,
            dtype=args.dtype,
            load_format=args.load_format,
            threads=threads,
            startup_timeout_s=args.startup_timeout,
            **({**SMOKE, **sizes} if args.smoke else sizes),
        ),
        on_system=lambda entry: print(format_system(entry), flush=True),
    )
    for note in result["notes"]:
        print(f"note: {note}")
    print(format_ratios(result))
    print(f"wrote {args.out}/fairness.json and {args.out}/fairness_*.png")
    return 0


def _make_adapters(args: argparse.Namespace) -> int:
    from server.bench.make_adapters import make_random_adapters

    paths = make_random_adapters(
        args.model,
        args.out,
        args.n,
        args.ranks,
        args.targets.split(","),
        args.seed,
        distinct=args.distinct,
    )
    print(f"wrote {len(set(paths))} adapter directories for {args.n} adapters under {args.out}")
    return 0
