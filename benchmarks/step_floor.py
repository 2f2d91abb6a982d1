"""The floor of one decode step on this machine: a model's decoder math in a bare loop.

    OMP_NUM_THREADS=1 python benchmarks/step_floor.py                   # the demo model
    OMP_NUM_THREADS=1 python benchmarks/step_floor.py --engine          # and the engine's step

For a static batch of ``--batch`` sequences, each with ``--context`` tokens already cached in a
plain contiguous KV tensor, one decode step is timed as the least a Python engine on torch
must do: the embedding; per layer the RMS norm, q/k/v projections, rotary embedding, the new
K/V written in place, grouped-query attention (one ``scaled_dot_product_attention`` call), the
output projection, the second norm and the SwiGLU MLP; the final norm, the output head and an
argmax. With ``--adapters N`` it adds LoRA the ideal way on ``--targets``: rows sorted by
adapter (drawn uniformly), each adapter's A and B ready as dense tensors, two matmuls per
adapter segment. No paging, no scheduling, no metadata, no sampling settings: what an engine
adds to the same batch cannot be less than this. ``--engine`` runs the same batch through
loraserve's engine (random adapters of the same ranks and targets) and prints its median
decode step beside the floor. Median of ``--repeats`` steps after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.arch import ModelArch
from engine.config import DEMO_DIR


def median_ms(step: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def floor_step(args: argparse.Namespace, arch: ModelArch) -> Callable[[], None]:
    """One decode step of the bare decoder (and LoRA when ``--adapters``)."""
    h, vocab, heads, hd = arch.hidden_size, arch.vocab_size, arch.num_heads, arch.head_dim
    kv_heads, layers, batch, ctx = arch.num_kv_heads, arch.num_layers, args.batch, args.context
    shapes = dict(arch.layout().linear_shapes)  # (in_features, out_features) of each linear
    w = [{t: torch.randn(o, i) * 0.02 for t, (i, o) in shapes.items()} for _ in range(layers)]
    norms = [torch.ones(h) for _ in range(2 * layers + 1)]
    embed, head = torch.randn(vocab, h) * 0.02, torch.randn(vocab, h) * 0.02
    k_cache = [torch.randn(batch, kv_heads, ctx + 1, hd) for _ in range(layers)]
    v_cache = [torch.randn(batch, kv_heads, ctx + 1, hd) for _ in range(layers)]
    cos, sin = torch.randn(batch, 1, hd), torch.randn(batch, 1, hd)
    ids = torch.randint(vocab, (batch,))
    group = heads // kv_heads
    owner = sorted(torch.randint(max(args.adapters, 1), (batch,)).tolist())
    segs = [(owner.index(a), batch - owner[::-1].index(a), a) for a in sorted(set(owner))]
    ranks = [args.ranks[a % len(args.ranks)] for a in range(args.adapters)]
    lora = [
        {
            t: [(torch.randn(r, shapes[t][0]) * 0.02, torch.randn(shapes[t][1], r)) for r in ranks]
            for t in args.targets
        }
        for _ in range(layers)
    ]

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))

    def rot(x: torch.Tensor) -> torch.Tensor:
        return torch.cat((-x[..., hd // 2 :], x[..., : hd // 2]), dim=-1)

    def linear(layer: int, t: str, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, w[layer][t])
        if args.adapters and t in args.targets:
            for lo, hi, a in segs:
                lora_a, lora_b = lora[layer][t][a]
                y[lo:hi].addmm_(x[lo:hi] @ lora_a.t(), lora_b.t(), alpha=2.0)
        return y

    def step() -> None:
        x = embed[ids]
        for i in range(layers):
            a = norm(x, norms[2 * i])
            q = linear(i, "q_proj", a).view(batch, heads, hd)
            k = linear(i, "k_proj", a).view(batch, kv_heads, hd)
            v = linear(i, "v_proj", a).view(batch, kv_heads, hd)
            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
            k_cache[i][:, :, ctx] = k
            v_cache[i][:, :, ctx] = v
            qg = q.view(batch, kv_heads, group, hd)
            o = F.scaled_dot_product_attention(qg, k_cache[i], v_cache[i])
            x = x + linear(i, "o_proj", o.reshape(batch, heads * hd))
            m = norm(x, norms[2 * i + 1])
            x = x + linear(
                i, "down_proj", F.silu(linear(i, "gate_proj", m)) * linear(i, "up_proj", m)
            )
        F.linear(norm(x, norms[-1]), head).argmax(-1).tolist()

    return step


def engine_step_ms(args: argparse.Namespace, model: Path) -> float:
    """The median decode step of loraserve's engine on the same batch shape."""
    from engine import EngineConfig, LLMEngine, SamplingParams
    from server.bench.make_adapters import make_random_adapters

    config = EngineConfig.create(
        str(model), dtype="float32", max_num_seqs=args.batch, max_lora_rank=max(args.ranks),
        max_loras=max(args.adapters, 1), load_format=args.load_format,
    )  # fmt: skip
    engine = LLMEngine(config)
    paths = make_random_adapters(
        model, Path(tempfile.mkdtemp()), args.adapters, args.ranks, args.targets, seed=0,
        dtype=torch.float32,
    ) if args.adapters else []  # fmt: skip
    for i, path in enumerate(paths):
        engine.load_lora(f"a{i}", path)
    params = SamplingParams(temperature=0.0, max_tokens=args.repeats + 10, ignore_eos=True)
    for i in range(args.batch):
        lora = f"a{i % args.adapters}" if args.adapters else None
        engine.add_request([5 + (i + j) % 50 for j in range(args.context)], params, lora=lora)
    while engine.scheduler.waiting or any(
        r.num_computed_tokens == 0 for r in engine.scheduler.running
    ):
        engine.step()  # the prefills
    return median_ms(lambda: engine.step(), args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEMO_DIR / "model")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=80)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument(
        "--ranks", type=lambda s: [int(v) for v in s.split(",")], default=[4, 8, 16]
    )
    parser.add_argument(
        "--targets", type=lambda s: s.split(","), default="q_proj,k_proj,v_proj,o_proj"
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--engine", action="store_true", help="also time loraserve's engine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    arch = ModelArch.load(args.model)
    print(f"{args.model.name}: decode step, batch {args.batch}, context {args.context}, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats}")  # fmt: skip
    with torch.inference_mode():
        rows = {
            "floor, base": median_ms(
                floor_step(argparse.Namespace(**{**vars(args), "adapters": 0}), arch), args.repeats
            )
        }
        if args.adapters:
            rows[f"floor, {args.adapters} adapters"] = median_ms(
                floor_step(args, arch), args.repeats
            )
    if args.engine:
        rows["loraserve engine, base"] = engine_step_ms(
            argparse.Namespace(**{**vars(args), "adapters": 0}), args.model
        )
        if args.adapters:
            rows[f"loraserve engine, {args.adapters} adapters"] = engine_step_ms(args, args.model)
    for name, ms in rows.items():
        print(f"  {name:34s} {ms:8.3f} ms/step  {1e3 * args.batch / ms:8.0f} tok/s")


if __name__ == "__main__":
    main()
