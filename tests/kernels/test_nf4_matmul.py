"""Fused NF4 matmul kernels vs the `Semantics:` of kernels/nf4_matmul.py, and the dispatch.

Weights are random `NF4Weight`s built directly (random packed bytes and absmax codes read
through the NF4 and dynamic maps, random positive nested scales, an offset): no quantizer is
involved, every NF4 code is hit, and scales of both signs. The oracle is the float32 semantics,
x · dtype(dequantize_nf4(w))ᵀ, so tolerances allow the rounding of the output alone. Shapes are
small (the interpreter runs one program at a time) but cross the CPU tiles: n = 72 is not a
multiple of BLOCK_N, three K chunks split two ways, quantization blocks spanning rows, a last
block cut short, and more than one nested block.
"""

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import Tensor

from kernels import nf4_matmul
from kernels.nf4 import NF4Weight, dequantize_nf4, dynamic_code, nf4_code, nf4_linear_ref
from kernels.nf4_matmul import nf4_gemm, nf4_gemv, nf4_linear
from kernels.triton_utils import HAS_TRITON, triton_interpreter_enabled

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# rtol and atol: float32 summation order, or one rounding of the output to a 16-bit dtype.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
BATCH_SIZES = [1, 3, 16, 17, 40]  # GEMV up to 16 rows; 40 crosses the CPU GEMM's 32-row tile
BLOCKSIZES = [64, 128, 256]


def random_weight(
    n: int, k: int, blocksize: int, nested: bool, seed: int = 0, nested_blocksize: int = 256
) -> NF4Weight:
    """An (n, k) NF4Weight of random bytes; scales in [0.1, 1.1] (nested: about [-1.5, 2])."""
    gen = torch.Generator().manual_seed(seed)
    numel = n * k
    num_blocks = -(-numel // blocksize)
    packed = torch.randint(0, 256, ((numel + 1) // 2,), generator=gen, dtype=torch.uint8)
    if not nested:
        absmax = torch.rand(num_blocks, generator=gen) + 0.1
        return NF4Weight(packed, absmax, nf4_code(), (n, k), blocksize).to(DEVICE)
    absmax_codes = torch.randint(0, 256, (num_blocks,), generator=gen, dtype=torch.uint8)
    nested_absmax = torch.rand(-(-num_blocks // nested_blocksize), generator=gen) + 0.5
    offset = float(torch.rand((), generator=gen)) * 0.5
    return NF4Weight(
        packed, absmax_codes, nf4_code(), (n, k), blocksize,
        nested_absmax=nested_absmax, nested_code=dynamic_code(), offset=offset,
        nested_blocksize=nested_blocksize,
    ).to(DEVICE)  # fmt: skip


def random_x(m: int, k: int, dtype: torch.dtype, seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen).to(DEVICE, dtype)


def cast_like_kernel(t: Tensor, dtype: torch.dtype) -> Tensor:
    """`t.to(dtype)` as the kernels round it.

    Triton's interpreter truncates float32 -> bfloat16 casts, even when asked for
    fp_downcast_rounding="rtne" (`cast_impl` in triton/runtime/interpreter.py); GPUs round to
    nearest even like torch. Truncating here keeps the bfloat16 tolerance at one output ulp.
    """
    if dtype == torch.bfloat16 and triton_interpreter_enabled() and t.device.type == "cpu":
        return (t.float().view(torch.int32) & -65536).view(torch.float32).to(dtype)
    return t.to(dtype)


def assert_matches_semantics(out: Tensor, x: Tensor, w: NF4Weight) -> None:
    weight = cast_like_kernel(dequantize_nf4(w), x.dtype).float()  # (n, k)
    expected = x.float() @ weight.t()  # (m, n) float32
    assert out.dtype == x.dtype and out.shape == expected.shape
    tol = TOL[x.dtype]
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------
# Kernels vs the semantics
# ----------------------------------------------------------------------------------------------

# Every batch size meets every dtype; blocksize and double quantization go round so that each
# batch size and each dtype meets all three blocksizes, nested and plain.
KERNEL_CASES = [
    pytest.param(m, dtype, BLOCKSIZES[(i + j) % 3], (i + j) % 2 == 0, id=f"m{m}-{dtype}")
    for i, m in enumerate(BATCH_SIZES)
    for j, dtype in enumerate(DTYPES)
]


@requires_triton
@pytest.mark.parametrize(("m", "dtype", "blocksize", "nested"), KERNEL_CASES)
def test_kernels_match_semantics(m: int, dtype: torch.dtype, blocksize: int, nested: bool) -> None:
    w = random_weight(72, 192, blocksize, nested, seed=m)
    x = random_x(m, 192, dtype)
    assert_matches_semantics(nf4_linear(x, w), x, w)
    if m <= nf4_matmul.GEMV_MAX_M:  # the GEMM form takes small batches too
        assert_matches_semantics(nf4_gemm(x, w), x, w)


@requires_triton
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("shape", [(3, 64), (5, 128)], ids=str)
def test_kernels_with_a_last_block_cut_short(shape: tuple[int, int], nested: bool) -> None:
    """blocksize 256 over 192 and 640 values: the last block is partial (one K chunk per row
    in (3, 64), so the output is stored without a split)."""
    w = random_weight(*shape, blocksize=256, nested=nested)
    assert w.numel % w.blocksize != 0
    for m in (1, 17):
        x = random_x(m, shape[1], torch.bfloat16)
        assert_matches_semantics(nf4_linear(x, w), x, w)


@requires_triton
@pytest.mark.parametrize("nested_blocksize", [256, 48])
def test_kernels_read_every_nested_block(nested_blocksize: int) -> None:
    """320 blocks of 64: bitsandbytes' second 256-scale nested block is half full; blocks of 48
    scales, not a power of two, make seven."""
    w = random_weight(160, 128, blocksize=64, nested=True, nested_blocksize=nested_blocksize)
    assert w.nested_absmax is not None and w.nested_absmax.numel() == -(-320 // nested_blocksize)
    for m in (1, 17):
        x = random_x(m, 128, torch.float32)
        assert_matches_semantics(nf4_linear(x, w), x, w)


@requires_triton
@pytest.mark.parametrize("form", ["gemv", "gemm"])
def test_kernels_accept_strided_x(form: str) -> None:
    """x as a column slice of a wider tensor, and as a transposed view."""
    op = nf4_gemv if form == "gemv" else nf4_gemm
    w = random_weight(72, 128, blocksize=64, nested=True)
    x = random_x(5, 128, torch.float32)
    wide = torch.zeros(5, 140, device=DEVICE)
    wide[:, 7:135] = x
    transposed = x.t().contiguous().t()
    for view in (wide[:, 7:135], transposed):
        assert not view.is_contiguous()
        assert_matches_semantics(op(view, w), x, w)


@requires_triton
def test_kernels_with_the_cuda_block_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA table's tiles under the interpreter (or on the GPU): every GEMV row, GEMM's
    64- and 128-row token blocks (130 rows run as two), and K split three ways."""
    cuda_rows = {
        (DEVICE.type, form, block_m): blocks
        for (device, form, block_m), blocks in nf4_matmul.NF4_BLOCKS.items()
        if device == "cuda"
    }
    monkeypatch.setattr(nf4_matmul, "NF4_BLOCKS", cuda_rows)
    w = random_weight(72, 192, blocksize=128, nested=True)
    for m in (1, 3, 5, 16):
        x = random_x(m, 192, torch.float16)
        assert_matches_semantics(nf4_gemv(x, w), x, w)
    for m in (40, 130):
        x = random_x(m, 192, torch.float16)
        assert_matches_semantics(nf4_gemm(x, w), x, w)


# ----------------------------------------------------------------------------------------------
# Dispatch and fallback
# ----------------------------------------------------------------------------------------------


def _spy_launchers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record which launcher `nf4_linear` calls; the list fills as it runs."""
    calls: list[str] = []

    def spy(name: str, launcher: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def run(*args: Any) -> Tensor:
            calls.append(name)
            return launcher(*args)

        return run

    monkeypatch.setattr(nf4_matmul, "nf4_gemv", spy("gemv", nf4_gemv))
    monkeypatch.setattr(nf4_matmul, "nf4_gemm", spy("gemm", nf4_gemm))
    return calls


@requires_triton
@pytest.mark.parametrize(("m", "form"), [(1, "gemv"), (16, "gemv"), (17, "gemm")])
def test_nf4_linear_dispatches_by_batch_size(
    m: int, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _spy_launchers(monkeypatch)
    w = random_weight(72, 128, blocksize=64, nested=False)
    x = random_x(m, 128, torch.float32)
    out = nf4_linear(x, w)
    assert calls == [form]
    torch.testing.assert_close(out, nf4_linear_ref(x, w), rtol=1e-5, atol=1e-5)


def _fallback_cases() -> dict[str, tuple[Tensor, NF4Weight]]:
    return {
        "k96": (random_x(3, 96, torch.float32), random_weight(8, 96, 64, nested=True)),
        "blocksize32": (random_x(3, 64, torch.bfloat16), random_weight(8, 64, 32, nested=False)),
        "float64": (random_x(17, 64, torch.float64), random_weight(8, 64, 64, nested=True)),
    }


@pytest.mark.parametrize("case", ["k96", "blocksize32", "float64", "no_triton"])
def test_nf4_linear_falls_back_to_the_reference(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy_launchers(monkeypatch)
    if case == "no_triton":  # e.g. CPU tensors without the interpreter
        monkeypatch.setattr(nf4_matmul, "can_launch_triton", lambda device: False)
        x, w = random_x(3, 128, torch.float32), random_weight(8, 128, 64, nested=True)
    else:
        x, w = _fallback_cases()[case]
    assert not nf4_matmul.triton_supports(x, w)
    assert torch.equal(nf4_linear(x, w), nf4_linear_ref(x, w))
    assert calls == []


@requires_triton
@pytest.mark.parametrize("form", ["gemv", "gemm"])
def test_launchers_on_an_empty_batch(form: str) -> None:
    op = nf4_gemv if form == "gemv" else nf4_gemm
    out = op(random_x(0, 64, torch.bfloat16), random_weight(8, 64, 64, nested=True))
    assert out.shape == (0, 8) and out.dtype == torch.bfloat16


def _bad_inputs() -> dict[str, tuple[Tensor, NF4Weight]]:
    x, w = random_x(3, 64, torch.float32), random_weight(8, 64, 64, nested=True)
    strided_bytes = torch.zeros(2 * w.packed.numel(), dtype=torch.uint8, device=DEVICE)[::2]
    return {
        **_fallback_cases(),
        "x_columns": (random_x(3, 128, torch.float32), w),
        "x_3d": (x.view(3, 1, 64), w),
        "gemv_rows": (random_x(17, 64, torch.float32), w),
        "strided_packed": (x, replace(w, packed=strided_bytes)),
    }


BAD_INPUT_CASES = [
    (case, form)
    for case in _bad_inputs()
    for form in ("gemv", "gemm")
    if case != "gemv_rows" or form == "gemv"  # the GEMM form takes any number of rows
]


@requires_triton
@pytest.mark.parametrize(("case", "form"), BAD_INPUT_CASES)
def test_launchers_reject_bad_inputs(case: str, form: str) -> None:
    x, w = _bad_inputs()[case]
    with pytest.raises(AssertionError):
        (nf4_gemv if form == "gemv" else nf4_gemm)(x, w)
