"""The served base model's weights, for adapter kinds that read them at load."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from adapters.base_layout import BaseModelLayout
from adapters.errors import UNSUPPORTED_ADAPTER_FEATURE, AdapterError
from engine.loader import iterate_weights
from engine.naming import packed_module
from engine.packed import PackedLinear
from engine.quantization import NF4Linear, PackedNF4Linear
from kernels.nf4 import dequantize_nf4

# The checkpoint names of the embeddings and the head.
_EMBED, _HEAD = "model.embed_tokens.weight", "lm_head.weight"


class ServedBaseWeights:
    """The model's weights as an adapter kind reads them at load (DoRA's norms; the
    embeddings and the head that a LoRA on them is checked against): linear weights as
    float32 copies of a slice of a packed layer, or an NF4 layer's dequantization; the
    embeddings and the head as served, never copied (``adapters.weights.BaseWeights``)."""

    def __init__(self, model: nn.Module, layout: BaseModelLayout) -> None:
        self.model = model
        self.layout = layout

    def weight(self, layer: int, target: str) -> torch.Tensor:
        module_path = self.layout.module_path(layer, target)
        packed = packed_module(module_path)
        if packed is None:
            module = self.model.get_submodule(module_path)
        else:
            holder = self.model.get_submodule(packed[0])
            if isinstance(holder, PackedNF4Linear):
                module = holder.part(packed[1])
            else:
                assert isinstance(holder, PackedLinear)
                offsets = holder.slices.column_offsets
                s = holder.slices.names.index(packed[1])
                return holder.weight.detach()[offsets[s] : offsets[s + 1]].float().cpu()
        if isinstance(module, NF4Linear):
            assert module.weight is not None
            return dequantize_nf4(module.weight).cpu()
        assert isinstance(module, nn.Linear)
        return module.weight.detach().float().cpu()

    def embedding(self) -> torch.Tensor:
        return self._matrix("model.embed_tokens")

    def head(self) -> torch.Tensor:
        return self._matrix("lm_head")

    def _matrix(self, module_path: str) -> torch.Tensor:
        weight = self.model.get_parameter(f"{module_path}.weight")
        return weight.detach()


class CheckpointBaseWeights:
    """A base's embeddings and head as its checkpoint holds them, read once, for merging
    an adapter from disk (``loraserve merge``): what an adapter's saved base matrices are
    checked against (``adapters.weights.BaseWeights``). Linear weights are not read here,
    so DoRA is refused as without a base."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self._matrices: dict[str, torch.Tensor] | None = None

    def weight(self, layer: int, target: str) -> torch.Tensor:
        raise AdapterError(
            UNSUPPORTED_ADAPTER_FEATURE,
            "DoRA (use_dora) is not supported without the served base weights: export a "
            "DoRA adapter from a server that has loaded it (POST /v1/adapters/{name}/export)",
        )

    def embedding(self) -> torch.Tensor:
        return self._read()[_EMBED]

    def head(self) -> torch.Tensor:
        matrices = self._read()
        return matrices.get(_HEAD, matrices[_EMBED])  # a tied checkpoint has no lm_head

    def _read(self) -> dict[str, torch.Tensor]:
        if self._matrices is None:
            self._matrices = {
                name: tensor
                for name, tensor in iterate_weights(self.model_dir)
                if name in (_EMBED, _HEAD)
            }
        return self._matrices
