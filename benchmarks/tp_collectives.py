"""The two ways to put a column-parallel LoRA layer's rank-sized intermediate together,
measured: an all-reduce of the whole (T, R) (loraserve: A split along its input) against an
all-gather of (T, R/N) parts (S-LoRA: A split along its rank), beside the base layer's own
all-reduce of (T, hidden).

    python benchmarks/tp_collectives.py [--world 2] [--tokens 1,16,256] [--ranks 8,64]
        [--hidden 4096] [--repeats 200] [--backend gloo]

Starts ``--world`` processes (gloo on the CPU by default; ``--backend nccl`` on GPUs), times
each collective ``--repeats`` times after a warm-up, and prints the median microseconds per
call with rank 0's figures; ``--out`` writes them as JSON. Every process calls every
collective in the same order, so the times include waiting for the slowest one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _time(fn: Callable[..., object], repeats: int) -> float:
    """Median microseconds of ``fn()`` over ``repeats`` calls, after five warm-up calls."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1e6 * statistics.median(times)


def _worker(rank: int, args: argparse.Namespace, port: int, out: Any) -> None:
    torch.set_num_threads(1)
    device = torch.device(f"cuda:{rank}") if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=120)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)  # type: ignore[attr-defined]
    dist.init_process_group(
        args.backend, store=store, rank=rank, world_size=args.world, timeout=timeout
    )
    sync: Callable[[], object] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for tokens in args.tokens:
        base = torch.randn(tokens, args.hidden, device=device, dtype=torch.bfloat16)
        base_us = _time(lambda b=base: (dist.all_reduce(b), sync()), args.repeats)
        for rank_r in args.ranks:
            whole = torch.randn(tokens, rank_r, device=device)  # float32, as the shrink's y
            part = torch.randn(tokens, -(-rank_r // args.world), device=device)
            parts = [torch.empty_like(part) for _ in range(args.world)]
            reduce_us = _time(lambda w=whole: (dist.all_reduce(w), sync()), args.repeats)
            gather_us = _time(
                lambda p=part, ps=parts: (dist.all_gather(ps, p), sync()), args.repeats
            )
            rows.append(
                {
                    "tokens": tokens,
                    "rank": rank_r,
                    "lora_all_reduce_us": reduce_us,
                    "lora_all_gather_us": gather_us,
                    "base_all_reduce_us": base_us,
                }
            )
    if rank == 0:
        out.put(rows)
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--tokens", default="1,16,256")
    parser.add_argument("--ranks", default="8,64")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--out", type=Path, default=None, help="JSON results")
    args = parser.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.ranks = [int(r) for r in args.ranks.split(",")]
    # The rendezvous, hosted here on a port the system picks as it binds it.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # type: ignore[attr-defined]
    port = store.port
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    procs = [
        context.Process(target=_worker, args=(r, args, port, queue)) for r in range(args.world)
    ]
    for proc in procs:
        proc.start()
    rows = queue.get()
    for proc in procs:
        proc.join(60)
    print(
        f"{args.world} processes, {args.backend}, {os.cpu_count()} CPU cores; median µs per "
        "call (waiting for the slowest process included)"
    )
    print(f"{'T':>5} {'R':>4} {'all-reduce (T,R)':>17} {'all-gather (T,R/N)':>19} "
          f"{'base all-reduce (T,h)':>22}")  # fmt: skip
    for row in rows:
        print(
            f"{row['tokens']:>5} {row['rank']:>4} {row['lora_all_reduce_us']:>17.1f} "
            f"{row['lora_all_gather_us']:>19.1f} {row['base_all_reduce_us']:>22.1f}"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
