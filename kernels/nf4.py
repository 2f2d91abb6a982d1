"""NF4 weights with double quantization (QLoRA), laid out exactly as bitsandbytes stores them.

A weight W (out, in) is read as one flat row-major vector of n = out·in values, cut into
blocks of ``blocksize`` (64) values. Each value is stored as the 4-bit index of the nearest
of the 16 NF4 code values after its block is scaled into [-1, 1]; two indices share a byte,
the even element in the high nibble. The block scales (absmax, float32) are themselves
quantized to 8 bits ("double quantization"): their mean ``offset`` is subtracted, and the
rest is quantized blockwise (256 scales per block) to bitsandbytes' signed dynamic 8-bit map.

Semantics (the one definition of dequantization, shared by kernels, references and merging):
    scale[b]  = dyn[absmax[b]] · nested_absmax[b // nested_blocksize] + offset   (float32)
                (without double quantization: scale[b] = absmax[b], stored as float32)
    W.flat[i] = code[nibble(i)] · scale[i // blocksize]                          (float32)
    out = x · Wᵀ, computed with W cast to x's dtype

The matmul comes as a torch reference (`nf4_linear_ref`, the CPU path), a row-tiled torch
form that never materialises the whole float weight (`nf4_linear_tiled`), and the fused
Triton kernels in `kernels/nf4_matmul.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

# The NF4 code: quantiles of N(0, 1) normalised to [-1, 1], as QLoRA and bitsandbytes publish
# them (float32 values written out in full).
NF4_CODE_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the ones bitsandbytes accepts
DEFAULT_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 code values, float32, sorted."""
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)


def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (256 float32 values, sorted).

    Dettmers' dynamic tree quantization with 7 exponent bits: for exponent e = 0..6 the
    fraction has 2^e + 1 boundaries spread over [0.1, 1]; each code is the midpoint of two
    boundaries times 10^(e - 6), with both signs; plus 0 and 1, and zeros to fill 256.
    """
    values: list[float] = []
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        magnitude = 10 ** (e - 6)  # multiplied in float32, as bitsandbytes does
        values += (magnitude * means).tolist() + (-magnitude * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def nf4_nbytes(
    numel: int,
    blocksize: int = DEFAULT_BLOCKSIZE,
    nested: bool = True,
    nested_blocksize: int = NESTED_BLOCKSIZE,
) -> int:
    """Bytes of every tensor an :class:`NF4Weight` of ``numel`` values is made of (its
    ``nbytes``), from the layout alone: the packed values, the block scales (uint8 codes when
    nested, else float32), the 16-value code and, when nested, the nested scales (float32)
    and their 256-value map. About 4.127 bits per value at blocksize 64 with double
    quantization (QLoRA's 4 + 8/64 + 32/(64·256)), plus the two maps per weight."""
    num_blocks = -(-numel // blocksize)
    total = (numel + 1) // 2 + 4 * 16
    if not nested:
        return total + 4 * num_blocks
    return total + num_blocks + 4 * -(-num_blocks // nested_blocksize) + 4 * 256


@dataclass(frozen=True)
class NF4Weight:
    """One linear layer's weight in NF4, as bitsandbytes' packed tensor plus its quant state.

    Attributes:
        packed: (ceil(n / 2),) uint8, two 4-bit code indices per byte, high nibble first.
        absmax: (num_blocks,) uint8 codes of each block's scale when double-quantized,
            else float32 scales.
        code: (16,) float32 NF4 code values (the checkpoint's ``quant_map``).
        shape: (out_features, in_features).
        blocksize: values per block (64 by default).
        nested_absmax: (ceil(num_blocks / nested_blocksize),) float32 scales of the
            absmax codes, or None without double quantization.
        nested_code: (256,) float32 dynamic map of the absmax codes, or None.
        offset: the mean scale subtracted before the absmax was quantized (a float32 value).
        nested_blocksize: absmax codes per nested block (256).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: tuple[int, int]
    blocksize: int = DEFAULT_BLOCKSIZE
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: float = 0.0
    nested_blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self) -> None:
        n = self.numel
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"NF4 blocksize {self.blocksize} is not one of {BLOCKSIZES}")
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (n + 1) // 2:
            raise ValueError(
                f"NF4 weight {self.shape} needs {(n + 1) // 2} packed uint8 bytes, "
                f"got {self.packed.numel()} {self.packed.dtype}"
            )
        if self.absmax.numel() != self.num_blocks:
            raise ValueError(
                f"NF4 weight {self.shape} has {self.num_blocks} blocks of {self.blocksize} "
                f"but {self.absmax.numel()} absmax values"
            )
        if self.code.numel() != 16 or self.code.dtype != torch.float32:
            raise ValueError(f"NF4 quant_map must be 16 float32 values, got {self.code.numel()}")
        if self.nested:
            assert self.nested_absmax is not None and self.nested_code is not None
            expected = -(-self.num_blocks // self.nested_blocksize)
            if self.absmax.dtype != torch.uint8 or self.nested_absmax.numel() != expected:
                raise ValueError(
                    f"NF4 weight {self.shape}: double quantization needs uint8 absmax and "
                    f"{expected} nested_absmax values, got {self.absmax.dtype} and "
                    f"{self.nested_absmax.numel()}"
                )
            if self.nested_code.numel() != 256 or self.nested_code.dtype != torch.float32:
                raise ValueError("NF4 nested_quant_map must be 256 float32 values")
            if self.nested_absmax.dtype != torch.float32:
                raise ValueError("NF4 nested_absmax must be float32")
        elif self.absmax.dtype != torch.float32:
            raise ValueError("NF4 absmax without double quantization must be float32")

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def nested(self) -> bool:
        """Whether the block scales are double-quantized."""
        return self.nested_absmax is not None

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the weight is made of."""
        tensors = [self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to(self, device: torch.device | str) -> NF4Weight:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            packed=self.packed.to(device),
            absmax=self.absmax.to(device),
            code=self.code.to(device),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
        )


def block_scales(w: NF4Weight) -> torch.Tensor:
    """(num_blocks,) float32 scale of each block: the absmax, double-dequantized if nested."""
    if not w.nested:
        return w.absmax.float()
    assert w.nested_absmax is not None and w.nested_code is not None
    nb, nbs = w.num_blocks, w.nested_blocksize
    codes = w.nested_code[w.absmax.long()]
    padded = torch.nn.functional.pad(codes, (0, w.nested_absmax.numel() * nbs - nb))
    # (num_nested_blocks, nested_blocksize) · (num_nested_blocks, 1)
    scales = (padded.view(-1, nbs) * w.nested_absmax.view(-1, 1)).view(-1)[:nb]
    return scales + torch.tensor(w.offset, dtype=torch.float32, device=scales.device)


def _code_values(code: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) float32 code values of packed bytes: one lookup per byte in a 256-pair table."""
    pairs = torch.stack((code.repeat_interleave(16), code.repeat(16)), dim=1)  # byte -> (hi, lo)
    return pairs[packed.view(-1).long()].view(-1)[:n]


def dequantize_nf4(w: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight (out, in) that ``w`` stands for, in ``dtype``."""
    n, bs = w.numel, w.blocksize
    values = _code_values(w.code, w.packed, n)
    padded = torch.nn.functional.pad(values, (0, w.num_blocks * bs - n))
    # (num_blocks, blocksize) · (num_blocks, 1)
    flat = (padded.view(-1, bs) * block_scales(w).view(-1, 1)).view(-1)[:n]
    return flat.view(w.shape).to(dtype)


def nf4_linear_ref(x: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """x (m, in) · dequantize(w)ᵀ -> (m, out) in x's dtype: dequantize, then matmul."""
    return x @ dequantize_nf4(w, x.dtype).t()


def dequantize_rows(
    w: NF4Weight,
    start: int,
    stop: int,
    dtype: torch.dtype,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows [start, stop) of the float weight, when the rows start and end on block edges.

    ``scales``: ``block_scales(w)``, when the caller dequantizes several row ranges.
    """
    k, bs = w.shape[1], w.blocksize
    assert (start * k) % bs == 0 and (stop * k) % bs == 0, "rows must align with blocks"
    first, last = start * k // bs, stop * k // bs
    values = _code_values(w.code, w.packed[start * k // 2 : stop * k // 2], (stop - start) * k)
    scales = (block_scales(w) if scales is None else scales)[first:last]
    return (values.view(-1, bs) * scales.view(-1, 1)).view(stop - start, k).to(dtype)


def nf4_linear_tiled(x: torch.Tensor, w: NF4Weight, rows_per_tile: int = 512) -> torch.Tensor:
    """`nf4_linear_ref` one tile of output rows at a time (the float weight is never whole).

    Falls back to the reference when rows do not start on block edges.
    """
    out_features, k = w.shape
    aligned = (k * rows_per_tile) % w.blocksize == 0 and w.numel % w.blocksize == 0
    if not aligned or out_features <= rows_per_tile:
        return nf4_linear_ref(x, w)
    out = torch.empty(x.shape[0], out_features, dtype=x.dtype, device=x.device)
    scales = block_scales(w)  # once, not per tile
    for start in range(0, out_features, rows_per_tile):
        stop = min(start + rows_per_tile, out_features)
        out[:, start:stop] = x @ dequantize_rows(w, start, stop, x.dtype, scales).t()
    return out
