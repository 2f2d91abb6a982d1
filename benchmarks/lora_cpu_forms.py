"""The CPU LoRA forms side by side, and where the cost model's crossover lies.

    python benchmarks/lora_cpu_forms.py [--threads 1] [--out DIR]

For one target layer of a decode batch (every row its own request, rows grouped by adapter
as the runner lays them out) it times, per (layer width, number of adapters, rank):

    per-token  the kernel references' BGMV form: every row's A and B rows gathered,
               padded to the batch's largest rank (what the engine ran before grouping)
    grouped    each adapter gathered once, two matmuls per adapter segment
    stacked    every adapter's rows stacked, one masked pair of matmuls for the batch

and prints which form `kernels.lora_grouped.choose_form` picks, marking it when it is not
the fastest measured. ``--out`` writes ``cpu_forms.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

import torch

from kernels.lora import lora_expand_bgmv_ref, lora_shrink_bgmv_ref, write_rows
from kernels.lora_grouped import (
    choose_form,
    lora_grouped,
    lora_stacked,
    read_adapter,
    stacked_coefficients,
    stacked_rows,
)

# (in_features = out_features, page_width): the demo model's layers and a 25-50M Llama's.
WIDTHS = [(128, 64), (512, 128)]
ADAPTERS = [1, 4, 8, 32]
RANKS = [8, 64]
NUM_TOKENS = 64


class FormRow(TypedDict):
    """One layer width, adapter count and rank: each form's milliseconds, the one chosen."""

    width: int
    adapters: int
    rank: int
    ms: dict[str, float]
    chosen: str


def median_ms(fn: Callable[[], None], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def case(width: int, page_width: int, num_adapters: int, rank: int, repeats: int) -> FormRow:
    chunks = width // page_width
    num_pages = num_adapters * rank * chunks * 2 + 1
    pool = torch.zeros(num_pages, page_width)
    pages = torch.arange(num_pages - 1, dtype=torch.int32)
    a_pages = pages[: num_adapters * rank * chunks].view(num_adapters, rank, chunks)
    b_pages = pages[num_adapters * rank * chunks :].view(num_adapters, rank, chunks)
    for a in range(num_adapters):
        write_rows(pool, a_pages[a], torch.randn(rank, width) / width**0.5)
        write_rows(pool, b_pages[a], torch.randn(rank, width) * 0.01)
    x = torch.randn(NUM_TOKENS, width)
    out = torch.randn(NUM_TOKENS, width)
    token_adapters = (torch.arange(NUM_TOKENS) * num_adapters // NUM_TOKENS).to(torch.int32)
    ranks = torch.full((num_adapters,), rank, dtype=torch.int32)
    scalings = torch.full((num_adapters,), 2.0)
    per_rows = NUM_TOKENS // num_adapters
    segments = [(a, a * per_rows, (a + 1) * per_rows, 1.0) for a in range(num_adapters)]
    slots = list(range(num_adapters))
    stacked = stacked_rows(a_pages, b_pages, slots, [rank] * num_adapters)
    coef = stacked_coefficients(
        token_adapters[None],
        torch.ones(1, NUM_TOKENS),
        torch.tensor([s for s in slots for _ in range(rank)], dtype=torch.int32),
        torch.full((1, num_adapters * rank), 2.0),
    )[0]

    def per_token() -> None:
        y = lora_shrink_bgmv_ref(x, pool, a_pages, ranks, token_adapters, rank, validate=False)
        lora_expand_bgmv_ref(y, pool, b_pages, ranks, scalings, token_adapters, out, validate=False)

    def grouped() -> None:
        # As the engine does: each adapter read once per call (in place: its pages are
        # consecutive here, as in a fresh pool), then two matmuls per segment.
        weights = {
            a: read_adapter(
                pool,
                a_pages[a],
                b_pages[a],
                rank,
                width,
                width,
                int(a_pages[a, 0, 0]),
                int(b_pages[a, 0, 0]),
            )
            for a in range(num_adapters)
        }
        lora_grouped(x, out, segments, weights, [2.0] * num_adapters)

    def stacked_form() -> None:
        lora_stacked(x, out, pool, stacked, coef)

    times = {
        "per-token": median_ms(per_token, repeats),
        "grouped": median_ms(grouped, repeats),
        "stacked": median_ms(stacked_form, repeats),
    }
    chosen = choose_form(
        NUM_TOKENS, [(per_rows, rank)] * num_adapters, num_adapters, num_adapters * rank, 2 * width
    )
    return {"width": width, "adapters": num_adapters, "rank": rank, "ms": times, "chosen": chosen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[FormRow] = []
    print(f"{NUM_TOKENS} decode rows, one target layer, ms per call (median of {args.repeats})")
    print(
        f"{'width':>5} {'adapters':>8} {'rank':>4} {'per-token':>9} {'grouped':>8} "
        f"{'stacked':>8}  chosen"
    )
    for width, page_width in WIDTHS:
        for num_adapters in ADAPTERS:
            for rank in RANKS:
                row = case(width, page_width, num_adapters, rank, args.repeats)
                rows.append(row)
                ms = row["ms"]
                best = min(("grouped", "stacked"), key=lambda f: ms[f])
                mark = "" if row["chosen"] == best else f"  (measured best: {best})"
                print(
                    f"{width:>5} {num_adapters:>8} {rank:>4} {ms['per-token']:9.3f} "
                    f"{ms['grouped']:8.3f} {ms['stacked']:8.3f}  {row['chosen']}{mark}"
                )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cpu_forms.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
