"""A tensor-parallel worker's part of the weights: the base model's and each adapter's.

Semantics (worker ``rank`` of N; ``part(n)`` = elements ``rank·n/N .. (rank+1)·n/N``):
    base, column-parallel (q, k, v, gate, up; each slice of a packed layer on its own):
        W_local = W[part(out), :]          b_local = b[part(out)]
    base, row-parallel (o, down):
        W_local = W[:, part(in)]           b_local = b on worker 0, zeros elsewhere
    embeddings and head (ceil(vocab / N) rows each, zeros past the vocabulary's end):
        E_local = E[rank·ceil(vocab/N) .. (rank+1)·ceil(vocab/N), :]
    norms: whole on every worker.
    LoRA, every target (A: (r, in), B: (out, r)):
        A_local = A[:, part(in)]           B_local = B[part(out), :]
    so that (`engine/parallel/lora.py`), for a column-parallel target, with x the whole input,
        y = Σ_workers x[:, part(in)] · A_localᵀ      (an all-reduce of (tokens, r))
        out_local += s · y · B_localᵀ                 (the worker's own output columns)
    and for a row-parallel target, with x_local = x[:, part(in)] already the worker's input,
        y = Σ_workers x_local · A_localᵀ              (an all-reduce of (tokens, r))
        partial[:, part(out)] += s · y · B_localᵀ     (summed by the base layer's all-reduce)

NF4 weights are split without re-quantizing: the 4-bit codes of the worker's part, and the
block scales of its blocks (each block must lie inside one row of the part; the scales are
kept dequantized to float32, since a part's blocks no longer form whole groups of 256 for
the second quantization level). Dequantizing a part gives exactly the same values as the
same elements of the whole weight.
"""

from __future__ import annotations

import dataclasses

import torch

from adapters.placement import Placement, TargetPlacement
from engine.parallel.group import Shard
from kernels.nf4 import NF4Weight, block_scales

ROW_PARALLEL = ("o_proj", "down_proj")
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def checkpoint_part(name: str, tensor: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Worker ``shard``'s part of the checkpoint tensor ``name`` (the tensor itself on one
    device): the loader's cut of each float tensor as it streams in."""
    if shard.size == 1:
        return tensor
    module, _, kind = name.rpartition(".")
    leaf = module.rpartition(".")[2]
    if leaf in ("embed_tokens", "lm_head"):
        rows = shard.rows(tensor.shape[0])
        part = torch.zeros(rows, *tensor.shape[1:], dtype=tensor.dtype, device=tensor.device)
        piece = tensor[shard.rank * rows : (shard.rank + 1) * rows]
        part[: piece.shape[0]] = piece
        return part
    if leaf in ROW_PARALLEL:
        if kind == "bias":
            return tensor if shard.rank == 0 else torch.zeros_like(tensor)
        return tensor[:, shard.part(tensor.shape[1])]
    if leaf in COLUMN_PARALLEL:
        return tensor[shard.part(tensor.shape[0])]
    return tensor  # norms: whole on every worker


def nf4_part(module: str, weight: NF4Weight, shard: Shard) -> NF4Weight:
    """Worker ``shard``'s part of checkpoint module ``module``'s NF4 weight."""
    if shard.size == 1:
        return weight
    out_features, in_features = weight.shape
    if module.rpartition(".")[2] in ROW_PARALLEL:
        return shard_nf4(weight, cols=shard.part(in_features))
    return shard_nf4(weight, rows=shard.part(out_features))


def shard_nf4(w: NF4Weight, rows: slice | None = None, cols: slice | None = None) -> NF4Weight:
    """The elements ``[rows, cols]`` of an NF4 weight, as an NF4 weight of their own: the same
    codes, and each of their blocks' scale in float32 (see the module's Semantics).

    Raises:
        ValueError: a block would straddle the part's edge (the blocksize must divide the
            input features and the part's column bounds).
    """
    out_features, in_features = w.shape
    rows = rows or slice(0, out_features)
    cols = cols or slice(0, in_features)
    bs = w.blocksize
    if in_features % bs or cols.start % bs or cols.stop % bs:
        raise ValueError(
            f"an NF4 weight {w.shape} splits into parts of whole {bs}-value blocks only: "
            f"columns {cols.start}..{cols.stop} do not"
        )
    high, low = w.packed >> 4, w.packed & 0x0F
    codes = torch.stack((high, low), dim=1).view(-1)[: w.numel].view(out_features, in_features)
    part = codes[rows, cols].reshape(-1)
    packed = (part[0::2] << 4) | part[1::2]
    scales = block_scales(w).view(out_features, in_features // bs)
    part_scales = scales[rows, cols.start // bs : cols.stop // bs].reshape(-1).contiguous()
    shape = (rows.stop - rows.start, cols.stop - cols.start)
    return NF4Weight(packed.contiguous(), part_scales, w.code, shape, bs)


def shard_placement(placement: Placement, shard: Shard) -> Placement:
    """The worker's part of an adapter's rows: A split along its input, B along its output
    (the page tables are the same on every worker; a part's rows are 1/N as wide, as are
    the pages they go into)."""
    if placement.blocks:
        raise ValueError("adapters with more than LoRA matrices are not split across workers")
    return dataclasses.replace(
        placement, targets=tuple(_shard_target(t, shard) for t in placement.targets)
    )


def _shard_target(target: TargetPlacement, shard: Shard) -> TargetPlacement:
    ins, outs = shard.part(target.in_features), shard.part(target.out_features)
    return dataclasses.replace(
        target,
        lora_a=tuple(None if a is None else a[:, ins].contiguous() for a in target.lora_a),
        lora_b=tuple(None if b is None else b[outs].contiguous() for b in target.lora_b),
        in_features=ins.stop - ins.start,
        out_features=outs.stop - outs.start,
    )
