"""``loraserve bench``'s arguments: serve, sweep, prefix, fairness and make-adapters.

Each subcommand's parser sets ``run`` to its function in :mod:`server.bench.commands`. The
benchmarks against the Hugging Face baselines (``benchmarks/sweep_baselines.py``,
``benchmarks/compare.py``) build their parsers from the pieces here.

loraserve bench serve --url URL [--workload FILE | W2 parameters] [--out FILE]
loraserve bench sweep --model DIR [--load-format dummy] --adapters 0,1,8,64 ... --out DIR
loraserve bench make-adapters --model DIR --n N --ranks 8,16,32,64 --targets ... --out DIR
loraserve bench prefix --model DIR [--load-format dummy] [--prefix-len 1000] [--smoke] --out DIR
loraserve bench fairness --model DIR [--load-format dummy] [--flood-requests N] [--smoke] --out DIR
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from server.bench.commands import (
    DEFAULT_RANGE,
    fairness_command,
    make_adapters_command,
    prefix_command,
    serve_command,
    sweep_command,
)

ATTENTION = "q_proj,k_proj,v_proj,o_proj"


def int_list(text: str) -> list[int]:
    """``--ranks 8,16``: comma-separated integers."""
    return [int(v) for v in text.split(",") if v]


def token_range(text: str) -> tuple[int, int]:
    """``--input-range 8,64``: a [LO, HI) range of token counts."""
    lo, hi = int_list(text)
    if not 0 < lo < hi:
        raise argparse.ArgumentTypeError(f"a range is LO,HI with 0 < LO < HI; got {text!r}")
    return lo, hi


def add_model_args(parser: argparse.ArgumentParser) -> None:
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
        type=token_range,
        default=None,
        help=f"LO,HI: prompt tokens drawn in [LO, HI) (W3: at most HI) (default {lo},{hi}{fit})",
    )
    w.add_argument(
        "--output-range",
        type=token_range,
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


def add_sweep_args(sweep: argparse.ArgumentParser) -> None:
    """``bench sweep``'s flags (``benchmarks/sweep_baselines.py`` adds ``--baselines``)."""
    add_model_args(sweep)
    sweep.add_argument(
        "--quantization", choices=["none", "nf4"], default=None, help="the base's (default: auto)"
    )
    sweep.add_argument(
        "--adapters", type=int_list, default=[0, 1, 8, 64], help="values of n, comma-separated"
    )
    sweep.add_argument(
        "--ranks", type=int_list, default=[8], help="random adapters' ranks, round-robin"
    )
    sweep.add_argument("--targets", default=ATTENTION, help="modules the adapters adapt")
    sweep.add_argument(
        "--distinct-adapters",
        type=int,
        default=None,
        help="write only this many adapter dirs, shared round-robin (default: one each)",
    )
    sweep.add_argument("--rates", default="", help="a rate sweep for SLO attainment")
    sweep.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="loraserve's max_num_seqs (and the baselines' batch size, where there are any)",
    )
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
    serve.set_defaults(run=serve_command)

    sweep = sub.add_parser(
        "sweep", help="loraserve over numbers of adapters (and request rates), one request list"
    )
    add_sweep_args(sweep)
    sweep.set_defaults(run=sweep_command)

    _add_prefix_parser(sub)
    _add_fairness_parser(sub)

    make = sub.add_parser("make-adapters", help="random PEFT adapters shaped for a base")
    make.add_argument("--model", type=Path, required=True, help="a dir with config.json")
    make.add_argument("--n", type=int, required=True, help="adapters to make")
    make.add_argument(
        "--ranks", type=int_list, default=[8, 16, 32, 64], help="ranks, round-robin over the n"
    )
    make.add_argument("--targets", default=ATTENTION, help="modules the adapters adapt")
    make.add_argument("--distinct", type=int, default=None, help="write only this many dirs")
    make.add_argument("--seed", type=int, default=0, help="seeds the random weights")
    make.add_argument("--out", type=Path, required=True, help="the adapters' parent dir")
    make.set_defaults(run=make_adapters_command)


def _add_prefix_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    prefix = sub.add_parser(
        "prefix",
        help="prefix caching on against off over HTTP: a shared system prompt over 8 adapters",
    )
    add_model_args(prefix)
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
        "--question-range", type=token_range, default=None, help="[lo, hi) tokens (default 16,49)"
    )
    prefix.add_argument(
        "--output-range", type=token_range, default=None, help="[lo, hi) tokens (default 16,33)"
    )
    prefix.add_argument("--ranks", type=int_list, default=None, help="round-robin (default 4,8,16)")
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
    prefix.set_defaults(run=prefix_command)


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
    add_model_args(fairness)
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
        "--input-range", type=token_range, default=None, help="[lo, hi) prompt tokens (16,64)"
    )
    fairness.add_argument(
        "--output-range", type=token_range, default=None, help="[lo, hi) output tokens (16,48)"
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
    fairness.set_defaults(run=fairness_command)
