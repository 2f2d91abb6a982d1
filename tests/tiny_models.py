"""Tiny random models of each supported family, saved as Hugging Face directories.

Weights are random (seeded) with a larger initializer range than transformers' default, so
logits are decisive and greedy comparisons are not decided by float rounding at near-ties.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIALS = ["<pad>", "<s>", "</s>"]
PAD, BOS, EOS = 0, 1, 2
VOCAB_SIZE = 320  # 3 specials + 256 bytes, rounded up


def save_byte_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (every UTF-8 byte is a token) that prepends <s>."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", BOS)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(path)
    return fast


FAMILIES: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    # GQA 4:1 and Llama-3 rope scaling, untied.
    "llama": (
        LlamaConfig,
        {
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "tie_word_embeddings": False,
        },
    ),
    # Tied embeddings, head_dim not derived from hidden_size.
    "mistral": (
        MistralConfig,
        {
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 24,
            "sliding_window": None,
            "tie_word_embeddings": True,
        },
    ),
    # q/k/v bias, untied.
    "qwen2": (
        Qwen2Config,
        {"num_attention_heads": 4, "num_key_value_heads": 1, "tie_word_embeddings": False},
    ),
}


def make_model(
    path: Path, family: str = "llama", *, num_layers: int = 2, seed: int = 0, **overrides: Any
) -> Path:
    """Save a random tiny ``family`` model with a byte tokenizer under ``path``."""
    config_cls, extra = FAMILIES[family]
    fields: dict[str, Any] = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": num_layers,
        "max_position_embeddings": 256,
        "initializer_range": 0.1,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        **extra,
        **overrides,
    }
    config = config_cls(**fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if family == "qwen2":
        # transformers zero-initialises biases; random ones make the bias path observable.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0.0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    save_byte_tokenizer(path)
    return path


def make_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int,
    alpha: float,
    targets: list[str] | str,
    seed: int,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    std: float = 0.3,
) -> Path:
    """Save a random PEFT LoRA adapter for the model in ``base_dir`` (PEFT's own format).

    A and B are both random (PEFT would start B at zero, a no-op), large enough to change
    greedy outputs visibly.
    """
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        lora_dropout=0.0,
        bias="none",
    )
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    model.save_pretrained(out_dir)
    return out_dir


def write_random_adapter(
    out_dir: Path,
    shapes: dict[str, tuple[int, int]],
    num_layers: int,
    *,
    r: int,
    alpha: float,
    seed: int,
    std: float = 0.2,
) -> Path:
    """Write a random LoRA adapter in PEFT's file format without PEFT (fast, for many).

    ``shapes`` maps each target (e.g. "q_proj") to (in_features, out_features).
    """
    import json

    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(num_layers):
        for target, (fan_in, fan_out) in shapes.items():
            block = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{block}.{target}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=generator) * std
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=generator) * std
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(shapes),
        "bias": "none",
        "base_model_name_or_path": "tiny",
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config))
    return out_dir
