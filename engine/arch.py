"""The shape of a served decoder, read once from its checkpoint's ``config.json``.

Everything that depends on the model's shape (the page width, the layout adapters are checked
against, the decode graphs' buffers, the tensor-parallel split, the context limit) derives it
from :class:`ModelArch`; nothing else parses the config's shape fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from adapters.base_layout import BaseModelLayout

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class ModelArch:
    """The shape of a supported decoder (Llama, Mistral, Qwen2).

    Attributes:
        max_positions: ``max_position_embeddings``, what the rotary tables cover.
        sliding_window: the window of Mistral-style windowed attention, None without one.
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    max_positions: int
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def q_width(self) -> int:
        """Elements of one token's queries in one layer (q_proj's output)."""
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Elements of one token's K (or V) in one layer: the page width."""
        return self.num_kv_heads * self.head_dim

    @property
    def context_limit(self) -> int:
        """The longest context served exactly. Windowed attention is not implemented, so a
        context stops at the window, where full and windowed attention still agree."""
        if self.sliding_window is None:
            return self.max_positions
        return min(self.max_positions, self.sliding_window)

    def layout(self) -> BaseModelLayout:
        """The target linear layers an adapter may touch, as the adapter loader sees them."""
        return BaseModelLayout.for_decoder(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab_size,
            tie_word_embeddings=self.tie_word_embeddings,
        )

    @classmethod
    def load(cls, model_dir: Path) -> ModelArch:
        """The shape of the checkpoint in ``model_dir``, from its ``config.json`` read as
        transformers reads it (its defaults for keys the file leaves out, as the model gets
        them; remote code never trusted)."""
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        return cls.from_config(config)

    @classmethod
    def from_config(cls, config: PretrainedConfig | Mapping[str, Any]) -> ModelArch:
        """From a transformers config, or the dictionary of a ``config.json`` (where keys it
        leaves out take Llama's defaults rather than its class's: prefer :meth:`load`).

        Raises:
            ValueError: an architecture or activation the model does not implement.
        """
        values: dict[str, Any] = dict(config) if isinstance(config, Mapping) else config.to_dict()
        get = values.get

        def need(key: str) -> int:
            if values.get(key) is None:
                raise ValueError(f"the model's config lacks {key}")
            return int(values[key])

        arch = (get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {arch} is not supported; one of {SUPPORTED_ARCHITECTURES}"
            )
        act = get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (silu only)")
        hidden_size = need("hidden_size")
        num_heads = need("num_attention_heads")
        is_qwen2 = arch == "Qwen2ForCausalLM"
        attention_bias = bool(get("attention_bias", False))
        window = get("sliding_window")
        return cls(
            hidden_size=hidden_size,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=int(get("num_key_value_heads") or num_heads),
            head_dim=int(get("head_dim") or hidden_size // num_heads),
            vocab_size=need("vocab_size"),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            qkv_bias=is_qwen2 or attention_bias,  # Qwen2 always biases q, k and v
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(get("mlp_bias", False)),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            max_positions=int(get("max_position_embeddings", 2048)),
            sliding_window=int(window) if window and get("use_sliding_window", True) else None,
        )
