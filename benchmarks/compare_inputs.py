"""The request list and the adapters every system of ``benchmarks/compare.py`` replays.

One W2 list (S-LoRA's synthetic workload) with every request arriving at once, outputs
clamped so prompt + output fit the model's context; random adapters, or the ones found in a
directory.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from engine.arch import ModelArch
from server.bench.generators import synthetic_w2
from server.bench.make_adapters import make_random_adapters
from server.bench.workload import Workload

if TYPE_CHECKING:
    from benchmarks.compare import CompareArgs

ALL_AT_ONCE = 1e6  # req/s: every request has arrived within a few microseconds


def compare_workload(args: CompareArgs, arch: ModelArch) -> tuple[Workload, int]:
    """The W2 list, all requests at once, outputs clamped to the context; and how many
    requests were clamped."""
    limit = arch.context_limit
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
        vocab_size=arch.vocab_size,
    )
    requests = tuple(
        replace(r, output_len=min(r.output_len, limit - len(r.prompt))) for r in w2.requests
    )
    clamped = sum(a.output_len != b.output_len for a, b in zip(w2.requests, requests, strict=True))
    params = {**w2.params, "context": limit, "clamped_outputs": clamped}
    return replace(w2, params=params, requests=requests), clamped


def compare_adapters(
    args: CompareArgs, model_dir: Path, names: list[str]
) -> list[tuple[str, Path]]:
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


def max_rank(adapter: Path) -> int:
    """An adapter's largest rank, from its ``adapter_config.json``."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    return max([int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())])
