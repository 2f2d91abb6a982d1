"""The engine's command-line flags, shared by ``loraserve serve`` and ``loraserve generate``."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine import config as defaults
from engine.checkpoint import DTYPES, QUANTIZATIONS
from engine.config import FAIRNESS_KEYS, LOAD_FORMATS, SCHEDULING_POLICIES, EngineConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags shaped after ``vllm serve``'s: dtype, quantization, load format, limits and the
    pool's size."""
    add_sizing_args(parser)
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=defaults.DEFAULT_MAX_NUM_BATCHED_TOKENS,
        help="the tokens one step computes, prefill chunks and decodes together "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the keys and values of a prompt's leading blocks computed before under "
        "the same adapter (on by default)",
    )
    parser.add_argument(
        "--block-size",
        type=_positive,
        default=defaults.DEFAULT_BLOCK_SIZE,
        metavar="N",
        help="tokens per prefix-cache block: what is hashed and reused as one "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--scheduling-policy",
        default=defaults.DEFAULT_SCHEDULING_POLICY,
        choices=SCHEDULING_POLICIES,
        help="which waiting request runs next: fair shares between clients (the Virtual "
        "Token Counter), fcfs in arrival order, priority by the request's priority field",
    )
    parser.add_argument(
        "--fairness-key",
        default=defaults.DEFAULT_FAIRNESS_KEY,
        choices=FAIRNESS_KEYS,
        help="what the fair policy calls a client: the request's adapter, or its user field",
    )
    parser.add_argument(
        "--fairness-input-weight",
        type=_weight,
        default=defaults.DEFAULT_INPUT_TOKEN_WEIGHT,
        metavar="W",
        help="what one prompt token costs a client under the fair policy",
    )
    parser.add_argument(
        "--fairness-output-weight",
        type=_weight,
        default=defaults.DEFAULT_OUTPUT_TOKEN_WEIGHT,
        metavar="W",
        help="what one generated token costs a client under the fair policy",
    )


def add_sizing_args(parser: argparse.ArgumentParser) -> None:
    """The flags that decide what the engine allocates (``serve`` and ``plan`` share them)."""
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    parser.add_argument(
        "--quantization",
        default=None,
        choices=QUANTIZATIONS,
        help="nf4 quantizes a float checkpoint at load; by default, as the checkpoint is stored",
    )
    parser.add_argument(
        "--load-format",
        default="auto",
        choices=LOAD_FORMATS,
        help="dummy: random weights from config.json alone (no checkpoint or tokenizer needed)",
    )
    parser.add_argument(
        "--max-lora-rank",
        type=int,
        default=defaults.DEFAULT_MAX_LORA_RANK,
        help="adapters of a larger rank are refused (default %(default)s)",
    )
    parser.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=_positive,
        default=1,
        metavar="N",
        help="split the model across N worker processes, one per GPU (or N processes on the "
        "CPU): Megatron's partition of the base, S-LoRA's of the adapters",
    )
    parser.add_argument(
        "--max-resident-loras",
        type=_positive,
        default=None,
        metavar="N",
        help="the most adapters resident in the page pool at once (default "
        f"{defaults.DEFAULT_MAX_RESIDENT_LORAS}, or --max-loras if larger)",
    )
    parser.add_argument(
        "--max-loras",
        type=_positive,
        default=None,
        metavar="N",
        help="the most distinct adapters in one batch; requests past it wait for a later "
        "step (default: no cap but --max-resident-loras)",
    )
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=defaults.DEFAULT_MAX_NUM_SEQS,
        help="the most requests running at once (default %(default)s)",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="the longest prompt plus output, in tokens (default: what the model supports)",
    )
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run every step eagerly: no CUDA graphs for decode steps (a GPU captures them "
        "at start-up by default)",
    )
    parser.add_argument(
        "--cuda-graph-sizes",
        type=_sizes,
        default=(),
        metavar="N[,N...]",
        help="decode batch sizes to capture (default 1,2,4,8,16,24,32,48,64,... up to "
        "--max-num-seqs); a batch is padded up to the next one",
    )
    # Either must leave room for one --max-model-len request beside the startup adapters
    # resident at once; the default holds --max-num-seqs of them beside every startup
    # adapter, within the device's memory (engine/sizing.py).
    pool = parser.add_mutually_exclusive_group()
    pool.add_argument("--pool-memory", type=int, default=None, help="page pool size in bytes")
    pool.add_argument("--num-pages", type=int, default=None, help="page pool size in pages")


def sizing_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :meth:`EngineConfig.create` that :func:`add_sizing_args`'
    flags give (``serve`` and ``plan`` pass them alike)."""
    return {
        "dtype": args.dtype,
        "quantization": args.quantization,
        "load_format": args.load_format,
        "max_model_len": args.max_model_len,
        "num_pages": args.num_pages,
        "pool_memory": args.pool_memory,
        "max_num_seqs": args.max_num_seqs,
        "max_lora_rank": args.max_lora_rank,
        "max_loras": args.max_loras,
        "max_resident_loras": args.max_resident_loras,
        "enforce_eager": args.enforce_eager,
        "cuda_graph_sizes": args.cuda_graph_sizes,
        "tensor_parallel_size": args.tensor_parallel_size,
    }


def engine_config(
    args: argparse.Namespace,
    model_dir: str | Path | None,
    seed: int = 0,
    adapters: Sequence[tuple[str, Path]] = (),
    pinned: Sequence[str] = (),
) -> EngineConfig:
    """The engine configuration those flags describe (``ValueError`` for a bad one), with
    ``adapters`` (name, directory) to load at start-up, ``pinned`` the names of those kept
    resident: the pool is sized to hold them (``EngineConfig.create``'s ``lora_modules``)."""
    return EngineConfig.create(
        model_dir,
        **sizing_options(args),
        max_num_batched_tokens=args.max_num_batched_tokens,
        scheduling_policy=args.scheduling_policy,
        fairness_key=args.fairness_key,
        input_token_weight=args.fairness_input_weight,
        output_token_weight=args.fairness_output_weight,
        enable_prefix_caching=args.enable_prefix_caching,
        block_size=args.block_size,
        seed=seed,
        lora_modules=adapters,
        pinned_lora_modules=pinned,
    )


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of batch sizes: {text!r}") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError("batch sizes must be positive integers")
    return sizes


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number")
    return value
