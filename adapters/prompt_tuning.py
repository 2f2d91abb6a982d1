"""Prompt-tuning adapters (``peft_type: PROMPT_TUNING``): n learned input embeddings.

PEFT saves one tensor, ``prompt_embeddings`` ``(n, hidden_size)``, and its forward feeds the
base model ``inputs_embeds = cat(prompt_embeddings, embed_tokens(ids))``: the virtual tokens
take positions 0 .. n−1 and the request's token j position n + j (``peft_model.py``'s
``PeftModelForCausalLM.forward``, peft 0.21). The embeddings are used raw (no scale).
loraserve serves a request on such an adapter as n placeholder tokens followed by its
prompt; at those positions the model's input row is the virtual embedding, read from the
adapter's ``"prompt"`` rows in the pool (`engine/virtual_tokens.py`).

This module also holds what prompt and prefix tuning (`adapters/prefix_tuning.py`) share:
their config fields and their one tensor, both refused field by field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapters.base_layout import BaseModelLayout
from adapters.errors import INVALID_ADAPTER, UNSUPPORTED_ADAPTER_FEATURE, AdapterError
from adapters.loader import check_shapes, converted, unexpected_key, weights_file
from adapters.safetensors_file import DTYPE_NAMES, read_header, read_tensors
from adapters.weights import PROMPT_TUNING, AdapterWeights

# The one tensor either kind saves (``get_prompt_embedding_to_save``).
EMBEDDINGS_KEY = "prompt_embeddings"

# PromptLearningConfig's fields that change nothing in what is served (the tokenizer and
# init fields only said how training started; the saved embeddings are what counts).
SHARED_HARMLESS = frozenset(
    {
        "peft_type", "task_type", "auto_mapping", "peft_version", "revision", "inference_mode",
        "base_model_name_or_path", "num_virtual_tokens", "token_dim", "num_layers",
        "num_attention_heads", "num_transformer_submodules", "modules_to_save",
    }
)  # fmt: skip
_HARMLESS = SHARED_HARMLESS | {
    "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs",
}  # fmt: skip


@dataclass(frozen=True)
class VirtualTokenConfig:
    """What loraserve reads from a prompt- or prefix-tuning ``adapter_config.json``.

    Attributes:
        peft_type: ``PROMPT_TUNING`` or ``PREFIX_TUNING``.
        num_virtual_tokens: n, the positions the adapter takes before a request's tokens.
        token_dim: the width of one virtual token's vector per layer (hidden size for
            prompt tuning; kv heads × head dim for prefix tuning).
        num_layers: the base model's decoder layers.
        num_attention_heads: heads (prompt tuning) or key/value heads (prefix tuning).
    """

    peft_type: str
    num_virtual_tokens: int
    token_dim: int
    num_layers: int
    num_attention_heads: int


def _message(text: str) -> str:
    return f"adapter_config.json: {text}"


def read_virtual_token_config(
    raw: Mapping[str, Any],
    harmless: frozenset[str],
    layout: BaseModelLayout,
    token_dim: int,
    num_heads: int,
) -> VirtualTokenConfig:
    """Check a prompt-learning config against the base (``token_dim`` and ``num_heads``:
    what it must say for this base).

    Raises:
        AdapterError: ``unsupported_adapter_feature`` for an unknown field, another task
            than causal LM or an encoder-decoder layout; ``invalid_adapter`` for a missing
            or mismatched number.
    """
    for name, value in raw.items():
        if name not in harmless and value not in (None, False, [], {}, ""):
            raise AdapterError(
                UNSUPPORTED_ADAPTER_FEATURE,
                _message(f"unknown field {name[:80]!r} is not supported"),
            )
    if raw.get("modules_to_save"):
        raise AdapterError(
            UNSUPPORTED_ADAPTER_FEATURE, _message("modules_to_save is not supported")
        )
    task = raw.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        shown = repr(task)[:40]
        raise AdapterError(
            UNSUPPORTED_ADAPTER_FEATURE,
            _message(f"task_type {shown} is not served (CAUSAL_LM only)"),
        )
    if raw.get("num_transformer_submodules") not in (None, 1):
        raise AdapterError(
            UNSUPPORTED_ADAPTER_FEATURE,
            _message(
                "num_transformer_submodules must be 1 (encoder-decoder models are not served)"
            ),
        )
    n = _positive_int(raw, "num_virtual_tokens")
    expected = {
        "token_dim": token_dim,
        "num_layers": layout.num_layers,
        "num_attention_heads": num_heads,
    }
    values = {}
    for name, want in expected.items():
        values[name] = _positive_int(raw, name)
        if want and values[name] != want:
            raise AdapterError(
                INVALID_ADAPTER,
                _message(f"{name} is {values[name]}; the base model has {want}"),
            )
    return VirtualTokenConfig(str(raw["peft_type"]), n, **values)


def _positive_int(raw: Mapping[str, Any], name: str) -> int:
    value = raw.get(name)
    if value is None:
        raise AdapterError(INVALID_ADAPTER, _message(f"missing {name!r}"))
    if type(value) is not int or value <= 0:
        raise AdapterError(INVALID_ADAPTER, _message(f"{name} must be a positive integer"))
    return value


def read_prompt_embeddings(
    path: Path, num_virtual_tokens: int, width: int, dtype: torch.dtype
) -> torch.Tensor:
    """The adapter's ``prompt_embeddings``, ``(num_virtual_tokens, width)``, checked (keys,
    dtype, shape from the header before any data is read; then NaN/Inf) and converted."""
    weights_path = weights_file(path)
    header, size = read_header(weights_path)
    for name in sorted(set(header) - {EMBEDDINGS_KEY}):
        raise unexpected_key(name)
    shapes = {EMBEDDINGS_KEY: (num_virtual_tokens, width)}
    check_shapes(header, shapes)
    tensors = read_tensors(weights_path, size)
    check_shapes({k: (DTYPE_NAMES.get(t.dtype, "?"), tuple(t.shape)) for k, t in tensors.items()},
                 shapes)  # fmt: skip
    return converted(EMBEDDINGS_KEY, tensors[EMBEDDINGS_KEY], dtype)


def read_prompt_tuning(
    path: Path, raw: Mapping[str, Any], layout: BaseModelLayout, dtype: torch.dtype = torch.float32
) -> AdapterWeights:
    """Read the prompt-tuning adapter in directory ``path`` (``raw``: its config).

    Raises:
        AdapterError: ``invalid_adapter``, ``unsupported_adapter_feature``, ``pickle_refused``.
    """
    hidden = layout.hidden_size
    config = read_virtual_token_config(raw, _HARMLESS, layout, hidden, layout.num_heads)
    tokens = read_prompt_embeddings(path, config.num_virtual_tokens, hidden, dtype)
    return AdapterWeights(
        name=path.absolute().name,
        config=config,
        modules={},
        kind=PROMPT_TUNING,
        virtual_tokens=tokens,  # (n, hidden_size)
    )
