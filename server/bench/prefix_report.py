"""What ``loraserve bench prefix`` prints and plots from its result (``prefix.json``)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any


def format_system(entry: dict[str, Any]) -> str:
    """One system's line, as ``bench prefix`` prints it."""
    cached = entry["total_cached_tokens"]
    return (
        f"{entry['label']:20s} {entry['completed']} requests ({entry['failed']} failed), "
        f"TTFT p50 {_ms(entry['median_ttft_ms'])} p90 {_ms(entry['p90_ttft_ms'])}, "
        f"{entry['output_throughput']:.1f} output tok/s, {entry['request_throughput']:.2f} req/s, "
        f"cached prompt tokens {'n/a' if cached is None else cached}"
    )


def format_ratios(result: dict[str, Any]) -> str:
    """The final line: how much lower TTFT p50 and how much higher throughput with caching."""
    r, targets = result["ratios"], result["targets"]
    met = {True: "met", False: "not met", None: "n/a"}[result["targets_met"]]
    return (
        f"caching on vs off: TTFT p50 {_times(r['ttft_p50_off_over_on'])} lower, output "
        f"throughput {_times(r['output_throughput_on_over_off'])} higher (target "
        f"{targets['ttft_p50_off_over_on']:g}x and "
        f"{targets['output_throughput_on_over_off']:g}x: {met})"
    )


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} ms"


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def plot_prefix(result: dict[str, Any], path: Path) -> None:
    """Two panels, caching on beside off: TTFT p50 (p90 as a tick) and output tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = result["systems"]
    labels = [s["system"] for s in systems]
    colors = ["tab:green" if s["system"] == "on" else "tab:gray" for s in systems]
    ratios = result["ratios"]
    fig, (ttft, tput) = plt.subplots(1, 2, figsize=(8, 3.4))
    p50 = [s["median_ttft_ms"] or 0.0 for s in systems]
    bars = ttft.bar(labels, p50, color=colors)
    ttft.bar_label(bars, fmt="%.0f", fontsize=8)
    p90 = [s["p90_ttft_ms"] or 0.0 for s in systems]
    ttft.scatter(labels, p90, marker="_", s=400, color="black", label="p90", zorder=3)
    ttft.set_ylim(top=1.2 * max([*p50, *p90, 1e-3]))
    ttft.legend(fontsize=8, loc="upper left")
    ttft.set_ylabel("TTFT p50 (ms)")
    ttft.set_title(f"TTFT p50: {_times(ratios['ttft_p50_off_over_on'])} lower on", fontsize=9)
    throughput = [s["output_throughput"] for s in systems]
    bars = tput.bar(labels, throughput, color=colors)
    tput.set_ylim(top=1.15 * max([*throughput, 1e-3]))
    tput.bar_label(bars, fmt="%.1f", fontsize=8)
    tput.set_ylabel("generated tokens / s")
    gain = _times(ratios["output_throughput_on_over_off"])
    tput.set_title(f"throughput: {gain} higher on", fontsize=9)
    for ax in (ttft, tput):
        ax.set_xlabel("prefix caching")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(textwrap.fill(result["header"][1], 110), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
