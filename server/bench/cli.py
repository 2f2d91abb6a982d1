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
import sys
from pathlib import Path
from typing import Any

from server.bench.metrics import SLO, all_failed, describe_failures, format_summary, summarize
from server.bench.workloads import Workload, churn_w4, closed_loop_w3, describe, synthetic_w2

# The commands import their heavier parts (httpx, torch, peft) when they run, so that the
# rest of the command line (``loraserve serve``) does not depend on them.

ATTENTION = "q_proj,k_proj,v_proj,o_proj"
DEFAULT_RANGE = (8, 512)  # --input-range and --output-range of serve and sweep


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _range(text: str) -> tuple[int, int]:
    lo, hi = _ints(text)
    if not 0 < lo < hi:
        raise argparse.ArgumentTypeError(f"a range is LO,HI with 0 < LO < HI; got {text!r}")
    return lo, hi


def _model_args(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--load-format`` and ``--dtype`` of the benchmarks that load a base."""
    parser.add_argument("--model", type=Path, required=True, help="a model dir or a preset")
    parser.add_argument(
        "--load-format",
        choices=["auto", "dummy"],
        default="auto",
        help="dummy: random weights from config.json (the presets have no weights)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="the weights' dtype (auto: the checkpoint's)",
    )


def _workload_args(parser: argparse.ArgumentParser, serve: bool) -> None:
    """The W2/W3 generator's flags. ``serve``: for ``bench serve``, whose lengths left out
    are fitted to the server; sweep runs W2 alone, over its own --adapters and the model's
    vocabulary, and ignores --kind, --num-adapters and --vocab-size."""
    ignored = "" if serve else "ignored by sweep: "
    w = parser.add_argument_group("workload (W2 unless --workload or --kind says otherwise)")
    w.add_argument(
        "--kind",
        choices=["W2", "W3", "W4"],
        default="W2",
        help=f"{ignored}W2: S-LoRA's open loop at --rate; W3: Punica's closed loop, 32 in flight; "
        "W4: W2 over far more adapters than the pool holds (churn: give --num-adapters)",
    )
    w.add_argument(
        "--num-requests", type=int, default=200, help="requests in the list (default 200)"
    )
    w.add_argument(
        "--num-adapters", type=int, default=None, help=f"{ignored}default: the server's adapters"
    )
    w.add_argument(
        "--alpha", type=float, default=1.0, help="power-law exponent (default 1: uniform)"
    )
    w.add_argument("--rate", type=float, default=10.0, help="requests per second (W2; default 10)")
    w.add_argument(
        "--cv",
        type=float,
        default=1.0,
        help="arrival coefficient of variation (default 1: Poisson)",
    )
    fit = ", clipped to fit the server's max_model_len when left out" if serve else ""
    lo, hi = DEFAULT_RANGE
    w.add_argument(
        "--input-range",
        type=_range,
        default=None,
        help=f"LO,HI: prompt tokens drawn in [LO, HI) (W3: at most HI) (default {lo},{hi}{fit})",
    )
    w.add_argument(
        "--output-range",
        type=_range,
        default=None,
        help=f"LO,HI: output tokens drawn in [LO, HI) (default {lo},{hi}{fit})",
    )
    w.add_argument(
        "--vocab-size",
        type=int,
        default=259,
        help=f"{ignored}prompt ids are drawn below it (default 259)",
    )
    w.add_argument(
        "--seed", type=int, default=42, help="the same seed gives the same requests (default 42)"
    )


def add_bench_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    bench = commands.add_parser("bench", help="throughput benchmarks (S-LoRA's workloads)")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    serve = sub.add_parser("serve", help="drive a running server over HTTP with a workload")
    serve.add_argument(
        "--url",
        default="http://127.0.0.1:8000",
        help="the server, plain http:// (default %(default)s)",
    )
    serve.add_argument(
        "--workload", type=Path, default=None, help="a saved request list, replayed as it is"
    )
    serve.add_argument(
        "--save-workload", type=Path, default=None, help="write the request list (JSON) here"
    )
    serve.add_argument(
        "--adapters",
        default=None,
        help="comma-separated model names for adapter 0, 1, ... (default: the server's "
        "adapters, in its /v1/models order)",
    )
    serve.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    serve.add_argument(
        "--slo-ttft", type=float, default=6.0, help="TTFT objective, seconds (default 6)"
    )
    serve.add_argument(
        "--slo-tpot", type=float, default=None, help="TPOT objective, seconds (default: none)"
    )
    serve.add_argument("--out", type=Path, default=None, help="JSON results")
    _workload_args(serve, serve=True)
    serve.set_defaults(run=_serve)

    sweep = sub.add_parser("sweep", help="loraserve and the PEFT baselines on one request list")
    _model_args(sweep)
    sweep.add_argument(
        "--quantization", choices=["none", "nf4"], default=None, help="the base's (default: auto)"
    )
    sweep.add_argument(
        "--adapters", type=_ints, default=[0, 1, 8, 64], help="values of n, comma-separated"
    )
    sweep.add_argument(
        "--ranks", type=_ints, default=[8], help="random adapters' ranks, round-robin"
    )
    sweep.add_argument("--targets", default=ATTENTION, help="modules the adapters adapt")
    sweep.add_argument(
        "--distinct-adapters",
        type=int,
        default=None,
        help="write only this many adapter dirs, shared round-robin (default: one each)",
    )
    sweep.add_argument(
        "--baselines", default="peft,peft-mixed,merge-swap", help="comma-separated baselines"
    )
    sweep.add_argument("--rates", default="", help="a rate sweep for SLO attainment")
    sweep.add_argument("--batch-size", type=int, default=32, help="the baselines' batches")
    sweep.add_argument(
        "--kernels",
        default=None,
        help="loraserve's kernels: torch (the references) or triton (default: triton on CUDA, "
        "else torch)",
    )
    sweep.add_argument(
        "--enforce-eager", action="store_true", help="no CUDA graphs for loraserve's decodes"
    )
    sweep.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="loraserve split across N devices"
    )
    sweep.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/sweep"), help="results dir"
    )
    _workload_args(sweep, serve=False)
    sweep.set_defaults(run=_sweep)

    _add_compare_parser(sub)
    _add_prefix_parser(sub)
    _add_fairness_parser(sub)

    make = sub.add_parser("make-adapters", help="random PEFT adapters shaped for a base")
    make.add_argument("--model", type=Path, required=True, help="a dir with config.json")
    make.add_argument("--n", type=int, required=True, help="adapters to make")
    make.add_argument(
        "--ranks", type=_ints, default=[8, 16, 32, 64], help="ranks, round-robin over the n"
    )
    make.add_argument("--targets", default=ATTENTION, help="modules the adapters adapt")
    make.add_argument("--distinct", type=int, default=None, help="write only this many dirs")
    make.add_argument("--seed", type=int, default=0, help="seeds the random weights")
    make.add_argument("--out", type=Path, required=True, help="the adapters' parent dir")
    make.set_defaults(run=_make_adapters)


def _add_compare_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    compare = sub.add_parser(
        "compare",
        help="loraserve over HTTP and in-process against the PEFT baselines, one request list",
    )
    _model_args(compare)
    compare.add_argument(
        "--systems",
        default="loraserve-http,loraserve,peft-mixed,peft",
        help="some of loraserve-http, loraserve, peft-mixed, peft (default: all)",
    )
    compare.add_argument(
        "--base", action="store_true", help="also run every system on the base (n = 0)"
    )
    compare.add_argument("--num-requests", type=int, default=64, help="requests in the list")
    compare.add_argument("--num-adapters", type=int, default=8, help="adapters (n)")
    compare.add_argument(
        "--ranks", type=_ints, default=[4, 8, 16], help="random adapters' ranks, round-robin"
    )
    compare.add_argument("--targets", default=ATTENTION, help="modules the adapters adapt")
    compare.add_argument("--adapter-dir", type=Path, default=None, help="existing adapters")
    compare.add_argument("--alpha", type=float, default=1.0, help="power-law exponent")
    compare.add_argument(
        "--input-range", type=_range, default=(8, 120), help="[LO, HI) prompt tokens"
    )
    compare.add_argument(
        "--output-range",
        type=_range,
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
    compare.set_defaults(run=_compare)


def _add_prefix_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    prefix = sub.add_parser(
        "prefix",
        help="prefix caching on against off over HTTP: a shared system prompt over 8 adapters",
    )
    _model_args(prefix)
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
    prefix.add_argument("--targets", default=ATTENTION, help="modules the adapters adapt")
    prefix.add_argument("--seed", type=int, default=42, help="seeds the list and adapters")
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
    prefix.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/prefix"), help="results dir"
    )
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
    _model_args(fairness)
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
    fairness.add_argument("--targets", default=ATTENTION, help="modules the adapters adapt")
    fairness.add_argument("--seed", type=int, default=42, help="seeds the list and adapters")
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
    fairness.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/fairness"), help="results dir"
    )
    fairness.set_defaults(run=_fairness)


Range = tuple[int, int]


def fit_ranges(
    kind: str,
    input_range: Range | None,
    output_range: Range | None,
    room: int | None,
    context: str | None = None,
) -> tuple[Range, Range, str | None]:
    """``--input-range`` and ``--output-range`` for requests of at most ``room`` positions
    (prompt + output tokens; None: the server does not say, nothing is checked), and a note
    when they were clipped. ``context`` names ``room`` in the messages ("the server's
    max_model_len of 128").

    A range left out (None) takes ``DEFAULT_RANGE``. When the longest prompt plus the longest
    output would exceed ``room``, the ranges left out are clipped until they fit: both left
    out share the room in proportion to their longest values; one left out takes what the
    given one leaves. Ranges the user gave are never changed: a ``ValueError`` says when
    they cannot fit. The result depends on the arguments alone, so the same seed still gives
    the same requests against the same server.
    """
    given_in, given_out = input_range is not None, output_range is not None
    inputs, outputs = input_range or DEFAULT_RANGE, output_range or DEFAULT_RANGE
    # W3 draws prompts of at most HI tokens (Punica's max_prompt); every other range is [LO, HI).
    top_in = inputs[1] if kind == "W3" else inputs[1] - 1
    top_out = outputs[1] - 1
    if room is None or top_in + top_out <= room:
        return inputs, outputs, None
    context = context or f"a context of {room} tokens"
    flags = [f"--input-range {inputs[0]},{inputs[1]}"] if given_in else []
    flags += [f"--output-range {outputs[0]},{outputs[1]}"] if given_out else []
    if given_in and given_out:
        raise ValueError(
            f"{' and '.join(flags)} allow a {top_in}-token prompt with {top_out} output "
            f"tokens, {top_in + top_out} in all, more than {context}; give ranges whose "
            f"longest prompt and output sum to at most {room}, or leave one out to have it "
            "fitted"
        )
    if given_in:
        new_in, new_out = top_in, room - top_in
    elif given_out:
        new_in, new_out = room - top_out, top_out
    else:
        new_in = max(1, room * top_in // (top_in + top_out))
        new_out = room - new_in
    if new_in < 1 or new_out < 1:
        if not flags:
            raise ValueError(f"{context} leaves no room for a prompt and an output")
        longest, other = (
            (f"prompts of up to {top_in}", "an output")
            if given_in
            else (
                f"outputs of up to {top_out}",
                "a prompt",
            )
        )
        raise ValueError(
            f"{flags[0]} allows {longest} tokens, which leave no room for {other} within "
            f"{context}; give ranges whose longest prompt and output sum to at most {room}"
        )
    hi_in = new_in if kind == "W3" else new_in + 1
    fitted_in = (max(1, min(inputs[0], hi_in - 1)), hi_in)
    fitted_out = (min(outputs[0], new_out), new_out + 1)
    note = (
        f"lengths clipped to fit {context}: --input-range {fitted_in[0]},{fitted_in[1]} "
        f"--output-range {fitted_out[0]},{fitted_out[1]} (prompts up to {new_in} tokens, "
        f"outputs up to {new_out}; unclipped: {top_in} + {top_out})"
    )
    return fitted_in, fitted_out, note


def _workload(
    args: argparse.Namespace, num_adapters: int, input_range: Range, output_range: Range
) -> Workload:
    """The W2, W3 or W4 list the flags describe."""
    if args.kind == "W4":
        return churn_w4(
            num_adapters=num_adapters,
            alpha=args.alpha,
            rate=args.rate,
            cv=args.cv,
            num_requests=args.num_requests,
            input_range=input_range,
            output_range=output_range,
            seed=args.seed,
            vocab_size=args.vocab_size,
        )
    if args.kind == "W3":
        return closed_loop_w3(
            num_requests=args.num_requests,
            num_adapters=num_adapters,
            popularity="uniform",
            max_prompt=input_range[1],
            output_range=output_range,
            seed=args.seed,
            vocab_size=args.vocab_size,
        )
    return synthetic_w2(
        num_adapters=num_adapters,
        alpha=args.alpha,
        rate=args.rate,
        cv=args.cv,
        num_requests=args.num_requests,
        input_range=input_range,
        output_range=output_range,
        seed=args.seed,
        vocab_size=args.vocab_size,
    )


def _serve(args: argparse.Namespace) -> int:
    from server.bench.client import check_fits, read_models, run_workload

    served = read_models(args.url, args.api_key)  # a ValueError when it cannot be read
    adapters = args.adapters.split(",") if args.adapters else list(served.adapters)
    models: list[str | None] = list(adapters)
    if served.max_model_len is None:
        print("note: the server reports no max_model_len; request lengths were not checked")
    if args.workload is not None:
        workload = Workload.load(args.workload)
        source = str(args.workload)
    else:
        n = args.num_adapters if args.num_adapters is not None else len(adapters)
        # The model the tightest request goes to: the one with the most virtual tokens.
        used = [models[i % len(models)] for i in range(n)] if models and n else [None]
        tightest = min(used, key=lambda m: served.room(m) or 0)
        inputs, outputs, note = fit_ranges(
            args.kind,
            args.input_range,
            args.output_range,
            served.room(tightest),
            served.context(tightest),
        )
        if note:
            print(f"note: {note}")
        workload = _workload(args, n, inputs, outputs)
        source = "the workload"
    unreported = sorted(set(served.unreported) & set(models))
    if unreported:
        print(
            "note: /v1/models does not say how many virtual tokens these adapters take "
            f"(prompt or prefix tuning): {', '.join(unreported)}; their longest requests may "
            "not fit the context"
        )
    unlisted = [m for m in adapters if m not in served.adapters and m != served.base]
    if unlisted:
        print(f"note: /v1/models does not list {', '.join(unlisted)}")
    check_fits(workload, served, models, source)
    if args.save_workload:
        workload.save(args.save_workload)
    print(f"workload: {json.dumps(describe(workload))}")
    records, duration = asyncio.run(
        run_workload(args.url, workload, models, served.base, args.api_key)
    )
    name = f"TTFT<={args.slo_ttft:g}s" + (f",TPOT<={args.slo_tpot:g}s" if args.slo_tpot else "")
    slos = {name: SLO(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot)}
    summary = summarize(records, duration, slos)
    print(format_summary(summary, f"{workload.kind} against {args.url}"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "summary": summary,
            "workload": workload.params,
            "max_model_len": served.max_model_len,
        }
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    if all_failed(summary):
        print(f"loraserve bench serve: {describe_failures(summary)}", file=sys.stderr)
        return 1
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
            input_range=args.input_range or DEFAULT_RANGE,
            output_range=args.output_range or DEFAULT_RANGE,
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
    return _every_request_failed("compare", result["systems"])


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
    return _every_request_failed("prefix", result["systems"])


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
    return _every_request_failed("fairness", result["systems"])


def _every_request_failed(command: str, systems: list[dict[str, Any]]) -> int:
    """1, saying which, when a system completed none of its requests (its numbers measure
    nothing); else 0."""
    failed = [s for s in systems if all_failed(s)]
    for s in failed:
        label = s.get("label", s["system"])
        print(f"loraserve bench {command}: {label}: {describe_failures(s)}", file=sys.stderr)
    return 1 if failed else 0


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
