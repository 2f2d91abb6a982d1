"""W1: the LoRA shrink and expand ops against S-LoRA's "gather + padded bmm" ablation.

    python benchmarks/lora_kernels.py [--out DIR] [--batches 1,3,7,64] [--smoke]

Each case is a form (BGMV: a decode batch, one token per request; SGMV: prefill segments of
``--prefill-len`` tokens), a batch size, an adapter popularity (W1: distinct,
uniform over ⌈√n⌉ adapters, zipf-1.5, identical, skewed), a rank set (8, 16, 32, 64, or
"mixed": 64/32/16/8 round-robin over adapters, so one batch mixes ranks) and an output width
(4096: q/k/v/o; 11008: gate/up; the input is hidden 4096). The adapters sit in shuffled pages
of one pool shared with garbage (KV) pages, and page tables index them, as in the engine and
``tests/kernels/test_lora.py``. Every token has an adapter. Two implementations, side by side:

* **kernel**: ``lora_{shrink,expand}_{bgmv,sgmv}`` (Triton on a GPU; on the CPU the torch
  references, or the Triton kernels under ``TRITON_INTERPRET=1``);
* **baseline**, the same math as gather + padded bmm: the batch's distinct adapters are
  gathered from their pages into a contiguous stack zero-padded to the batch's largest rank
  ``(adapters, max_rank, features)``, indexed per request, and multiplied with one ``bmm``
  in the model dtype. Its metadata (distinct adapters, each request's index) is prepared
  before timing, as a scheduler would, so it never syncs.

Outputs are checked against each other before timing (llm.c's rule). On a GPU each op is
timed with ``torch.cuda.Event`` pairs, L2 flushed and the GPU kept busy by a sleep kernel
before each repeat (so CPU launch overhead is not counted), and the median taken; on the CPU
with ``time.perf_counter``. Prints a table, writes ``lora_kernels.json`` (every case, with
baseline / kernel ratios) and ``lora_kernels.png`` into ``--out``. ``--smoke`` runs tiny
shapes in seconds (the default without a GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kernels import lora
from kernels.lora_layout import num_chunks, write_rows
from kernels.triton_utils import can_launch_triton

POPULARITIES = ("distinct", "uniform", "zipf", "identical", "skewed")
MIXED_RANKS = (64, 32, 16, 8)
GARBAGE_PAGES = 256  # pages of other tenants (the KV cache) interleaved with the adapters'
FLUSH_BYTES = 256 << 20  # more than an H100's / H200's 50-60 MB of L2
SLEEP_CYCLES = 400_000  # ~0.2 ms at 2 GHz: longer than launching any op timed here


@dataclass(frozen=True)
class Shape:
    in_features: int
    out_features: tuple[int, ...]
    page_width: int  # num_kv_heads * head_dim: 4096 for Llama-2-7B


GPU_SHAPE = Shape(4096, (4096, 11008), 4096)
SMOKE_SHAPE = Shape(64, (96,), 48)  # a page width dividing neither feature size


@dataclass
class Case:
    """One batch's tensors: the ops' inputs and the baseline's prepared metadata."""

    x: Tensor  # (num_tokens, in_features)
    base_out: Tensor  # (num_tokens, out_features)
    pool: Tensor  # (num_pages, page_width)
    a_pages: Tensor  # int32 (num_slots, max_rank, chunks(in))
    b_pages: Tensor  # int32 (num_slots, max_rank, chunks(out))
    ranks: Tensor  # int32 (num_slots,)
    scalings: Tensor  # float32 (num_slots,)
    token_adapters: Tensor  # int32 (num_tokens,)
    seg_starts: Tensor  # int32 (num_segments + 1,)
    seg_adapters: Tensor  # int32 (num_segments,)
    seg_len: int  # every segment has this many tokens (1 for BGMV)
    max_rank: int
    # baseline metadata
    batch_adapters: Tensor  # int64 (num_distinct,): the distinct adapters of the batch
    seg_slot: Tensor  # int64 (num_segments,): each segment's index into batch_adapters
    rank_mask: Tensor  # (num_distinct, max_rank, 1) in x's dtype: 1 for rows < the rank
    seg_scaling: Tensor  # (num_segments, 1, 1) in x's dtype


def popularity(kind: str, n: int, rng: random.Random) -> list[int]:
    """Each request's adapter id (W1's popularity patterns)."""
    if kind == "distinct":
        return list(range(n))
    if kind == "uniform":
        return [rng.randrange(math.ceil(math.sqrt(n))) for _ in range(n)]
    if kind == "zipf":  # zipf-1.5 over n adapters
        return rng.choices(range(n), [1 / (i + 1) ** 1.5 for i in range(n)], k=n)
    if kind == "identical":
        return [0] * n
    assert kind == "skewed", kind  # one dominant adapter and a few rare ones
    return [0 if rng.random() < 0.8 else rng.randrange(1, 6) for _ in range(n)]


def make_case(
    adapters: list[int],
    rank_of: Callable[[int], int],
    seg_len: int,
    shape: Shape,
    out_features: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
) -> Case:
    """A batch of ``len(adapters)`` segments of ``seg_len`` tokens, segment i on adapter
    ``adapters[i]``; only the adapters used get pages."""
    gen = torch.Generator(device=device).manual_seed(seed)
    used = sorted(set(adapters))
    num_slots = max(used) + 1
    ranks = [rank_of(a) for a in range(num_slots)]
    max_rank = max(ranks[a] for a in used)
    width = shape.page_width
    a_chunks, b_chunks = num_chunks(shape.in_features, width), num_chunks(out_features, width)
    num_pages = sum(ranks[a] * (a_chunks + b_chunks) for a in used) + GARBAGE_PAGES
    pool = torch.randn(num_pages, width, generator=gen, device=device).to(dtype)
    free = torch.randperm(num_pages, generator=gen, device=device)
    a_pages = torch.zeros(num_slots, max_rank, a_chunks, dtype=torch.int32, device=device)
    b_pages = torch.zeros(num_slots, max_rank, b_chunks, dtype=torch.int32, device=device)
    taken = 0
    for a in used:
        r = ranks[a]
        lora_a = torch.randn(r, shape.in_features, generator=gen, device=device)
        lora_b_t = torch.randn(r, out_features, generator=gen, device=device)  # Bᵀ rows
        for pages, rows, chunks in (
            (a_pages, lora_a / math.sqrt(shape.in_features), a_chunks),
            (b_pages, lora_b_t / math.sqrt(r), b_chunks),
        ):
            ids = free[taken : taken + r * chunks].view(r, chunks).to(torch.int32)
            taken += r * chunks
            pages[a, :r] = ids
            write_rows(pool, ids, rows)
    num_tokens = len(adapters) * seg_len
    int32 = partial(torch.tensor, dtype=torch.int32, device=device)
    long = partial(torch.tensor, dtype=torch.int64, device=device)
    slot_of = {a: i for i, a in enumerate(used)}
    rank_mask = (
        torch.arange(max_rank, device=device)[None, :] < long([ranks[a] for a in used])[:, None]
    )
    scaling = 2.0  # alpha = 2 * rank
    return Case(
        x=torch.randn(num_tokens, shape.in_features, generator=gen, device=device).to(dtype),
        base_out=torch.randn(num_tokens, out_features, generator=gen, device=device).to(dtype),
        pool=pool,
        a_pages=a_pages,
        b_pages=b_pages,
        ranks=int32(ranks),
        scalings=torch.full((num_slots,), scaling, device=device),
        token_adapters=int32([a for a in adapters for _ in range(seg_len)]),
        seg_starts=int32([i * seg_len for i in range(len(adapters) + 1)]),
        seg_adapters=int32(adapters),
        seg_len=seg_len,
        max_rank=max_rank,
        batch_adapters=long(used),
        seg_slot=long([slot_of[a] for a in adapters]),
        rank_mask=rank_mask[:, :, None].to(dtype),  # (num_distinct, max_rank, 1)
        seg_scaling=torch.full((len(adapters), 1, 1), scaling, device=device, dtype=dtype),
    )


# ----------------------------------------------------------------------------------------------
# The baseline: gather + padded bmm
# ----------------------------------------------------------------------------------------------


def gather_stack(c: Case, pages: Tensor, features: int) -> Tensor:
    """(num_distinct, max_rank, features): the batch's adapters, contiguous, zero-padded."""
    table = pages.index_select(0, c.batch_adapters)  # (num_distinct, max_rank, chunks)
    rows = c.pool.index_select(0, table.reshape(-1))  # (num_distinct * max_rank * chunks, W)
    stacked = rows.view(table.shape[0], c.max_rank, -1)[:, :, :features]
    return stacked * c.rank_mask  # rows past each adapter's rank are padding: zero them


def baseline_shrink(c: Case) -> Tensor:
    """y = x · Aᵀ: (num_tokens, max_rank) float32."""
    lora_a = gather_stack(c, c.a_pages, c.x.shape[1]).index_select(0, c.seg_slot)  # (S, r, in)
    x = c.x.view(c.seg_slot.shape[0], c.seg_len, -1)  # (S, seg_len, in)
    return torch.bmm(x, lora_a.transpose(1, 2)).view(c.x.shape[0], c.max_rank).float()


def baseline_expand(c: Case, y: Tensor, out: Tensor) -> None:
    """out += scaling · y · Bᵀ, in place."""
    lora_b_t = gather_stack(c, c.b_pages, out.shape[1]).index_select(0, c.seg_slot)  # (S, r, out)
    y_in = y.to(out.dtype).view(c.seg_slot.shape[0], c.seg_len, c.max_rank)  # (S, seg_len, r)
    delta = torch.bmm(y_in, lora_b_t) * c.seg_scaling  # (S, seg_len, out)
    out += delta.view(out.shape)


# ----------------------------------------------------------------------------------------------
# The ops under test
# ----------------------------------------------------------------------------------------------


def kernel_ops(
    c: Case, form: str, triton: bool
) -> tuple[Callable[[], Tensor], Callable[[Tensor, Tensor], None]]:
    """(shrink() -> y, expand(y, out)) for the case, Triton or the torch references."""
    if form == "bgmv":
        shrink_bgmv = lora.lora_shrink_bgmv if triton else lora.lora_shrink_bgmv_ref
        expand_bgmv = lora.lora_expand_bgmv if triton else lora.lora_expand_bgmv_ref
        shrink = partial(shrink_bgmv, c.x, c.pool, c.a_pages, c.ranks, c.token_adapters, c.max_rank)

        def expand_tokens(y: Tensor, out: Tensor) -> None:
            expand_bgmv(y, c.pool, c.b_pages, c.ranks, c.scalings, c.token_adapters, out)

        return shrink, expand_tokens
    shrink_sgmv = lora.lora_shrink_sgmv if triton else lora.lora_shrink_sgmv_ref
    expand_sgmv = lora.lora_expand_sgmv if triton else lora.lora_expand_sgmv_ref
    shrink = partial(
        shrink_sgmv,
        c.x,
        c.pool,
        c.a_pages,
        c.ranks,
        c.seg_starts,
        c.seg_adapters,
        c.max_rank,
        c.seg_len,
    )

    def expand_segments(y: Tensor, out: Tensor) -> None:
        expand_sgmv(
            y, c.pool, c.b_pages, c.ranks, c.scalings, c.seg_starts, c.seg_adapters, out, c.seg_len
        )

    return shrink, expand_segments


class Timer:
    """Median milliseconds of a callable (see the module docstring for the method)."""

    def __init__(self, device: torch.device, repeats: int, warmup: int) -> None:
        self.device, self.repeats, self.warmup = device, repeats, warmup
        cuda = device.type == "cuda"
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device) if cuda else None
        self.sleep = getattr(torch.cuda, "_sleep", None) if cuda else None

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        if self.flush is None:
            samples = []
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                fn()
                samples.append(1e3 * (time.perf_counter() - t0))
            return statistics.median(samples)
        torch.cuda.synchronize()
        events = []
        for _ in range(self.repeats):
            self.flush.zero_()
            if self.sleep is not None:
                self.sleep(SLEEP_CYCLES)
            start, stop = (
                torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                for _ in range(2)
            )
            start.record()
            fn()
            stop.record()
            events.append((start, stop))
        torch.cuda.synchronize()
        elapsed: list[float] = [s.elapsed_time(e) for s, e in events]
        return statistics.median(elapsed)


def run_case(c: Case, form: str, triton: bool, timer: Timer, tol: float) -> dict[str, float]:
    shrink, expand = kernel_ops(c, form, triton)
    # Validate first: both implementations compute the same y and the same out.
    y = shrink()
    torch.testing.assert_close(y, baseline_shrink(c), atol=tol, rtol=tol)
    out, expected = c.base_out.clone(), c.base_out.clone()
    expand(y, out)
    baseline_expand(c, y, expected)
    torch.testing.assert_close(out.float(), expected.float(), atol=3 * tol, rtol=tol)
    out = c.base_out.clone()  # the timed expands accumulate into it; its values don't matter
    times = {
        "shrink_ms": timer(shrink),
        "expand_ms": timer(lambda: expand(y, out)),
        "baseline_shrink_ms": timer(lambda: baseline_shrink(c)),
        "baseline_expand_ms": timer(lambda: baseline_expand(c, y, out)),
    }
    times["shrink_ratio"] = times["baseline_shrink_ms"] / times["shrink_ms"]
    times["expand_ratio"] = times["baseline_expand_ms"] / times["expand_ms"]
    kernel = times["shrink_ms"] + times["expand_ms"]
    times["ratio"] = (times["baseline_shrink_ms"] + times["baseline_expand_ms"]) / kernel
    return times


def rank_sets(names: list[str]) -> dict[str, Callable[[int], int]]:
    """Rank-set label -> adapter id -> rank."""
    sets: dict[str, Callable[[int], int]] = {}
    for name in names:
        if name == "mixed":
            sets[name] = lambda a: MIXED_RANKS[a % len(MIXED_RANKS)]
        else:
            sets[name] = partial(lambda r, _a: r, int(name))
    return sets


def plot(rows: list[dict[str, Any]], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    form, out_features = rows[0]["form"], rows[0]["out_features"]  # BGMV unless --forms says
    bgmv = [r for r in rows if r["form"] == form and r["out_features"] == out_features]
    ranks = list(dict.fromkeys(r["ranks"] for r in bgmv))
    rank = "16" if "16" in ranks else ranks[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for pop in dict.fromkeys(r["popularity"] for r in bgmv):
        mine = [r for r in bgmv if r["popularity"] == pop and r["ranks"] == rank]
        us = [1e3 * (r["shrink_ms"] + r["expand_ms"]) for r in mine]
        left.plot([r["batch"] for r in mine], us, "o-", label=pop)
    in_features = rows[0]["in_features"]
    left.set_title(f"{form.upper()} shrink + expand, rank {rank}, {in_features} -> {out_features}")
    left.set_ylabel("µs (median)")
    for name in ranks:
        mine = [r for r in bgmv if r["popularity"] == "distinct" and r["ranks"] == name]
        right.plot(
            [r["batch"] for r in mine], [r["ratio"] for r in mine], "o-", label=f"rank {name}"
        )
    right.axhline(1.0, color="gray", lw=0.8)
    right.set_title("gather + padded bmm time / kernel time, distinct adapters")
    right.set_ylabel("baseline / kernel (x)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (requests)")
        ax.legend(fontsize=7)
    fig.suptitle(f"LoRA ops on {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lora_kernels"))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (default on a CPU)")
    parser.add_argument("--batches", default=None, help="default 1,2,3,4,7,8,16,32,33,64")
    parser.add_argument("--popularities", default=",".join(POPULARITIES))
    parser.add_argument("--ranks", default=None, help="rank sets; default 8,16,32,64,mixed")
    parser.add_argument("--forms", default="bgmv,sgmv")
    parser.add_argument("--prefill-len", type=int, default=None, help="SGMV segment length")
    parser.add_argument("--sgmv-max-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    shape = SMOKE_SHAPE if smoke else GPU_SHAPE
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    triton = can_launch_triton(device)
    batches = [
        int(b)
        for b in (args.batches or ("1,3,7" if smoke else "1,2,3,4,7,8,16,32,33,64")).split(",")
    ]
    ranks = rank_sets((args.ranks or ("8,16,mixed" if smoke else "8,16,32,64,mixed")).split(","))
    prefill_len = args.prefill_len or (3 if smoke else 64)
    interpreted = triton and device.type == "cpu"  # Triton's interpreter: slow, 1 repeat
    repeats = args.repeats or (1 if interpreted else 2 if smoke else 20)
    timer = Timer(device, repeats, warmup=0 if interpreted else 1 if smoke else 3)
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    impl = "triton" if triton else "torch references"
    print(f"device: {name}, kernels: {impl}, {dtype}, in {shape.in_features}, ", end="")
    print(f"page width {shape.page_width}, {repeats} repeats")
    print(
        f"{'form':5} {'out':>6} {'batch':>5} {'popularity':10} {'ranks':>5} {'adapters':>8} "
        f"{'shrink µs':>10} {'expand µs':>10} {'base µs':>9} {'base/kernel':>11}"
    )
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with torch.inference_mode():
        for form in args.forms.split(","):
            seg_len = 1 if form == "bgmv" else prefill_len
            for out_features in shape.out_features:
                for batch in batches:
                    if form == "sgmv" and batch > args.sgmv_max_batch:
                        continue
                    for pop in args.popularities.split(","):
                        adapters = popularity(pop, batch, random.Random(args.seed + batch))
                        for label, rank_of in ranks.items():
                            c = make_case(
                                adapters, rank_of, seg_len, shape, out_features, dtype, device,
                                args.seed,
                            )  # fmt: skip
                            t = run_case(c, form, triton, timer, tol)
                            row = {
                                "form": form, "in_features": shape.in_features,
                                "out_features": out_features, "batch": batch,
                                "tokens": batch * seg_len, "popularity": pop, "ranks": label,
                                "num_adapters": len(set(adapters)), "max_rank": c.max_rank, **t,
                            }  # fmt: skip
                            rows.append(row)
                            base_us = 1e3 * (t["baseline_shrink_ms"] + t["baseline_expand_ms"])
                            print(
                                f"{form:5} {out_features:>6} {batch:>5} {pop:10} {label:>5} "
                                f"{row['num_adapters']:>8} {1e3 * t['shrink_ms']:>10.1f} "
                                f"{1e3 * t['expand_ms']:>10.1f} {base_us:>9.1f} "
                                f"{t['ratio']:>10.2f}x",
                                flush=True,
                            )
    summary = {
        f"{form} out={o}": statistics.geometric_mean(
            r["ratio"] for r in rows if r["form"] == form and r["out_features"] == o
        )
        for form in dict.fromkeys(r["form"] for r in rows)
        for o in shape.out_features
        if any(r["form"] == form and r["out_features"] == o for r in rows)
    }
    for key, ratio in summary.items():
        print(f"geometric mean of baseline / kernel, {key}: {ratio:.2f}x")
    punica = [
        r for r in rows
        if (r["form"], r["batch"], r["popularity"], r["ranks"]) == ("bgmv", 64, "distinct", "16")
    ]  # fmt: skip
    for r in punica:  # Punica: ~75 µs for its LoRA op at batch 64, distinct rank-16 adapters
        us = 1e3 * (r["shrink_ms"] + r["expand_ms"])
        print(f"batch 64, distinct rank-16 adapters, out {r['out_features']}: {us:.1f} µs")
    result = {
        "device": name, "kernels": impl, "dtype": str(dtype), "page_width": shape.page_width,
        "repeats": repeats, "seconds": time.perf_counter() - started,
        "geomean_baseline_over_kernel": summary, "cases": rows,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_kernels.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, args.out / "lora_kernels.png", name)
    print(f"wrote {args.out / 'lora_kernels.json'} and {args.out / 'lora_kernels.png'}")


if __name__ == "__main__":
    main()
