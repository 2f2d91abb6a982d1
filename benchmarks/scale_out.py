"""One server against Ray Serve replicas, over HTTP, on one request list.

    python benchmarks/scale_out.py [--num-requests 300] [--out benchmarks/results/scale_out]

Replays one W2 request list (every request arriving at once, so throughput is capacity) over
the demo's five adapters against, one after another in one run:

* ``serve``: ``loraserve serve`` (the engine in its own process);
* ``ray-1``: ``loraserve serve --ray-replicas 1`` (the ingress, one replica);
* ``ray-2``: ``loraserve serve --ray-replicas 2``.

Each server is started on a free loopback port, waited for (for ``ray-2``, until both
replicas have answered), warmed up, measured and stopped with its whole process group.
Prints output tokens per second and the ratios to ``serve`` and to ``ray-1``, and writes
``scale_out.json`` and ``scale_out.png`` into ``--out``.
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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.arch import ModelArch  # noqa: E402
from engine.config import DEMO_DIR  # noqa: E402
from server.bench.client import run_workload  # noqa: E402
from server.bench.generators import synthetic_w2  # noqa: E402
from server.bench.harness import (  # noqa: E402
    SERVED_BASE,
    ServerSpec,
    free_port,
    machine_info,
    server_command,
)
from server.bench.metrics import summarize  # noqa: E402

ADAPTERS = ("upper", "swapcase", "caesar", "reverse", "lower")
SYSTEMS = {"serve": 0, "ray-1": 1, "ray-2": 2}  # name → --ray-replicas


@contextlib.contextmanager
def running(spec: ServerSpec, replicas: int, log: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = server_command(spec, port)
    if replicas:
        command += ["--ray-replicas", str(replicas)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads), "RAY_USAGE_STATS_ENABLED": "0"}
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=out, start_new_session=True
        )
    try:
        seen: set[str] = set()
        deadline = time.monotonic() + 300
        while len(seen) < max(replicas, 1):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not come up; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                body = {"model": SERVED_BASE, "prompt": "warm=", "max_tokens": 4}
                reply = httpx.post(url + "/v1/completions", json=body, timeout=30)
                if reply.status_code == 200:
                    seen.add(reply.headers.get("x-loraserve-replica", "server"))
                    continue
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=300)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per process")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/scale_out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "servers.log"
    log.write_text("")
    vocab = ModelArch.load(DEMO_DIR / "model").vocab_size
    workload = synthetic_w2(
        num_adapters=len(ADAPTERS),
        alpha=1.0,
        rate=1e6,
        cv=1.0,
        num_requests=args.num_requests,
        input_range=(4, 24),
        output_range=(16, 64),
        vocab_size=vocab,
    )
    spec = ServerSpec(
        model_dir=DEMO_DIR / "model",
        dtype="float32",
        load_format="auto",
        max_num_seqs=args.max_num_seqs,
        max_lora_rank=64,
        max_loras=len(ADAPTERS),
        max_waiting_requests=args.num_requests,
        threads=args.threads,
        adapters=tuple((name, DEMO_DIR / "adapters" / name) for name in ADAPTERS),
    )
    results: dict[str, Any] = {}
    for system, replicas in SYSTEMS.items():
        with running(spec, replicas, log) as url:
            records, duration = asyncio.run(
                run_workload(url, workload, list(ADAPTERS), SERVED_BASE, progress=False)
            )
        summary = summarize(records, duration)
        results[system] = summary
        print(
            f"{system:6s} {summary['completed']:4d} done {summary['output_throughput']:8.1f} "
            f"output tok/s  median TTFT {summary['median_ttft_ms']:7.1f} ms",
            flush=True,
        )
    tps = {s: r["output_throughput"] for s, r in results.items()}
    ratios = {
        "ray-1/serve": tps["ray-1"] / tps["serve"],
        "ray-2/serve": tps["ray-2"] / tps["serve"],
        "ray-2/ray-1": tps["ray-2"] / tps["ray-1"],
    }
    for name, ratio in ratios.items():
        print(f"{name:12s} {ratio:.2f}x")
    out = {"systems": results, "ratios": ratios, "args": vars(args) | {"out": str(args.out)}}
    out["machine"] = machine_info(args.threads)
    (args.out / "scale_out.json").write_text(json.dumps(out, indent=2, default=str))
    _plot(tps, args.out / "scale_out.png")
    return 0


def _plot(tps: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    names = list(tps)
    ax.bar(names, [tps[n] for n in names], color=["#64748b", "#3b82f6", "#1d4ed8"])
    for i, n in enumerate(names):
        ax.text(i, tps[n], f"{tps[n]:.0f}", ha="center", va="bottom")
    ax.set_ylabel("output tokens/s")
    ax.set_title("demo, 5 adapters, one request list (2-core CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
