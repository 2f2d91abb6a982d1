"""``loraserve bench fairness``: one client flooding while the others send a modest steady
load, under the fcfs, fair and priority scheduling policies, through the HTTP API, one run.

The workload (:func:`server.bench.fairness_workload.flooding`): adapter 0 is a flooding
client, 8,000 requests in a closed loop of 128 in flight (4× ``--max-num-seqs``, so about
96 of its requests always wait in the server); adapters 1–7 are modest clients, each a
Poisson stream of 1 request/s for 50 s from 5 s (on the 2-core machine the demo-sized server
answers about 85 requests/s, so a fair eighth is about 10 requests/s); prompts of 16–63 tokens,
outputs of 16–47, greedy, EOS ignored, ``min_tokens = max_tokens``. The flooder's requests
outlast the modest streams (each system's ``flood_outlasted_modest`` says whether they did),
so every modest request meets the flood.

Three systems replay the same saved request list, one after the other:

* ``fcfs``: ``loraserve serve --scheduling-policy fcfs``: arrival order;
* ``fair``: ``--scheduling-policy fair`` (the Virtual Token Counter, clients = adapters);
* ``priority``: ``--scheduling-policy priority``, the modest clients' requests sent with
  ``"priority": 0`` and the flooder's with ``"priority": 1`` (only to this system: the others
  refuse a priority other than 0).

Each is started as a subprocess (:func:`server.bench.harness.running_server`) with the same
flags otherwise: the random adapters (one rank for all, so the fair policy's rank pricing
charges every client alike) as ``--lora-modules adapter-i=PATH``, ``--max-num-seqs``,
``--max-loras`` = the adapters (no cap on adapters per batch), the same ``OMP_NUM_THREADS``.
While a system runs, its ``/metrics`` is read every half second for the waiting and
running requests.

Writes into ``out``: ``fairness.json`` (per system: the overall ``summarize`` summary, one
per client group (flooder, modest) and per client, the largest and mean waiting queue; the
ratios between systems; the targets; notes; the arguments and the machine),
``fairness_series.json`` (per system: each request's send time and TTFT, each client's
served tokens over time, the waiting and running requests over time), ``workload.json``,
three plots (:mod:`server.bench.fairness_report`), the adapters, and each server's log
(``server-fcfs.log``, ...).
"""

from __future__ import annotations

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
from server.bench.client import check_fits, read_models, run_workload, sample_gauges
from server.bench.fairness_metrics import (
    GAUGES,
    TARGETS,
    fairness_ratios,
    stalled,
    system_entry,
    targets_met,
)
from server.bench.fairness_report import plot_fairness
from server.bench.fairness_workload import FLOODER, flooding
from server.bench.harness import SERVED_BASE, ServerSpec, machine_info, running_server
from server.bench.make_adapters import make_random_adapters
from server.bench.metrics import RequestRecord, describe_failures
from server.bench.prefix import check_serve_flags
from server.bench.workload import Workload, describe
from server.request_models import CompletionRequest

logger = logging.getLogger(__name__)

SYSTEMS = {  # in the order they run
    "fcfs": "first come, first served",
    "fair": "fair (virtual token counter)",
    "priority": "priority (modest first)",
}
PRIORITIES = {"flooder": 1, "modest": 0}  # the priority system's request field, lower first
SAMPLE_INTERVAL_S = 0.5
# Requests waiting and none running this long means the server admits nothing (an adapter
# loads from disk in well under a second here): the run stops with an error, not forever.
STALL_S = 30.0
# ``--smoke``: a few seconds of each system to check the pipeline end to end; the engine
# steps in the server's process, one interpreter fewer to start. Not for numbers.
SMOKE = {
    "num_adapters": 3,
    "flood_requests": 160,
    "flood_concurrency": 8,
    "modest_rate": 4.0,
    "modest_start_s": 0.0,
    "duration_s": 1.0,
    "input_range": (4, 9),
    "output_range": (2, 5),
    "max_num_seqs": 4,
    "server_flags": ["--engine-in-process"],
}


@dataclass
class FairnessArgs:
    """What ``loraserve bench fairness`` runs (``server.bench.cli`` documents each flag).

    ``server_flags`` are appended to every system's ``loraserve serve`` command as they are.
    """

    model_dir: Path
    out: Path
    num_adapters: int = 8
    flood_requests: int = 8000
    flood_concurrency: int = 128
    modest_rate: float = 1.0
    modest_start_s: float = 5.0
    duration_s: float = 50.0
    input_range: tuple[int, int] = (16, 64)
    output_range: tuple[int, int] = (16, 48)
    max_num_seqs: int = 32
    rank: int = 8
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    seed: int = 42
    dtype: str = "auto"
    load_format: str = "auto"
    threads: int = 1
    server_flags: list[str] = field(default_factory=list)
    startup_timeout_s: float = 600.0


def run_fairness(
    args: FairnessArgs, on_system: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Replay the flooding list under fcfs, fair and priority; returns what
    ``fairness.json`` and ``fairness_series.json`` hold. ``on_system`` is called with each
    system's entry as soon as it has run."""
    model_dir = args.model_dir.resolve()
    flags = {key: [*args.server_flags, "--scheduling-policy", key] for key in SYSTEMS}
    for key, system_flags in flags.items():
        check_serve_flags(model_dir, system_flags, key)
    arch = ModelArch.load(model_dir)
    workload = fairness_workload(args, arch)
    args.out.mkdir(parents=True, exist_ok=True)
    workload.save(args.out / "workload.json")
    paths = make_random_adapters(
        model_dir, args.out / "adapters", args.num_adapters, [args.rank], args.targets, args.seed
    )
    adapters = tuple(zip(workload.adapter_names(), (p.resolve() for p in paths), strict=True))
    names: list[str | None] = [name for name, _ in adapters]
    header = _header(args, workload, arch, flags)
    systems = []
    for key, label in SYSTEMS.items():
        spec = ServerSpec(
            model_dir=model_dir,
            dtype=args.dtype,
            load_format=args.load_format,
            max_num_seqs=args.max_num_seqs,
            max_lora_rank=args.rank,
            max_loras=args.num_adapters,
            max_waiting_requests=len(workload.requests),
            threads=args.threads,
            adapters=adapters,
            extra_flags=tuple(flags[key]),
            startup_timeout_s=args.startup_timeout_s,
        )
        extra = priority_fields(workload) if key == "priority" else None
        log = args.out / f"server-{key}.log"
        log.write_text("")
        logger.info("running %s", label)
        started = time.perf_counter()
        with running_server(spec, log) as url:
            # the flags may shorten the context (--max-model-len)
            check_fits(workload, read_models(url), names, f"the list ({key})")
            records, samples = asyncio.run(_replay(url, workload, names, extra, key))
        entry = system_entry(key, workload, records, samples, time.perf_counter() - started)
        entry["label"], entry["flags"] = label, flags[key]
        systems.append(entry)
        if on_system is not None:
            on_system(entry)
    result = _result(args, header, workload, systems)
    save_result(result, args.out)
    plot_fairness(result, args.out)
    return result


def save_result(result: dict[str, Any], out: Path) -> None:
    """``fairness.json`` (the result without the series, readable) and
    ``fairness_series.json`` (each system's series, compact); :func:`load_result` joins them."""
    systems = [{k: v for k, v in s.items() if k != "series"} for s in result["systems"]]
    (out / "fairness.json").write_text(json.dumps({**result, "systems": systems}, indent=1))
    series = {s["system"]: s["series"] for s in result["systems"]}
    (out / "fairness_series.json").write_text(json.dumps(series) + "\n")


def load_result(out: Path) -> dict[str, Any]:
    """What :func:`run_fairness` returned, from the two files in ``out`` (to plot again)."""
    result: dict[str, Any] = json.loads((out / "fairness.json").read_text())
    series = json.loads((out / "fairness_series.json").read_text())
    for system in result["systems"]:
        system["series"] = series[system["system"]]
    return result


def fairness_workload(args: FairnessArgs, arch: ModelArch) -> Workload:
    """The flooding list for a model of shape ``arch``; a ``ValueError`` when its longest
    request does not fit the model's context."""
    limit = arch.context_limit
    longest = args.input_range[1] - 1 + args.output_range[1] - 1
    if longest > limit:
        raise ValueError(
            f"{args.model_dir}: a prompt of up to {args.input_range[1] - 1} tokens and an "
            f"output of up to {args.output_range[1] - 1} need {longest} positions, more than "
            f"the model's context of {limit} positions"
        )
    return flooding(
        num_adapters=args.num_adapters,
        flood_requests=args.flood_requests,
        flood_concurrency=args.flood_concurrency,
        modest_rate=args.modest_rate,
        modest_start_s=args.modest_start_s,
        duration_s=args.duration_s,
        input_range=args.input_range,
        output_range=args.output_range,
        seed=args.seed,
        vocab_size=arch.vocab_size,
    )


def priority_fields(workload: Workload) -> list[dict[str, int]]:
    """The priority system's extra body field per request: 1 for the flooder, 0 otherwise."""
    return [
        {"priority": PRIORITIES["flooder" if r.adapter == FLOODER else "modest"]}
        for r in workload.requests
    ]


async def _replay(
    url: str,
    workload: Workload,
    names: list[str | None],
    extra: list[dict[str, int]] | None,
    key: str,
) -> tuple[list[RequestRecord], list[tuple[float, dict[str, float]]]]:
    """The list against one server, its waiting queue sampled meanwhile; a ``RuntimeError``
    when the server stalls (:func:`stalled`)."""
    stop = asyncio.Event()
    samples: list[tuple[float, dict[str, float]]] = []
    sampler = asyncio.create_task(sample_gauges(url, GAUGES, SAMPLE_INTERVAL_S, stop, samples))
    replay = asyncio.create_task(
        run_workload(
            url,
            workload,
            names,
            SERVED_BASE,
            progress=False,
            closed_loops={FLOODER: int(workload.params["flood_concurrency"])},
            extra_body=extra,
        )
    )
    try:
        while not replay.done():
            await asyncio.wait({replay}, timeout=SAMPLE_INTERVAL_S)
            if not replay.done() and stalled(samples, STALL_S):
                replay.cancel()
                waiting = samples[-1][1].get(GAUGES[0])
                raise RuntimeError(
                    f"the {key} server stalled: {waiting:.0f} requests waiting and none "
                    f"running for {STALL_S:g} s (its /metrics); see server-{key}.log"
                )
        records, _ = replay.result()
    finally:
        stop.set()
        await sampler
    return records, samples


def _header(
    args: FairnessArgs, workload: Workload, arch: ModelArch, flags: dict[str, list[str]]
) -> list[str]:
    stats = describe(workload)
    modest = sum(r.adapter != FLOODER for r in workload.requests)
    i_lo, i_hi = args.input_range
    o_lo, o_hi = args.output_range
    return [
        f"model {args.model_dir} (dtype {args.dtype}, load format {args.load_format}, "
        f"context {arch.context_limit}), {args.threads} torch thread(s), "
        f"--max-num-seqs {args.max_num_seqs}",
        f"flooding: adapter-0 sends {args.flood_requests} requests, {args.flood_concurrency} "
        f"in flight; adapters 1-{args.num_adapters - 1} each {args.modest_rate:g} req/s "
        f"(Poisson) for {args.duration_s:g} s from {args.modest_start_s:g} s ({modest} "
        f"requests); prompts {i_lo}-{i_hi - 1} "
        f"tokens, outputs {o_lo}-{o_hi - 1}; rank {args.rank} on {','.join(args.targets)}; "
        f"seed {args.seed}",
        f"{stats['total_input_tokens']} prompt tokens, {stats['total_output_tokens']} to generate",
        *(f"{key}: loraserve serve ... {shlex.join(f)}" for key, f in flags.items()),
    ]


def _result(
    args: FairnessArgs, header: list[str], workload: Workload, systems: list[dict[str, Any]]
) -> dict[str, Any]:
    by_key = {s["system"]: s for s in systems}
    ratios = fairness_ratios(by_key)
    notes = []
    if "priority" not in CompletionRequest.model_fields:
        notes.append(
            "this server's completions take no priority field: the priority system ran every "
            "request at one level, in arrival order (as fcfs)"
        )
    for s in systems:
        if s["failed"]:
            notes.append(f"{s['system']}: {describe_failures(s)}")
        elif not s["exact"]:
            notes.append(f"{s['system']}: generated other lengths than planned")
        if not s["flood_outlasted_modest"]:
            notes.append(
                f"{s['system']}: the flooder ran out of requests before the modest clients "
                "stopped sending (raise --flood-requests): the last modest requests met an "
                "idle server"
            )
    return {
        "header": header,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(args.threads),
        "workload": workload.params,
        "systems": systems,
        "ratios": ratios,
        "targets": TARGETS,
        "targets_met": targets_met(ratios),
        "notes": notes,
    }
