"""What ``loraserve bench fairness`` prints and plots from its result (``fairness.json`` and
``fairness_series.json``, joined as :func:`server.bench.fairness.load_result` does).

Three PNGs, one panel per system, fcfs, fair and priority side by side:

* ``fairness_ttft.png``: each request's TTFT against the time it was sent, one color per
  client (the flooder black), on a log scale;
* ``fairness_tokens.png``: the output tokens each client had received over time (the modest
  clients on the left axis, the flooder on the right), and below, the server's waiting and
  running requests as its ``/metrics`` said;
* ``fairness_summary.png``: the modest clients' TTFT p99 (p50 marked) and the total output
  tokens/s per system.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from server.bench.fairness_workload import FLOODER

FLOODER_COLOR = "black"
SYSTEM_COLORS = {"fcfs": "tab:gray", "fair": "tab:green", "priority": "tab:blue"}


def format_system(entry: dict[str, Any]) -> str:
    """One system's lines, as ``bench fairness`` prints them: the whole run, then each group."""
    lines = [
        f"{entry['label']}: {entry['completed']} requests ({entry['failed']} failed) in "
        f"{entry['duration_s']:.1f} s, {entry['output_throughput']:.1f} output tok/s, "
        f"{entry['request_throughput']:.2f} req/s, waiting queue max "
        f"{_count(entry['queue']['max_waiting'])} mean {_count(entry['queue']['mean_waiting'])}"
    ]
    for group, g in entry["groups"].items():
        share = g["output_share"]
        lines.append(
            f"  {group:8s} {g['completed']:5d} requests, TTFT p50 {_ms(g['median_ttft_ms'])} "
            f"p90 {_ms(g['p90_ttft_ms'])} p99 {_ms(g['p99_ttft_ms'])}, E2E p50 "
            f"{_ms(g['median_e2el_ms'])} p99 {_ms(g['p99_e2el_ms'])}, "
            f"{g['total_output_tokens']} output tokens"
            + (f" ({100 * share:.0f}%)" if share is not None else "")
        )
    return "\n".join(lines)


def format_ratios(result: dict[str, Any]) -> str:
    """The final lines: the modest clients' TTFT p99 and the throughput, fair (and priority)
    against fcfs, with the targets."""
    r, targets = result["ratios"], result["targets"]
    met = {True: "met", False: "not met", None: "n/a"}[result["targets_met"]]
    return "\n".join(
        [
            f"fair vs fcfs: modest clients' TTFT p99 "
            f"{_times(r['modest_ttft_p99_fcfs_over_fair'])} lower, output throughput "
            f"{_times(r['output_throughput_fair_over_fcfs'])} fcfs's (targets "
            f"{targets['modest_ttft_p99_fcfs_over_fair']:g}x lower and at least "
            f"{targets['output_throughput_fair_over_fcfs']:g}x: {met})",
            f"priority vs fcfs: modest clients' TTFT p99 "
            f"{_times(r['modest_ttft_p99_fcfs_over_priority'])} lower, output throughput "
            f"{_times(r['output_throughput_priority_over_fcfs'])} fcfs's",
        ]
    )


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} ms"


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _count(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _client_color(adapter: int) -> Any:
    import matplotlib

    return FLOODER_COLOR if adapter == FLOODER else matplotlib.colormaps["tab10"](adapter % 10)


def plot_fairness(result: dict[str, Any], out: Path) -> None:
    """Write the three PNGs (module docstring) into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    _plot_ttft(result, out / "fairness_ttft.png")
    _plot_tokens(result, out / "fairness_tokens.png")
    _plot_summary(result, out / "fairness_summary.png")


def _title(result: dict[str, Any]) -> str:
    return textwrap.fill(result["header"][1], 130)


def _plot_ttft(result: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    systems = result["systems"]
    fig, axes = plt.subplots(1, len(systems), figsize=(5 * len(systems), 4), sharey=True)
    for ax, system in zip(axes, systems, strict=True):
        points = [p for p in system["series"]["requests"] if p[2] is not None]
        for adapter in sorted({p[0] for p in points}):
            mine = [p for p in points if p[0] == adapter]
            flooder = adapter == FLOODER
            ax.scatter(
                [p[1] for p in mine],
                [p[2] for p in mine],
                s=3 if flooder else 10,
                alpha=0.25 if flooder else 0.9,
                color=_client_color(adapter),
                label=f"adapter-{adapter}" + (" (flooder)" if flooder else ""),
                zorder=1 if flooder else 2,
            )
        p99 = system["groups"]["modest"]["p99_ttft_ms"]
        ax.set_title(f"{system['system']}: modest TTFT p99 {_ms(p99)}", fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("sent at (s)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("TTFT (s)")
    axes[-1].legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(_title(result), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_tokens(result: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    systems = result["systems"]
    fig, axes = plt.subplots(
        2,
        len(systems),
        figsize=(5 * len(systems), 5.5),
        sharex="col",
        gridspec_kw={"height_ratios": [3, 1]},
        squeeze=False,
    )
    for col, system in enumerate(systems):
        tokens_ax, queue_ax = axes[0][col], axes[1][col]
        served = system["series"]["served"]
        flood_ax = tokens_ax.twinx()
        for key, counts in served["tokens"].items():
            adapter = int(key)
            flooder = adapter == FLOODER
            (flood_ax if flooder else tokens_ax).plot(
                served["t"],
                counts,
                color=_client_color(adapter),
                linestyle="--" if flooder else "-",
                linewidth=1.2,
                label=f"adapter-{adapter}" + (" (flooder, right)" if flooder else ""),
            )
        tokens_ax.set_title(system["system"], fontsize=9)
        tokens_ax.grid(alpha=0.3)
        flood_ax.tick_params(axis="y", labelsize=7)
        if col == 0:
            tokens_ax.set_ylabel("output tokens received\n(modest clients)")
        if col == len(systems) - 1:
            flood_ax.set_ylabel("flooder's output tokens")
            handles = [*tokens_ax.get_lines(), *flood_ax.get_lines()]
            flood_ax.legend(
                handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.3, 0.5)
            )
        samples = system["series"]["queue"]
        queue_ax.plot([s[0] for s in samples], [s[1] for s in samples], label="waiting")
        queue_ax.plot([s[0] for s in samples], [s[2] for s in samples], label="running")
        queue_ax.set_xlabel("time (s)")
        queue_ax.grid(alpha=0.3)
        if col == 0:
            queue_ax.set_ylabel("requests\n(/metrics)")
            queue_ax.legend(fontsize=7)
    fig.suptitle(_title(result), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_summary(result: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    systems = result["systems"]
    labels = [s["system"] for s in systems]
    colors = [SYSTEM_COLORS.get(s["system"], "tab:orange") for s in systems]
    ratios = result["ratios"]
    fig, (ttft, tput) = plt.subplots(1, 2, figsize=(8, 3.4))
    p99 = [s["groups"]["modest"]["p99_ttft_ms"] or 0.0 for s in systems]
    p50 = [s["groups"]["modest"]["median_ttft_ms"] or 0.0 for s in systems]
    bars = ttft.bar(labels, p99, color=colors)
    ttft.bar_label(bars, fmt="%.0f", fontsize=8)
    ttft.scatter(labels, p50, marker="_", s=400, color="black", label="p50", zorder=3)
    ttft.set_ylim(top=1.2 * max([*p99, 1e-3]))
    ttft.legend(fontsize=8, loc="upper right")
    ttft.set_ylabel("modest clients' TTFT p99 (ms)")
    gain = _times(ratios["modest_ttft_p99_fcfs_over_fair"])
    ttft.set_title(f"modest TTFT p99: fcfs / fair = {gain}", fontsize=9)
    throughput = [s["output_throughput"] for s in systems]
    bars = tput.bar(labels, throughput, color=colors)
    tput.bar_label(bars, fmt="%.0f", fontsize=8)
    tput.set_ylim(top=1.15 * max([*throughput, 1e-3]))
    tput.set_ylabel("output tokens / s (all clients)")
    kept = _times(ratios["output_throughput_fair_over_fcfs"])
    tput.set_title(f"throughput: fair / fcfs = {kept}", fontsize=9)
    for ax in (ttft, tput):
        ax.set_xlabel("scheduling policy")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(_title(result), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
