"""loraserve's engine against transformers ``generate`` on the same prompts.

    python benchmarks/engine_vs_hf.py [--model DIR] [--num-prompts 64] [--output-len 64]

Every request has a planned output length, and both systems generate exactly that many tokens
for it (EOS ignored), greedy, in float32, in one process, one after the other. Two workloads:

* ``fixed``: every request wants ``output_len`` tokens: transformers' best case, one
  left-padded batch with no wasted decode steps;
* ``varied``: each request wants a length drawn uniformly from [output_len / 8, output_len]
  (seeded), as real traffic does; ``generate`` must run its batch to the longest request
  and discard the rest, while continuous batching retires each request when it is done.

Throughput counts only the planned tokens. With no ``--model``, the model is
``benchmarks/presets/tiny`` (the bundled demo model's shape, no weights): a directory without
weights gets the engine's dummy weights (``engine.dummy``) in both systems, the same model.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import LLM, SamplingParams
from engine.dummy import init_dummy_weights, init_std

TINY_PRESET = Path(__file__).resolve().parent / "presets" / "tiny"


def has_weights(model_dir: Path) -> bool:
    return any(model_dir.glob("*.safetensors"))


def make_workload(
    num: int, vocab: int, output_len: int, varied: bool, seed: int
) -> tuple[list[list[int]], list[int]]:
    """Seeded prompts (8 to 128 tokens) and each request's planned output length."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(8, 128))] for _ in range(num)]
    lengths = [
        rng.randint(max(1, output_len // 8), output_len) if varied else output_len
        for _ in range(num)
    ]
    return prompts, lengths


def run_loraserve(model_dir: Path, prompts: list[list[int]], lengths: list[int]) -> float:
    load_format = "auto" if has_weights(model_dir) else "dummy"
    llm = LLM(model_dir, dtype="float32", max_num_seqs=len(prompts), load_format=load_format)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    llm.generate(prompts[:2], params[:2])  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert [len(o.token_ids) for o in outs] == lengths
    return elapsed


def hf_model(model_dir: Path) -> Any:
    """transformers' model; one without weights gets the engine's dummy weights (seed 0)."""
    if has_weights(model_dir):
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return hf.eval()  # type: ignore[no-untyped-call]
    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    init_dummy_weights(model, init_std(config), seed=0)
    return model.eval()


def run_transformers(model_dir: Path, prompts: list[list[int]], lengths: list[int]) -> float:
    """One left-padded batch run to the longest planned length; extra tokens are discarded."""
    model = hf_model(model_dir)
    pad = model.config.pad_token_id or 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    longest = max(lengths)
    kwargs = {
        "max_new_tokens": longest,
        "min_new_tokens": longest,
        "do_sample": False,
        "pad_token_id": pad,
    }
    with torch.inference_mode():
        model.generate(ids[:2], attention_mask=mask[:2], **kwargs)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, **kwargs)
        elapsed = time.perf_counter() - start
    assert out.shape[1] == width + longest
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=TINY_PRESET)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}, float32, greedy")
    print(
        f"{'workload':9s} {'system':24s} {'seconds':>8s} {'req/s':>7s} {'out tok/s':>10s} "
        f"{'total tok/s':>12s}"
    )
    model_dir = args.model
    for workload in ("fixed", "varied"):
        prompts, lengths = make_workload(
            args.num_prompts, 259, args.output_len, workload == "varied", args.seed
        )
        n_in, n_out = sum(len(p) for p in prompts), sum(lengths)
        secs = {
            "loraserve": run_loraserve(model_dir, prompts, lengths),
            "transformers generate": run_transformers(model_dir, prompts, lengths),
        }
        for name, t in secs.items():
            print(
                f"{workload:9s} {name:24s} {t:8.2f} {len(prompts) / t:7.2f} "
                f"{n_out / t:10.1f} {(n_in + n_out) / t:12.1f}"
            )
        ratio = secs["transformers generate"] / secs["loraserve"]
        print(
            f"{workload:9s} loraserve / transformers throughput: {ratio:.2f}x "
            f"({len(prompts)} requests, {n_in} prompt + {n_out} generated tokens)"
        )


if __name__ == "__main__":
    main()
