"""``loraserve plan``: its flags and its table (the numbers are :mod:`engine.plan`'s).

    loraserve plan [MODEL_DIR] [--gpu-memory 80GiB] [--dtype ...] [--quantization none|nf4]
                   [--max-lora-rank N] [--max-num-seqs N] [--max-model-len N] [--max-loras N]
                   [--num-pages N | --pool-memory BYTES] [--enforce-eager]
                   [--lora-modules NAME=PATH ...] [--pinned-lora-modules NAME ...]
                   [--ranks 8,16,32,64] [--targets q_proj,v_proj] [--adapters DIR] [--json]

The flags that decide what the engine allocates are ``serve``'s (``add_sizing_args``, and
the startup adapters: ``--lora-modules``, or the demo's without MODEL_DIR, which the pool
is sized to hold as ``serve`` sizes it); ``--gpu-memory`` stands for the device: the CUDA
device's total memory by default, required on a machine without one (unless the pool's
size is given). ``--adapters DIR`` only sizes adapters for the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from adapters.base_layout import LINEAR_TARGETS
from engine.plan import Plan, adapter_dirs_under, make_plan, parse_size
from server.engine_args import add_sizing_args, sizing_options
from server.serve_args import add_startup_adapter_args, lora_modules, pinned_modules


def _plan(args: argparse.Namespace) -> int:
    memory = parse_size(args.gpu_memory) if args.gpu_memory else None
    sized = args.num_pages is not None or args.pool_memory is not None
    if memory is None and torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(0).total_memory
    elif memory is None and not sized:
        raise ValueError("no CUDA device here: pass --gpu-memory (e.g. 80GiB) or the pool's size")
    startup = lora_modules(args)
    plan = make_plan(
        args.model_dir,
        device_memory=memory,
        device=None if memory else "cpu",
        ranks=args.ranks,
        targets=args.targets,
        adapter_dirs=adapter_dirs_under(Path(args.adapters)) if args.adapters else (),
        **sizing_options(args),
        lora_modules=startup,
        pinned_lora_modules=pinned_modules(args, startup),
    )
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(plan))
    return 0


def add_plan_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    plan = commands.add_parser(
        "plan", help="print what the engine would allocate: weights, pool, KV, adapters"
    )
    plan.add_argument(
        "model_dir", nargs="?", default=None, help="a model directory (default: the demo model)"
    )
    plan.add_argument(
        "--gpu-memory",
        default=None,
        metavar="SIZE",
        help="the GPU's total memory, e.g. 80GiB (default: the CUDA device's)",
    )
    add_sizing_args(plan)
    add_startup_adapter_args(plan)
    plan.add_argument(
        "--ranks", type=_ints, default=None, metavar="R[,R...]", help="default 8,16,32,64"
    )
    plan.add_argument(
        "--targets",
        type=lambda text: [t.strip() for t in text.split(",") if t.strip()],
        default=None,
        metavar="T[,T...]",
        help="the adapters' target layers (default: every linear layer)",
    )
    plan.add_argument("--adapters", default=None, metavar="DIR", help="PEFT adapters to size")
    plan.add_argument("--json", action="store_true", help="print the same numbers as JSON")
    plan.set_defaults(run=_plan)


def _ints(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n} B"


def _startup_lines(plan: Plan) -> list[str]:
    """The startup adapters the pool is sized for, and the floor they set."""
    p = plan.pool
    if not p.startup_adapters:
        return []
    pages = sum(a.pages for a in p.startup_adapters)
    names = ", ".join(a.name + (" (pinned)" if a.pinned else "") for a in p.startup_adapters)
    return [
        f"startup      {len(p.startup_adapters)} adapters, {pages:,} pages: {names}",
        f"             at least {p.floor_pages:,} pages: one {plan.max_model_len}-token request "
        "beside those resident at once",
    ]


def format_plan(plan: Plan) -> str:
    """The plan as a table a person reads."""
    w, p, g = plan.weights, plan.pool, plan.geometry
    lines = [
        f"model        {plan.model}: {plan.dtype}, quantization {plan.quantization}, "
        f"max_model_len {plan.max_model_len}, max_num_seqs {plan.max_num_seqs}, "
        f"decode {plan.graph_mode}",
        f"weights      {w.params:,} params, {_size(w.bytes)} ({w.bytes:,} bytes), "
        f"{w.bits_per_param:.3f} bits/param",
    ]
    if plan.tensor_parallel_size > 1:
        lines.insert(
            1,
            f"split        {plan.tensor_parallel_size} devices; the figures below are one "
            "device's: 1/N of the weights, of every page (its KV heads) and of every adapter",
        )
    if w.quantized_params:
        lines.append(
            f"  nf4        {w.quantized_params:,} params, {_size(w.quantized_bytes)}, "
            f"{w.quantized_bits_per_param:.3f} bits/param (blocksize 64, "
            + ("double quantization)" if plan.tensor_parallel_size == 1 else "scales in float32)")
        )
    if p.source == "device":
        assert p.device_memory is not None and p.weight_bytes is not None
        assert p.budget is not None and p.cap_bytes is not None
        lines += [
            f"memory       {_size(p.device_memory)} × 0.85 − weights {_size(p.weight_bytes)} "
            f"− headroom 1.00 GiB",
            f"             − decode graphs {_size(p.graph_bytes)} = {_size(p.budget)} for the pool",
        ]
        if p.cap_bytes < p.budget:
            beside = " + startup adapters" if p.startup_adapters else ""
            lines.append(
                f"             capped at {plan.max_num_seqs} sequences × {plan.max_model_len} "
                f"tokens{beside} = {_size(p.cap_bytes)}"
            )
    sources = {"num_pages": "--num-pages", "pool_memory": "--pool-memory", "cpu": "CPU default"}
    source = f"; {sources[p.source]}" if p.source in sources else ""
    lines += [
        f"pool         {p.num_pages:,} pages × {_size(p.page_bytes)} = {_size(p.pool_bytes)} "
        f"(+1 scratch page){source}",
        f"             a page: {g.num_layers} layers × {g.page_width} elements × "
        f"{g.itemsize} bytes",
        *_startup_lines(plan),
        f"KV/token     {_size(g.kv_bytes_per_token)} = 2 × {g.num_layers} layers × "
        f"{plan.num_kv_heads} KV heads × {plan.head_dim} head dim × {g.itemsize} bytes",
        f"KV only      {plan.kv_tokens:,} tokens "
        f"({plan.kv_tokens / plan.max_model_len:,.1f} full-length sequences)",
        "",
        f"{'adapter':<16}{'kind':<15}{'rank':>5}  {'targets':<14}{'pages':>9}{'size':>13}",
    ]
    for a in plan.adapters:
        every = set(a.targets) == set(LINEAR_TARGETS)
        short = ",".join(t.removesuffix("_proj") for t in a.targets) or "-"
        targets = "all-linear" if every else short
        size = _size(a.pages * p.page_bytes)
        lines.append(f"{a.name:<16}{a.kind:<15}{a.rank:>5}  {targets:<14}{a.pages:>9,}{size:>13}")
    lines += [
        "",
        "resident adapters → tokens of context that still fit (the last: the most that leave "
        "one full-length request)",
    ]
    for a in plan.adapters:
        cells = "   ".join(f"{n:>4,} → {t:>9,}" for n, t in a.fits) or "none leaves room"
        lines.append(f"{a.name:<16}{cells}")
    return "\n".join(lines)
