"""Random PEFT LoRA adapters for a base model described by its ``config.json`` alone.

Benchmarks serve hundreds or thousands of adapters on a base with dummy weights; what they
need from each adapter is its shapes, its rank and a realistic memory and loading cost, not
trained values. :func:`make_random_adapters` writes them as PEFT directories
(:func:`adapters.peft_writer.save_peft_adapter`), readable by both our loader and PEFT's
``PeftModel.from_pretrained``.

Semantics:
    adapter i has rank r_i = ranks[i % len(ranks)] and lora_alpha = 2 · r_i (scaling 2);
    on every layer and every target t of ``targets``, with t: in_t -> out_t,
        lora_A ~ N(0, 1 / in_t)  (std 1/sqrt(in_t))   (r_i, in_t)
        lora_B ~ N(0, 0.01²)     (std 0.01)           (out_t, r_i)
    drawn from a generator seeded by (seed, i), so adapter i is the same whatever n is.

Disk: a rank-64 adapter on q, k, v and o of a 7B base is 134 MB in float16, so 1000 of them
would take 134 GB. ``distinct=d`` writes only d directories and returns the n paths reusing
them round-robin (path i is directory i mod d); served under n names they are n adapters to
the server (each load is a new registry entry, host-cache entry and set of pool pages), but
they repeat d weight sets, and after the first read the OS page cache serves the files, so
disk load times are optimistic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from adapters.base_layout import LINEAR_TARGETS, BaseModelLayout
from adapters.peft_config import LoraAdapterConfig
from adapters.peft_writer import save_peft_adapter
from adapters.weights import AdapterWeights, LoraModuleWeights
from engine.arch import ModelArch

B_STD = 0.01


def make_random_adapters(
    base_config_dir: Path,
    out_dir: Path,
    n: int,
    ranks: Sequence[int],
    targets: Sequence[str],
    seed: int,
    distinct: int | None = None,
    dtype: torch.dtype = torch.float16,
) -> list[Path]:
    """Write random LoRA adapters for the base in ``base_config_dir`` (see `Semantics`).

    Args:
        base_config_dir: a directory with the base's ``config.json`` (nothing else is read).
        out_dir: where the adapter directories ``lora-0000``, ``lora-0001``, ... are written
            (existing ones are overwritten).
        n: the number of adapters.
        ranks: adapter i has rank ``ranks[i % len(ranks)]``.
        targets: the linear layers adapted, e.g. ``("q_proj", "k_proj", "v_proj", "o_proj")``.
        seed: the random seed.
        distinct: write only this many directories and reuse them round-robin; it must be a
            multiple of ``len(ranks)`` (so path i keeps rank ``ranks[i % len(ranks)]``)
            unless it is at least ``n``. None writes ``n``.
        dtype: the dtype of the saved tensors.

    Returns:
        ``n`` adapter directories, path i for adapter i.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if not ranks or any(r <= 0 for r in ranks):
        raise ValueError(f"ranks must be positive, got {list(ranks)}")
    unknown = sorted(set(targets) - set(LINEAR_TARGETS))
    if not targets or unknown:
        raise ValueError(f"targets must be among {LINEAR_TARGETS}; got {list(targets)}")
    num_dirs = n if distinct is None else min(distinct, n)
    if distinct is not None and (distinct <= 0 or (num_dirs < n and distinct % len(ranks))):
        raise ValueError(
            f"distinct must be a positive multiple of the {len(ranks)} ranks, got {distinct}"
        )
    layout = ModelArch.load(base_config_dir).layout()
    out_dir = Path(out_dir)
    base_name = Path(base_config_dir).resolve().name
    dirs = [
        _write_adapter(layout, base_name, out_dir, i, ranks[i % len(ranks)], targets, seed, dtype)
        for i in range(num_dirs)
    ]
    return [dirs[i % num_dirs] for i in range(n)]


def _write_adapter(
    layout: BaseModelLayout,
    base_name: str,
    out_dir: Path,
    index: int,
    rank: int,
    targets: Sequence[str],
    seed: int,
    dtype: torch.dtype,
) -> Path:
    """Adapter ``index``, written to ``out_dir/lora-{index:04d}``."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    modules = {}
    for layer in range(layout.num_layers):
        for target in targets:
            in_features, out_features = layout.linear_shapes[target]
            lora_a = torch.randn(rank, in_features, generator=gen) / math.sqrt(in_features)
            lora_b = torch.randn(out_features, rank, generator=gen) * B_STD
            modules[layer, target] = LoraModuleWeights(
                lora_a=lora_a.to(dtype), lora_b=lora_b.to(dtype), scaling=2.0
            )
    config = LoraAdapterConfig.from_dict(
        {"r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets)}
    )
    name = f"lora-{index:04d}"
    weights = AdapterWeights(name=name, config=config, modules=modules)
    return save_peft_adapter(weights, out_dir / name, base_model_name_or_path=base_name)
