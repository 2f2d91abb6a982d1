"""The paged-attention kernels compile for an H100 (sm_90), with no GPU at hand.

The interpreter runs kernels as numpy and accepts code the GPU compiler rejects, so each kernel
is compiled with the CUDA table's block sizes, in a child process without the interpreter
(Triton ships its own ptxas). The LoRA kernels have the same check in test_lora.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.triton_utils import HAS_TRITON


def compile_for_sm90() -> None:
    """Compile both kernels for bfloat16 and head_dim 128; exit 3 if this Triton lacks the
    compiler entry points used here."""
    import triton
    import triton.language as tl

    from kernels import paged_attention as pa

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        sys.exit(3)
    blocks = pa._BLOCKS[("cuda", 128)]
    cases = [
        (pa._paged_prefill_kernel,
         {"GROUP_SIZE": 4, "BLOCK_M": blocks.block_m, "BLOCK_N": blocks.block_n,
          "BLOCK_D": 128, "DOT_DTYPE": tl.bfloat16}),
        (pa._paged_decode_kernel,
         {"GROUP_SIZE": 4, "BLOCK_H": 16, "BLOCK_N": blocks.block_n, "BLOCK_D": 128,
          "DOT_DTYPE": tl.bfloat16}),
    ]  # fmt: skip
    pointers = {"q_ptr": "*bf16", "pool_ptr": "*bf16", "out_ptr": "*bf16"}
    for kernel, constexprs in cases:
        names = kernel.arg_names
        signature = {
            arg: "constexpr"
            if arg in constexprs
            else pointers.get(arg, "*i32" if arg.endswith("_ptr") else "i32")
            for arg in names
        }
        signature["scale_log2"] = "fp32"
        try:
            source = ASTSource(
                fn=kernel,
                signature=signature,
                constexprs={(names.index(k),): v for k, v in constexprs.items()},
            )
        except TypeError:
            sys.exit(3)
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": blocks.num_warps, "num_stages": blocks.num_stages},
        )
        assert "cubin" in compiled.asm, kernel


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.slow
def test_paged_attention_kernels_compile_for_h100() -> None:
    root = Path(__file__).resolve().parents[2]
    code = "from tests.kernels.test_paged_attention_compile import compile_for_sm90 as c; c()"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    child = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True
    )
    if child.returncode == 3:
        pytest.skip("this Triton has no ASTSource / GPUTarget taking these arguments")
    assert child.returncode == 0, child.stderr[-3000:]
