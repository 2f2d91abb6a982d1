"""A tiny random Llama and real PEFT adapters saved for it."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from adapters.base_layout import BaseModelLayout

LLAMA = LlamaConfig(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
)


@pytest.fixture(scope="session")
def base_model() -> PreTrainedModel:
    torch.manual_seed(0)
    model: PreTrainedModel = AutoModelForCausalLM.from_config(LLAMA)
    return model


@pytest.fixture(scope="session")
def layout() -> BaseModelLayout:
    return BaseModelLayout.for_decoder(
        num_layers=LLAMA.num_hidden_layers,
        hidden_size=LLAMA.hidden_size,
        intermediate_size=LLAMA.intermediate_size,
        num_heads=LLAMA.num_attention_heads,
        num_kv_heads=LLAMA.num_key_value_heads,
        head_dim=LLAMA.hidden_size // LLAMA.num_attention_heads,
        vocab_size=LLAMA.vocab_size,
        tie_word_embeddings=LLAMA.tie_word_embeddings,
    )


def save_peft_adapter(
    base: PreTrainedModel, directory: Path, seed: int = 1, **lora_kwargs: Any
) -> PeftModel:
    """Wrap a copy of ``base`` with PEFT, randomise A and B, and ``save_pretrained`` it."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out, deprecations
        model = get_peft_model(
            copy.deepcopy(base), LoraConfig(init_lora_weights=False, **lora_kwargs)
        )
        model.save_pretrained(directory)
    return model


@pytest.fixture(scope="session")
def reference_adapter(
    base_model: PreTrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A valid rank-4 adapter on q_proj, v_proj and down_proj; tests copy and break it."""
    directory = tmp_path_factory.mktemp("reference") / "ref"
    save_peft_adapter(
        base_model, directory, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    return directory
