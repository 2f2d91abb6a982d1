"""``benchmarks/compare.py``'s report: the result it writes, the table it prints, the plot.

:func:`compare_result` turns each system's request records into its summary, the ratios to
the reference (loraserve over HTTP, else in-process) and the LoRA overhead;
:func:`format_table` and :func:`plot_compare` show them.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.bench.harness import machine_info
from server.bench.metrics import SLO, describe_failures, replay_span, summarize
from server.bench.workload import Workload, describe

if TYPE_CHECKING:
    from benchmarks.compare import CompareArgs, Run
    from engine.config import EngineConfig

SLOS = {"ttft<6s": SLO(ttft_s=6.0, tpot_s=None)}


def compare_result(
    args: CompareArgs, header: list[str], workload: Workload, runs: list[Run]
) -> dict[str, Any]:
    """What ``compare.json`` holds: every run's summary beside the plan, the ratios and the
    LoRA overhead, the arguments and the machine."""
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


def header_lines(
    args: CompareArgs,
    workload: Workload,
    clamped: int,
    config: EngineConfig,
    max_num_seqs: int,
) -> list[str]:
    """The lines above the table: the model, the request list, the batch sizes."""
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
            f"{clamped} output lengths clamped so prompt + output <= the context "
            f"({config.model.max_model_len})"
        )
    return lines


def format_table(result: dict[str, Any]) -> str:
    """The header, one row per system, why requests failed (when some did) and the LoRA
    overhead, as ``benchmarks/compare.py`` prints."""
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
    labels = {s["system"]: s["label"] for s in result["systems"] if s["n"]}
    for key, value in result["lora_overhead"].items():
        lines.append(
            f"LoRA overhead, {labels[key]}: output tok/s with adapters / on the base = {value:.2f}"
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
