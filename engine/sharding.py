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
    so that (`engine/sharded_lora.py`), for a column-parallel target, with x the whole input,
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
from collections.abc import Sequence

import torch
from torch import nn

from adapters.placement import Placement, TargetPlacement
from engine.model import CausalLM
from engine.packed import PackedLinear
from engine.parallel import Shard
from engine.quantization import NF4Linear, PackedNF4Linear
from kernels.nf4 import NF4Weight, block_scales

ROW_PARALLEL = ("o_proj", "down_proj")
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def shard_model(full: CausalLM, local: CausalLM, shard: Shard) -> None:
    """Copy worker ``shard``'s part of every weight of ``full`` into ``local`` (a model built
    with that worker's collectives, materialised on its device)."""
    full_modules = dict(full.named_modules())
    with torch.no_grad():
        for name, module in local.named_modules():
            source = full_modules[name]
            leaf = name.rpartition(".")[2]
            if isinstance(module, PackedNF4Linear):
                assert isinstance(source, PackedNF4Linear)
                for part in module.slices.names:
                    weight = source.part(part).weight
                    assert weight is not None
                    module.part(part).set_weight(
                        shard_nf4(weight, rows=shard.part(weight.shape[0])).to(_device(module))
                    )
                _copy_packed_bias(module.bias, source.bias, source.slices.widths, shard)
            elif isinstance(module, PackedLinear):
                assert isinstance(source, PackedLinear)
                _copy_rows(module.weight, source.weight, source.slices.widths, shard)
                _copy_packed_bias(module.bias, source.bias, source.slices.widths, shard)
            elif isinstance(module, NF4Linear) and leaf not in ROW_PARALLEL:
                continue  # a slice of a packed layer: its part was set with the packed layer's
            elif isinstance(module, NF4Linear):
                assert isinstance(source, NF4Linear) and source.weight is not None
                weight = source.weight
                module.set_weight(
                    shard_nf4(weight, cols=shard.part(weight.shape[1])).to(_device(module))
                )
                _copy_row_parallel_bias(module.bias, source.bias, shard)
            elif isinstance(module, nn.Linear) and leaf in ROW_PARALLEL:
                assert isinstance(source, nn.Linear)
                module.weight.copy_(source.weight[:, shard.part(source.weight.shape[1])])
                _copy_row_parallel_bias(module.bias, source.bias, shard)
            elif isinstance(module, nn.Linear | nn.Embedding) and leaf in (
                "lm_head",
                "embed_tokens",
            ):
                assert isinstance(source, nn.Linear | nn.Embedding)
                _copy_vocabulary_rows(module.weight, source.weight, shard)
            else:
                for pname, param in module.named_parameters(recurse=False):
                    param.copy_(getattr(source, pname))
    local.tie_weights()


def _device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _copy_vocabulary_rows(dest: torch.Tensor, source: torch.Tensor, shard: Shard) -> None:
    """The worker's ceil(vocab / N) rows; past the vocabulary's end, zeros."""
    rows = dest.shape[0]
    start = shard.rank * rows
    part = source[start : start + rows]
    dest.zero_()
    dest[: part.shape[0]].copy_(part)


def _copy_rows(
    dest: torch.Tensor, source: torch.Tensor, widths: Sequence[int], shard: Shard
) -> None:
    """A packed weight's rows: each slice's part, side by side."""
    parts = [
        s[shard.part(w)] for s, w in zip(torch.split(source, list(widths)), widths, strict=True)
    ]
    dest.copy_(torch.cat(parts))


def _copy_packed_bias(
    dest: torch.Tensor | None, source: torch.Tensor | None, widths: Sequence[int], shard: Shard
) -> None:
    if dest is not None:
        assert source is not None
        _copy_rows(dest, source, widths, shard)


def _copy_row_parallel_bias(
    dest: torch.Tensor | None, source: torch.Tensor | None, shard: Shard
) -> None:
    """Added once, after the all-reduce sums the partial outputs: on worker 0 only."""
    if dest is not None:
        assert source is not None
        dest.copy_(source if shard.rank == 0 else torch.zeros_like(source))


def checkpoint_part(name: str, tensor: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Worker ``shard``'s part of the checkpoint tensor ``name`` (the tensor itself on one
    device): the loader's cut of each float tensor as it streams in."""
    if shard.size == 1:
        return tensor
    module, _, kind = name.rpartition(".")
    leaf = module.rpartition(".")[2]
    if leaf in ("embed_tokens", "lm_head"):
        rows = shard.rows(tensor.shape[0])
        part = torch.zeros(rows, *tensor.shape[1:], dtype=tensor.dtype)
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
