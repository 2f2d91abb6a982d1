"""The paged-attention kernels compile for an H100 (sm_90), with no GPU at hand.

The LoRA kernels have the same check in test_lora.py; see tests/kernels/sm90.py.
"""

from __future__ import annotations

import pytest

from kernels.triton_utils import HAS_TRITON
from tests.kernels.sm90 import CompileCase, compile_in_child


def sm90_cases() -> list[CompileCase]:
    """Both kernels in bfloat16, head_dim 128, GQA 4:1, with the CUDA block table."""
    import triton.language as tl

    from kernels import paged_attention as pa

    blocks = pa._BLOCKS[("cuda", 128)]
    types = {"q_ptr": "*bf16", "pool_ptr": "*bf16", "out_ptr": "*bf16", "scale_log2": "fp32"}
    options = {"num_warps": blocks.num_warps, "num_stages": blocks.num_stages}
    common = {"GROUP_SIZE": 4, "BLOCK_N": blocks.block_n, "BLOCK_D": 128, "DOT_DTYPE": tl.bfloat16}
    return [
        CompileCase(
            "prefill",
            pa._paged_prefill_kernel,
            common | {"BLOCK_M": blocks.block_m},
            types,
            options,
        ),
        CompileCase("decode", pa._paged_decode_kernel, common | {"BLOCK_H": 16}, types, options),
    ]


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.slow
def test_paged_attention_kernels_compile_for_h100() -> None:
    compile_in_child(
        "from tests.kernels.test_paged_attention_compile import sm90_cases; "
        "from tests.kernels.sm90 import compile_cases; compile_cases(sm90_cases())"
    )
