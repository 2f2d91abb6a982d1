"""Decode under CUDA graphs, checked and timed: the GPU suite's graph step.

    python benchmarks/decode_graphs.py --out DIR            # on a GPU: ~2 minutes
    python benchmarks/decode_graphs.py --out DIR --smoke    # anywhere: tiny sizes

1. **Equality.** The bundled demo model and its four trained adapters, in bfloat16 and in
   NF4: mixed-adapter and base batches of sizes that fill and that pad the ladder, greedy,
   once with decode graphs and once eagerly; every request's tokens must agree. Graph replay
   pads a batch (3 rows run as 4), so a GEMM may pick a different kernel for the padded
   shape; the tokens of a trained model still agree, and any row that does not is reported.
   Without CUDA the padded path runs eagerly ("static" mode), the same code as replay.
2. **Speed.** The decode step of ``--model`` (default the 7B preset, dummy weights) at batch
   sizes ``--batches``, graphs against eager, for the base and with one rank-16 adapter per
   request (q, k, v, o), so the LoRA overhead is measured with and without graphs; and NF4
   against bfloat16 at batch 1, both with graphs.

Writes ``decode_graphs.json`` and ``decode_graphs.png`` into ``--out`` and prints the
ratios the GPU-path targets are judged by: graphs / eager at batch 1, the LoRA overhead at
the largest batch, NF4 / bfloat16 at batch 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import LLMEngine, SamplingParams
from engine.config import DEMO_DIR, EngineConfig
from engine.model_runner import ModelRunner
from server.bench.make_adapters import make_random_adapters

PRESET_7B = Path(__file__).resolve().parent / "presets" / "llama-2-7b"
TINY = Path(__file__).resolve().parent / "presets" / "tiny"


def graph_mode() -> str:
    """Capture where CUDA is; elsewhere the same padded forward, run eagerly."""
    return "graphs" if torch.cuda.is_available() else "static"


def engine(model: Path, mode: str, **kwargs: Any) -> LLMEngine:
    config = EngineConfig.create(model, graph_mode=mode, **kwargs)
    return LLMEngine(config)


def generate(
    llm: LLMEngine, jobs: list[tuple[list[int], str | None]], max_tokens: int
) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    for i, (prompt, adapter) in enumerate(jobs):
        llm.add_request(prompt, params, request_id=str(i), lora=adapter)
    done: dict[str, list[int]] = {}
    while llm.has_unfinished():
        for out in llm.step():
            if out.finished:
                done[out.request_id] = list(out.token_ids)
    return [done[str(i)] for i in range(len(jobs))]


def equality(dtype: str, quantization: str, sizes: list[int], max_tokens: int) -> dict[str, Any]:
    """Greedy tokens of the demo with graphs and eagerly, mixed adapters and base."""
    model = DEMO_DIR / "model"
    adapters = sorted(p for p in (DEMO_DIR / "adapters").iterdir() if p.is_dir())
    common = {
        "dtype": dtype,
        "quantization": quantization,
        "max_num_seqs": max(sizes),
        "num_pages": 1 << 16,  # the demo's pages are small: room for every adapter and batch
    }
    runs = {mode: engine(model, mode, **common) for mode in (graph_mode(), "eager")}
    for llm in runs.values():
        for path in adapters:
            llm.load_lora(path.name, path)
    names: list[str | None] = [p.name for p in adapters] + [None]
    words = ["hello world", "the quick brown fox", "graphs", "loraserve", "a b c d e f"]
    tokenizer = runs["eager"].tokenizer
    result: dict[str, Any] = {"dtype": dtype, "quantization": quantization, "sizes": []}
    for n in sizes:
        jobs = [
            (tokenizer(words[i % len(words)] + f" {i}").input_ids, names[i % len(names)])
            for i in range(n)
        ]
        outs = {mode: generate(llm, jobs, max_tokens) for mode, llm in runs.items()}
        padded = outs[graph_mode()]
        differ = [i for i, (a, b) in enumerate(zip(padded, outs["eager"], strict=True)) if a != b]
        result["sizes"].append({"n": n, "requests": n, "differ": differ})
        print(f"  {dtype:9s} {quantization:4s} n={n:<3d} rows differing: {differ or 'none'}")
    runner = runs[graph_mode()].runner
    assert isinstance(runner, ModelRunner), "one device: the runner is in this process"
    graphs = runner.graphs
    assert graphs is not None
    result["padded_steps"] = sum(graphs.runs.values())
    result["replays"] = graphs.replays
    return result


def decode_step_ms(
    llm: LLMEngine, batch: int, adapters: list[str | None], context: int, steps: int
) -> float:
    """Median milliseconds of one decode step of ``batch`` requests (prefill excluded)."""
    params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
    assert llm.model is not None, "one device: the model is in this process"
    vocab = llm.model.arch.vocab_size
    for i in range(batch):
        prompt = [(7 * i + j) % (vocab - 3) + 3 for j in range(context)]
        llm.add_request(prompt, params, lora=adapters[i % len(adapters)])
    while llm.scheduler.waiting or any(  # run until every request is decoding
        r.num_computed_tokens < len(r.prompt_token_ids) for r in llm.scheduler.running
    ):
        llm.step()
    times = []
    while llm.has_unfinished():
        start = time.perf_counter()
        llm.step()  # each step reads its tokens back: timed to completion
        times.append(time.perf_counter() - start)
    times.sort()
    return 1e3 * times[len(times) // 2]


def speed(args: argparse.Namespace) -> dict[str, Any]:
    model, batches = args.model, args.batches
    model_len = args.context + args.steps + 8
    common = {
        "dtype": args.dtype,
        "load_format": "dummy",
        "max_num_seqs": max(batches),
        "max_model_len": model_len,
        # Every sequence at full length, and every adapter resident (a rank-r adapter on
        # q, k, v, o takes 8 r pages when the layers are square).
        "num_pages": max(batches) * (2 * model_len + 8 * args.rank),
        "max_lora_rank": args.rank,
        "max_loras": max(batches),
    }
    out: dict[str, Any] = {"model": model.name, "batches": batches, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_random_adapters(
            model, Path(tmp), n=4, ranks=[args.rank], targets=["q_proj", "k_proj", "v_proj",
            "o_proj"], seed=0, distinct=4,
        )  # fmt: skip
        for mode in (graph_mode(), "eager"):
            llm = engine(model, mode, **common)
            names = [f"lora-{i}" for i in range(max(batches))]
            started = time.perf_counter()
            for i, name in enumerate(names):  # distinct slots, four sets of weights
                llm.load_lora(name, paths[i % len(paths)])
            loaded = time.perf_counter() - started
            print(f"  {mode:6s} {len(names)} adapters loaded in {loaded:.1f} s")
            rows = []
            for batch in batches:
                base = decode_step_ms(llm, batch, [None], args.context, args.steps)
                lora = decode_step_ms(llm, batch, list(names[:batch]), args.context, args.steps)
                rows.append({"batch": batch, "base_ms": base, "lora_ms": lora})
                print(f"  {mode:6s} batch {batch:3d}: base {base:7.2f} ms, LoRA {lora:7.2f} ms")
            out["modes"][mode] = rows
            del llm
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        nf4 = engine(model, graph_mode(), quantization="nf4", **common)
        out["nf4_batch1_ms"] = decode_step_ms(nf4, 1, [None], args.context, args.steps)
        print(f"  nf4    batch   1: base {out['nf4_batch1_ms']:7.2f} ms")
    return out


def summarize(result: dict[str, Any]) -> dict[str, float]:
    modes = result["speed"]["modes"]
    graphs, eager = modes[graph_mode()], modes["eager"]
    first, last = graphs[0], graphs[-1]
    return {
        "graphs_over_eager_batch1": eager[0]["base_ms"] / first["base_ms"],
        "graphs_over_eager_batch1_lora": eager[0]["lora_ms"] / first["lora_ms"],
        "lora_overhead_graphs": last["lora_ms"] / last["base_ms"] - 1,
        "lora_overhead_eager": eager[-1]["lora_ms"] / eager[-1]["base_ms"] - 1,
        "nf4_over_bf16_batch1": first["base_ms"] / result["speed"]["nf4_batch1_ms"],
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, rows in result["speed"]["modes"].items():
        batches = [r["batch"] for r in rows]
        for kind, style in (("base", "-"), ("lora", "--")):
            tok_s = [r["batch"] / r[f"{kind}_ms"] * 1e3 for r in rows]
            ax.plot(batches, tok_s, style, marker="o", label=f"{mode}, {kind}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("decode batch size")
    ax.set_ylabel("decode tokens / s")
    ax.set_title(f"decode steps, {result['speed']['model']}: graphs vs eager, base vs LoRA")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_graphs"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device")
    parser.add_argument("--model", type=Path, default=None, help="default: the 7B preset")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batches", type=lambda t: [int(v) for v in t.split(",")], default=None)
    parser.add_argument("--context", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per batch")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--no-equality", action="store_true", help="time only (the equality check has run)"
    )
    args = parser.parse_args()
    if args.smoke:
        args.model = args.model or TINY
        args.batches = args.batches or [1, 3]
        args.context, args.steps = min(args.context, 8), min(args.steps, 3)
        args.dtype = "float32" if not torch.cuda.is_available() else args.dtype
        sizes, max_tokens = [1, 3], 4
    else:
        args.model = args.model or PRESET_7B
        args.batches = args.batches or [1, 8, 32, 64]
        sizes, max_tokens = [1, 3, 8, 16, 33], 24
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = args.dtype if torch.cuda.is_available() else "float32"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"decode graphs ({graph_mode()} vs eager) on {device}")
    result: dict[str, Any] = {"mode": graph_mode(), "equality": []}
    for quantization in () if args.no_equality else ("none", "nf4"):
        result["equality"].append(equality(dtype, quantization, sizes, max_tokens))
    result["speed"] = speed(args)
    result["summary"] = summarize(result)
    for name, value in result["summary"].items():
        print(f"{name}: {value:.3f}")
    (args.out / "decode_graphs.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "decode_graphs.png")
    print(f"wrote {args.out}/decode_graphs.json and decode_graphs.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
