"""The NF4 base: quantization as an offline state-dict transform plus a swap of linear layers.

gpt-fast's pattern. :func:`quantize_nf4` turns one float weight into an
:class:`~kernels.nf4.NF4Weight`, byte for byte what bitsandbytes'
``quantize_4bit(quant_type="nf4", compress_statistics=True)`` produces; :func:`swap_linears`
replaces the decoder's ``nn.Linear`` layers with :class:`NF4Linear`, whose forward is the
fused dequantize-matmul of the model's backend, and its packed layers (q, k and v; gate and
up) with :class:`PackedNF4Linear`, one NF4Linear per slice. The checkpoint format
(bitsandbytes' tensor names and packed quant state, as transformers saves them) is read and
written here too. The one definition of dequantization is :func:`kernels.nf4.dequantize_nf4`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.model import NF4Matmul
from engine.naming import packed_module, slice_module
from engine.packed import PackedLinear, PackedSlices
from kernels.nf4 import (
    BLOCKSIZES,
    DEFAULT_BLOCKSIZE,
    NESTED_BLOCKSIZE,
    NF4Weight,
    dynamic_code,
    nf4_code,
)

# The tensors bitsandbytes stores beside a packed ``<module>.weight``.
QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
COMPONENTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", QUANT_STATE_KEY)


def _scale_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's absmax and its values scaled into [-1, 1], as bitsandbytes computes them.

    Full blocks are multiplied by the reciprocal of their absmax; a trailing partial block is
    divided by its absmax (the two roundings bitsandbytes uses).
    """
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (num_full_blocks, blocksize)
    absmax = blocks.abs().max(dim=-1).values
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).view(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return absmax, scaled


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted ``code`` (a tie goes to the lower one)."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints, out_int32=True)


def quantize_blockwise(
    values: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization to ``code``: (uint8 indices, float32 absmax per block)."""
    absmax, scaled = _scale_blocks(values.reshape(-1).float(), blocksize)
    return _nearest_code(scaled, code).to(torch.uint8), absmax


def quantize_nf4(
    weight: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True
) -> NF4Weight:
    """Quantize a 2-D float weight to NF4, laid out exactly as bitsandbytes lays it out."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"NF4 quantizes 2-D float weights, got {tuple(weight.shape)}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"NF4 blocksize {blocksize} is not one of {BLOCKSIZES}")
    device = weight.device
    code = nf4_code(device)
    absmax, scaled = _scale_blocks(weight.reshape(-1).float(), blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    idx = _nearest_code(scaled, code).to(torch.uint8)
    packed = (idx[0::2] << 4) | idx[1::2]
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    if not double_quant:
        return NF4Weight(packed, absmax, code, shape, blocksize)
    offset = absmax.mean()
    nested_code = dynamic_code(device)
    codes, nested_absmax = quantize_blockwise(absmax - offset, nested_code, NESTED_BLOCKSIZE)
    return NF4Weight(
        packed,
        codes,
        code,
        shape,
        blocksize,
        nested_absmax=nested_absmax,
        nested_code=nested_code,
        offset=float(offset),
    )


# ---------------------------------------------------------------------------------------
# The checkpoint format: bitsandbytes' tensors, as transformers saves a 4-bit model.


def nf4_from_checkpoint(name: str, tensors: dict[str, torch.Tensor]) -> NF4Weight:
    """Rebuild ``name`` (a ``<module>.weight``) from its packed tensor and quant state.

    ``tensors`` maps ``"weight"`` and each of :data:`COMPONENTS` present to its tensor.
    """
    if QUANT_STATE_KEY not in tensors:
        raise ValueError(f"{name}: a packed 4-bit weight without {QUANT_STATE_KEY}")
    state = unpack_quant_state(tensors[QUANT_STATE_KEY])
    if state.get("quant_type") != "nf4":
        raise ValueError(f"{name}: quant_type {state.get('quant_type')!r}; only nf4 is served")
    shape = tuple(int(d) for d in state["shape"])
    if len(shape) != 2:
        raise ValueError(f"{name}: quantized shape {shape} is not 2-D")
    nested = "nested_absmax" in tensors
    try:
        return NF4Weight(
            packed=tensors["weight"].view(torch.uint8).reshape(-1),
            absmax=tensors["absmax"].reshape(-1),
            code=tensors["quant_map"].float().reshape(-1),
            shape=(shape[0], shape[1]),
            blocksize=int(state["blocksize"]),
            nested_absmax=tensors["nested_absmax"].float().reshape(-1) if nested else None,
            nested_code=tensors["nested_quant_map"].float().reshape(-1) if nested else None,
            offset=float(state.get("nested_offset", 0.0)),
            nested_blocksize=int(state.get("nested_blocksize", NESTED_BLOCKSIZE)),
        )
    except KeyError as missing:
        raise ValueError(f"{name}: the checkpoint lacks {name}.{missing.args[0]}") from None
    except ValueError as bad:
        raise ValueError(f"{name}: {bad}") from None


def nf4_to_checkpoint(w: NF4Weight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes saves for ``w``, keyed as suffixes of ``<module>.weight``.

    The key ``""`` is the packed weight itself; ``dtype`` is the float dtype it came from.
    """
    state: dict[str, Any] = {
        "quant_type": "nf4",
        "blocksize": w.blocksize,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": list(w.shape),
    }
    out = {"": w.packed.reshape(-1, 1), ".absmax": w.absmax, ".quant_map": w.code}
    if w.nested:
        assert w.nested_absmax is not None and w.nested_code is not None
        state |= {
            "nested_blocksize": w.nested_blocksize,
            "nested_dtype": "float32",
            "nested_offset": w.offset,
        }
        out |= {".nested_absmax": w.nested_absmax, ".nested_quant_map": w.nested_code}
    out["." + QUANT_STATE_KEY] = pack_quant_state(state)
    return {k: v.contiguous().cpu() for k, v in out.items()}


def unpack_quant_state(tensor: torch.Tensor) -> dict[str, Any]:
    """bitsandbytes' non-tensor quant state: JSON stored as a uint8 tensor."""
    try:
        state: dict[str, Any] = json.loads(bytes(tensor.reshape(-1).tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("the 4-bit quant state is not valid JSON") from None
    return state


def pack_quant_state(state: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


def quantization_config(compute_dtype: torch.dtype) -> dict[str, Any]:
    """The ``quantization_config`` transformers writes for an NF4 checkpoint of ours."""
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": None,
    }


# ---------------------------------------------------------------------------------------
# The module swap.


class NF4Linear(nn.Module):
    """A linear layer whose weight is NF4: ``y = x · dequantize(W)ᵀ + b``.

    The weight is set once, by the loader, with :meth:`set_weight`; the bias (Qwen2's q, k
    and v) stays a float parameter.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, matmul: NF4Matmul) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.matmul = matmul
        self.weight: NF4Weight | None = None

    def set_weight(self, weight: NF4Weight) -> None:
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"NF4 weight of shape {weight.shape}, layer expects "
                f"{(self.out_features, self.in_features)}"
            )
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.weight is not None, "NF4Linear used before its weight was loaded"
        out = self.matmul(x.reshape(-1, self.in_features), self.weight)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        bs = self.weight.blocksize if self.weight is not None else "?"
        return f"in={self.in_features}, out={self.out_features}, nf4 blocksize={bs}"


class PackedNF4Linear(nn.Module):
    """A packed layer (`engine/packed.py`) in NF4: one :class:`NF4Linear` per slice, named
    after it (``qkv_proj.k_proj``), each writing its columns of one output.

    bitsandbytes quantizes q, k and v as three tensors, each with its own blocks, absmax and
    double-quantization offset (the mean of its own absmax), so re-quantizing the packed
    weight as one tensor would not keep the checkpoint's bytes. Each slice keeps its
    NF4Weight exactly as an unpacked layer would, and the forward runs one fused
    dequantize-matmul per slice, copied into its columns of the output buffer: that copy is
    of (num_tokens, width) outputs, small beside reading the slice's weight. The bias
    (Qwen2's q, k and v) is one float parameter of the packed width, as PackedLinear's.
    """

    def __init__(
        self, in_features: int, slices: PackedSlices, bias: bool, matmul: NF4Matmul
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = slices.out_features
        self.slices = slices
        for name, width in zip(slices.names, slices.widths, strict=True):
            self.add_module(name, NF4Linear(in_features, width, False, matmul))
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None

    def part(self, name: str) -> NF4Linear:
        """The NF4Linear of slice ``name``."""
        layer = self.get_submodule(name)
        assert isinstance(layer, NF4Linear)
        return layer

    def slice_forward(self, x: torch.Tensor, s: int) -> torch.Tensor:
        """Slice ``s`` alone: ``x · dequantize(W_s)ᵀ + b_s``, (rows, its width)."""
        out: torch.Tensor = self.part(self.slices.names[s])(x)
        if self.bias is not None:
            offsets = self.slices.column_offsets
            out = out + self.bias[offsets[s] : offsets[s + 1]]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.empty(flat.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        offsets = self.slices.column_offsets
        for s, name in enumerate(self.slices.names):
            out[:, offsets[s] : offsets[s + 1]] = self.part(name)(flat)
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)


def swap_linears(model: nn.Module, matmul: NF4Matmul, keep: Callable[[str], bool]) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` not kept by ``keep`` with NF4Linear, and every
    packed layer with PackedNF4Linear.

    ``keep`` and the result speak the checkpoint's module names: a packed layer is swapped
    when none of its slices is kept (a checkpoint quantizing only some of them cannot be
    served packed). Runs on the meta device before materialisation, so the float weights are
    never allocated. Returns the replaced modules' checkpoint names.
    """
    swapped = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        has_bias = module.bias is not None
        nf4: nn.Module
        if isinstance(module, PackedLinear):
            names = [slice_module(name, leaf) for leaf in module.slices.names]
            kept = [keep(n) for n in names]
            if any(kept) and not all(kept):
                raise ValueError(f"NF4 covers some of {names} but not all; they run as one layer")
            nf4 = PackedNF4Linear(module.in_features, module.slices, has_bias, matmul)
        else:
            names, kept = [name], [keep(name)]
            nf4 = NF4Linear(module.in_features, module.out_features, has_bias, matmul)
        if all(kept):
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, nf4)
        swapped.extend(names)
    return swapped


def nf4_layer(model: nn.Module, module: str) -> NF4Linear:
    """The NF4Linear holding checkpoint module ``module``'s weight (in a packed layer, the
    slice's: ``...self_attn.k_proj`` is ``...self_attn.qkv_proj.k_proj``)."""
    packed = packed_module(module)
    layer = model.get_submodule(module if packed is None else ".".join(packed))
    assert isinstance(layer, NF4Linear), f"{module} is not an NF4 layer"
    return layer


@dataclass(frozen=True)
class QuantizationReport:
    """Memory of the base model's weights with and without quantization.

    Attributes:
        quantized_params: parameters of the NF4 weights.
        quantized_bytes: bytes the NF4 weights take (packed values and all their scales).
        base_bytes: bytes of all the base model's weights as loaded.
        unquantized_bytes: bytes the same weights would take unquantized, in the dtype.
    """

    quantized_params: int
    quantized_bytes: int
    base_bytes: int
    unquantized_bytes: int

    @property
    def bits_per_param(self) -> float:
        return 8 * self.quantized_bytes / max(self.quantized_params, 1)

    @property
    def saved_bytes(self) -> int:
        return self.unquantized_bytes - self.base_bytes


def memory_report(model: nn.Module, dtype: torch.dtype) -> QuantizationReport:
    """What the loaded ``model``'s weights take, against the same model unquantized."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    params = {id(p): p for p in model.parameters()}.values()
    float_bytes = sum(p.numel() * p.element_size() for p in params)
    layers = [m for m in model.modules() if isinstance(m, NF4Linear) and m.weight is not None]
    q_params = sum(m.weight.numel for m in layers if m.weight is not None)
    q_bytes = sum(m.weight.nbytes for m in layers if m.weight is not None)
    return QuantizationReport(
        quantized_params=q_params,
        quantized_bytes=q_bytes,
        base_bytes=float_bytes + q_bytes,
        unquantized_bytes=float_bytes + q_params * itemsize,
    )
