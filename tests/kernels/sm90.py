"""Compile Triton kernels for an H100 (sm_90) without a GPU, in a child process.

The interpreter runs kernels as numpy and accepts code the GPU compiler rejects; Triton ships
its own ptxas, so kernels can be compiled to cubins here. Compiling inside an interpreter
process sees the interpreter's patched ``tl``, hence the child process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

UNSUPPORTED = 3  # the child's exit status when this Triton lacks the entry points used here


@dataclass(frozen=True)
class CompileCase:
    """One kernel to compile.

    Attributes:
        name: for messages.
        kernel: the ``@triton.jit`` function.
        constexprs: values of its ``tl.constexpr`` arguments.
        types: Triton types of other arguments (e.g. ``"*bf16"``, ``"fp32"``); pointers
            (``*_ptr``) default to ``*i32`` and scalars to ``i32``.
        options: compile options (``num_warps``, ``num_stages``).
    """

    name: str
    kernel: Any
    constexprs: dict[str, object]
    types: dict[str, str] = field(default_factory=dict)
    options: dict[str, int] = field(default_factory=dict)


def compile_cases(cases: list[CompileCase]) -> None:
    """Compile every case to an sm_90 cubin; exit with UNSUPPORTED on an older Triton API."""
    import triton

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        sys.exit(UNSUPPORTED)
    for case in cases:
        names = case.kernel.arg_names
        signature = {
            arg: "constexpr"
            if arg in case.constexprs
            else case.types.get(arg, "*i32" if arg.endswith("_ptr") else "i32")
            for arg in names
        }
        try:
            source = ASTSource(
                fn=case.kernel,
                signature=signature,
                constexprs={(names.index(k),): v for k, v in case.constexprs.items()},
            )
        except TypeError:
            sys.exit(UNSUPPORTED)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=case.options)
        assert "cubin" in compiled.asm, case.name


def compile_in_child(call: str) -> None:
    """Run ``call`` (Python code that ends in :func:`compile_cases`) without the interpreter."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    child = subprocess.run(
        [sys.executable, "-c", call], cwd=root, env=env, capture_output=True, text=True
    )
    if child.returncode == UNSUPPORTED:
        pytest.skip("this Triton has no ASTSource / GPUTarget taking these arguments")
    assert child.returncode == 0, child.stderr[-3000:]
