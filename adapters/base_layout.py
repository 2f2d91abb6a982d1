"""The base model's linear layers, as the adapter loader needs to know them.

``adapters`` must not import ``engine``, so the base model is described here by what an
adapter may touch: the number of decoder layers and each target linear layer's
``(in_features, out_features)``. Module paths follow transformers' Llama/Mistral/Qwen2 names,
which are also the paths PEFT matches ``target_modules`` against and writes into its tensor
keys.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

# The decoder's linear layers, and the submodule of a decoder layer that holds each.
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
LINEAR_TARGETS = ATTENTION_TARGETS + MLP_TARGETS


@dataclass(frozen=True)
class BaseModelLayout:
    """The target linear layers of a decoder-only base model.

    Attributes:
        num_layers: decoder layers; layer ``i``'s modules live under ``model.layers.{i}``.
        linear_shapes: target name (one of :data:`LINEAR_TARGETS`) to
            ``(in_features, out_features)`` of that layer's ``nn.Linear``. The same in
            every layer. The output head (``lm_head``) and the embeddings are not listed:
            LoRA on them is planned apart (`adapters/embed_head.py`).
        vocab_size: rows of the embedding and the head; 0 when unknown (then a LoRA on them
            is refused).
        tie_word_embeddings: whether the head is the embedding matrix itself.
        num_heads, num_kv_heads: attention heads and key/value heads (0 where unknown: a
            layout rebuilt from an adapter's tensors); prompt and prefix tuning check them.
    """

    num_layers: int
    linear_shapes: Mapping[str, tuple[int, int]]
    num_heads: int = 0
    num_kv_heads: int = 0
    vocab_size: int = 0
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {self.num_layers}")
        if not self.linear_shapes:
            raise ValueError("linear_shapes is empty")
        unknown = set(self.linear_shapes) - set(LINEAR_TARGETS)
        if unknown:
            raise ValueError(f"unknown targets {sorted(unknown)}; known: {LINEAR_TARGETS}")
        for target, (in_features, out_features) in self.linear_shapes.items():
            if in_features <= 0 or out_features <= 0:
                raise ValueError(f"{target}: features must be positive")
        # A read-only copy, in LINEAR_TARGETS order, so the layout cannot change under a
        # loader that validated against it.
        ordered = {
            t: tuple(self.linear_shapes[t]) for t in LINEAR_TARGETS if t in self.linear_shapes
        }
        object.__setattr__(self, "linear_shapes", MappingProxyType(ordered))

    @classmethod
    def for_decoder(
        cls,
        *,
        num_layers: int,
        hidden_size: int,
        intermediate_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        vocab_size: int = 0,
        tie_word_embeddings: bool = False,
    ) -> BaseModelLayout:
        """The layout of a Llama/Mistral/Qwen2 decoder (``engine.model.ModelArch``'s fields)."""
        q_width = num_heads * head_dim
        kv_width = num_kv_heads * head_dim
        return cls(
            num_layers=num_layers,
            linear_shapes={
                "q_proj": (hidden_size, q_width),
                "k_proj": (hidden_size, kv_width),
                "v_proj": (hidden_size, kv_width),
                "o_proj": (q_width, hidden_size),
                "gate_proj": (hidden_size, intermediate_size),
                "up_proj": (hidden_size, intermediate_size),
                "down_proj": (intermediate_size, hidden_size),
            },
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            vocab_size=vocab_size,
            tie_word_embeddings=tie_word_embeddings,
        )

    @property
    def hidden_size(self) -> int:
        """The width of the residual stream (q_proj's input)."""
        return self.linear_shapes["q_proj"][0]

    @property
    def kv_width(self) -> int:
        """Elements of one token's key (or value) in one layer (k_proj's output)."""
        return self.linear_shapes["k_proj"][1]

    def flops_ratio(self, ranks: Mapping[tuple[int, str], int]) -> float:
        """The multiply-adds LoRA modules of these ranks (by ``(layer, target)``) add to a
        token, ``r·(in + out)`` each, over those of the base's linear layers, ``in·out``
        for every target of every layer."""
        base = self.num_layers * sum(i * o for i, o in self.linear_shapes.values())
        extra = sum(r * sum(self.linear_shapes[t]) for (_, t), r in ranks.items())
        return extra / base

    def module_path(self, layer: int, target: str) -> str:
        """The transformers module path, e.g. ``model.layers.3.self_attn.q_proj``."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range for {self.num_layers} layers")
        if target not in self.linear_shapes:
            raise ValueError(f"target {target!r} is not one of {tuple(self.linear_shapes)}")
        if target in ATTENTION_TARGETS:
            return f"model.layers.{layer}.self_attn.{target}"
        return f"model.layers.{layer}.mlp.{target}"

    def modules(self) -> Iterator[tuple[int, str, str]]:
        """Every ``(layer, target, module_path)`` of the base, layer by layer."""
        for layer in range(self.num_layers):
            for target in self.linear_shapes:
                yield layer, target, self.module_path(layer, target)
