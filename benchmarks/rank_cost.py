"""The rank-aware token cost, measured: step time against the LoRA path's share of arithmetic.

    OMP_NUM_THREADS=1 python benchmarks/rank_cost.py            # tiny, llama-30m, the demo
    python benchmarks/rank_cost.py --models tiny --rounds 3     # a quick look
    python benchmarks/rank_cost.py --models benchmarks/presets/llama-2-7b --dtype bfloat16
                                                                # any model directory (a GPU)

The fair policy prices a token on an adapter at ``1 + κ · flops_ratio`` base tokens
(``engine/scheduling.py``), where ``flops_ratio`` is the adapter's LoRA multiply-adds per
token over the base's linear ones (``BaseModelLayout.flops_ratio``). This measures κ.

For each model, one engine per configuration is built in this process: the base model
alone, and every request on adapters of rank r ∈ ``--ranks`` for two target patterns (all
seven linear layers; attention-only q and v), ``--adapters`` distinct random adapters per
configuration, requests spread round-robin over them. Two fixed batches are timed as whole
``engine.step()`` calls (schedule, forward, sampling, update):

    prefill  ``--prefill-requests`` fresh prompts of ``--prefill-len`` tokens, one step
             (prefix caching off, so every step computes all of them)
    decode   ``--decode-batch`` running requests, each with ``--context`` prompt tokens,
             one token each per step

Configurations are interleaved: each of ``--rounds`` rounds visits every engine (in a
shuffled order) for the same number of timed steps (at least ``--steps``, more where the
base's step is short, to fill ``--visit-s``), so drift and other tenants of the machine fall
on all of them alike. A configuration's ratio is paired by round: the median over rounds of
(its median step in the round / the base's median step in that round). κ is the
least-squares fit of ``ratio = 1 + κ · flops_ratio`` over the ranks (a line through the base
point), per model, phase and pattern; an affine fit ``ratio = a + b · flops_ratio`` beside
it shows the part of the LoRA path's time that does not grow with rank (a - 1), and κ fitted
round by round shows its spread.

Writes ``rank_cost.json`` (the ratios and fits) and ``steps.json`` (every timed step) under
``--out``, and the plot ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapters.base_layout import LINEAR_TARGETS
from engine import EngineConfig, LLMEngine, SamplingParams
from engine.arch import ModelArch
from engine.checkpoint import DTYPES
from engine.config import DEMO_DIR
from engine.request import Request
from engine.scheduling import RANK_COST_COEFFICIENT
from server.bench.make_adapters import make_random_adapters

PRESETS = Path(__file__).resolve().parent / "presets"
MODELS = {  # name: (directory, load format)
    "tiny": (PRESETS / "tiny", "dummy"),
    "llama-30m": (PRESETS / "llama-30m", "dummy"),
    "demo": (DEMO_DIR / "model", "auto"),
}
PATTERNS = {"all": LINEAR_TARGETS, "qv": ("q_proj", "v_proj")}
PHASES = ("decode", "prefill")


@dataclass(frozen=True)
class Setup:
    """One configuration: the base (``pattern`` None) or adapters of one rank and pattern."""

    pattern: str | None
    rank: int = 0

    @property
    def name(self) -> str:
        return "base" if self.pattern is None else f"{self.pattern}-r{self.rank}"


class Bench:
    """One engine, its adapters, and the step times measured on it, per phase."""

    def __init__(
        self, setup: Setup, engine: LLMEngine, adapters: list[str], max_tokens: int
    ) -> None:
        self.setup = setup
        self.engine = engine
        self.adapters = adapters
        self.max_tokens = max_tokens  # of a decode request: every decode step it will see
        self.flops_ratio = engine.adapters.get(adapters[0]).flops_ratio if adapters else 0.0
        self.times: dict[str, list[list[float]]] = {phase: [] for phase in PHASES}
        self._ids = 0

    def add(self, prompts: list[list[int]], max_tokens: int) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        for i, prompt in enumerate(prompts):
            lora = self.adapters[i % len(self.adapters)] if self.adapters else None
            self.engine.add_request(
                prompt, params, request_id=f"r{self._ids}", lora=lora, detokenize=False
            )
            self._ids += 1

    def timed_step(self) -> float:
        start = time.perf_counter()
        self.engine.step()
        return time.perf_counter() - start


def max_visit_steps(model_dir: Path, args: argparse.Namespace) -> int:
    """The most steps one visit may take: ``--max-steps``, or fewer where the decode requests
    would outgrow the model's context over all the rounds."""
    room = ModelArch.load(model_dir).context_limit - args.context - args.warmup - 8
    steps: int = min(args.max_steps, room // args.rounds)
    if steps < args.steps:
        raise ValueError(f"{model_dir.name}: context too short for {args.rounds} rounds")
    return steps


def pages_needed(model_dir: Path, args: argparse.Namespace, decode_tokens: int) -> int:
    """Pool pages for the decode batch, one prefill batch and the largest configuration's
    adapters (a page holds one vector of ``num_kv_heads · head_dim`` in every layer)."""
    arch = ModelArch.load(model_dir)
    width, layout = arch.kv_width, arch.layout()
    rows = sum(
        math.ceil(i / width) + math.ceil(o / width) for i, o in layout.linear_shapes.values()
    )
    kv_tokens: int = args.decode_batch * (args.context + decode_tokens + 2)
    kv_tokens += args.prefill_requests * (args.prefill_len + 2)
    adapter_rows: int = args.adapters * max(args.ranks) * rows
    return 2 * kv_tokens + adapter_rows + 64


def model_source(model: str) -> tuple[Path, str]:
    """A preset's name or a model directory, and its load format (dummy without weights)."""
    if model in MODELS:
        return MODELS[model]
    model_dir = Path(model)
    return model_dir, "auto" if any(model_dir.glob("*.safetensors")) else "dummy"


def build(model: str, args: argparse.Namespace, adapter_dir: Path) -> list[Bench]:
    """An engine per setup: the base, then each pattern at each rank."""
    model_dir, load_format = model_source(model)
    max_tokens = args.warmup + args.rounds * max_visit_steps(model_dir, args) + 4
    setups = [Setup(None)] + [Setup(p, r) for p in PATTERNS for r in args.ranks]
    paths: dict[str, list[Path]] = {}
    for pattern, targets in PATTERNS.items():
        n = args.adapters * len(args.ranks)  # adapter i has rank ranks[i % len(ranks)]
        paths[pattern] = make_random_adapters(
            model_dir,
            adapter_dir / model_dir.name / pattern,
            n,
            args.ranks,
            targets,
            seed=0,
            dtype=DTYPES[args.dtype],
        )
    benches = []
    for setup in setups:
        config = EngineConfig.create(
            model_dir,
            dtype=args.dtype,
            load_format=load_format,
            num_pages=pages_needed(model_dir, args, max_tokens),
            max_num_seqs=args.decode_batch,
            max_num_batched_tokens=max(
                args.decode_batch * args.context, args.prefill_requests * args.prefill_len
            ),
            max_lora_rank=max(args.ranks),
            enable_prefix_caching=False,
        )
        engine = LLMEngine(config)
        names = []
        if setup.pattern is not None:
            k = args.ranks.index(setup.rank)
            for j, path in enumerate(paths[setup.pattern][k :: len(args.ranks)]):
                names.append(f"{setup.name}-{j}")
                engine.load_lora(names[-1], path)
        benches.append(Bench(setup, engine, names, max_tokens))
    return benches


def prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = random.Random(seed)
    return [[gen.randrange(3, vocab) for _ in range(length)] for _ in range(num)]


def one_step(bench: Bench, phase: str, args: argparse.Namespace, seed: int) -> float:
    """One timed step of ``phase``: a prefill step gets fresh prompts, which finish in it."""
    if phase == "prefill":
        assert bench.engine.model is not None, "one device: the model is in this process"
        vocab = bench.engine.model.arch.vocab_size
        bench.add(prompts(args.prefill_requests, args.prefill_len, vocab, seed), max_tokens=1)
    seconds = bench.timed_step()
    if phase == "prefill" and bench.engine.has_unfinished():
        raise RuntimeError("a prefill batch took more than one step")
    return seconds


def start_decodes(bench: Bench, args: argparse.Namespace) -> None:
    """Admit the decode batch and step until every request is past its prompt."""
    assert bench.engine.model is not None, "one device: the model is in this process"
    vocab = bench.engine.model.arch.vocab_size
    bench.add(prompts(args.decode_batch, args.context, vocab, seed=1), bench.max_tokens)
    bench.engine.step()
    while any(r.num_computed_tokens < args.context for r in unfinished(bench.engine)):
        bench.engine.step()


def measure(
    model: str, model_dir: Path, benches: list[Bench], args: argparse.Namespace, t0: float
) -> None:
    """Time both phases on every bench, interleaved round by round."""
    order = random.Random(0)
    for phase in PHASES:
        warm: list[list[float]] = []
        for bench in benches:
            if phase == "decode":
                start_decodes(bench, args)
            warm.append([one_step(bench, phase, args, seed=0) for _ in range(args.warmup)])
        # Enough steps per visit to fill --visit-s on the base: short steps are noisier.
        base_s = min(warm[0])
        steps = max(
            args.steps, min(max_visit_steps(model_dir, args), math.ceil(args.visit_s / base_s))
        )
        for round_ in range(args.rounds):
            visit = list(benches)
            order.shuffle(visit)
            for bench in visit:
                bench.times[phase].append(
                    [one_step(bench, phase, args, seed=round_ + 1) for _ in range(steps)]
                )
            base = statistics.median(benches[0].times[phase][-1])
            print(
                f"  {model} {phase} round {round_ + 1}/{args.rounds}: {steps} steps per "
                f"engine, base {1e3 * base:.2f} ms/step  [{time.perf_counter() - t0:.0f} s]",
                flush=True,
            )
        if phase == "decode":
            for bench in benches:
                for request in unfinished(bench.engine):
                    bench.engine.abort(request.request_id)


def unfinished(engine: LLMEngine) -> list[Request]:
    """The engine's requests still waiting or running (the scheduler owns them)."""
    return [*engine.scheduler.waiting.order(), *engine.scheduler.running]


def fit_through_base(points: list[tuple[float, float]]) -> float:
    """κ minimising Σ (ratio - 1 - κ · f)² over ``(f, ratio)`` points."""
    return sum(f * (y - 1.0) for f, y in points) / sum(f * f for f, _ in points)


def fit_affine(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(a, b) minimising Σ (ratio - a - b · f)²."""
    n = len(points)
    mf = sum(f for f, _ in points) / n
    my = sum(y for _, y in points) / n
    b = sum((f - mf) * (y - my) for f, y in points) / sum((f - mf) ** 2 for f, _ in points)
    return my - b * mf, b


def _flat(rounds: list[list[float]]) -> list[float]:
    return [seconds for steps in rounds for seconds in steps]


def analyse(benches: list[Bench], phase: str, coefficient: float) -> dict[str, Any]:
    """Ratios and fits of one model and phase, per pattern.

    A setup's ratio is paired by round: the median over rounds of its median step in the
    round over the base's median step in the same round, so that a slower stretch of the
    machine (another tenant) falls on both sides of each ratio.
    """
    base = benches[0]
    base_by_round = [statistics.median(steps) for steps in base.times[phase]]

    def round_ratios(bench: Bench) -> list[float]:
        medians = [statistics.median(steps) for steps in bench.times[phase]]
        return [m / b for m, b in zip(medians, base_by_round, strict=True)]

    result: dict[str, Any] = {
        "base_ms": 1e3 * statistics.median(_flat(base.times[phase])),
        "patterns": {},
    }
    for pattern in PATTERNS:
        chosen = [b for b in benches if b.setup.pattern == pattern]
        by_round = [round_ratios(b) for b in chosen]
        points = [
            (b.flops_ratio, statistics.median(r)) for b, r in zip(chosen, by_round, strict=True)
        ]
        kappa = fit_through_base(points)
        a, b = fit_affine(points)
        kappa_rounds = [
            fit_through_base([(c.flops_ratio, r[i]) for c, r in zip(chosen, by_round, strict=True)])
            for i in range(len(base_by_round))
        ]
        result["patterns"][pattern] = {
            "kappa": kappa,
            "kappa_rounds": kappa_rounds,
            "affine": {"a": a, "b": b},
            "points": [
                {
                    "rank": c.setup.rank,
                    "flops_ratio": f,
                    "step_ms": 1e3 * statistics.median(_flat(c.times[phase])),
                    "ratio": y,
                    "ratio_rounds": r,
                    "fit": 1.0 + kappa * f,
                    "fit_error": y / (1.0 + kappa * f) - 1.0,
                    # what the scheduler charges with --coefficient, and how far off that is
                    "priced": 1.0 + coefficient * f,
                    "priced_error": y / (1.0 + coefficient * f) - 1.0,
                }
                for c, (f, y), r in zip(chosen, points, by_round, strict=True)
            ],
        }
    return result


def report(results: dict[str, Any]) -> None:
    print(
        f"\n{'model':<10} {'phase':<8} {'pattern':<7} {'base ms':>8}  "
        f"{'ratio at each rank (flops_ratio)':<60} {'κ':>6} {'κ rounds':>13} {'a':>6} {'b':>6}"
    )
    for model, phases in results.items():
        for phase, r in phases.items():
            for pattern, p in r["patterns"].items():
                cells = "  ".join(
                    f"r{q['rank']}: {q['ratio']:.3f} ({q['flops_ratio']:.3f})" for q in p["points"]
                )
                lo, hi = min(p["kappa_rounds"]), max(p["kappa_rounds"])
                print(
                    f"{model:<10} {phase:<8} {pattern:<7} {r['base_ms']:8.2f}  {cells:<60} "
                    f"{p['kappa']:6.2f} {lo:6.2f}–{hi:<6.2f} {p['affine']['a']:6.3f} "
                    f"{p['affine']['b']:6.2f}"
                )
    print("\nmeasured ratio / (1 + κ·flops_ratio) - 1 at each rank, κ = --coefficient:")
    for model, phases in results.items():
        for phase, r in phases.items():
            for pattern, p in r["patterns"].items():
                cells = "  ".join(f"r{q['rank']}: {q['priced_error']:+6.1%}" for q in p["points"])
                print(f"{model:<10} {phase:<8} {pattern:<7} {cells}")


def plot(results: dict[str, Any], path: Path, coefficient: float | None) -> None:
    """Step time over the base's against flops_ratio, with the fitted lines; one panel per
    model and phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    fig, axes = plt.subplots(
        len(models), len(PHASES), figsize=(10, 3.2 * len(models)), squeeze=False
    )
    markers = {"all": "o", "qv": "^"}
    for row, model in enumerate(models):
        for col, phase in enumerate(PHASES):
            ax = axes[row][col]
            r = results[model][phase]
            xmax = max(q["flops_ratio"] for p in r["patterns"].values() for q in p["points"])
            for i, (pattern, p) in enumerate(r["patterns"].items()):
                color = f"C{i}"
                xs = [q["flops_ratio"] for q in p["points"]]
                ys = [q["ratio"] for q in p["points"]]
                ax.plot(
                    xs, ys, markers[pattern], color=color, label=f"{pattern} (κ={p['kappa']:.2f})"
                )
                for q in p["points"]:
                    ax.annotate(
                        f"r{q['rank']}",
                        (q["flops_ratio"], q["ratio"]),
                        fontsize=6,
                        xytext=(3, -8),
                        textcoords="offset points",
                    )
                span = [0.0, max(xs)]
                ax.plot(span, [1.0 + p["kappa"] * x for x in span], "-", color=color, lw=1)
                a, b = p["affine"]["a"], p["affine"]["b"]
                ax.plot(span, [a + b * x for x in span], "--", color=color, lw=0.6, alpha=0.6)
            if coefficient is not None:
                ax.plot(
                    [0.0, xmax],
                    [1.0, 1.0 + coefficient * xmax],
                    ":",
                    color="gray",
                    lw=1,
                    label=f"chosen κ={coefficient:g}",
                )
            ax.plot([0.0], [1.0], "ks", ms=4)
            ax.set_title(
                f"{model}, {phase} (base {r['base_ms']:.1f} ms/step); "
                "solid: 1 + κ·f, dashed: a + b·f",
                fontsize=8,
            )
            ax.set_xlabel("flops_ratio (LoRA multiply-adds / base linear)", fontsize=8)
            ax.set_ylabel("step time / base step time", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def cpu_name() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        type=lambda s: s.split(","),
        default=list(MODELS),
        help=f"presets ({', '.join(MODELS)}) or model directories",
    )
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument(
        "--ranks", type=lambda s: [int(v) for v in s.split(",")], default=[8, 16, 32, 64]
    )
    parser.add_argument("--adapters", type=int, default=4, help="distinct adapters per setup")
    parser.add_argument("--decode-batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=32, help="decode requests' prompt")
    parser.add_argument("--prefill-requests", type=int, default=4)
    parser.add_argument("--prefill-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3, help="the fewest timed steps per visit")
    parser.add_argument("--max-steps", type=int, default=12, help="the most per visit")
    parser.add_argument(
        "--visit-s", type=float, default=0.1, help="the base's seconds per visit to aim for"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rank-cost"))
    parser.add_argument("--plot", type=Path, default=Path("docs/img/rank_cost.png"))
    parser.add_argument(
        "--coefficient",
        type=float,
        default=RANK_COST_COEFFICIENT,
        help="the κ drawn as a dotted line (default: the scheduler's)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"rank cost: {', '.join(args.models)}; ranks {args.ranks}; decode {args.decode_batch} "
        f"requests, prefill {args.prefill_requests}×{args.prefill_len} tokens; "
        f"{args.rounds} rounds, ≥ {args.steps} steps per visit; "
        f"{torch.get_num_threads()} thread(s)",
        flush=True,
    )
    load_before = os.getloadavg()
    if load_before[0] > (os.cpu_count() or 1):
        print(f"warning: load average {load_before[0]:.1f}; the machine is busy", flush=True)
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for source in args.models:
            model = source if source in MODELS else Path(source).name
            benches = build(source, args, Path(tmp))
            print(
                f"{model}: {len(benches)} engines built [{time.perf_counter() - t0:.0f} s]",
                flush=True,
            )
            measure(model, model_source(source)[0], benches, args, t0)
            results[model] = {phase: analyse(benches, phase, args.coefficient) for phase in PHASES}
            raw[model] = {
                b.setup.name: {
                    "flops_ratio": b.flops_ratio,
                    "step_us": {
                        phase: [[round(1e6 * t) for t in steps] for steps in rounds]
                        for phase, rounds in b.times.items()
                    },
                }
                for b in benches
            }
            del benches
    report(results)
    print(f"total {time.perf_counter() - t0:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    document = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": cpu_name(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "seconds": time.perf_counter() - t0,
        },
        "results": results,
    }
    (args.out / "rank_cost.json").write_text(json.dumps(document, indent=1) + "\n")
    # Every timed step, in µs, by model, setup, phase and round (compact: thousands of them).
    (args.out / "steps.json").write_text(json.dumps(raw, separators=(",", ":")) + "\n")
    plot(results, args.plot, args.coefficient)
    print(f"wrote rank_cost.json and steps.json under {args.out}, and {args.plot}")


if __name__ == "__main__":
    main()
