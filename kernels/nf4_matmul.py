"""Fused NF4 dequantize + matmul: out = x · Wᵀ, W read as packed 4-bit codes, never written out.

The Triton twin of `nf4_linear_ref` (`kernels/nf4.py` defines the format and the one meaning of
dequantization). Every program dequantizes the weight tiles it multiplies, in registers. Two
forms: GEMV for decode batches (m <= GEMV_MAX_M rows, products on CUDA cores, since tl.dot needs
16 rows) and GEMM for larger ones (tl.dot).

Semantics:
    W = dequantize_nf4(w) (float32: W.flat[i] = code[nibble(i)] · scale[i // blocksize])
    out[i, r] = sum_c float32(x[i, c]) · float32(dtype(W[r, c]))     dtype = x.dtype
    Products are exact for 16-bit inputs and accumulate in float32, in an unspecified order:
    when the reduction over c is split across programs, their float32 partial sums are added
    with atomics, so the last bits vary from run to run. out is (m, n) in x's dtype. The
    reference computes x @ dtype(W)ᵀ in x's dtype: the same up to the rounding of the sum.

Args (shared by every op here):
    x: (m, k), float32, bfloat16 or float16, any strides.
    w: `NF4Weight` of shape (n, k), its tensors on x's device and contiguous.

Kernel preconditions (`nf4_linear` falls back to `nf4_linear_ref` when one fails):
    k % 64 == 0 and w.blocksize % 64 == 0 (every bitsandbytes blocksize but 32). Then a
    64-column chunk of a weight row, 32 packed bytes, lies inside one quantization block (its
    first flat index row·k + c0 and every block edge are multiples of 64), so a chunk needs one
    scale per row, that of block (row·k + c0) // blocksize. A last block cut short by the end of
    the weight is fine.
    Triton can launch on x's device (`can_launch_triton`: CUDA, or the CPU interpreter).
"""

from dataclasses import dataclass, replace
from typing import Any

import torch

from kernels.nf4 import NF4Weight, nf4_linear_ref
from kernels.triton_utils import HAS_TRITON, can_launch_triton, next_power_of_2

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHUNK = 64  # weight columns per reduction step: 32 packed bytes, one scale per row
GEMV_MAX_M = 16  # nf4_linear runs the GEMV form up to this many rows of x, the GEMM form above
# ...up to this many: a long prefill chunk re-dequantizes every weight tile once per 128 rows
# of x in the fused GEMM, while dequantizing W once and calling the float matmul (cuBLAS)
# costs one pass over W; so above it, nf4_linear takes that path (a starting point, untimed).
GEMM_MAX_M = 512


def triton_supports(x: torch.Tensor, w: NF4Weight) -> bool:
    """Whether the kernels can run x · Wᵀ (the preconditions above, and x's dtype)."""
    return (
        can_launch_triton(x.device)
        and x.dtype in DTYPES
        and w.shape[1] % CHUNK == 0
        and w.blocksize % CHUNK == 0
    )


def nf4_linear(x: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """x (m, k) · dequantize(w)ᵀ -> (m, n) in x's dtype, fused where the kernels allow.

    GEMV form for m <= GEMV_MAX_M, GEMM form up to GEMM_MAX_M, dequantize-then-matmul above;
    `nf4_linear_ref` when `triton_supports` is false (k or the blocksize not a multiple of 64,
    no Triton for x's device, another dtype).
    """
    if not triton_supports(x, w) or x.shape[0] > GEMM_MAX_M:
        return nf4_linear_ref(x, w)
    if x.shape[0] <= GEMV_MAX_M:
        return nf4_gemv(x, w)
    return nf4_gemm(x, w)


# ----------------------------------------------------------------------------------------------
# Block sizes (tuning is data)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NF4Blocks:
    block_n: int  # weight rows (output features) per program
    max_split_k: int  # programs sharing one output tile's reduction at most; > 1 adds float32
    #   partial sums with atomics into a zeroed buffer, cast to x's dtype afterwards
    min_programs: int  # the reduction is split until the grid has this many programs
    num_warps: int
    num_stages: int


# Keyed by (device type, form, the largest BLOCK_M the row serves). A launch wants
# BLOCK_M = next_power_of_2(m) (at least 16 for GEMM's tl.dot) and takes the first row holding
# it, or the largest row with BLOCK_M capped to its key (more programs along m).
# CUDA rows are starting points for H100 (132 SMs; 4096 x 4096 and 4096 x 11008 bf16 weights,
# m = 1..64), sized by compiling for sm_90 (registers, spills, vector widths), not yet timed:
# * GEMV is bound by reading the packed weight once. BLOCK_M · BLOCK_N <= 256 keeps the
#   (BLOCK_M, BLOCK_N, 32) float32 products at 64 registers per thread of 4 warps (48-106
#   registers in all, no spills); at BLOCK_M <= 4 a step loads 64 rows x 32 bytes, 16 bytes per
#   thread. Triton does not software-pipeline this loop (no tl.dot; num_stages 3 compiles to the
#   same PTX), so num_stages is 1, and splitting K to ~8 programs per SM keeps loads in flight
#   instead (a 4096-row weight: 64 row blocks x 16 splits).
# * GEMM multiplies the dequantized tile as tl.dot's left operand, which Hopper's wgmma reads
#   from registers (the right one must sit in shared memory): BLOCK_N = 128 rows are two
#   warpgroups' M of 64, the token block is N. 8 warps need 60-130 registers (4 warps: up to
#   200, and float32 spills). Splitting K fills the GPU when few token blocks exist (m <= 64).
# The interpreter's small tiles and 2-way split make CPU tests cross row tiles and splits.
_CPU = NF4Blocks(block_n=32, max_split_k=2, min_programs=8, num_warps=1, num_stages=1)
_CUDA_GEMV = NF4Blocks(block_n=64, max_split_k=16, min_programs=1056, num_warps=4, num_stages=1)
_CUDA_GEMM = NF4Blocks(block_n=128, max_split_k=8, min_programs=264, num_warps=8, num_stages=3)
NF4_BLOCKS: dict[tuple[str, str, int], NF4Blocks] = {
    ("cpu", "gemv", 16): _CPU,
    ("cpu", "gemm", 32): _CPU,
    ("cuda", "gemv", 4): _CUDA_GEMV,
    ("cuda", "gemv", 8): replace(_CUDA_GEMV, block_n=32),
    ("cuda", "gemv", 16): replace(_CUDA_GEMV, block_n=16),
    ("cuda", "gemm", 128): _CUDA_GEMM,
}


def _blocks_for(device: torch.device, form: str, block_m: int) -> tuple[NF4Blocks, int]:
    """The block row for a launch, and the BLOCK_M it runs with."""
    keys = sorted(key for key in NF4_BLOCKS if key[:2] == (device.type, form))
    assert keys, f"no NF4 matmul block config for {device.type} {form}"
    key = next((key for key in keys if block_m <= key[2]), keys[-1])
    return NF4_BLOCKS[key], min(block_m, key[2])


def _split_k(tiles: int, chunks: int, blocks: NF4Blocks) -> int:
    """Programs per output tile: split the chunks until the grid has min_programs programs."""
    wanted = -(-blocks.min_programs // tiles)
    return max(1, min(blocks.max_split_k, wanted, chunks))


# ----------------------------------------------------------------------------------------------
# Triton kernels (Linux only)
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels.triton_utils import dot_operand_dtype

    _CHUNK_BYTES = tl.constexpr(CHUNK // 2)

    @triton.jit
    def _dequantize_chunk(  # type: ignore[no-untyped-def]
        packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
        rows, row_mask, k, chunk,
        BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    ):  # fmt: skip
        # Columns chunk·64 .. chunk·64 + 63 of the weight rows `rows` ((BLOCK_N,) int64, masked
        # by row_mask) as float32 (hi, lo), each (BLOCK_N, 32): byte j holds column 2j in its
        # high nibble and column 2j + 1 in its low nibble. Masked rows come out finite.
        first = rows * k + chunk * 64  # (BLOCK_N,) flat index of each row's chunk
        offs_j = tl.arange(0, _CHUNK_BYTES)
        # rows · (k // 2) rather than first // 2: the compiler then sees 16-byte aligned rows
        byte_ptrs = packed_ptr + (rows * (k // 2) + chunk * 32)[:, None] + offs_j[None, :]
        packed = tl.load(byte_ptrs, mask=row_mask[:, None], other=0).to(tl.int32)
        blocks = first // BLOCKSIZE  # the chunk's one quantization block
        if NESTED:  # nf4.py's block_scales: dyn[absmax[b]] · nested_absmax[b // 256] + offset
            absmax_code = tl.load(absmax_ptr + blocks, mask=row_mask, other=0).to(tl.int32)
            nested_blocks = blocks // NESTED_BLOCKSIZE
            nested = tl.load(nested_absmax_ptr + nested_blocks, mask=row_mask, other=0.0)
            # (GPUs may fuse this into one fma: within a float32 ulp of block_scales)
            scale = tl.load(nested_code_ptr + absmax_code) * nested + offset
        else:
            scale = tl.load(absmax_ptr + blocks, mask=row_mask, other=0.0).to(tl.float32)
        hi = tl.load(code_ptr + (packed >> 4)) * scale[:, None]
        lo = tl.load(code_ptr + (packed & 15)) * scale[:, None]
        return hi, lo

    # Both kernels: one program per (BLOCK_N weight rows, BLOCK_M rows of x, one split of the
    # k / 64 chunks). Split programs add float32 partial sums into a zeroed out (ATOMIC_ADD);
    # otherwise out has x's dtype and is written once. x is read as its even and odd columns,
    # matching the high and low nibbles, so the dequantized tile is never interleaved.
    @triton.jit
    def _nf4_gemv_kernel(  # type: ignore[no-untyped-def]
        x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, out_ptr,
        offset, m, n, k, chunks_per_split,
        stride_x_row, stride_x_col, stride_out_row,
        BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC_ADD: tl.constexpr,
    ):  # fmt: skip
        # Products as (BLOCK_M, BLOCK_N, 32) broadcasts summed over the chunk, in float32.
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n
        rows = rows.to(tl.int64)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x_row  # (BLOCK_M, 1)
        offs_j = tl.arange(0, _CHUNK_BYTES)
        chunk_start = tl.program_id(2) * chunks_per_split
        chunk_end = tl.minimum(chunk_start + chunks_per_split, k // 64)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for chunk in range(chunk_start, chunk_end):
            hi, lo = _dequantize_chunk(
                packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                rows, row_mask, k, chunk, BLOCKSIZE, NESTED_BLOCKSIZE, NESTED,
            )  # fmt: skip
            # W in x's dtype, as the reference multiplies it (a no-op for float32)
            hi = hi.to(x_ptr.dtype.element_ty).to(tl.float32)
            lo = lo.to(x_ptr.dtype.element_ty).to(tl.float32)
            cols = (chunk * 64 + 2 * offs_j).to(tl.int64)  # (32,) even columns
            x_ptrs = x_rows + cols[None, :] * stride_x_col  # (BLOCK_M, 32)
            x_even = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0).to(tl.float32)
            x_odd = tl.load(x_ptrs + stride_x_col, mask=m_mask[:, None], other=0.0).to(tl.float32)
            products = x_even[:, None, :] * hi[None, :, :] + x_odd[:, None, :] * lo[None, :, :]
            acc += tl.sum(products, axis=2)  # (BLOCK_M, BLOCK_N)

        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_out_row + rows[None, :]
        out_mask = m_mask[:, None] & row_mask[None, :]
        if ATOMIC_ADD:
            tl.atomic_add(out_ptrs, acc, mask=out_mask)
        else:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _nf4_gemm_kernel(  # type: ignore[no-untyped-def]
        x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, out_ptr,
        offset, m, n, k, chunks_per_split,
        stride_x_row, stride_x_col, stride_out_row,
        BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC_ADD: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
    ):  # fmt: skip
        # Computes the transposed tile outᵀ = W · xᵀ (BLOCK_N, BLOCK_M), so the dequantized
        # weight, built in registers, is tl.dot's left operand (see NF4_BLOCKS). float32 inputs
        # use input_precision="ieee" (never tf32); the option is ignored for 16-bit ones.
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n
        rows = rows.to(tl.int64)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m
        x_rows = x_ptr + offs_m.to(tl.int64)[None, :] * stride_x_row  # (1, BLOCK_M)
        offs_j = tl.arange(0, _CHUNK_BYTES)
        chunk_start = tl.program_id(2) * chunks_per_split
        chunk_end = tl.minimum(chunk_start + chunks_per_split, k // 64)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for chunk in range(chunk_start, chunk_end):
            hi, lo = _dequantize_chunk(
                packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                rows, row_mask, k, chunk, BLOCKSIZE, NESTED_BLOCKSIZE, NESTED,
            )  # fmt: skip
            # W rounded to x's dtype; DOT_DTYPE differs from it only under the interpreter
            hi = hi.to(x_ptr.dtype.element_ty).to(DOT_DTYPE)
            lo = lo.to(x_ptr.dtype.element_ty).to(DOT_DTYPE)
            cols = (chunk * 64 + 2 * offs_j).to(tl.int64)  # (32,) even columns
            x_ptrs = x_rows + cols[:, None] * stride_x_col  # (32, BLOCK_M): xᵀ
            x_even = tl.load(x_ptrs, mask=m_mask[None, :], other=0.0).to(DOT_DTYPE)
            x_odd = tl.load(x_ptrs + stride_x_col, mask=m_mask[None, :], other=0.0).to(DOT_DTYPE)
            acc = tl.dot(hi, x_even, acc=acc, input_precision="ieee")
            acc = tl.dot(lo, x_odd, acc=acc, input_precision="ieee")

        out_ptrs = out_ptr + offs_m.to(tl.int64)[None, :] * stride_out_row + rows[:, None]
        out_mask = row_mask[:, None] & m_mask[None, :]
        if ATOMIC_ADD:
            tl.atomic_add(out_ptrs, acc, mask=out_mask)
        else:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _check_launch(x: torch.Tensor, w: NF4Weight) -> None:
    """The kernels' preconditions (module docstring) and the layout they read."""
    assert x.dtype in DTYPES, f"unsupported dtype {x.dtype}"
    assert x.dim() == 2, f"x must be (m, k), got {tuple(x.shape)}"
    assert x.shape[1] == w.shape[1], f"x has {x.shape[1]} columns, weight {w.shape} wants k"
    assert w.shape[1] % CHUNK == 0, f"k = {w.shape[1]} is not a multiple of {CHUNK}"
    assert w.blocksize % CHUNK == 0, f"blocksize {w.blocksize} is not a multiple of {CHUNK}"
    assert can_launch_triton(x.device), f"no Triton for {x.device} tensors: use nf4_linear_ref"
    assert w.code.dtype == torch.float32, f"NF4 code must be float32, got {w.code.dtype}"
    if w.nested:
        assert w.nested_absmax is not None and w.nested_code is not None
        assert w.nested_absmax.dtype == torch.float32, "nested_absmax must be float32"
        assert w.nested_code.dtype == torch.float32, "nested_code must be float32"
    for t in (w.packed, w.absmax, w.code, w.nested_absmax, w.nested_code):
        if t is not None:
            assert t.device == x.device, f"weight on {t.device}, x on {x.device}"
            assert t.is_contiguous(), "NF4 weight tensors must be contiguous"


def _launch(
    kernel: Any,  # a @triton.jit kernel (untyped)
    form: str,
    x: torch.Tensor,
    w: NF4Weight,
    min_block_m: int,
    **constexprs: Any,
) -> torch.Tensor:
    """Pick tiles and the K split for (m, n, k), run `kernel`, return out (m, n) in x's dtype."""
    m, k = x.shape
    n = w.shape[0]
    if m == 0 or n == 0:
        return torch.zeros(m, n, dtype=x.dtype, device=x.device)
    blocks, block_m = _blocks_for(x.device, form, max(min_block_m, next_power_of_2(m)))
    tiles = triton.cdiv(n, blocks.block_n) * triton.cdiv(m, block_m)
    chunks = k // CHUNK
    chunks_per_split = triton.cdiv(chunks, _split_k(tiles, chunks, blocks))
    split_k = triton.cdiv(chunks, chunks_per_split)  # every split has work
    if split_k > 1:
        out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    nested_absmax = w.absmax if w.nested_absmax is None else w.nested_absmax  # never read then
    nested_code = w.code if w.nested_code is None else w.nested_code
    grid = (triton.cdiv(n, blocks.block_n), triton.cdiv(m, block_m), split_k)
    kernel[grid](
        x, w.packed, w.absmax, w.code, nested_absmax, nested_code, out,
        w.offset, m, n, k, chunks_per_split,
        x.stride(0), x.stride(1), out.stride(0),
        BLOCKSIZE=w.blocksize, NESTED_BLOCKSIZE=w.nested_blocksize, NESTED=w.nested,
        BLOCK_M=block_m, BLOCK_N=blocks.block_n, ATOMIC_ADD=split_k > 1, **constexprs,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip
    return out.to(x.dtype)


def nf4_gemv(x: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """Triton `nf4_linear_ref` for decode batches, m <= GEMV_MAX_M (see `Semantics`)."""
    _check_launch(x, w)
    assert x.shape[0] <= GEMV_MAX_M, f"GEMV takes at most {GEMV_MAX_M} rows, got {x.shape[0]}"
    return _launch(_nf4_gemv_kernel, "gemv", x, w, min_block_m=1)


def nf4_gemm(x: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """Triton `nf4_linear_ref` on tensor cores, for any m (see `Semantics`)."""
    _check_launch(x, w)
    dot_dtype = dot_operand_dtype(x.dtype)
    return _launch(_nf4_gemm_kernel, "gemm", x, w, min_block_m=16, DOT_DTYPE=dot_dtype)
