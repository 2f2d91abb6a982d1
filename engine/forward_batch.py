"""Everything one forward pass needs besides the tokens, handed to every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata
from engine.kinds import KindMetadata
from engine.lora import LoraMetadata


@dataclass(frozen=True)
class ForwardBatch:
    """Per-forward metadata, passed as an argument (never held in a global).

    Attributes:
        attn: where each token reads and writes the KV cache.
        pools: the page pool's per-layer tensors, (num_pages, page_width) each; they hold the
            KV cache and the adapters' weights.
        lora: which adapter each token uses; None when no request in the batch has one.
        kinds: the rows of adapters with more than LoRA (DoRA, IA³, ...) and where their
            vectors are; None when the batch has none.
    """

    attn: AttentionMetadata
    pools: list[torch.Tensor]
    lora: LoraMetadata | None = None
    kinds: KindMetadata | None = None
