"""``loraserve bench prefix``: prefix caching on against off, through the HTTP API, one run.

The workload (:func:`server.bench.generators.shared_prefix`): a system prompt of about 1,000
tokens shared by every request, each request adding a short question (16–48 tokens) and
generating a short answer (16–32 tokens, greedy, EOS ignored, ``min_tokens = max_tokens``),
spread evenly over 8 adapters, sent by 8 clients in a closed loop. Since the cache is keyed
by adapter identity, each adapter computes the system prompt once and its later requests
reuse it.

Two systems replay the same saved request list, one after the other:

* ``on``: ``loraserve serve`` with its defaults (prefix caching is on by default) plus
  ``on_flags`` (none by default);
* ``off``: the same server with ``off_flags`` (``--no-enable-prefix-caching``).

Each is started as a subprocess (:func:`server.bench.harness.running_server`: a free loopback
port, one warm-up request, SIGTERM at the end), with the same flags otherwise: the random
adapters as ``--lora-modules adapter-i=PATH``, ``--max-num-seqs`` = the concurrency, the same
``OMP_NUM_THREADS``, and a page pool (``--num-pages``) with room for one full-context
sequence per adapter and per client and for the adapters' weights, so that no adapter's cached
system prompt has to be evicted for want of room (unless the flags size the pool
themselves). The flags are checked against ``loraserve serve``'s parser before anything
starts: a server that does not know a flag is reported as such, not as a failed run.

Writes into ``out``: ``prefix.json`` (each system's ``summarize`` summary: TTFT p50/p90,
output tokens/s, requests/s, the prompt tokens the server reported as cached when it
reports them; the ratios on/off; the targets; the arguments and the machine),
``workload.json``, ``prefix.png`` (TTFT p50 and output tokens/s, on beside off:
:mod:`server.bench.prefix_report`), the adapters, and each server's log (``server-on.log``,
``server-off.log``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.arch import ModelArch
from server.bench.client import check_fits, read_models, run_workload
from server.bench.generators import shared_prefix
from server.bench.harness import SERVED_BASE, ServerSpec, machine_info, running_server
from server.bench.make_adapters import make_random_adapters
from server.bench.metrics import describe_failures, replay_span, summarize
from server.bench.prefix_report import plot_prefix
from server.bench.workload import Workload, describe
from server.serve_args import add_serve_args

logger = logging.getLogger(__name__)

OFF_FLAGS = ("--no-enable-prefix-caching",)
SYSTEMS = {"on": "prefix caching on", "off": "prefix caching off"}  # in the order they run
# The targets on 2 CPU cores: with caching on, TTFT p50 at least 3× lower and output
# throughput at least 2× higher than with caching off.
TARGETS = {"ttft_p50_off_over_on": 3.0, "output_throughput_on_over_off": 2.0}
# ``--smoke``: a handful of short requests to check the pipeline end to end in seconds; the
# engine steps in the server's process, one interpreter fewer to start. Not for numbers.
SMOKE = {
    "num_requests": 8,
    "concurrency": 2,
    "num_adapters": 2,
    "prefix_len": 48,
    "question_range": (4, 9),
    "output_range": (2, 5),
    "ranks": [4],
    "server_flags": ["--engine-in-process"],
}


@dataclass
class PrefixArgs:
    """What ``loraserve bench prefix`` runs (``server.bench.cli`` documents each flag).

    ``on_flags``, ``off_flags`` and ``server_flags`` (both systems) are appended to the
    ``loraserve serve`` command as they are.
    """

    model_dir: Path
    out: Path
    num_requests: int = 64
    concurrency: int = 8
    num_adapters: int = 8
    prefix_len: int = 1000
    question_range: tuple[int, int] = (16, 49)
    output_range: tuple[int, int] = (16, 33)
    ranks: list[int] = field(default_factory=lambda: [4, 8, 16])
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    seed: int = 42
    dtype: str = "auto"
    load_format: str = "auto"
    threads: int = 1
    on_flags: list[str] = field(default_factory=list)
    off_flags: list[str] = field(default_factory=lambda: list(OFF_FLAGS))
    server_flags: list[str] = field(default_factory=list)
    startup_timeout_s: float = 600.0


def run_prefix(
    args: PrefixArgs, on_system: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Replay the shared-prefix list with caching on, then off; returns what ``prefix.json``
    holds. ``on_system`` is called with each system's entry as soon as it has run."""
    if args.num_adapters < 1 or args.concurrency < 1:
        raise ValueError("--num-adapters and --concurrency must be at least 1")
    model_dir = args.model_dir.resolve()
    flags = {key: [*args.server_flags, *_system_flags(args, key)] for key in SYSTEMS}
    for key, system_flags in flags.items():
        check_serve_flags(model_dir, system_flags, SYSTEMS[key])
    arch = ModelArch.load(model_dir)
    workload = prefix_workload(args, arch)
    args.out.mkdir(parents=True, exist_ok=True)
    workload.save(args.out / "workload.json")
    paths = make_random_adapters(
        model_dir, args.out / "adapters", args.num_adapters, args.ranks, args.targets, args.seed
    )
    adapters = tuple(zip(workload.adapter_names(), (p.resolve() for p in paths), strict=True))
    for system_flags in flags.values():
        if not any(f.startswith(("--num-pages", "--pool-memory")) for f in system_flags):
            system_flags += ["--num-pages", str(_num_pages(args, arch))]
    header = _header(args, workload, arch, flags)
    systems = []
    for key, label in SYSTEMS.items():
        spec = ServerSpec(
            model_dir=model_dir,
            dtype=args.dtype,
            load_format=args.load_format,
            max_num_seqs=args.concurrency,
            max_lora_rank=max(args.ranks),
            max_loras=args.num_adapters,
            max_waiting_requests=args.num_requests,
            threads=args.threads,
            adapters=adapters,
            extra_flags=tuple(flags[key]),
            startup_timeout_s=args.startup_timeout_s,
        )
        log = args.out / f"server-{key}.log"
        log.write_text("")
        logger.info("running %s", label)
        started = time.perf_counter()
        with running_server(spec, log) as url:
            names: list[str | None] = [name for name, _ in adapters]
            # the flags may shorten the context (--max-model-len)
            check_fits(workload, read_models(url), names, f"the list ({label})")
            records, _ = asyncio.run(
                run_workload(url, workload, names, SERVED_BASE, progress=False)
            )
        wall_s = time.perf_counter() - started
        summary = summarize(records, replay_span(records, wall_s))
        planned = [r.output_len for r in workload.requests]
        generated = [r.output_len for r in records]
        entry = {
            "system": key,
            "label": label,
            "flags": flags[key],
            "generated_tokens": sum(generated),
            "planned_tokens": sum(planned),
            "exact": generated == planned,
            "wall_s": wall_s,  # with the server's start-up and stop
            **summary,
            "cached_fraction": (
                summary["total_cached_tokens"] / summary["total_input_tokens"]
                if summary["total_cached_tokens"] is not None and summary["total_input_tokens"]
                else None
            ),
        }
        systems.append(entry)
        if on_system is not None:
            on_system(entry)
    result = _result(args, header, workload, systems, flags)
    (args.out / "prefix.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_prefix(result, args.out / "prefix.png")
    return result


def _system_flags(args: PrefixArgs, key: str) -> list[str]:
    return list(args.on_flags if key == "on" else args.off_flags)


def check_serve_flags(model_dir: Path, flags: list[str], label: str) -> None:
    """Raise ``ValueError`` unless ``loraserve serve`` parses ``flags`` (the parser the
    subprocess will run, built here, so that an unknown flag is named before any server
    starts)."""
    parser = argparse.ArgumentParser(prog="loraserve serve", add_help=False)
    add_serve_args(parser)
    try:
        _, unknown = parser.parse_known_args([str(model_dir), *flags])
    except SystemExit:  # argparse has printed why (a flag missing its value, say)
        raise ValueError(f"loraserve serve rejects the {label} flags {shlex.join(flags)}") from None
    if unknown:
        raise ValueError(f"loraserve serve does not know {shlex.join(unknown)} (the {label} flags)")


def prefix_workload(args: PrefixArgs, arch: ModelArch) -> Workload:
    """The shared-prefix list for a model of shape ``arch``; a ``ValueError`` when its
    longest request does not fit the model's context."""
    limit = arch.context_limit
    longest_tail = args.question_range[1] - 1 + args.output_range[1] - 1
    if args.prefix_len + longest_tail > limit:
        fit = limit - longest_tail
        hint = (
            f"use --prefix-len {fit} or less, or "
            if fit >= 1
            else "use shorter --question-range and --output-range, or "
        )
        raise ValueError(
            f"{args.model_dir}: a {args.prefix_len}-token system prompt, a question of up to "
            f"{args.question_range[1] - 1} tokens and an answer of up to "
            f"{args.output_range[1] - 1} need {args.prefix_len + longest_tail} positions, "
            f"more than the model's context of {limit} positions; "
            + hint
            + "a model with a longer context: benchmarks/presets/tiny is the demo model's "
            "shape with a context of 2048 (--model benchmarks/presets/tiny --load-format dummy)"
        )
    return shared_prefix(
        num_requests=args.num_requests,
        num_adapters=args.num_adapters,
        prefix_len=args.prefix_len,
        question_range=args.question_range,
        output_range=args.output_range,
        concurrency=args.concurrency,
        seed=args.seed,
        vocab_size=arch.vocab_size,
    )


def _num_pages(args: PrefixArgs, arch: ModelArch) -> int:
    """Room for a full-context sequence per adapter (its cached system prompt) and per client
    (a running request), plus the adapters' weights.

    A page holds one token's keys, or its values, in every layer (``num_kv_heads · head_dim``
    values per layer); an adapter of rank r takes r · (in + out) values per layer and target,
    rounded up to pages here target by target.
    """
    context, layout, width = arch.context_limit, arch.layout(), arch.kv_width
    weights = sum(
        -(-args.ranks[i % len(args.ranks)] * sum(layout.linear_shapes[t]) // width)
        for i in range(args.num_adapters)
        for t in args.targets
    )
    return 2 * context * (args.num_adapters + args.concurrency) + weights


def _header(
    args: PrefixArgs, workload: Workload, arch: ModelArch, flags: dict[str, list[str]]
) -> list[str]:
    stats = describe(workload)
    q_lo, q_hi = args.question_range
    o_lo, o_hi = args.output_range
    return [
        f"model {args.model_dir} (dtype {args.dtype}, load format {args.load_format}, "
        f"context {arch.context_limit}), {args.threads} torch thread(s)",
        f"shared prefix: {stats['requests']} requests, a {args.prefix_len}-token system prompt "
        f"+ questions of {q_lo}-{q_hi - 1} tokens, answers of {o_lo}-{o_hi - 1}, over "
        f"{args.num_adapters} adapters (uniform; ranks {','.join(map(str, args.ranks))} on "
        f"{','.join(args.targets)}), {args.concurrency} clients in a closed loop, seed {args.seed}",
        f"{stats['total_input_tokens']} prompt tokens, {stats['total_output_tokens']} to generate",
        *(f"{SYSTEMS[key]}: loraserve serve ... {shlex.join(f)}" for key, f in flags.items()),
    ]


def _result(
    args: PrefixArgs,
    header: list[str],
    workload: Workload,
    systems: list[dict[str, Any]],
    flags: dict[str, list[str]],
) -> dict[str, Any]:
    on, off = (next(s for s in systems if s["system"] == key) for key in SYSTEMS)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    ratios = {
        "ttft_p50_off_over_on": ratio(off["median_ttft_ms"], on["median_ttft_ms"]),
        "ttft_p50_on_over_off": ratio(on["median_ttft_ms"], off["median_ttft_ms"]),
        "ttft_p90_off_over_on": ratio(off["p90_ttft_ms"], on["p90_ttft_ms"]),
        "output_throughput_on_over_off": ratio(on["output_throughput"], off["output_throughput"]),
        "request_throughput_on_over_off": ratio(
            on["request_throughput"], off["request_throughput"]
        ),
    }
    met: bool | None = True
    for key, target in TARGETS.items():
        value = ratios[key]
        met = None if value is None or met is None else met and value >= target
    notes = []
    if flags["on"] == flags["off"]:
        notes.append("both systems ran with the same flags: the ratios measure noise")
    if on["total_cached_tokens"] is None:
        notes.append("the server reports no cached_tokens in its usage")
    elif not on["total_cached_tokens"]:
        notes.append("with caching on, the server reported no cached prompt tokens")
    for s in systems:
        if s["failed"]:
            notes.append(f"{s['label']}: {describe_failures(s)}")
        elif not s["exact"]:
            notes.append(f"{s['label']}: generated other lengths than planned")
    return {
        "header": header,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(args.threads),
        "workload": workload.params,
        "systems": systems,
        "ratios": ratios,
        "targets": TARGETS,
        "targets_met": met,
        "notes": notes,
    }
