"""The fused NF4 matmul kernels compile for an H100 (sm_90), with no GPU at hand.

See tests/kernels/sm90.py. Each kernel is compiled for bfloat16 and float32 inputs, with and
without double quantization, with the CUDA block table at blocksize 64 (bitsandbytes'
default). For each kernel and dtype, both ways of writing out (a plain store, float32 atomics
for a split K) and the smallest and largest BLOCK_M of the table are compiled.
"""

from __future__ import annotations

import pytest

from kernels.triton_utils import HAS_TRITON
from tests.kernels.sm90 import CompileCase, compile_in_child

# (form, dtype, nested, BLOCK_M, ATOMIC_ADD)
CASES = [
    ("gemv", "bf16", True, 1, True),
    ("gemv", "bf16", False, 16, False),
    ("gemv", "fp32", True, 16, True),
    ("gemv", "fp32", False, 1, False),
    ("gemm", "bf16", True, 16, True),
    ("gemm", "bf16", False, 128, False),
    ("gemm", "fp32", True, 128, True),
    ("gemm", "fp32", False, 16, False),
]


def sm90_cases() -> list[CompileCase]:
    import torch
    import triton.language as tl

    from kernels import nf4_matmul as nm

    kernels = {"gemv": nm._nf4_gemv_kernel, "gemm": nm._nf4_gemm_kernel}
    dot_dtypes = {"bf16": tl.bfloat16, "fp32": tl.float32}
    cases = []
    for form, dtype, nested, block_m, atomic_add in CASES:
        blocks, launched_block_m = nm._blocks_for(torch.device("cuda"), form, block_m)
        assert launched_block_m == block_m, "CASES must hold block sizes a launch can pick"
        constexprs: dict[str, object] = {
            "BLOCKSIZE": 64, "NESTED_BLOCKSIZE": 256, "NESTED": nested,
            "BLOCK_M": block_m, "BLOCK_N": blocks.block_n, "ATOMIC_ADD": atomic_add,
        }  # fmt: skip
        if form == "gemm":
            constexprs["DOT_DTYPE"] = dot_dtypes[dtype]
        types = {
            "x_ptr": f"*{dtype}",
            "packed_ptr": "*u8",
            "absmax_ptr": "*u8" if nested else "*fp32",
            "code_ptr": "*fp32",
            "nested_absmax_ptr": "*fp32",
            "nested_code_ptr": "*fp32",
            "out_ptr": "*fp32" if atomic_add else f"*{dtype}",
            "offset": "fp32",
        }  # the rest are int32
        name = f"{form}-{dtype}-{'nested' if nested else 'plain'}-m{block_m}"
        options = {"num_warps": blocks.num_warps, "num_stages": blocks.num_stages}
        cases.append(CompileCase(name, kernels[form], constexprs, types, options))
    return cases


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.slow
def test_nf4_matmul_kernels_compile_for_h100() -> None:
    compile_in_child(
        "from tests.kernels.test_nf4_matmul_compile import sm90_cases; "
        "from tests.kernels.sm90 import compile_cases; compile_cases(sm90_cases())"
    )
