"""Compile Triton kernels for an H100 (sm_90) without a GPU, in a child process.

The interpreter runs kernels as numpy and accepts code the GPU compiler rejects; Triton ships
its own ptxas, so kernels can be compiled to cubins here. Compiling inside an interpreter
process sees the interpreter's patched ``tl``, hence the child process.

The check is skipped only where it cannot run at all: without Triton, or off Linux (Triton
ships for Linux only). A Triton whose compile API has moved fails the check, never skips it
(a skip would leave the kernels unchecked without a sign): with a message naming what moved
for the entry points used here (``ASTSource``, ``GPUTarget``, a jitted function's
``arg_names``, the compiled kernel's ``asm``), with Triton's own traceback otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

API_CHANGED = 3  # the child's exit status when this Triton lacks the entry points used here


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
    """Compile every case to an sm_90 cubin; exit with API_CHANGED, saying what moved, when
    this Triton lacks the entry points used here."""
    import triton

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        _api_changed(f"cannot import ASTSource and GPUTarget ({e})")
    for case in cases:
        names = getattr(case.kernel, "arg_names", None)
        if not isinstance(names, list):
            _api_changed(f"the jitted {case.name} kernel has no list of arg_names")
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
        except TypeError as e:
            _api_changed(f"ASTSource(fn=, signature=, constexprs=) is refused ({e})")
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=case.options)
        asm = getattr(compiled, "asm", None)
        if not isinstance(asm, dict):
            _api_changed("a compiled kernel has no asm dictionary")
        assert "cubin" in asm, case.name


def _api_changed(what: str) -> NoReturn:
    import triton

    print(f"Triton {triton.__version__}: {what}", file=sys.stderr)
    sys.exit(API_CHANGED)


def compile_in_child(call: str) -> None:
    """Run ``call`` (Python code that ends in :func:`compile_cases`) without the interpreter.

    Skips only without Triton or off Linux; fails when Triton's compile API has moved.
    """
    # Imported here: the child imports this module too, and needs no torch for it.
    from kernels.triton_utils import HAS_TRITON

    if not HAS_TRITON:
        pytest.skip("Triton is not installed")
    if not sys.platform.startswith("linux"):
        pytest.skip(f"Triton compiles CUDA kernels on Linux only, not {sys.platform}")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    child = subprocess.run(
        [sys.executable, "-c", call], cwd=root, env=env, capture_output=True, text=True
    )
    if child.returncode == API_CHANGED:
        pytest.fail(
            "Triton's compile API has moved, so the sm_90 compile check cannot run: "
            f"{child.stderr.strip()[-1000:]}. Update tests/kernels/sm90.py for this Triton.",
            pytrace=False,
        )
    assert child.returncode == 0, child.stderr[-3000:]
