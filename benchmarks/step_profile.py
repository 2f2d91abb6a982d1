"""Where a step's time goes: each phase's share of the engine's time on one workload.

    python benchmarks/step_profile.py                         # the demo, 64 requests, 8 adapters
    python benchmarks/step_profile.py --model benchmarks/presets/llama-30m --load-format dummy \\
        --num-adapters 32 --ranks 8,16,32,64 --targets all --out benchmarks/results/profile-30m
    python benchmarks/step_profile.py --http    # also the same workload over HTTP (compare.py)

Runs one seeded W2 request list (every request arriving at once, EOS ignored) through the
engine in this process with timers wrapped around each phase, and prints each phase's share
of the stepping time:

    schedule   Scheduler.schedule (admission, pages, adapter residency, prefetch)
    placement  the runner writing the adapters that schedule placed into the pool
    prepare    ModelRunner._prepare (packing the step's metadata, its one upload)
    linears    the base model's nn.Linear layers (packed ones too), the output head included
    lora       the LoRA backend (every target of every layer)
    attention  the paged-attention backend
    other      the rest of the forward: embeddings, norms, rotary embeddings, activations
    sampling   the sampler and log-probabilities
    update     Scheduler.update (detokenization included)
    rest       everything else inside step(): the inbox, the requests' outputs, the runner's
               bookkeeping

The wrappers add a little time of their own (a few microseconds per call), so the shares are
for diagnosis; the throughput printed first comes from a run without them. ``--http`` then
runs the same workload through ``benchmarks/compare.py`` over HTTP (a ``loraserve serve``
subprocess, streamed) and in-process, so what the process boundary, HTTP and streaming cost
shows as their ratio. ``--out DIR`` writes ``profile.json`` and a bar chart ``profile.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import LLMEngine, SamplingParams
from engine.arch import ModelArch
from engine.config import DEMO_DIR, EngineConfig
from engine.model import Attention
from engine.model_runner import ModelRunner
from server.bench.generators import synthetic_w2
from server.bench.make_adapters import make_random_adapters
from server.bench.workload import Workload

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PHASES = (
    "schedule",
    "placement",
    "prepare",
    "linears",
    "lora",
    "attention",
    "other",
    "sampling",
    "update",
    "rest",
)


class Timers:
    """Seconds per phase; nested phases are subtracted from their parent by the report."""

    def __init__(self, device: torch.device) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync: Callable[[], object] = (
            torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        )

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[phase] += time.perf_counter() - start

        return timed


def instrument(engine: LLMEngine, timers: Timers) -> None:
    """Wrap the engine's phases in timers (instance attributes only; the classes are intact)."""
    runner = engine.runner
    assert isinstance(runner, ModelRunner), "one device: the runner is in this process"
    scheduler, model = engine.scheduler, runner.model
    scheduler.schedule = timers.wrap("schedule", scheduler.schedule)  # type: ignore[method-assign]
    scheduler.update = timers.wrap("update", scheduler.update)  # type: ignore[method-assign]
    runner._prepare = timers.wrap("prepare", runner._prepare)  # type: ignore[method-assign]
    placements = runner.placements
    placements.apply = timers.wrap("placement", placements.apply)  # type: ignore[method-assign]
    runner.sampler = timers.wrap("sampling", runner.sampler)  # type: ignore[assignment]
    model.forward = timers.wrap("forward", model.forward)  # type: ignore[method-assign]
    model.compute_logits = timers.wrap("linears", model.compute_logits)  # type: ignore[method-assign]
    for module in model.model.modules():  # the decoder: the output head is compute_logits
        if isinstance(module, torch.nn.Linear):
            module.forward = timers.wrap("forward.linears", module.forward)  # type: ignore[method-assign]
        backends = getattr(module, "backends", None)
        if backends is not None:
            attention = replace(
                backends.attention,
                decode=timers.wrap("forward.attention", backends.attention.decode),
                prefill=timers.wrap("forward.attention", backends.attention.prefill),
            )
            module.backends = replace(backends, attention=attention)
    attention = model.model.layers[0].self_attn
    assert isinstance(attention, Attention)
    lora = attention.backends.lora
    # object.__setattr__: a backend may be a frozen dataclass (older versions' was)
    object.__setattr__(lora, "apply", timers.wrap("forward.lora", lora.apply))
    object.__setattr__(lora, "apply_packed", timers.wrap("forward.lora", lora.apply_packed))
    engine.step = timers.wrap("step", engine.step)  # type: ignore[method-assign]


def shares(seconds: dict[str, float]) -> dict[str, float]:
    """Each phase's seconds, nested timers taken out of their parents."""
    s = dict(seconds)
    forward = s.get("forward", 0.0)
    parts = {k: s.get(f"forward.{k}", 0.0) for k in ("linears", "lora", "attention")}
    result = {
        "schedule": s.get("schedule", 0.0),
        "placement": s.get("placement", 0.0),
        "prepare": s.get("prepare", 0.0),
        "linears": parts["linears"] + s.get("linears", 0.0),
        "lora": parts["lora"],
        "attention": parts["attention"],
        "other": forward - sum(parts.values()),
        "sampling": s.get("sampling", 0.0),
        "update": s.get("update", 0.0),
    }
    result["rest"] = s.get("step", 0.0) - sum(result.values())
    return result


def build_engine(args: argparse.Namespace, paths: list[Path]) -> LLMEngine:
    config = EngineConfig.create(
        args.model,
        dtype=args.dtype,
        load_format=args.load_format,
        max_num_seqs=args.max_num_seqs,
        max_lora_rank=max(args.ranks),
        max_loras=max(len(paths), 1),
    )
    engine = LLMEngine(config)
    for i, path in enumerate(paths):
        engine.load_lora(f"adapter-{i}", path)
    warm = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    engine.add_request([5, 6, 7], warm)
    while engine.has_unfinished():
        engine.step()
    return engine


def run(engine: LLMEngine, workload: Workload, num_adapters: int, max_len: int) -> int:
    """Add every request and step to the end; returns the tokens generated."""
    generated = 0
    for i, r in enumerate(workload.requests):
        out_len = min(r.output_len, max_len - len(r.prompt))
        params = SamplingParams(
            temperature=0.0, max_tokens=out_len, min_tokens=out_len, ignore_eos=True
        )
        lora = None if r.adapter is None or not num_adapters else f"adapter-{r.adapter}"
        engine.add_request(list(r.prompt), params, request_id=f"p{i}", lora=lora)
        generated += out_len
    while engine.has_unfinished():
        engine.step()
    return generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEMO_DIR / "model")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--num-adapters", type=int, default=8)
    parser.add_argument(
        "--ranks", type=lambda t: [int(v) for v in t.split(",")], default=[4, 8, 16]
    )
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="or 'all'")
    parser.add_argument("--input-range", default="8,121")
    parser.add_argument("--output-range", default="8,65")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--adapter-dir", type=Path, default=None)
    parser.add_argument("--http", action="store_true", help="also over HTTP (compare.py)")
    parser.add_argument(
        "--before", type=Path, default=None, help="an earlier profile.json to plot beside this one"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    arch = ModelArch.load(args.model)
    max_len = arch.context_limit
    lo_in, hi_in = (int(v) for v in args.input_range.split(","))
    lo_out, hi_out = (int(v) for v in args.output_range.split(","))
    workload = synthetic_w2(
        num_adapters=max(args.num_adapters, 1),
        alpha=1.0,
        rate=1e6,
        cv=1.0,
        num_requests=args.num_requests,
        input_range=(lo_in, hi_in),
        output_range=(lo_out, hi_out),
        vocab_size=arch.vocab_size,
    )
    targets = ALL_TARGETS if args.targets == "all" else tuple(args.targets.split(","))
    adapter_dir = args.adapter_dir or Path(args.out or "/tmp") / "profile-adapters"
    paths = make_random_adapters(
        args.model, adapter_dir, args.num_adapters, args.ranks, targets, seed=0,
        dtype=torch.float32,
    )  # fmt: skip

    engine = build_engine(args, paths)
    started = time.perf_counter()
    tokens = run(engine, workload, args.num_adapters, max_len)
    plain_s = time.perf_counter() - started

    engine = build_engine(args, paths)
    assert isinstance(engine.runner, ModelRunner), "one device: the runner is in this process"
    timers = Timers(engine.runner.device)
    instrument(engine, timers)
    run(engine, workload, args.num_adapters, max_len)
    phase_s = shares(timers.seconds)
    total = sum(phase_s.values())
    print(f"{args.model.name}: {args.num_requests} requests over {args.num_adapters} adapters")
    print(
        f"in-process, no timers: {tokens} tokens in {plain_s:.2f} s = {tokens / plain_s:.0f} tok/s"
    )
    print(f"{'phase':<10} {'seconds':>8} {'share':>7}")
    for phase in PHASES:
        print(f"{phase:<10} {phase_s[phase]:8.3f} {100 * phase_s[phase] / total:6.1f}%")
    http = None
    if args.http:
        http = over_http(args, (lo_in, hi_in), (lo_out, hi_out), adapter_dir)
        print(
            f"compare.py, same workload: over HTTP {http['http']:.0f} tok/s, in-process "
            f"{http['in_process']:.0f} tok/s: HTTP / in-process = "
            f"{http['http'] / http['in_process']:.2f} (the boundary: IPC, HTTP, streaming)"
        )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        result = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "tokens": tokens,
            "in_process_tok_s": tokens / plain_s,
            "phase_seconds": phase_s,
            "http": http,
        }
        (args.out / "profile.json").write_text(json.dumps(result, indent=1) + "\n")
        name = "demo model" if args.model == DEMO_DIR / "model" else args.model.name
        title = f"{name}, {args.num_requests} requests, n = {args.num_adapters}"
        bars = {"this run": (phase_s, tokens / plain_s)}
        if args.before is not None:
            earlier = json.loads(args.before.read_text())
            bars = {"before": (earlier["phase_seconds"], earlier["in_process_tok_s"]), **bars}
        plot(bars, args.out / "profile.png", title)


def over_http(
    args: argparse.Namespace,
    input_range: tuple[int, int],
    output_range: tuple[int, int],
    adapter_dir: Path,
) -> dict[str, float]:
    """Output tok/s of the same workload over HTTP and in-process, from one compare run."""
    from benchmarks.compare import CompareArgs, run_compare  # needs peft

    targets = ALL_TARGETS if args.targets == "all" else tuple(args.targets.split(","))
    result = run_compare(
        CompareArgs(
            model_dir=args.model,
            out=(args.out or Path("/tmp/step-profile")) / "compare",
            num_requests=args.num_requests,
            num_adapters=args.num_adapters,
            ranks=list(args.ranks),
            targets=list(targets),
            input_range=input_range,
            output_range=output_range,
            systems=["loraserve-http", "loraserve"],
            batch_size=args.max_num_seqs,
            dtype=args.dtype,
            load_format=args.load_format,
            adapter_dir=adapter_dir,
            threads=args.threads,
            progress=False,
        )
    )
    by_system = {s["system"]: s["output_throughput"] for s in result["systems"]}
    return {"http": by_system["loraserve-http"], "in_process": by_system["loraserve"]}


def plot(bars: dict[str, tuple[dict[str, float], float]], path: Path, title: str) -> None:
    """One horizontal bar per profile: seconds per phase, stacked, labelled with tok/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    fig, ax = plt.subplots(figsize=(9, 1.1 + 0.55 * len(bars)))
    cmap = plt.get_cmap("tab10")
    assert isinstance(cmap, ListedColormap)
    colors = cmap.colors
    labels = []
    for y, (name, (phase_s, tok_s)) in enumerate(bars.items()):
        left = 0.0
        for i, phase in enumerate(PHASES):
            seconds = phase_s.get(phase, 0.0)
            color = colors[i % 10]  # type: ignore[index]  # matplotlib: colors is any ArrayLike
            ax.barh([y], [seconds], left=left, color=color, label=phase if y == 0 else None)
            left += seconds
        labels.append(f"{name}\n{tok_s:.0f} tok/s")
    ax.set_yticks(range(len(bars)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("seconds of stepping, by phase (with timers)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
