"""LoRA on the input embeddings and the output head: which tensors a PEFT LoRA file holds for
them, checked against the served base, read into :class:`~adapters.weights.LoraModuleWeights`.

What PEFT 0.21 computes (``peft/tuners/lora/layer.py``; ``s = alpha / r``, or
``alpha / sqrt(r)`` with rsLoRA, by the module path's ``rank_pattern`` / ``alpha_pattern``)::

    embedding  e = E[id] + (A[:, id]ᵀ @ Bᵀ) · s     A = <embed>.lora_embedding_A   (r, vocab)
                                                     B = <embed>.lora_embedding_B   (hidden, r)
    head       logits = h Hᵀ + ((h Aᵀ) Bᵀ) · s       A = lm_head.lora_A.weight       (r, hidden)
                                                     B = lm_head.lora_B.weight       (vocab, r)

The forward is `engine/embed_head.py`; the rows' place in the pool is ``AdapterWeights.blocks``.

Base matrices. When the embedding or the head is targeted, ``save_pretrained`` also writes
the full base matrices (``<embed>.base_layer.weight``, ``lm_head.base_layer.weight``, or
``.weight`` for the one not targeted), and PEFT loads them over the base. They are accepted
only when they equal the served base's (compared in its dtype): different ones mean trained
or resized token embeddings, which this server does not serve.

Tied embeddings (``tie_word_embeddings``: the head *is* E). Without ``ensure_weight_tying``
the two LoRAs are independent on the shared matrix, exactly as on an untied base. With it
(and an embedding LoRA), PEFT makes lm_head's LoRA the embedding's, transposed (lora_A =
Bᵀ_e, lora_B = Aᵀ_e, ``peft/tuners/lora/model.py:314-322``), even though the saved
``target_modules`` no longer names lm_head; the file's own lm_head tensors, when present,
must be exactly those. On an untied base PEFT ignores ``ensure_weight_tying``, as here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from adapters.base_layout import BaseModelLayout
from adapters.errors import INVALID_ADAPTER, UNSUPPORTED_ADAPTER_FEATURE, AdapterError
from adapters.peft_config import ALL_LINEAR, LoraAdapterConfig
from adapters.peft_targets import (
    EMBED_PATH,
    HEAD_PATH,
    is_targeted,
    module_rank,
    module_scaling,
)
from adapters.safetensors_file import TensorInfo
from adapters.weights import BaseWeights, LoraModuleWeights

EMBED_KEY = f"base_model.model.{EMBED_PATH}"
HEAD_KEY = f"base_model.model.{HEAD_PATH}"
EMBED_A, EMBED_B = f"{EMBED_KEY}.lora_embedding_A", f"{EMBED_KEY}.lora_embedding_B"
HEAD_A, HEAD_B = f"{HEAD_KEY}.lora_A.weight", f"{HEAD_KEY}.lora_B.weight"
# The base matrices PEFT may save beside them, and which served matrix each must equal.
BASE_MATRICES = {
    f"{EMBED_KEY}.base_layer.weight": "embed_tokens",
    f"{EMBED_KEY}.weight": "embed_tokens",
    f"{HEAD_KEY}.base_layer.weight": "lm_head",
    f"{HEAD_KEY}.weight": "lm_head",
}


@dataclass(frozen=True)
class EmbedHeadPlan:
    """What a LoRA config adapts of the embeddings and the head on this base.

    Attributes:
        embedding: ``(rank, scaling)`` of the embedding's LoRA, or None.
        head: ``(rank, scaling)`` of the head's LoRA, or None.
        tied_head: the head's LoRA is the embedding's transposed (``ensure_weight_tying``
            on a tied base), not tensors of its own.
        vocab_size, hidden_size: the base's.
    """

    embedding: tuple[int, float] | None
    head: tuple[int, float] | None
    tied_head: bool
    vocab_size: int
    hidden_size: int

    @property
    def empty(self) -> bool:
        return self.embedding is None and self.head is None

    def required(self) -> dict[str, tuple[int, ...]]:
        """The tensors the file must hold, key to shape."""
        vocab, hidden = self.vocab_size, self.hidden_size
        shapes: dict[str, tuple[int, ...]] = {}
        if self.embedding is not None:
            rank = self.embedding[0]
            shapes |= {EMBED_A: (rank, vocab), EMBED_B: (hidden, rank)}
        if self.head is not None and not self.tied_head:
            rank = self.head[0]
            shapes |= {HEAD_A: (rank, hidden), HEAD_B: (vocab, rank)}
        return shapes

    def optional(self) -> dict[str, tuple[int, ...]]:
        """The tensors the file may hold (the base matrices; a tied head's own copy of its
        LoRA), key to shape."""
        if self.empty:
            return {}
        shapes: dict[str, tuple[int, ...]] = {
            key: (self.vocab_size, self.hidden_size) for key in BASE_MATRICES
        }
        if self.tied_head and self.embedding is not None:
            rank = self.embedding[0]
            shapes |= {HEAD_A: (rank, self.hidden_size), HEAD_B: (self.vocab_size, rank)}
        return shapes


def plan_embed_head(config: LoraAdapterConfig, layout: BaseModelLayout) -> EmbedHeadPlan:
    """Which of the embeddings and the head ``config`` adapts, with what rank and scaling.

    Raises:
        AdapterError: ``unsupported_adapter_feature`` when the base's vocabulary size is
            unknown (a layout built without it).
    """

    all_linear = isinstance(config.target_modules, str) and config.target_modules.lower() == (
        ALL_LINEAR
    )

    def planned(path: str) -> tuple[int, float] | None:
        # "all-linear" is the decoder's linear layers, never the head (PEFT's
        # _maybe_include_all_linear_layers) nor the embeddings.
        if all_linear or not is_targeted(config, path):
            return None
        return module_rank(config, path), module_scaling(config, path)

    embedding, head = planned(EMBED_PATH), planned(HEAD_PATH)
    tied_head = bool(
        config.ensure_weight_tying and layout.tie_word_embeddings and embedding is not None
    )
    if tied_head:
        assert embedding is not None
        # PEFT builds the tied head with lm_head's own alpha over the embedding's matrices.
        head = (embedding[0], module_scaling(config, HEAD_PATH))
    if config.use_dora and (embedding is not None or head is not None):
        raise AdapterError(
            UNSUPPORTED_ADAPTER_FEATURE,
            "DoRA (use_dora) on embed_tokens or lm_head is not served",
        )
    plan = EmbedHeadPlan(
        embedding, head, tied_head, layout.vocab_size, layout.linear_shapes["q_proj"][0]
    )
    if not plan.empty and layout.vocab_size <= 0:
        raise AdapterError(
            UNSUPPORTED_ADAPTER_FEATURE,
            "LoRA on embed_tokens or lm_head is not served without the base's vocabulary size",
        )
    return plan


def check_optional_shapes(plan: EmbedHeadPlan, infos: Mapping[str, TensorInfo]) -> None:
    """The optional tensors present have their shapes (a resized vocabulary is named)."""
    for key, shape in plan.optional().items():
        if key in infos and tuple(infos[key][1]) != shape:
            extra = " (a resized vocabulary is not served)" if key in BASE_MATRICES else ""
            raise AdapterError(
                INVALID_ADAPTER,
                f"{key} has shape {list(infos[key][1])}; the base model expects "
                f"{list(shape)}{extra}",
            )


def read_embed_head(
    plan: EmbedHeadPlan,
    tensors: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    base: BaseWeights | None,
    convert: Callable[[str, torch.Tensor, torch.dtype], torch.Tensor],
) -> tuple[LoraModuleWeights | None, LoraModuleWeights | None]:
    """The embedding's and the head's LoRA from the file's (checked) ``tensors``, after
    checking its base matrices against the served ones. ``convert`` makes a checked,
    owned copy of a tensor in a dtype (the loader's ``converted``).

    Raises:
        AdapterError: ``invalid_adapter`` for a base matrix that differs from the served
            one, a tied head whose tensors are not the embedding's transposed, or values
            that are not finite.
    """
    for key, what in BASE_MATRICES.items():
        if key not in tensors:
            continue
        if base is None:
            raise AdapterError(
                UNSUPPORTED_ADAPTER_FEATURE,
                f"{key} cannot be checked here: the served base weights are not available",
            )
        served = base.embedding() if what == "embed_tokens" else base.head()
        if not torch.equal(tensors[key].to(served.device, served.dtype), served):
            raise AdapterError(
                INVALID_ADAPTER,
                f"{key} differs from the served base's {what} weight: the adapter was saved "
                "from other base weights (trained or resized token embeddings are not served)",
            )
    embedding = head = None
    if plan.embedding is not None:
        embedding = LoraModuleWeights(
            lora_a=convert(EMBED_A, tensors[EMBED_A], dtype),
            lora_b=convert(EMBED_B, tensors[EMBED_B], dtype),
            scaling=plan.embedding[1],
        )
    if plan.head is not None and plan.tied_head:
        assert embedding is not None
        for key, own in ((HEAD_A, embedding.lora_b.T), (HEAD_B, embedding.lora_a.T)):
            if key in tensors and not torch.equal(tensors[key].to(dtype), own):
                raise AdapterError(
                    INVALID_ADAPTER,
                    f"{key} is not the embedding's LoRA transposed, though ensure_weight_tying "
                    "ties lm_head to embed_tokens",
                )
        head = LoraModuleWeights(
            lora_a=embedding.lora_b.T.contiguous(),
            lora_b=embedding.lora_a.T.contiguous(),
            scaling=plan.head[1],
        )
    elif plan.head is not None:
        head = LoraModuleWeights(
            lora_a=convert(HEAD_A, tensors[HEAD_A], dtype),
            lora_b=convert(HEAD_B, tensors[HEAD_B], dtype),
            scaling=plan.head[1],
        )
    return embedding, head
