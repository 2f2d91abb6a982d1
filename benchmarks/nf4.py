"""NF4 matmuls: the fused dequantize-matmul against dequantize-then-matmul and a float matmul.

    python benchmarks/nf4.py [--out DIR] [--shapes 1024x1024,4096x4096] [--batches 1,16,64]

For each weight shape (out x in) and batch size m, times x (m, in) · Wᵀ three ways, side by
side in one process:

* **dense**: ``torch.matmul`` with W in the float dtype (float32 on the CPU, bfloat16 on a
  GPU), the baseline NF4 has to beat;
* **dequantize + matmul**: ``nf4_linear_ref``, W rebuilt whole from NF4, then the matmul;
* **fused**: on a GPU, the Triton GEMV (m <= 16) / GEMM kernels that read the packed codes
  and both levels of scales (``kernels/nf4_matmul.py``); on the CPU, the row-tiled torch form
  (``nf4_linear_tiled``), which never holds the whole float weight (Triton's CPU
  interpreter is for correctness, not speed).

On a GPU it also times the linear layers of one 7B-shaped decode step (32 layers of q, k, v,
o 4096x4096, gate and up 11008x4096, down 4096x11008) in NF4 and in bfloat16. It prints a
table of milliseconds and ratios, writes ``nf4.json`` and ``nf4.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypedDict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.quantization import quantize_nf4
from kernels.nf4 import NF4Weight, nf4_linear_ref, nf4_linear_tiled
from kernels.nf4_matmul import nf4_linear

LLAMA_7B_LINEARS = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]


class MatmulRow(TypedDict):
    """One weight shape and batch size, timed three ways (milliseconds) and their ratios."""

    shape: str
    m: int
    dense_ms: float
    dequant_matmul_ms: float
    fused_ms: float
    fused_vs_dequant: float
    fused_vs_dense: float


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` runs, after warm-up."""
    for _ in range(2):
        fn()
    samples: list[float] = []
    for _ in range(repeats):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            stop = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(samples)


def bench_shape(
    shape: tuple[int, int], batches: list[int], device: torch.device, repeats: int
) -> list[MatmulRow]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fused = nf4_linear if device.type == "cuda" else nf4_linear_tiled
    dense_w = (torch.randn(shape, device=device) * 0.02).to(dtype)
    w: NF4Weight = quantize_nf4(dense_w)
    rows: list[MatmulRow] = []
    for m in batches:
        x = torch.randn(m, shape[1], device=device).to(dtype)
        with torch.inference_mode():
            dense = timed(partial(torch.matmul, x, dense_w.t()), device, repeats)
            unfused = timed(partial(nf4_linear_ref, x, w), device, repeats)
            fused_ms = timed(partial(fused, x, w), device, repeats)
        rows.append(
            {
                "shape": f"{shape[0]}x{shape[1]}",
                "m": m,
                "dense_ms": dense,
                "dequant_matmul_ms": unfused,
                "fused_ms": fused_ms,
                "fused_vs_dequant": unfused / fused_ms,
                "fused_vs_dense": dense / fused_ms,
            }
        )
        print(
            f"{shape[0]:>6}x{shape[1]:<6} m={m:<3} dense {dense:8.3f} ms  dequant+matmul "
            f"{unfused:8.3f} ms  fused {fused_ms:8.3f} ms  fused/dequant {unfused / fused_ms:5.2f}x"
            f"  fused vs dense {dense / fused_ms:5.2f}x",
            flush=True,
        )
    return rows


def decode_step(device: torch.device, batch: int, repeats: int) -> dict[str, float]:
    """The linear layers of one decode step of a 7B-shaped Llama, NF4 against bfloat16."""
    layers = [
        (torch.randn(s, device=device, dtype=torch.bfloat16) * 0.02) for s in LLAMA_7B_LINEARS
    ]
    nf4 = [quantize_nf4(w) for w in layers]
    xs = [torch.randn(batch, s[1], device=device, dtype=torch.bfloat16) for s in LLAMA_7B_LINEARS]

    def bf16_step() -> None:
        for _ in range(32):
            for x, w in zip(xs, layers, strict=True):
                x @ w.t()

    def nf4_step() -> None:
        for _ in range(32):
            for x, w in zip(xs, nf4, strict=True):
                nf4_linear(x, w)

    with torch.inference_mode():
        bf16_ms, nf4_ms = timed(bf16_step, device, repeats), timed(nf4_step, device, repeats)
    print(f"7B decode step linears, batch {batch}: bf16 {bf16_ms:.2f} ms, nf4 {nf4_ms:.2f} ms")
    return {"batch": batch, "bf16_ms": bf16_ms, "nf4_ms": nf4_ms, "speedup": bf16_ms / nf4_ms}


def plot(rows: list[MatmulRow], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape]
        ms = [r["m"] for r in mine]
        ax.plot(ms, [r["fused_vs_dense"] for r in mine], "o-", label=f"fused vs dense, {shape}")
        ax.plot(
            ms, [r["fused_vs_dequant"] for r in mine], "s--", label=f"fused vs dequant, {shape}"
        )
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (rows of x)")
    ax.set_ylabel("speed-up of the fused NF4 path (x)")
    ax.set_title(f"NF4 matmul on {device}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/nf4"))
    parser.add_argument("--shapes", default=None, help="OUTxIN,...; default by device")
    parser.add_argument("--batches", default="1,2,4,8,16,32,64")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default_shapes = "4096x4096,4096x11008" if device.type == "cuda" else "1024x1024,2048x2048"
    shapes = [
        (int(a), int(b))
        for a, b in (s.split("x") for s in (args.shapes or default_shapes).split(","))
    ]
    batches = [int(b) for b in args.batches.split(",")]
    repeats = args.repeats or (50 if device.type == "cuda" else 5)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch threads: {torch.get_num_threads()}")
    rows = [row for shape in shapes for row in bench_shape(shape, batches, device, repeats)]
    result: dict[str, object] = {"device": name, "matmuls": rows}
    if device.type == "cuda":
        result["decode_7b"] = [decode_step(device, b, max(5, repeats // 10)) for b in (1, 16)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nf4.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out / "nf4.png", name)
    print(f"wrote {args.out / 'nf4.json'} and {args.out / 'nf4.png'}")


if __name__ == "__main__":
    main()
