"""Rotary position embeddings, computed exactly as transformers computes them.

The inverse frequencies come from transformers' own RoPE initialisers (so Llama-3, linear
and YaRN scaling mean what they mean there); cos/sin are tabulated once per position.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# Types whose frequencies change with the sequence length at run time; a fixed table would
# silently disagree with transformers past the original context.
_DYNAMIC = {"dynamic", "longrope"}


def rope_parameters(config: PretrainedConfig) -> dict[str, Any]:
    """The RoPE settings, from ``rope_parameters`` (transformers 5) or the older fields."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.pop("type", "default"))
    scaling.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return scaling


def inverse_frequencies(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """``(inv_freq [head_dim / 2], attention_scaling)`` for the config's RoPE type."""
    params = rope_parameters(config)
    rope_type = params.get("rope_type", "default")
    if rope_type in _DYNAMIC:
        raise ValueError(f"rope_type {rope_type!r} is not supported (frequencies vary at run time)")
    if rope_type == "default":
        base = float(params["rope_theta"])
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} is not supported")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    return inv_freq.float(), float(scaling)


class RotaryEmbedding:
    """Applies RoPE to packed query/key tensors at given positions.

    Not an ``nn.Module``: it owns no parameters, and its cos/sin tables are computed on the
    CPU, so a model built on the meta device and materialised with ``to_empty`` keeps them;
    a copy is made once for each device and dtype the model runs in.
    """

    def __init__(self, config: PretrainedConfig, head_dim: int, max_positions: int) -> None:
        with torch.device("cpu"):  # even when the model is being built on the meta device
            inv_freq, scaling = inverse_frequencies(config, head_dim)
            positions = torch.arange(max_positions, dtype=torch.float)
            freqs = positions[:, None] * inv_freq[None, :]  # (max_positions, head_dim / 2)
            angles = torch.cat((freqs, freqs), dim=-1)  # (max_positions, head_dim)
            self._cpu_tables = (angles.cos() * scaling, angles.sin() * scaling)
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _on(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        if key not in self._tables:
            cos, sin = self._cpu_tables
            self._tables[key] = (cos.to(device, dtype), sin.to(device, dtype))
        return self._tables[key]

    def __call__(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` (num_tokens, num_heads, head_dim) and ``k`` (num_tokens, kv_heads, ...)."""
        cos_table, sin_table = self._on(q.device, q.dtype)
        cos = cos_table[positions][:, None, :]  # (num_tokens, 1, head_dim)
        sin = sin_table[positions][:, None, :]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
