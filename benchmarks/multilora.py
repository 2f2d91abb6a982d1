"""Multi-LoRA serving throughput on CPU: loraserve against the PEFT baselines (S-LoRA's W2).

    python benchmarks/multilora.py [--num-requests 128] [--adapters 1,8,64] [--out DIR]

One seeded request list of S-LoRA's synthetic shape, scaled down for a 2-core CPU and a tiny
model: each request's adapter is floor(n · X) with X ~ power(α); input and output lengths are
uniform in [8, 64); arrival times come from a Gamma process (rate R, coefficient of variation
cv). The list is replayed offline (every request queued at once) through three systems, in one
process, one after another, each generating exactly the planned output lengths (EOS ignored),
greedy, float32:

* **loraserve**: every adapter loaded; continuous batching of the mixed-adapter queue;
* **PEFT server**: the queue grouped by adapter into padded static batches (up to
  ``--batch-size``), ``set_adapter`` between batches, each batch run to its longest request;
* **PEFT mixed batches**: arrival-order padded batches with ``generate(adapter_names=...)``.

It prints req/s and generated tok/s per system and n, the ratios, the LoRA scaling
throughput(n = max) / throughput(n = 1), writes ``results.json`` and ``multilora.png``.
Adapters are random (ranks 4, 8, 16 round-robin, on q, k, v, o) on a random tiny Llama the
size of the bundled demo model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import LLM, SamplingParams
from tests.tiny_models import make_demo_sized_model, write_random_adapter

RANKS = (4, 8, 16)


@dataclass(frozen=True)
class Request:
    arrival: float
    adapter: int
    prompt: list[int]
    output_len: int


def w2_requests(
    num: int, num_adapters: int, alpha: float, rate: float, cv: float, seed: int
) -> list[Request]:
    """S-LoRA's synthetic workload: power-law adapter choice, Gamma arrivals."""
    rng = np.random.default_rng(seed)
    shape = 1.0 / cv**2
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=num)
    adapters = np.minimum((num_adapters * rng.power(alpha, size=num)).astype(int), num_adapters - 1)
    inputs = rng.integers(8, 64, size=num)
    outputs = rng.integers(8, 64, size=num)
    return [
        Request(
            float(t), int(a), [int(x) for x in rng.integers(3, 259, size=int(n_in))], int(n_out)
        )
        for t, a, n_in, n_out in zip(np.cumsum(gaps), adapters, inputs, outputs, strict=True)
    ]


def run_loraserve(base: Path, adapters: list[Path], requests: list[Request], batch: int) -> float:
    llm = LLM(base, dtype="float32", max_num_seqs=batch)
    for i, path in enumerate(adapters):
        llm.engine.load_lora(f"a{i}", path)
    warm = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    llm.generate([[5, 6, 7]], warm)
    start = time.perf_counter()
    for r in requests:
        params = SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
        llm.engine.add_request(r.prompt, params, lora=f"a{r.adapter}")
    generated = 0
    while llm.engine.has_unfinished():
        generated += sum(len(o.token_ids) for o in llm.engine.step() if o.finished)
    elapsed = time.perf_counter() - start
    assert generated == sum(r.output_len for r in requests)
    return elapsed


def peft_model(base: Path, adapters: list[Path]) -> PeftModel:
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(hf, adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    return model.eval()


def padded_generate(model: PeftModel, batch: list[Request], **kwargs: object) -> None:
    width = max(len(r.prompt) for r in batch)
    ids = torch.tensor([[0] * (width - len(r.prompt)) + r.prompt for r in batch])
    mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch])
    longest = max(r.output_len for r in batch)
    model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=longest,
        min_new_tokens=longest,
        do_sample=False,
        pad_token_id=0,
        **kwargs,
    )


def run_peft_server(model: PeftModel, requests: list[Request], batch: int) -> float:
    """Requests grouped by adapter (in order of first arrival) into static padded batches."""
    groups: dict[int, list[Request]] = {}
    for r in requests:
        groups.setdefault(r.adapter, []).append(r)
    start = time.perf_counter()
    with torch.inference_mode():
        for adapter, group in groups.items():
            model.set_adapter(f"a{adapter}")
            for i in range(0, len(group), batch):
                padded_generate(model, group[i : i + batch])
    return time.perf_counter() - start


def run_peft_mixed(model: PeftModel, requests: list[Request], batch: int) -> float:
    """Arrival-order padded batches, each request with its own adapter (adapter_names)."""
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(requests), batch):
            chunk = requests[i : i + batch]
            padded_generate(model, chunk, adapter_names=[f"a{r.adapter}" for r in chunk])
    return time.perf_counter() - start


def plot(results: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for system in ("loraserve", "PEFT mixed batches", "PEFT server"):
        rows = [r for r in results if r["system"] == system]
        ax.plot([r["n"] for r in rows], [r["tok_per_s"] for r in rows], marker="o", label=system)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("number of adapters n")
    ax.set_ylabel("generated tokens / s")
    ax.set_title("Multi-LoRA throughput (S-LoRA W2 scaled down), tiny Llama, CPU", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--adapters", default="1,8,64")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--cv", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/multilora"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ns = [int(n) for n in args.adapters.split(",")]
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = make_demo_sized_model(root / "base")
        attn = {
            "q_proj": (128, 128),
            "k_proj": (128, 64),
            "v_proj": (128, 64),
            "o_proj": (128, 128),
        }
        paths = [
            write_random_adapter(
                root / f"a{i}", attn, 4, r=RANKS[i % 3], alpha=16, seed=i, std=0.05
            )
            for i in range(max(ns))
        ]
        for n in ns:
            requests = w2_requests(args.num_requests, n, args.alpha, args.rate, args.cv, args.seed)
            (args.out / f"requests_n{n}.json").write_text(json.dumps([asdict(r) for r in requests]))
            tokens = sum(r.output_len for r in requests)
            model = peft_model(base, paths[:n])
            secs = {
                "loraserve": run_loraserve(base, paths[:n], requests, args.batch_size),
                "PEFT mixed batches": run_peft_mixed(model, requests, args.batch_size),
                "PEFT server": run_peft_server(model, requests, args.batch_size),
            }
            for system, s in secs.items():
                results.append(
                    {
                        "system": system,
                        "n": n,
                        "seconds": s,
                        "req_per_s": len(requests) / s,
                        "tok_per_s": tokens / s,
                    }
                )
                print(
                    f"n={n:3d} {system:20s} {s:7.2f} s {len(requests) / s:7.2f} req/s "
                    f"{tokens / s:8.1f} tok/s",
                    flush=True,
                )
            server, mixed = secs["PEFT server"], secs["PEFT mixed batches"]
            print(
                f"n={n:3d} loraserve vs PEFT server {server / secs['loraserve']:.2f}x, "
                f"vs PEFT mixed {mixed / secs['loraserve']:.2f}x",
                flush=True,
            )
    tput = {(r["system"], r["n"]): r["tok_per_s"] for r in results}
    scaling = tput[("loraserve", max(ns))] / tput[("loraserve", min(ns))]  # type: ignore[operator]
    print(f"loraserve throughput(n={max(ns)}) / throughput(n={min(ns)}): {scaling:.2f}")
    (args.out / "results.json").write_text(
        json.dumps(
            {"results": results, "scaling": scaling, "args": vars(args) | {"out": str(args.out)}},
            indent=1,
        )
    )
    plot(results, args.out / "multilora.png")
    print(f"wrote {args.out}/results.json and multilora.png")


if __name__ == "__main__":
    main()
