"""Prefix-tuning adapters (``peft_type: PREFIX_TUNING``): n learned keys and values per layer.

PEFT saves ``prompt_embeddings`` ``(n, num_layers · 2 · kv_heads · head_dim)``; with
``prefix_projection`` the file holds the projection's output, not the MLP, so both variants
read the same. Its forward views row t as ``(num_layers, 2, kv_heads, head_dim)``: ``[l, 0]``
is layer l's key and ``[l, 1]`` its value for virtual token t, given to the base model as an
already computed cache (``peft_model.py``'s ``get_prompt``, peft 0.21). So the prefix keys
get no rotary embedding, the request's own tokens start at position n, and every query
attends to all n prefix positions.

loraserve stores each layer's n keys and n values once, as the adapter's ``"prefix"`` rows
in the pool (one page per row: a key is as wide as a page), and every request on the adapter
reads them through its page table as the KV cache of positions 0 .. n−1
(`engine/virtual_tokens.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from adapters.base_layout import BaseModelLayout
from adapters.prompt_tuning import (
    SHARED_HARMLESS,
    read_prompt_embeddings,
    read_virtual_token_config,
)
from adapters.weights import PREFIX_TUNING, AdapterWeights

# PrefixTuningConfig's own fields that change nothing in what is served: the saved tensor is
# the projection's output whatever the encoder was.
_HARMLESS = SHARED_HARMLESS | {"encoder_hidden_size", "prefix_projection", "init_weights"}


def read_prefix_tuning(
    path: Path, raw: Mapping[str, Any], layout: BaseModelLayout, dtype: torch.dtype = torch.float32
) -> AdapterWeights:
    """Read the prefix-tuning adapter in directory ``path`` (``raw``: its config).

    Raises:
        AdapterError: ``invalid_adapter``, ``unsupported_adapter_feature``, ``pickle_refused``.
    """
    kv_width, num_layers = layout.kv_width, layout.num_layers
    # PEFT sets token_dim to kv heads × head dim and num_attention_heads to the kv heads.
    config = read_virtual_token_config(raw, _HARMLESS, layout, kv_width, layout.num_kv_heads)
    n = config.num_virtual_tokens
    embeddings = read_prompt_embeddings(path, n, num_layers * 2 * kv_width, dtype)
    prefix = embeddings.view(n, num_layers, 2, kv_width)  # (n, layers, K|V, kv_width)
    return AdapterWeights(
        name=path.absolute().name,
        config=config,
        modules={},
        kind=PREFIX_TUNING,
        prefix=prefix.permute(1, 2, 0, 3).contiguous(),  # (layers, K|V, n, kv_width)
    )
