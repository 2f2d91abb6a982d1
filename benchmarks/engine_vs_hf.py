"""loraserve's engine against transformers ``generate`` on the same prompts.

    python benchmarks/engine_vs_hf.py [--model DIR] [--num-prompts 64] [--output-len 64]

Both systems generate exactly ``output_len`` tokens per prompt (EOS ignored), greedy, in
float32 on the same machine, in one process, one after the other. transformers gets its
best case: every prompt in one left-padded batch. With no ``--model``, a random tiny Llama
(the size of the bundled demo model) is built in a temporary directory.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import LLM, SamplingParams
from tests.tiny_models import make_model


def prompts_for(num: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(8, 128))] for _ in range(num)]


def run_loraserve(model_dir: Path, prompts: list[list[int]], output_len: int) -> float:
    llm = LLM(model_dir, dtype="float32", max_num_seqs=len(prompts))
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], params)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, progress=True)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == output_len for o in outs)
    return elapsed


def run_transformers(model_dir: Path, prompts: list[list[int]], output_len: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = AutoTokenizer.from_pretrained(model_dir).pad_token_id or 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(
        max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=pad
    )
    model.generate(ids[:2], attention_mask=mask[:2], **kwargs)  # warm-up
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, **kwargs)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == width + output_len
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_model(
            Path(tmp) / "tiny",
            "llama",
            num_layers=4,
            hidden_size=128,
            intermediate_size=352,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_scaling=None,
        )
        prompts = prompts_for(args.num_prompts, 259, args.seed)
        n_in = sum(len(p) for p in prompts)
        n_out = args.num_prompts * args.output_len
        results = {
            "loraserve": run_loraserve(model_dir, prompts, args.output_len),
            "transformers generate (one padded batch)": run_transformers(
                model_dir, prompts, args.output_len
            ),
        }
    print(
        f"\n{args.num_prompts} prompts, {n_in} prompt tokens, {n_out} generated tokens, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'system':44s} {'seconds':>8s} {'req/s':>8s} {'out tok/s':>10s} {'total tok/s':>12s}")
    for name, secs in results.items():
        print(
            f"{name:44s} {secs:8.2f} {args.num_prompts / secs:8.2f} {n_out / secs:10.1f} "
            f"{(n_in + n_out) / secs:12.1f}"
        )
    base = results["transformers generate (one padded batch)"]
    print(f"loraserve / transformers throughput: {base / results['loraserve']:.2f}x")


if __name__ == "__main__":
    main()
