"""The floor of the LoRA overhead on this machine: the same math as a model step, no engine.

For one decode step (``--tokens`` tokens, one per running request) of the base described by
``--config`` (default: the llama-30m preset), it times every decoder linear of every layer
(q, k, v, o, gate, up, down: dense ``F.linear`` with the preset's shapes) and compares:

* base: the seven linears of each layer alone;
* base + LoRA, mixed: the same, plus LoRA done the ideal way: the tokens sorted by adapter
  (each token's adapter drawn uniformly among ``--adapters``, ranks ``--ranks`` round-robin),
  each adapter's A and B ready as dense tensors, and per target and per adapter segment two
  matmuls, ``y[seg] += s · (x[seg] Aᵀ) Bᵀ``;
* base + LoRA, one adapter: every token on one adapter of rank ``--single-rank``.

No attention, norms, sampling, gathers from a page pool or kernel launches of an engine are
counted, so what an engine adds over the base cannot be smaller than the overhead printed
here on the same threads. ``--prefill N`` also times a prefill of N tokens. Times are the
median over ``--repeats`` steps after a warm-up, with ``torch.set_num_threads(--threads)``.

    OMP_NUM_THREADS=1 python benchmarks/lora_floor.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.arch import ModelArch

PRESET = Path(__file__).resolve().parent / "presets" / "llama-30m" / "config.json"
Lora = tuple[torch.Tensor, torch.Tensor]  # A (r, in), B (out, r)


def median_ms(step: Callable[[], None], repeats: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return 1000.0 * statistics.median(times)


def bench(args: argparse.Namespace, tokens: int, label: str) -> None:
    arch = ModelArch.from_config(json.loads(Path(args.config).read_text()))
    shapes = dict(arch.layout().linear_shapes)  # (in_features, out_features) of each linear
    layers = arch.num_layers
    gen = torch.Generator().manual_seed(args.seed)
    # Each layer's weights (out, in) and one input per target, as F.linear takes them.
    weights = [
        {t: torch.randn(o, i, generator=gen) * 0.02 for t, (i, o) in shapes.items()}
        for _ in range(layers)
    ]
    xs = {t: torch.randn(tokens, i, generator=gen) for t, (i, _) in shapes.items()}
    ranks = [args.ranks[a % len(args.ranks)] for a in range(args.adapters)]

    def adapter(rank: int, target: str) -> Lora:
        i, o = shapes[target]
        return torch.randn(rank, i, generator=gen) / i**0.5, torch.randn(o, rank, generator=gen)

    mixed = [{t: [adapter(r, t) for r in ranks] for t in shapes} for _ in range(layers)]
    single = [{t: adapter(args.single_rank, t) for t in shapes} for _ in range(layers)]
    # Tokens sorted by adapter: contiguous segments (start, end, adapter).
    owner = torch.randint(args.adapters, (tokens,), generator=gen).sort().values.tolist()
    segs = [(owner.index(a), len(owner) - owner[::-1].index(a), a) for a in sorted(set(owner))]

    def base_step() -> None:
        for layer in weights:
            for t, w in layer.items():
                F.linear(xs[t], w)

    def mixed_step() -> None:
        for layer, loras in zip(weights, mixed, strict=True):
            for t, w in layer.items():
                x, y = xs[t], F.linear(xs[t], w)
                for s, e, a in segs:
                    lora_a, lora_b = loras[t][a]
                    y[s:e].addmm_(x[s:e] @ lora_a.t(), lora_b.t(), alpha=2.0)

    def single_step() -> None:
        for layer, loras in zip(weights, single, strict=True):
            for t, w in layer.items():
                lora_a, lora_b = loras[t]
                F.linear(xs[t], w).addmm_(xs[t] @ lora_a.t(), lora_b.t(), alpha=2.0)

    with torch.inference_mode():
        base = median_ms(base_step, args.repeats)
        lora = median_ms(mixed_step, args.repeats)
        one = median_ms(single_step, args.repeats)
    ranks_text = ",".join(map(str, args.ranks))
    print(f"{label}: {tokens} tokens, {layers} layers x {len(shapes)} linears")
    print(f"  {'base linears alone':52s} {base:8.3f} ms")
    for name, ms in (
        (f"+ LoRA, {len(segs)} segments of {args.adapters} adapters (r {ranks_text})", lora),
        (f"+ LoRA, one adapter of rank {args.single_rank}", one),
    ):
        print(f"  {name:52s} {ms:8.3f} ms  overhead {100 * (ms / base - 1):6.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=PRESET, help="a model's config.json")
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens per step")
    parser.add_argument("--prefill", type=int, default=0, help="also time a prefill of N")
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument(
        "--ranks", type=lambda s: [int(r) for r in s.split(",")], default=[8, 16, 32, 64]
    )
    parser.add_argument("--single-rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} thread(s), float32, median of {args.repeats}")
    bench(args, args.tokens, "decode step")
    if args.prefill:
        bench(args, args.prefill, "prefill")


if __name__ == "__main__":
    main()
