"""Which checkpoint tensors the engine treats specially, by name (a leaf module).

Checkpoints (and PEFT adapters) name q, k, v, gate and up one by one; the model packs each
group that shares an input into one linear layer (`engine/packed.py`). :data:`PACKED` is the
map between the two, as vLLM's ``packed_modules_mapping``.
"""

from __future__ import annotations

# Packed leaf module -> the checkpoint's leaf modules it holds, in the order of its output
# columns. Each is a LoRA target of its own (`adapters.base_layout.LINEAR_TARGETS`).
PACKED: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
_PACKED_IN = {leaf: packed for packed, leaves in PACKED.items() for leaf in leaves}


def is_quantized_linear(name: str, shape: tuple[int, ...]) -> bool:
    """Whether NF4 quantization covers this checkpoint tensor: the decoder layers' linear
    weights, not the embeddings or the output head (transformers' default too)."""
    return len(shape) == 2 and ".layers." in name and name.endswith("_proj.weight")


def packed_module(module: str) -> tuple[str, str] | None:
    """The model's module that holds a checkpoint module, and the slice it is there, e.g.
    ``model.layers.0.self_attn.k_proj`` -> ``(model.layers.0.self_attn.qkv_proj, k_proj)``;
    None for a module the model holds as it is."""
    parent, _, leaf = module.rpartition(".")
    packed = _PACKED_IN.get(leaf)
    return None if packed is None else (f"{parent}.{packed}", leaf)


def slice_module(packed: str, leaf: str) -> str:
    """The checkpoint's name of slice ``leaf`` of the model's packed module ``packed``."""
    return f"{packed.rpartition('.')[0]}.{leaf}"
