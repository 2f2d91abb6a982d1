"""What the base model's weights take once loaded, from the checkpoint's headers alone.

The default pool is what a GPU has left after the weights (``engine/sizing.py``), so their
size is known before they load: from the safetensors headers, or with dummy weights from
the shapes ``config.json`` gives the model; NF4 weights count as the packed values, scales
and maps they are served as.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from engine.dummy import checkpoint_shapes
from engine.naming import is_quantized_linear
from engine.quantization import QUANT_STATE_KEY, unpack_quant_state
from kernels.nf4 import NESTED_BLOCKSIZE, nf4_nbytes


def itemsize(dtype: torch.dtype) -> int:
    """Bytes of one element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class WeightMemory:
    """The base model's weights once loaded.

    Attributes:
        params: parameters of every weight (of a 4-bit weight, the values it packs).
        bytes: bytes they take, quantization included.
        quantized_params, quantized_bytes: the NF4 weights alone (their scales and maps in
            the bytes).
    """

    params: int
    bytes: int
    quantized_params: int = 0
    quantized_bytes: int = 0

    @property
    def bits_per_param(self) -> float:
        """Over every weight of the base."""
        return 8 * self.bytes / max(self.params, 1)

    @property
    def quantized_bits_per_param(self) -> float:
        """Over the NF4 weights alone (``QuantizationReport.bits_per_param``)."""
        return 8 * self.quantized_bytes / max(self.quantized_params, 1)


def weight_memory(
    model_dir: Path, dtype: torch.dtype, quantization: str, load_format: str = "auto"
) -> WeightMemory:
    """What the checkpoint's weights take once loaded.

    The tensors are read from the safetensors headers or, with dummy weights (or no
    safetensors at all), from the shapes ``config.json`` gives the model. Float tensors count
    in ``dtype``; each weight stored in 4 bits (bitsandbytes), or quantized to NF4 at load
    (the decoder's linear weights; blocksize 64, double quantization), counts as the
    :class:`~kernels.nf4.NF4Weight` it is loaded as.
    """
    size = itemsize(dtype)
    stored_nf4 = {} if load_format == "dummy" else _stored_nf4_weights(model_dir)
    params = total = q_params = q_bytes = 0
    for name, shape in _checkpoint_tensors(model_dir, load_format):
        head, infix, _ = name.partition(".weight.")
        if infix and head + ".weight" in stored_nf4:
            continue  # a packed weight's scales and maps: counted with it
        numel = math.prod(shape)
        if name in stored_nf4:
            numel, nbytes = stored_nf4[name]
        elif quantization == "nf4" and is_quantized_linear(name, shape):
            nbytes = nf4_nbytes(numel)
        else:
            params += numel
            total += numel * size
            continue
        params += numel
        q_params += numel
        total += nbytes
        q_bytes += nbytes
    return WeightMemory(params, total, q_params, q_bytes)


def _stored_nf4_weights(model_dir: Path) -> dict[str, tuple[int, int]]:
    """``<module>.weight`` to ``(params, bytes)`` of each weight a bitsandbytes checkpoint
    stores in 4 bits, from its quant state (a few bytes of JSON read per weight)."""
    found = {}
    suffix = ".weight." + QUANT_STATE_KEY
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if not name.endswith(suffix):
                    continue
                state = unpack_quant_state(f.get_tensor(name))
                numel = math.prod(int(d) for d in state["shape"])
                nested = "nested_blocksize" in state
                nested_blocksize = int(state.get("nested_blocksize", NESTED_BLOCKSIZE))
                nbytes = nf4_nbytes(numel, int(state["blocksize"]), nested, nested_blocksize)
                found[name.removesuffix("." + QUANT_STATE_KEY)] = (numel, nbytes)
    return found


def device_weights(weights: WeightMemory, split: int) -> WeightMemory:
    """One device's share of ``weights`` split across ``split`` tensor-parallel devices:
    1/N of each, an NF4 part's block scales in float32 (4.5 bits a parameter rather than
    double quantization's 4.127: a part's blocks no longer form the second level's whole
    groups, `engine/parallel/sharding.py`). The norms, whole on every device, are left out."""
    if split == 1:
        return weights
    q_params = weights.quantized_params // split
    q_bytes = nf4_nbytes(q_params, nested=False) if q_params else 0
    floats = (weights.bytes - weights.quantized_bytes) // split
    return WeightMemory(weights.params // split, floats + q_bytes, q_params, q_bytes)


def weight_bytes(
    model_dir: Path, dtype: torch.dtype, quantization: str, load_format: str = "auto"
) -> int:
    """Bytes the checkpoint's weights take once loaded (see :func:`weight_memory`)."""
    return weight_memory(model_dir, dtype, quantization, load_format).bytes


def _checkpoint_tensors(model_dir: Path, load_format: str) -> Iterator[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every tensor: from the safetensors headers, or from the model
    ``config.json`` describes (built on the meta device) with dummy weights or no files."""
    files = sorted(model_dir.glob("*.safetensors"))
    if load_format == "dummy" or not files:
        yield from checkpoint_shapes(model_dir)
        return
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, tuple(f.get_slice(name).get_shape())
