"""Which checkpoint tensors the engine treats specially, by name (a leaf module)."""

from __future__ import annotations


def is_quantized_linear(name: str, shape: tuple[int, ...]) -> bool:
    """Whether NF4 quantization covers this checkpoint tensor: the decoder layers' linear
    weights, not the embeddings or the output head (transformers' default too)."""
    return len(shape) == 2 and ".layers." in name and name.endswith("_proj.weight")
