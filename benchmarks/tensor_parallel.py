"""One server with its model split across two tensor-parallel workers against one unsplit,
over HTTP, on one request list.

    python benchmarks/tensor_parallel.py [--requests 120] [--large-requests 32]
        [--shapes demo,large] [--out benchmarks/results/tensor_parallel]

For each shape, replays one request list (every request arriving at once, so throughput is
capacity; temperature 0, EOS ignored, streamed) against, one after another in one run:

* ``tp=1``: ``loraserve serve --tensor-parallel-size 1`` (the model in the engine process);
* ``tp=2``: ``loraserve serve --tensor-parallel-size 2`` (the engine process schedules, two
  worker processes each hold half of the model and run it, gloo all-reduces between them).

The shapes:

* ``demo``: the bundled demo (no model directory), its base ``loraserve-demo`` and its four
  LoRA adapters upper, swapcase, caesar and reverse (the prefix-tuned ``lower`` is not served
  split; with ``tp=1`` the server still loads it, but no request uses it); ``--requests``
  requests, prompts of 4-23 tokens, outputs of 16-64 tokens.
* ``large``: ``--load-format dummy`` on a Llama config alone (hidden 1024, intermediate 2816,
  8 layers, 16 heads, 8 KV heads, vocabulary 32000: about 160M parameters, float32), written
  to a temporary directory, with four random PEFT adapters of ranks 8, 16, 32 and 64 on q, k,
  v and o (``server/bench/make_adapters.py``); ``--large-requests`` requests, prompts of
  16-63 tokens, 32 output tokens each. This shape gives the split some compute to divide.

Requests go to the base and the four adapters in turn (one fifth each). Each server is
started on a free loopback port in its own process group, waited for (``/health``), warmed up
with one short request per model, measured, and stopped with its whole process group (the
API process, the engine process and the workers). Prints requests/s, output tokens/s, mean
TTFT and wall time per server, and per shape the ratio of tp=2's output tokens/s to tp=1's;
writes ``tensor_parallel.json`` and the servers' output (``servers.log``) into ``--out``.

Threads: ``tp=1`` runs with ``OMP_NUM_THREADS`` unset, so the engine process picks its own
torch threads (all cores but one, which it leaves to the API process:
``server.engine_core.size_cpu_threads``). ``tp=2`` runs with ``OMP_NUM_THREADS`` = cores / 2,
one thread per worker on a 2-core machine.

On a 2-core CPU machine this is not what tensor parallelism is for: ``tp=2`` is two worker
processes on the same two cores, which they share with the API process, the engine process
and this benchmark's client, and every layer adds an all-reduce between processes. The ratio
says what the split costs or gains on this machine, not on N GPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.arch import ModelArch  # noqa: E402
from engine.config import DEMO_DIR  # noqa: E402
from server.bench.client import run_workload  # noqa: E402
from server.bench.generators import synthetic_w2  # noqa: E402
from server.bench.harness import SERVED_BASE, free_port, machine_info  # noqa: E402
from server.bench.make_adapters import make_random_adapters  # noqa: E402
from server.bench.metrics import summarize  # noqa: E402
from server.bench.workload import Workload  # noqa: E402
from server.serve import DEMO_MODEL_NAME  # noqa: E402

SIZES = (1, 2)  # --tensor-parallel-size values, measured in this order
SHAPES = ("demo", "large")
DEMO_ADAPTERS = ("upper", "swapcase", "caesar", "reverse")  # the demo's LoRA adapters
LARGE_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 2816,
    "max_position_embeddings": 2048,
    "mlp_bias": False,
    "num_attention_heads": 16,
    "num_hidden_layers": 8,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "use_cache": True,
    "vocab_size": 32000,
}
LARGE_RANKS = (8, 16, 32, 64)
LARGE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Shape:
    """One model to serve at both sizes, and the request list replayed against it.

    Attributes:
        name: ``demo`` or ``large``.
        base: the base model's API name.
        adapters: the API names of the adapters the requests use.
        flags: the ``serve`` arguments before the size (model directory, load format, ...).
        workload: the request list; workload adapter i is ``[None, *adapters][i]``.
    """

    name: str
    base: str
    adapters: tuple[str, ...]
    flags: tuple[str, ...]
    workload: Workload


def demo_shape(num_requests: int, max_num_seqs: int) -> Shape:
    """The bundled demo: no model directory, so ``serve`` loads the demo's adapters itself."""
    vocab = ModelArch.load(DEMO_DIR / "model").vocab_size
    workload = synthetic_w2(
        num_adapters=1 + len(DEMO_ADAPTERS),
        alpha=1.0,
        rate=1e6,
        cv=1.0,
        num_requests=num_requests,
        input_range=(4, 24),
        output_range=(16, 65),
        vocab_size=vocab,
    )
    flags = ("--dtype", "float32", "--max-num-seqs", str(max_num_seqs))
    return Shape("demo", DEMO_MODEL_NAME, DEMO_ADAPTERS, flags, workload)


def large_shape(num_requests: int, max_num_seqs: int, tmp: Path) -> Shape:
    """A ~160M-parameter Llama with dummy weights and four random adapters, under ``tmp``."""
    model_dir = tmp / "llama-160m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(LARGE_CONFIG, indent=2))
    paths = make_random_adapters(
        model_dir, tmp / "adapters", len(LARGE_RANKS), LARGE_RANKS, LARGE_TARGETS, seed=0
    )
    names = tuple(path.name for path in paths)
    workload = synthetic_w2(
        num_adapters=1 + len(names),
        alpha=1.0,
        rate=1e6,
        cv=1.0,
        num_requests=num_requests,
        input_range=(16, 64),
        output_range=(32, 33),
        vocab_size=int(LARGE_CONFIG["vocab_size"]),
    )
    flags: tuple[str, ...] = (
        str(model_dir),
        "--served-model-name",
        SERVED_BASE,
        "--load-format",
        "dummy",
    )
    flags += ("--dtype", "float32", "--max-num-seqs", str(max_num_seqs))
    flags += ("--max-lora-rank", str(max(LARGE_RANKS)))
    flags += ("--lora-modules", *(f"{p.name}={p}" for p in paths))
    return Shape("large", SERVED_BASE, names, flags, workload)


def worker_threads() -> int:
    """Torch threads per tensor-parallel worker with ``tp=2``: half the usable cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // 2)


def server_env(size: int) -> dict[str, str]:
    """The server's environment: no thread count for ``tp=1`` (the engine process sizes its
    own), ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = :func:`worker_threads` for ``tp=2``."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if size > 1:
        threads = str(worker_threads())
        env |= {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    return env


@contextlib.contextmanager
def serving(shape: Shape, size: int, log: Path) -> Iterator[str]:
    """Start ``loraserve serve`` for ``shape`` split across ``size`` workers, wait until
    ``/health`` answers 200 and every model answered one short request, yield the base URL;
    on the way out stop the server's whole process group (SIGTERM, 20 s, then SIGKILL)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "server.cli", "--log-level", "WARNING", "serve"]
    command += [*shape.flags, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--max-waiting-requests", str(len(shape.workload.requests)), "--no-access-log"]
    command += ["--tensor-parallel-size", str(size)]
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        proc = subprocess.Popen(
            command, cwd=REPO, env=server_env(size), stdout=out, stderr=out, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not come up; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.25)
        for model in (shape.base, *shape.adapters):
            body = {"model": model, "prompt": [5, 6, 7], "max_tokens": 2, "ignore_eos": True}
            httpx.post(url + "/v1/completions", json=body, timeout=120).raise_for_status()
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # workers or an engine that outlived the API


def measure(shape: Shape, size: int, log: Path) -> dict[str, Any]:
    """Serve ``shape`` on ``size`` workers and replay its request list; ``summarize``'s
    fields plus the start-up time and the 1-minute load average before and after."""
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with serving(shape, size, log) as url:
        startup_s = time.perf_counter() - started
        print(f"  {shape.name} tp={size}: ready in {startup_s:.1f} s; replaying", flush=True)
        models: list[str | None] = [None, *shape.adapters]
        before = httpx.get(url + "/v1/status", timeout=30).json()
        records, duration = asyncio.run(
            run_workload(url, shape.workload, models, shape.base, progress=False)
        )
        after = httpx.get(url + "/v1/status", timeout=30).json()
    summary = summarize(records, duration)
    errors = sorted({r.error for r in records if r.error})
    return summary | {
        "tensor_parallel_size": size,
        "omp_num_threads": server_env(size).get("OMP_NUM_THREADS"),
        "startup_s": startup_s,
        "load_1min_before": load_before,
        "load_1min_after": os.getloadavg()[0],
        "errors": errors[:5],
        "steps": after["requests"]["steps"] - before["requests"]["steps"],
        "worker0": worker_time(before["tensor_parallel"], after["tensor_parallel"]),
    }


def worker_time(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any] | None:
    """Where worker 0's time went during the replay (the status route's counters, after less
    before): seconds in steps, and seconds, calls and elements of each kind of collective."""
    if after["size"] == 1:
        return None
    collectives = {}
    for name, count in after["collectives"].items():
        was = before["collectives"].get(name, {"calls": 0, "elements": 0, "seconds": 0.0})
        collectives[name] = {key: count[key] - was[key] for key in ("calls", "elements", "seconds")}
    step_s = after["worker_step_seconds"] - before["worker_step_seconds"]
    return {"step_seconds": step_s, "collectives": collectives}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=120, help="requests on the demo")
    parser.add_argument("--large-requests", type=int, default=32, help="requests on 'large'")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, of demo,large")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/tensor_parallel")
    args = parser.parse_args()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if not shapes or set(shapes) - set(SHAPES):
        parser.error(f"--shapes takes names among {', '.join(SHAPES)}; got {args.shapes!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "servers.log"
    log.write_text("")
    cores = os.cpu_count()
    print(
        f"{cores} CPU cores; tp=1: OMP_NUM_THREADS unset (the engine process sizes its torch "
        f"threads); tp=2: OMP_NUM_THREADS={worker_threads()}, two worker processes sharing "
        "the cores with the API process, the engine process and this client",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="tp-bench-") as tmp:
        for name in shapes:
            if name == "demo":
                shape = demo_shape(args.requests, args.max_num_seqs)
            else:
                print("  large: writing the config and four random adapters", flush=True)
                shape = large_shape(args.large_requests, args.max_num_seqs, Path(tmp))
            runs = {f"tp{size}": measure(shape, size, log) for size in SIZES}
            tps = {key: run["output_throughput"] for key, run in runs.items()}
            ratio = tps["tp2"] / tps["tp1"] if tps["tp1"] else None
            results[name] = {
                "runs": runs,
                "ratio_tp2_over_tp1": ratio,
                "num_requests": len(shape.workload.requests),
                "models": [shape.base, *shape.adapters],
                "workload": shape.workload.params,
            }
            for key, run in runs.items():
                if run["failed"]:
                    print(f"  {name} {key}: {run['failed']} failed: {run['errors']}", flush=True)
    print()
    print(_table(results))
    out = {
        "shapes": results,
        "args": vars(args) | {"out": str(args.out)},
        "machine": machine_info(worker_threads())
        | {"torch_threads": {"tp1": "engine default (cores - 1)", "tp2": worker_threads()}},
        "note": "CPU only: tp=2 is two worker processes on the same cores, sharing them with "
        "the API process, the engine process and the benchmark client",
    }
    path = args.out / "tensor_parallel.json"
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"\nwrote {path}")
    return 0


def _breakdown(run: dict[str, Any]) -> str:
    """Worker 0's time in steps and, of it, in each kind of collective."""
    worker = run["worker0"]
    step_s = worker["step_seconds"]
    parts = [
        f"{name} {c['seconds']:.2f} s ({c['calls']} calls, {c['seconds'] / step_s:.0%})"
        for name, c in sorted(worker["collectives"].items())
        if step_s
    ]
    steps = max(run["steps"], 1)
    return (
        f"worker 0: {run['steps']} steps, {step_s:.2f} s in them "
        f"({1000 * step_s / steps:.1f} ms a step); collectives: " + ", ".join(parts)
    )


def _table(results: dict[str, dict[str, Any]]) -> str:
    """One row per shape and size, then the tp=2 / tp=1 output throughput ratio per shape."""
    head = f"{'shape':6s} {'tp':>2s} {'done':>5s} {'wall s':>7s} {'req/s':>7s}"
    head += f" {'out tok/s':>9s} {'mean TTFT ms':>12s} {'load 1m':>7s}"
    lines = [head, "-" * len(head)]
    for name, result in results.items():
        for run in result["runs"].values():
            done = f"{run['completed']}/{run['completed'] + run['failed']}"
            ttft = run["mean_ttft_ms"]
            lines.append(
                f"{name:6s} {run['tensor_parallel_size']:2d} {done:>5s} "
                f"{run['duration_s']:7.2f} {run['request_throughput']:7.2f} "
                f"{run['output_throughput']:9.1f} {'n/a' if ttft is None else f'{ttft:.1f}':>12s} "
                f"{run['load_1min_before']:7.2f}"
            )
    for name, result in results.items():
        ratio = result["ratio_tp2_over_tp1"]
        text = f"{ratio:.2f}x" if ratio is not None else "n/a"
        lines.append(f"{name}: tp=2 / tp=1 output tok/s = {text}")
        for key, run in result["runs"].items():
            if run["worker0"] is not None:
                lines.append(f"  {key} {_breakdown(run)}")
    lines.append("(2-core CPU: tp=2's two workers share the cores with the API process)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
