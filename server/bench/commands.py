"""``loraserve bench``'s commands: each runs one subcommand from its parsed arguments.

The arguments are defined, with their help, in :mod:`server.bench.cli`; each function here
takes the ``argparse.Namespace`` and returns the process's exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from server.bench.generators import churn_w4, closed_loop_w3, synthetic_w2
from server.bench.metrics import SLO, all_failed, describe_failures, format_summary, summarize
from server.bench.workload import Workload, describe

if TYPE_CHECKING:
    from server.bench.replay import System

# The commands import their heavier parts (httpx, torch, matplotlib) when they run, so that the
# rest of the command line (``loraserve serve``) does not depend on them.

DEFAULT_RANGE = (8, 512)  # --input-range and --output-range of serve and sweep

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


def serve_command(args: argparse.Namespace) -> int:
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


def sweep_command(args: argparse.Namespace, others: dict[str, System] | None = None) -> int:
    """``bench sweep``; ``others`` are replayed beside loraserve (``run_sweep``)."""
    from engine.arch import ModelArch
    from server.bench.sweep import SweepArgs, run_sweep  # torch and matplotlib

    # The engine serves the model's whole context (the sweep sets no --max-model-len).
    room = ModelArch.load(args.model).context_limit
    inputs, outputs, note = fit_ranges(
        "W2", args.input_range, args.output_range, room, f"the model's context of {room} tokens"
    )
    if note:
        print(f"note: {note}")
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
            input_range=inputs,
            output_range=outputs,
            seed=args.seed,
            rates=[float(r) for r in args.rates.split(",") if r],
            dtype=args.dtype,
            quantization=args.quantization,
            load_format=args.load_format,
            batch_size=args.batch_size,
            kernels=args.kernels,
            distinct_adapters=args.distinct_adapters,
            enforce_eager=args.enforce_eager,
            tensor_parallel_size=args.tensor_parallel_size,
        ),
        others,
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


def prefix_command(args: argparse.Namespace) -> int:
    from server.bench.prefix import SMOKE, PrefixArgs, run_prefix
    from server.bench.prefix_report import format_ratios, format_system

    sizes = _given(
        args,
        ("num_requests", "concurrency", "num_adapters", "prefix_len", "question_range"),
        ("output_range", "ranks", "on_flags", "off_flags", "server_flags"),
    )
    result = run_prefix(
        PrefixArgs(
            **_server_run(args),
            **({**SMOKE, **sizes} if args.smoke else sizes),
        ),
        on_system=lambda entry: print(format_system(entry), flush=True),
    )
    wrote = f"{args.out}/prefix.json and {args.out}/prefix.png"
    return _report("loraserve bench prefix", result, format_ratios(result), wrote)


def fairness_command(args: argparse.Namespace) -> int:
    from server.bench.fairness import SMOKE, FairnessArgs, run_fairness
    from server.bench.fairness_report import format_ratios, format_system

    sizes = _given(
        args,
        ("num_adapters", "flood_requests", "flood_concurrency", "modest_rate", "duration"),
        ("modest_start", "input_range", "output_range", "max_num_seqs", "rank", "server_flags"),
    )
    renamed = {"duration": "duration_s", "modest_start": "modest_start_s"}
    sizes = {renamed.get(key, key): value for key, value in sizes.items()}
    result = run_fairness(
        FairnessArgs(
            **_server_run(args),
            **({**SMOKE, **sizes} if args.smoke else sizes),
        ),
        on_system=lambda entry: print(format_system(entry), flush=True),
    )
    wrote = f"{args.out}/fairness.json and {args.out}/fairness_*.png"
    return _report("loraserve bench fairness", result, format_ratios(result), wrote)


def _server_run(args: argparse.Namespace) -> dict[str, Any]:
    """What ``bench prefix`` and ``bench fairness`` take alike from their flags: the model,
    the output folder, the adapters' targets and seed, the servers' dtype, load format,
    torch threads and start-up timeout."""
    return {
        "model_dir": args.model,
        "out": args.out,
        "targets": args.targets.split(","),
        "seed": args.seed,
        "dtype": args.dtype,
        "load_format": args.load_format,
        "threads": torch_threads(args),
        "startup_timeout_s": args.startup_timeout,
    }


def _report(program: str, result: dict[str, Any], ratios: str, wrote: str) -> int:
    """Print the run's notes, its ratios and what it wrote; 1 when a system completed none
    of its requests."""
    for note in result["notes"]:
        print(f"note: {note}")
    print(ratios)
    print(f"wrote {wrote}")
    return every_request_failed(program, result["systems"])


def _given(args: argparse.Namespace, *names: tuple[str, ...]) -> dict[str, Any]:
    """The flags among ``names`` the user gave (left out: None), by name."""
    return {
        key: value for group in names for key in group if (value := getattr(args, key)) is not None
    }


def torch_threads(args: argparse.Namespace) -> int:
    """``--threads``, else ``OMP_NUM_THREADS``, else 1."""
    return int(args.threads or int(os.environ.get("OMP_NUM_THREADS") or 1))


def every_request_failed(program: str, systems: list[dict[str, Any]]) -> int:
    """1, saying which (after ``program``'s name), when a system completed none of its
    requests (its numbers measure nothing); else 0."""
    failed = [s for s in systems if all_failed(s)]
    for s in failed:
        label = s.get("label", s["system"])
        print(f"{program}: {label}: {describe_failures(s)}", file=sys.stderr)
    return 1 if failed else 0


def make_adapters_command(args: argparse.Namespace) -> int:
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
