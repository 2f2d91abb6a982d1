"""``loraserve bench sweep`` with the Hugging Face baselines beside loraserve.

    python benchmarks/sweep_baselines.py --model DIR --adapters 0,1,8,64 \
        --baselines peft,peft-mixed,merge-swap [every other flag of loraserve bench sweep]

The same sweep, flags and results as ``loraserve bench sweep`` (one W2 request list, n
adapters for each n of ``--adapters``, a rate sweep with ``--rates``), with each baseline of
``--baselines`` (``peft``: the PEFT server, ``peft-mixed``: PEFT mixed batches,
``merge-swap``: merge-and-swap; :mod:`benchmarks.baselines`) replaying every list after
loraserve, in ``--batch-size`` static batches. ``sweep.json`` then holds every system's
runs and loraserve's ratio to each baseline at each n, and the plots show them all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.baselines import BASELINES, LABELS, as_system
from server.bench.cli import add_sweep_args
from server.bench.commands import sweep_command


def parser() -> argparse.ArgumentParser:
    """``loraserve bench sweep``'s flags and ``--baselines``."""
    sweep = argparse.ArgumentParser(
        prog="python benchmarks/sweep_baselines.py",
        description="loraserve bench sweep with the Hugging Face baselines replaying the same "
        "request lists beside loraserve",
    )
    add_sweep_args(sweep)
    sweep.add_argument(
        "--baselines",
        default=",".join(BASELINES),
        help=f"comma-separated, some of {', '.join(BASELINES)} (default: all; empty: none)",
    )
    return sweep


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    names = [b for b in args.baselines.split(",") if b]
    unknown = sorted(set(names) - set(BASELINES))
    if unknown:
        raise SystemExit(f"--baselines takes some of {', '.join(BASELINES)}; got {unknown}")
    others = {LABELS[b]: as_system(b, args.model, args.batch_size) for b in names}
    return sweep_command(args, others)


if __name__ == "__main__":
    sys.exit(main())
