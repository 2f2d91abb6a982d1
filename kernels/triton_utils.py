"""Optional Triton support shared by the kernel modules.

Triton ships for Linux only, so every kernel module works without it: its torch `*_ref`
functions are the CPU backend, and its `@triton.jit` kernels are defined only under
`if HAS_TRITON:`. Probing with `find_spec` instead of `try: import triton` lets a broken
Triton install fail loudly at import rather than fall back in silence, and gives mypy a plain
`bool` to narrow on.
"""

import importlib.util
import os

import torch

HAS_TRITON: bool = importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its numpy interpreter (set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def can_launch_triton(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors living on `device`.

    True for CUDA tensors, and for CPU tensors when the interpreter is on (tests on CPU).
    """
    if not HAS_TRITON:
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreter_enabled())


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1): Triton block dimensions must be powers of two."""
    assert n >= 1, f"n must be positive, got {n}"
    return 1 << (n - 1).bit_length()


if HAS_TRITON:
    import triton.language as tl

    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

    def dot_operand_dtype(dtype: torch.dtype) -> tl.dtype:
        """The dtype a kernel should feed `tl.dot` for inputs of `dtype` (a constexpr argument).

        The input dtype itself, except bfloat16 under the interpreter, which stores bfloat16 as
        raw uint16 and multiplies the bit patterns in `tl.dot` (Triton's debugging guide:
        bfloat16 is unsupported there; triton-lang/triton#11584). Products of 16-bit values are
        exact in float32, so widening there gives the GPU's result.
        """
        if dtype == torch.bfloat16 and triton_interpreter_enabled():
            return tl.float32
        return _TL_DTYPES[dtype]
