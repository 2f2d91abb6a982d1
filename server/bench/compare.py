"""``loraserve bench compare``: one request list, every system side by side, ratios.

One W2 request list (S-LoRA's synthetic workload) with every request arriving at once (a
rate of 1e6 req/s: throughput is each system's capacity) is replayed, one system after
another in one run, by:

* ``loraserve-http``: ``loraserve serve`` started as a subprocess on a free loopback port with
  the adapters as ``--lora-modules adapter-i=PATH``, driven over HTTP with streaming by
  :func:`server.bench.client.run_workload` (workload adapter i is the model ``adapter-i``),
  then stopped (SIGTERM, a bounded wait, then kill): :func:`server.bench.harness.running_server`;
* ``loraserve``: the same engine configuration in this process
  (:func:`server.bench.systems.run_loraserve`);
* ``peft-mixed``: PEFT mixed batches (:func:`server.bench.systems.run_peft_mixed`);
* ``peft``: the PEFT server, static batches of one adapter each
  (:func:`server.bench.systems.run_peft_server`).

With ``base=True`` every selected system runs again with no adapters (n = 0, every request on
the base model): loraserve over HTTP and in-process, and transformers' ``generate`` (FCFS
static batches) for the Hugging Face baselines; ``lora_overhead`` then holds each loraserve
system's throughput with adapters over its throughput on the base.

Requests are greedy, with EOS ignored and ``min_tokens = max_tokens``, so every system
generates exactly the planned tokens; a request whose prompt plus output would exceed the
model's ``max_position_embeddings`` has its output length clamped to fit. Every system runs
with the same number of torch threads: ``torch.set_num_threads`` here, ``OMP_NUM_THREADS``
and ``MKL_NUM_THREADS`` in the server's environment.

Writes ``compare.json`` (each system's summary, the ratios, the arguments, the machine),
``workload.json`` (the replayed list), ``compare.png`` (output tokens/s per system) and the
server's log into ``out``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import textwrap
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engine.config import EngineConfig
from server.bench.client import check_fits, read_models, run_workload
from server.bench.harness import SERVED_BASE, ServerSpec, machine_info, running_server
from server.bench.make_adapters import make_random_adapters
from server.bench.metrics import SLO, RequestRecord, describe_failures, replay_span, summarize
from server.bench.systems import peft_model, run_loraserve, run_peft_mixed, run_peft_server
from server.bench.workloads import Workload, describe, synthetic_w2

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
ALL_AT_ONCE = 1e6  # req/s: every request has arrived within a few microseconds
SLOS = {"ttft<6s": SLO(ttft_s=6.0, tpot_s=None)}


@dataclass
class CompareArgs:
    """What ``loraserve bench compare`` runs (``server.bench.cli`` documents each flag)."""

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
    hf = json.loads((model_dir / "config.json").read_text())
    workload, clamped = compare_workload(args, hf)
    workload.save(args.out / "workload.json")
    adapters = _adapters(args, model_dir, workload.adapter_names())
    max_rank = max(_rank(path) for _, path in adapters)
    max_num_seqs = args.max_num_seqs or args.batch_size
    config = EngineConfig.create(
        model_dir,
        dtype=args.dtype,
        load_format=args.load_format,
        max_num_seqs=max_num_seqs,
        max_lora_rank=max_rank,
        max_loras=len(adapters),
    )
    header = _header(args, workload, clamped, hf, config, max_num_seqs)
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
                records = run_http(model_dir, wl, served, args, max_num_seqs, max_rank, server_log)
            elif key == "loraserve":
                records = run_loraserve(config, wl, served)
            else:
                model = peft_model(model_dir, served, config.model.dtype)
                _warm_up(model)
                names = [name for name, _ in served]
                if key == "peft-mixed" or not n:
                    records = run_peft_mixed(model, wl, names, args.batch_size)
                else:
                    records = run_peft_server(model, wl, names, args.batch_size)
                del model
            runs.append(Run(key, label, n, records, time.perf_counter() - started))
    result = _result(args, header, workload, runs)
    (args.out / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_compare(result, args.out / "compare.png")
    return result


def compare_workload(args: CompareArgs, hf: dict[str, Any]) -> tuple[Workload, int]:
    """The W2 list, all requests at once, outputs clamped to the context; and how many
    requests were clamped."""
    limit = int(hf.get("max_position_embeddings", 2048))
    if args.input_range[1] > limit:
        raise ValueError(f"--input-range {args.input_range} leaves no room in context {limit}")
    w2 = synthetic_w2(
        num_adapters=args.num_adapters,
        alpha=args.alpha,
        rate=ALL_AT_ONCE,
        cv=1.0,
        num_requests=args.num_requests,
        input_range=args.input_range,
        output_range=args.output_range,
        seed=args.seed,
        vocab_size=int(hf["vocab_size"]),
    )
    requests = tuple(
        replace(r, output_len=min(r.output_len, limit - len(r.prompt))) for r in w2.requests
    )
    clamped = sum(a.output_len != b.output_len for a, b in zip(w2.requests, requests, strict=True))
    params = {**w2.params, "max_position_embeddings": limit, "clamped_outputs": clamped}
    return replace(w2, params=params, requests=requests), clamped


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


def _adapters(args: CompareArgs, model_dir: Path, names: list[str]) -> list[tuple[str, Path]]:
    """``names[i]`` paired with adapter i: from ``adapter_dir`` (its adapter directories,
    sorted, reused round-robin), or random ones written to ``out/adapters``."""
    if args.adapter_dir is not None:
        found = sorted(
            p.resolve() for p in args.adapter_dir.iterdir() if (p / "adapter_config.json").is_file()
        )
        if not found:
            raise ValueError(f"{args.adapter_dir}: no adapter directories in it")
        paths = [found[i % len(found)] for i in range(len(names))]
    else:
        paths = make_random_adapters(
            model_dir, args.out / "adapters", len(names), args.ranks, args.targets, args.seed
        )
        paths = [p.resolve() for p in paths]
    return list(zip(names, paths, strict=True))


def _rank(adapter: Path) -> int:
    """An adapter's largest rank, from its ``adapter_config.json``."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    return max([int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


def _header(
    args: CompareArgs,
    workload: Workload,
    clamped: int,
    hf: dict[str, Any],
    config: EngineConfig,
    max_num_seqs: int,
) -> list[str]:
    stats = describe(workload)
    lines = [
        f"model {args.model_dir} ({config.model.dtype}, load format {args.load_format}), "
        f"{args.threads} torch thread(s) for every system",
        f"W2: {stats['requests']} requests at once over {workload.num_adapters} adapters "
        + (
            f"(from {args.adapter_dir}), "
            if args.adapter_dir
            else f"(ranks {','.join(map(str, args.ranks))} on {','.join(args.targets)}), "
        )
        + f"prompts {args.input_range[0]}-{args.input_range[1] - 1}, "
        f"outputs {args.output_range[0]}-{args.output_range[1] - 1}, seed {args.seed}",
        f"{stats['total_input_tokens']} prompt tokens, {stats['total_output_tokens']} tokens "
        f"to generate; loraserve max_num_seqs {max_num_seqs}, baselines' batch size "
        f"{args.batch_size}",
    ]
    if clamped:
        lines.append(
            f"{clamped} output lengths clamped so prompt + output <= "
            f"max_position_embeddings ({hf.get('max_position_embeddings')})"
        )
    return lines


def server_spec(
    model_dir: Path,
    adapters: list[tuple[str, Path]],
    args: CompareArgs,
    max_num_seqs: int,
    max_rank: int,
) -> ServerSpec:
    """``loraserve serve`` with the in-process system's engine configuration."""
    return ServerSpec(
        model_dir=model_dir,
        dtype=args.dtype,
        load_format=args.load_format,
        max_num_seqs=max_num_seqs,
        max_lora_rank=max_rank,
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
    max_rank: int,
    log_path: Path,
) -> list[RequestRecord]:
    """Start ``loraserve serve``, replay ``workload`` over HTTP (streamed), stop it."""
    spec = server_spec(model_dir, adapters, args, max_num_seqs, max_rank)
    with running_server(spec, log_path) as url:
        names: list[str | None] = [name for name, _ in adapters]
        # the server's context may be shorter than config.json's (a sliding window, say)
        check_fits(workload, read_models(url), names, "the request list")
        records, _ = asyncio.run(run_workload(url, workload, names, SERVED_BASE, progress=False))
    return records


def _warm_up(model: Any) -> None:
    """One short generate, so no system's first batch pays one-off setup costs."""
    ids = torch.tensor([[5, 6, 7]], device=model.device)
    with torch.inference_mode():
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)


def _result(
    args: CompareArgs, header: list[str], workload: Workload, runs: list[Run]
) -> dict[str, Any]:
    planned = [r.output_len for r in workload.requests]  # the same on the base
    systems: list[dict[str, Any]] = []
    for run in runs:
        summary = summarize(run.records, replay_span(run.records, run.wall_s), SLOS)
        generated = [r.output_len for r in run.records]
        systems.append(
            {
                "system": run.key,
                "label": run.label,
                "n": run.n,
                "generated_tokens": sum(generated),
                "planned_tokens": sum(planned),
                "exact": generated == planned,
                "wall_s": run.wall_s,
                **summary,
            }
        )
    ref = next((s for s in systems if s["n"] and s["system"] == "loraserve-http"), None)
    ref = ref or next((s for s in systems if s["n"] and s["system"] == "loraserve"), None)
    for s in systems:
        mine, theirs = (ref or {}).get("output_throughput"), s["output_throughput"]
        s["ratio"] = mine / theirs if mine and theirs else None
    overhead = {}
    for key in ("loraserve-http", "loraserve"):
        lora = next((s for s in systems if s["system"] == key and s["n"]), None)
        base = next((s for s in systems if s["system"] == key and not s["n"]), None)
        if lora and base and base["output_throughput"]:
            overhead[key] = lora["output_throughput"] / base["output_throughput"]
    return {
        "header": header,
        "reference": ref["label"] if ref else None,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(args.threads),
        "workload": workload.params,
        "systems": systems,
        "ratios": {s["label"]: s["ratio"] for s in systems},
        "lora_overhead": overhead,
    }


def format_table(result: dict[str, Any]) -> str:
    """The header, one row per system, why requests failed (when some did) and the LoRA
    overhead, as ``bench compare`` prints."""
    ref = result["reference"] or "n/a"
    lines = [*result["header"], ""]
    head = (
        f"{'system':30s} {'n':>3s} {'tokens':>7s} {'duration s':>10s} {'output tok/s':>12s} "
        f"{'total tok/s':>11s} {'med TTFT ms':>11s} {'HTTP / it':>9s}"
    )
    lines += [head, "-" * len(head)]
    for s in result["systems"]:
        ratio = "n/a" if s["ratio"] is None else f"{s['ratio']:.2f}x"
        ttft = s["median_ttft_ms"]
        tokens = f"{s['generated_tokens']}" + ("" if s["exact"] else "!")
        lines.append(
            f"{s['label']:30s} {s['n']:3d} {tokens:>7s} {s['duration_s']:10.2f} "
            f"{s['output_throughput']:12.1f} {s['total_token_throughput']:11.1f} "
            f"{'n/a' if ttft is None else f'{ttft:.0f}':>11s} {ratio:>9s}"
        )
    lines.append(f"(ratios: {ref} output tok/s over each row's)")
    for s in result["systems"]:
        if s["failed"]:
            lines.append(f"{s['label']}: {describe_failures(s)}")
    for key, value in result["lora_overhead"].items():
        lines.append(
            f"LoRA overhead, {SYSTEMS[key]}: output tok/s with adapters / on the base = {value:.2f}"
        )
    return "\n".join(lines)


def plot_compare(result: dict[str, Any], path: Path) -> None:
    """A bar chart of output tokens/s per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = result["systems"]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(systems) + 1.5))
    labels = [s["label"] for s in systems]
    values = [s["output_throughput"] for s in systems]
    bars = ax.barh(labels[::-1], values[::-1], color="tab:blue")
    ax.bar_label(bars, fmt="%.0f", fontsize=8, padding=2)
    ax.set_xlabel("generated tokens / s")
    ax.set_title(textwrap.fill(result["header"][1], 95), fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
