"""NF4 with double quantization, byte for byte against bitsandbytes.

bitsandbytes has three implementations of its 8-bit blockwise quantizer (used for the
double-quantized absmax): CUDA and its portable torch kernel round to the nearest code
value; its native CPU library approximates that with a 65,536-entry lookup table and lands
one code away on a fraction of a percent of values. loraserve rounds to the nearest, so it
equals the CUDA / portable kernels exactly; against the native CPU kernel the test bounds
the difference instead.
"""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch
from bitsandbytes.functional import QuantState

from engine.quantization import (
    nf4_from_checkpoint,
    nf4_to_checkpoint,
    quantize_blockwise,
    quantize_nf4,
)
from kernels.nf4 import (
    NF4Weight,
    dequantize_nf4,
    dequantize_rows,
    dynamic_code,
    nf4_code,
    nf4_linear_ref,
    nf4_linear_tiled,
)
from tests.references import bnb_dequantize

# (out, in): blocks of 64 that line up with rows, that straddle rows, a total that is not a
# multiple of 64 (a partial last block), an odd total (a half-filled last byte), and more
# than 256 blocks (several nested blocks, the last one partial).
SHAPES = [(64, 64), (96, 128), (7, 9), (33, 100), (3, 5), (300, 128), (257, 96)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weight(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[0, : min(5, shape[1])] = 0.0  # exact zeros
    w.view(-1)[-1] = 0.3  # an outlier sets one block's absmax
    return w.to(dtype)


def _bnb_portable_blockwise(
    values: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' portable (torch) 8-bit blockwise kernel, bypassing the CPU library."""
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    codes, absmax = op.redispatch(keys, values, dynamic_code(), blocksize)
    return codes, absmax


def test_code_tables_are_bitsandbytes() -> None:
    assert torch.equal(nf4_code(), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnbf.create_dynamic_map())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_equals_bitsandbytes(shape: tuple[int, int], dtype: torch.dtype) -> None:
    w = _weight(shape, dtype, seed=sum(shape))
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(w)
    assert state.state2 is not None and ours.nested_absmax is not None
    # The 4-bit codes and the mean offset: byte for byte.
    assert torch.equal(ours.packed, packed.view(-1))
    assert ours.offset == state.offset.item()
    assert torch.equal(ours.nested_code, state.state2.code)
    # The 8-bit absmax codes and their float32 scales: byte for byte with the portable kernel.
    unquantized = quantize_nf4(w, double_quant=False).absmax
    codes, nested_absmax = _bnb_portable_blockwise(unquantized - state.offset, 256)
    assert torch.equal(ours.absmax, codes) and torch.equal(ours.nested_absmax, nested_absmax)
    # The native CPU kernel: the same scales, and codes at most one step away, rarely.
    live = state.state2.absmax > 0  # a block of equal scales is 0/0 there
    assert torch.equal(ours.nested_absmax[live], state.state2.absmax[live])
    if bool(live.all()):
        step = (ours.absmax.int() - state.absmax.int()).abs()
        assert int(step.max()) <= 1 and int((step > 0).sum()) <= max(1, step.numel() // 100)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dequantize_equals_bitsandbytes(shape: tuple[int, int], dtype: torch.dtype) -> None:
    """Read bitsandbytes' own tensors, as a checkpoint holds them: the same float weight."""
    w = _weight(shape, dtype, seed=3 * sum(shape))
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    tensors = {"weight": packed, **state.as_dict(packed=True)}
    ours = dequantize_nf4(nf4_from_checkpoint("w.weight", tensors), dtype)
    assert torch.equal(ours, bnb_dequantize(packed, state))
    if shape[1] % 64 == 0:
        assert torch.equal(ours, bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_saved_tensors_load_in_bitsandbytes(shape: tuple[int, int]) -> None:
    """Our checkpoint tensors rebuild, in bitsandbytes, the weight we dequantize."""
    ours = quantize_nf4(_weight(shape, torch.float32, seed=7))
    saved = nf4_to_checkpoint(ours, torch.float32)
    components = {k.removeprefix("."): v for k, v in saved.items() if k}
    state = QuantState.from_dict(dict(components), device=torch.device("cpu"))
    assert torch.equal(bnb_dequantize(saved[""], state), dequantize_nf4(ours))
    assert torch.equal(
        dequantize_nf4(nf4_from_checkpoint("w.weight", {"weight": saved[""], **components})),
        dequantize_nf4(ours),
    )


@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_without_double_quantization(blocksize: int) -> None:
    w = _weight((40, 96), torch.float32, seed=blocksize)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    ours = quantize_nf4(w, blocksize=blocksize, double_quant=False)
    assert torch.equal(ours.packed, packed.view(-1)) and torch.equal(ours.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(ours), bnb_dequantize(packed, state))


def test_blockwise_rounds_to_the_nearest_code() -> None:
    values = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    table = dynamic_code()
    codes, absmax = quantize_blockwise(values, table, 256)
    scaled = values / absmax.repeat_interleave(256)[: values.numel()]
    chosen = (scaled - table[codes.long()]).abs()
    best = (scaled.view(-1, 1) - table).abs().min(dim=1).values
    torch.testing.assert_close(chosen, best, rtol=0, atol=1e-7)


def test_quantization_error_is_bounded() -> None:
    """NF4 keeps every value within half the widest code gap of its block's scale."""
    w = _weight((128, 256), torch.float32, seed=1)
    q = quantize_nf4(w)
    err = (dequantize_nf4(q) - w).view(-1, 64).abs().amax(dim=1)
    scale = w.view(-1, 64).abs().amax(dim=1)
    widest_gap = float((nf4_code()[1:] - nf4_code()[:-1]).max())
    # The 8-bit absmax adds well under 1% of relative error on top.
    assert bool((err <= scale * (widest_gap / 2 + 0.01)).all())


def test_tiled_matmul_equals_the_reference() -> None:
    w = quantize_nf4(_weight((96, 128), torch.float32, seed=2))
    x = torch.randn(5, 128)
    torch.testing.assert_close(nf4_linear_tiled(x, w, rows_per_tile=32), nf4_linear_ref(x, w))
    assert torch.equal(dequantize_rows(w, 32, 64, torch.float32), dequantize_nf4(w)[32:64])


def test_malformed_weights_are_refused() -> None:
    good = quantize_nf4(_weight((8, 64), torch.float32, seed=0))
    with pytest.raises(ValueError, match="packed uint8 bytes"):
        NF4Weight(good.packed[:-1], good.absmax, good.code, good.shape)
    with pytest.raises(ValueError, match="absmax values"):
        NF4Weight(good.packed, good.absmax[:-1], good.code, good.shape)
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.zeros(4, 4), blocksize=48)
    saved = nf4_to_checkpoint(good, torch.float32)
    components = {k.removeprefix("."): v for k, v in saved.items() if k}
    del components["nested_absmax"]
    with pytest.raises(ValueError, match="double quantization"):
        nf4_from_checkpoint("w.weight", {"weight": saved[""], **components})
