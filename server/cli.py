"""The ``loraserve`` command line.

    loraserve serve [MODEL_DIR] [--lora-modules NAME=PATH ...] [--host ...] [--port ...]
    loraserve generate [--model MODEL_DIR] [--dtype ...] PROMPT [PROMPT ...]
    loraserve quantize MODEL_DIR OUT_DIR [--dtype ...] [--device ...]
    loraserve merge MODEL_DIR ADAPTER_DIR OUT_DIR [--dtype ...] [--quantization none|nf4]
                    [--device ...]
    loraserve plan [MODEL_DIR] [--gpu-memory 80GiB] [--dtype ...] [--quantization none|nf4]
                   [--max-lora-rank N] [--ranks 8,16] [--targets q_proj,...] [--adapters DIR]
                   [--json]
    loraserve bench serve|sweep|make-adapters ...   (see :mod:`server.bench.cli`)

With no model ``serve`` and ``generate`` use the bundled demo model (``examples/demo/model``);
``serve`` also serves its adapters. ``serve`` is described in :mod:`server.serve`. ``merge``
writes W + scaling · B @ A for every module the adapter adapts (see :mod:`engine.export`).
``plan`` prints what the engine would allocate (see :mod:`engine.plan`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from adapters.errors import AdapterError
from engine import LLM, SamplingParams
from engine.checkpoint import resolve_dtype
from engine.export import merge_checkpoint, quantize_checkpoint
from server.bench.cli import add_bench_parser
from server.engine_args import add_engine_args, engine_config
from server.plan_cli import add_plan_parser
from server.serve_args import add_serve_args


def _serve(args: argparse.Namespace) -> int:
    from server.serve import run_serve  # the HTTP stack, imported only to serve

    return run_serve(args)


def _generate(args: argparse.Namespace) -> int:
    llm = LLM(config=engine_config(args, args.model))
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    for prompt, out in zip(args.prompts, llm.generate(args.prompts, params), strict=True):
        print(f"{prompt!r} -> {out.text!r} ({out.finish_reason})")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    model_dir, out_dir = Path(args.model_dir), Path(args.out_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir}: not a model directory (no config.json)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quantize_checkpoint(model_dir, out_dir, resolve_dtype(args.dtype, model_dir), device)
    print(f"wrote {out_dir} (nf4, double quantization, blocksize 64)")
    return 0


def _merge(args: argparse.Namespace) -> int:
    model_dir, adapter_dir, out_dir = map(Path, (args.model_dir, args.adapter_dir, args.out_dir))
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir}: not a model directory (no config.json)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(args.dtype, model_dir)
    try:
        merge_checkpoint(model_dir, adapter_dir, out_dir, dtype, args.quantization, device)
    except AdapterError as e:
        # The adapter's messages never name paths (they also reach HTTP clients); here, say which.
        raise ValueError(f"{adapter_dir}: {e.message}") from None
    stored = "nf4" if args.quantization == "nf4" else str(dtype).removeprefix("torch.")
    print(f"wrote {out_dir} ({adapter_dir.name} merged into {model_dir.name}, {stored})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraserve", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=None, help="default: INFO to serve, else WARNING")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_serve_args(serve)
    serve.set_defaults(run=_serve)

    generate = commands.add_parser("generate", help="generate text for prompts, offline")
    generate.add_argument("--model", default=None, help="a Hugging Face model directory")
    add_engine_args(generate)
    generate.add_argument("prompts", nargs="+")
    generate.add_argument("--max-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stop", action="append", default=[])
    generate.set_defaults(run=_generate)

    quantize = commands.add_parser(
        "quantize", help="write a model's NF4 checkpoint (transformers + bitsandbytes format)"
    )
    quantize.add_argument("model_dir", help="a Hugging Face model directory (float weights)")
    quantize.add_argument("out_dir")
    quantize.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights are cast to it before quantizing; the compute dtype",
    )
    quantize.add_argument("--device", default=None, help="where to quantize (default: cuda if any)")
    quantize.set_defaults(run=_quantize)

    merge = commands.add_parser(
        "merge", help="write a model with a LoRA adapter merged in (a Hugging Face directory)"
    )
    merge.add_argument("model_dir", help="a Hugging Face model directory (float or nf4)")
    merge.add_argument("adapter_dir", help="a PEFT LoRA adapter for that model")
    merge.add_argument("out_dir", help="a new (or empty) directory")
    merge.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="the written weights' dtype (the merge itself runs in float32)",
    )
    merge.add_argument(
        "--quantization",
        default="none",
        choices=["none", "nf4"],
        help="nf4: write the merged decoder's linear weights in nf4 (bitsandbytes format)",
    )
    merge.add_argument("--device", default=None, help="where to merge (default: cuda if any)")
    merge.set_defaults(run=_merge)

    add_plan_parser(commands)
    add_bench_parser(commands)

    args = parser.parse_args(argv)
    level = args.log_level or ("INFO" if args.command == "serve" else "WARNING")
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args))
    except ValueError as e:
        print(f"loraserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
