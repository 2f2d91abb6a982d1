"""Packed projections: linear layers that share an input, run as one matmul.

q, k and v all read the same normed hidden state, as do gate and up, so the model holds each
group as one :class:`PackedLinear` whose weight is the slices' weights stacked along the
output features (vLLM's ``QKVParallelLinear`` / ``MergedColumnParallelLinear``):

Semantics:
    W = [W_0; W_1; ...]  (Σ widths, in_features);   b = [b_0; b_1; ...]
    out = x · Wᵀ + b;   out[:, column_offsets[s] : column_offsets[s + 1]] = x · W_sᵀ + b_s

The slices keep their own identity everywhere outside the matmul: checkpoints name them
(``...self_attn.k_proj.weight`` loads into rows of ``...self_attn.qkv_proj.weight``, through
:func:`checkpoint_tensors` and `engine/naming.py`'s map), adapters target them (each slice's
LoRA goes into its own columns of the output), and NF4 quantizes each on its own
(`engine/quantization.py`). Splitting the output columns is also where tensor parallelism
cuts a column-parallel layer: each rank would take its share of every slice.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.naming import slice_module


@dataclass(frozen=True)
class PackedSlices:
    """Where a packed layer's slices are, shared by its float and NF4 forms.

    Attributes:
        names: each slice's checkpoint leaf name (its LoRA target), in column order.
        column_offsets: (num_slices + 1,) where each slice's output columns start, then the
            total width.
    """

    names: tuple[str, ...]
    column_offsets: tuple[int, ...]

    @classmethod
    def of(cls, slices: tuple[tuple[str, int], ...]) -> PackedSlices:
        """From ``(name, out_features)`` per slice."""
        offsets = (0, *itertools.accumulate(width for _, width in slices))
        return cls(tuple(name for name, _ in slices), offsets)

    @property
    def widths(self) -> list[int]:
        """Each slice's output features."""
        return [hi - lo for lo, hi in itertools.pairwise(self.column_offsets)]

    @property
    def out_features(self) -> int:
        return self.column_offsets[-1]


class PackedLinear(nn.Linear):
    """Slices ``(name, out_features)`` of one input as one ``nn.Linear`` (see `Semantics`);
    ``slices`` says where each one's rows of the weight (columns of the output) are."""

    def __init__(self, in_features: int, slices: tuple[tuple[str, int], ...], bias: bool) -> None:
        packed = PackedSlices.of(slices)
        super().__init__(in_features, packed.out_features, bias=bias)
        self.slices = packed

    def slice_forward(self, x: torch.Tensor, s: int) -> torch.Tensor:
        """Slice ``s`` alone: ``x · W_sᵀ + b_s``, (rows, its width)."""
        lo, hi = self.slices.column_offsets[s], self.slices.column_offsets[s + 1]
        bias = None if self.bias is None else self.bias[lo:hi]
        return F.linear(x, self.weight[lo:hi], bias)

    def extra_repr(self) -> str:
        widths = zip(self.slices.names, self.slices.widths, strict=True)
        return f"{super().extra_repr()}, slices: {', '.join(f'{n}={w}' for n, w in widths)}"


def packed_layers(model: nn.Module) -> dict[str, PackedSlices]:
    """The slices of every packed layer of ``model`` (float or NF4), by module name."""
    found = {}
    for name, module in model.named_modules():
        slices = getattr(module, "slices", None)
        if isinstance(slices, PackedSlices):
            found[name] = slices
    return found


def checkpoint_tensors(
    model: nn.Module, remove_duplicate: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter of ``model`` under the checkpoint's name (tied ones once, unless not
    ``remove_duplicate``): a packed layer's weight and bias as one view of rows per slice,
    named after the slice.

    Loading copies into these views, dummy weights are drawn into them, and a model of
    ``nn.Linear`` layers (transformers') yields its own parameters, so the two compare name
    by name.
    """
    packed = packed_layers(model)
    for name, param in model.named_parameters(remove_duplicate=remove_duplicate):
        module, _, kind = name.rpartition(".")  # kind: "weight" or "bias"
        slices = packed.get(module)
        if slices is None:
            yield name, param
            continue
        offsets = slices.column_offsets
        for s, leaf in enumerate(slices.names):
            yield f"{slice_module(module, leaf)}.{kind}", param[offsets[s] : offsets[s + 1]]
