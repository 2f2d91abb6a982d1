"""A validated adapter in host memory, whatever its kind, and the pool rows it takes.

Every kind (`adapters/kinds.py`) reads its PEFT directory into one :class:`AdapterWeights`,
which the registry, the host cache, the residency and the runner treat alike. Its parts:

* ``modules``: LoRA updates of the decoder's linear layers, ``delta_W = s · B @ A``: plain
  LoRA, AdaLoRA (its singular values folded into A at load) and the LoRA part of DoRA. They
  take the pool's LoRA rows (``adapters/residency.py``) and run through the LoRA kernels.
* everything else is a list of :class:`RowBlock`: rows of a fixed width stored in pool pages
  of each layer, which the model reads in the forward (`engine/kinds.py`):

  ====================  ===================================  ==============================
  part                   rows per layer                       the forward
  ====================  ===================================  ==============================
  ``dora`` (DoRA)        1 × out_features per module          out = g ⊙ (out − b) + b
  ``ia3``                1 × out (or in) features per module  out ⊙ l (or x ⊙ l before W)
  ``virtual_tokens``     a share of n × hidden (spread)       embeddings of n virtual tokens
  ``prefix``             2n × kv_width (K rows, then V)       n keys and values attended first
  ``embedding``          shares of A and Bᵀ (spread)          embed += s · A[:, id]ᵀ Bᵀ
  ``head``               shares of A and Bᵀ (spread)          logits += s · (h Aᵀ) Bᵀ
  ====================  ===================================  ==============================

  A block that is not per layer (the embeddings, a LoRA on the vocabulary) is *spread*:
  layer ℓ stores rows ℓ, ℓ + L, ℓ + 2L, … (L layers), so it takes ``ceil(rows / L)`` pages
  and not ``rows``: a page is a row of every layer's tensor.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

# The kinds (`adapters/kinds.py`), as messages, metrics and the API's model cards name them.
LORA = "lora"
DORA = "dora"
ADALORA = "adalora"
IA3 = "ia3"
PROMPT_TUNING = "prompt_tuning"
PREFIX_TUNING = "prefix_tuning"


class BaseWeights(Protocol):
    """The served base model's weights, as an adapter kind may need them at load (DoRA's
    scales are norms of the adapted weight; a LoRA on the embeddings checks the base
    matrices its file holds). Implemented by the engine; any thread."""

    def weight(self, layer: int, target: str) -> torch.Tensor:
        """``(out_features, in_features)`` float32: the weight the base serves (an NF4
        layer's dequantization)."""
        ...

    def embedding(self) -> torch.Tensor:
        """``(vocab_size, hidden_size)``: the input embeddings as served (dtype, device)."""
        ...

    def head(self) -> torch.Tensor:
        """``(vocab_size, hidden_size)``: the output head as served (the embeddings when
        tied)."""
        ...


@dataclass(frozen=True)
class LoraModuleWeights:
    """One adapted linear layer: ``delta_W = scaling · lora_b @ lora_a``.

    Attributes:
        lora_a: ``(rank, in_features)``, contiguous, on the host.
        lora_b: ``(out_features, rank)``, contiguous, on the host.
        scaling: ``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA.
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def nbytes(self) -> int:
        return self.lora_a.nbytes + self.lora_b.nbytes

    def delta_weight(self) -> torch.Tensor:
        """``(out_features, in_features)``: what the adapter adds to the base weight."""
        return self.scaling * (self.lora_b @ self.lora_a)

    def pin_memory(self) -> LoraModuleWeights:
        return dataclasses.replace(
            self, lora_a=self.lora_a.pin_memory(), lora_b=self.lora_b.pin_memory()
        )


@dataclass(frozen=True)
class Ia3Vector:
    """IA³'s learned rescaling of one linear layer.

    Attributes:
        values: ``(features,)``: of the output (keys, values: ``y ⊙ l``, bias included) or,
            for a feed-forward module, of the input (``W (x ⊙ l) + b``).
        feedforward: whether it scales the input.
    """

    values: torch.Tensor
    feedforward: bool


@dataclass(frozen=True, eq=False)
class RowBlock:
    """Rows an adapter stores in the pool besides its LoRA matrices.

    Attributes:
        key: what the rows are, unique within the adapter (``"dora:q_proj"``,
            ``"ia3_out:k_proj"``, ``"ia3_in:down_proj"``, ``"prompt"``, ``"prefix"``,
            ``"embed_a"``, ...).
        features: the width of a row (a row takes ``ceil(features / page_width)`` pages).
        rows: per layer, ``(n_rows, features)`` or None where the layer has none.
        scaling: a factor the forward applies to what it computes from these rows (a
            LoRA's ``s`` on its Bᵀ block), 1 for rows used as they are. It stays a Python
            float on the host (``BlockTable.scaling``), never a pool value, so the forward
            multiplies by exactly the number PEFT does.
    """

    key: str
    features: int
    rows: tuple[torch.Tensor | None, ...]
    scaling: float = 1.0

    @property
    def num_rows(self) -> int:
        """Rows the block's pages must hold in one layer (its largest)."""
        return max((0 if r is None else int(r.shape[0]) for r in self.rows), default=0)


def spread_rows(matrix: torch.Tensor, num_layers: int) -> tuple[torch.Tensor | None, ...]:
    """A matrix that is not per layer, dealt out over the layers: layer ℓ gets rows
    ``ℓ, ℓ + L, …`` (see :func:`gather_spread`)."""
    return tuple(matrix[layer::num_layers] if layer < len(matrix) else None
                 for layer in range(num_layers))  # fmt: skip


def spread_rows_needed(num_rows: int, num_layers: int) -> int:
    return math.ceil(num_rows / num_layers)


@dataclass(frozen=True)
class AdapterWeights:
    """A validated adapter of any kind, ready to be placed in the page pool.

    Attributes:
        name: the adapter directory's name.
        config: its parsed ``adapter_config.json`` (the kind's config class).
        kind: which kind read it (``"lora"``, ``"dora"``, ``"adalora"``, ``"ia3"``,
            ``"prompt_tuning"``, ``"prefix_tuning"``); see `adapters/kinds.py`.
        modules: ``(layer, target)`` to its LoRA update, for every linear layer it adapts
            that way (LoRA, AdaLoRA, DoRA).
        dora: ``(layer, target)`` to DoRA's output scale ``g = m / ‖W + s·B·A‖`` (one value
            per output feature, the row norms of the adapted weight): applied after the
            LoRA update, ``y = g ⊙ (W x + s·B·A x) + b``.
        ia3: ``(layer, target)`` to IA³'s vector.
        virtual_tokens: prompt tuning's ``(n, hidden_size)`` embeddings, placed before the
            request's tokens.
        prefix: prefix tuning's ``(num_layers, 2, n, kv_width)`` keys and values, attended
            before the request's tokens (which start at position n).
        embedding: a LoRA on the input embeddings: ``lora_a (rank, vocab)``,
            ``lora_b (hidden, rank)``.
        head: a LoRA on the output head: ``lora_a (rank, hidden)``, ``lora_b (vocab, rank)``.
    """

    name: str
    config: Any
    modules: Mapping[tuple[int, str], LoraModuleWeights]
    kind: str = LORA
    dora: Mapping[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    ia3: Mapping[tuple[int, str], Ia3Vector] = field(default_factory=dict)
    virtual_tokens: torch.Tensor | None = None
    prefix: torch.Tensor | None = None
    embedding: LoraModuleWeights | None = None
    head: LoraModuleWeights | None = None

    @property
    def targets(self) -> frozenset[str]:
        """The target names (``q_proj``, ...) adapted by a LoRA in at least one layer."""
        return frozenset(target for _, target in self.modules)

    @property
    def max_rank(self) -> int:
        """The largest LoRA rank of any of its modules (0 for a kind with none)."""
        ranks = [m.rank for m in self.modules.values()]
        ranks += [m.rank for m in (self.embedding, self.head) if m is not None]
        return max(ranks, default=0)

    @property
    def num_virtual_tokens(self) -> int:
        """Positions the adapter takes before the request's tokens (prompt or prefix
        tuning), 0 for the rest."""
        if self.virtual_tokens is not None:
            return int(self.virtual_tokens.shape[0])
        if self.prefix is not None:
            return int(self.prefix.shape[2])
        return 0

    @property
    def is_lora_only(self) -> bool:
        """Whether everything it adds is a LoRA of the decoder's linear layers (what
        mixtures, merges and the decode graphs take)."""
        return not self.blocks_present

    @property
    def blocks_present(self) -> bool:
        return bool(
            self.dora or self.ia3 or self.virtual_tokens is not None or self.prefix is not None
            or self.embedding is not None or self.head is not None
        )  # fmt: skip

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor it holds."""
        out = [t for m in self.modules.values() for t in (m.lora_a, m.lora_b)]
        out += list(self.dora.values()) + [v.values for v in self.ia3.values()]
        out += [t for t in (self.virtual_tokens, self.prefix) if t is not None]
        for m in (self.embedding, self.head):
            if m is not None:
                out += [m.lora_a, m.lora_b]
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def blocks(self, num_layers: int) -> list[RowBlock]:
        """Its pool rows besides the LoRA matrices (see the module's table)."""
        vectors: dict[str, dict[int, torch.Tensor]] = {}  # key -> layer -> vector
        for (layer, target), g in self.dora.items():
            vectors.setdefault(f"dora:{target}", {})[layer] = g
        for (layer, target), v in self.ia3.items():
            side = "ia3_in" if v.feedforward else "ia3_out"
            vectors.setdefault(f"{side}:{target}", {})[layer] = v.values
        blocks = []
        for key in sorted(vectors):
            per_layer = vectors[key]
            features = int(next(iter(per_layer.values())).numel())
            rows = tuple(
                None if layer not in per_layer else per_layer[layer].view(1, -1)
                for layer in range(num_layers)
            )
            blocks.append(RowBlock(key, features, rows))
        if self.virtual_tokens is not None:
            tokens = self.virtual_tokens
            blocks.append(RowBlock("prompt", tokens.shape[1], spread_rows(tokens, num_layers)))
        if self.prefix is not None:
            # (layers, 2, n, kv_width) -> per layer (2n, kv_width): K rows, then V rows
            prefix_rows = tuple(self.prefix[layer].flatten(0, 1) for layer in range(num_layers))
            blocks.append(RowBlock("prefix", self.prefix.shape[-1], prefix_rows))
        for name, module in (("embed", self.embedding), ("head", self.head)):
            if module is not None:
                a, b_t = module.lora_a, module.lora_b.T.contiguous()
                blocks.append(RowBlock(f"{name}_a", a.shape[1], spread_rows(a, num_layers)))
                blocks.append(
                    RowBlock(
                        f"{name}_b", b_t.shape[1], spread_rows(b_t, num_layers), module.scaling
                    )
                )
        return blocks

    def pin_memory(self) -> AdapterWeights:
        """A copy in page-locked host memory, for asynchronous host → device copies."""

        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()

        return dataclasses.replace(
            self,
            modules={key: m.pin_memory() for key, m in self.modules.items()},
            dora={key: v.pin_memory() for key, v in self.dora.items()},
            ia3={
                key: dataclasses.replace(v, values=v.values.pin_memory())
                for key, v in self.ia3.items()
            },
            virtual_tokens=pin(self.virtual_tokens),
            prefix=pin(self.prefix),
            embedding=None if self.embedding is None else self.embedding.pin_memory(),
            head=None if self.head is None else self.head.pin_memory(),
        )
