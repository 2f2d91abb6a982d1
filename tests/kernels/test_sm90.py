"""The sm_90 compile check fails, never skips, when Triton's compile API moves.

Each case runs the check's child process with one entry point taken away or changed, as a
Triton release that moved it would; see tests/kernels/sm90.py.
"""

from __future__ import annotations

import pytest

from kernels.triton_utils import HAS_TRITON
from tests.kernels.sm90 import compile_in_child

# Python run in the child before compile_cases(CASES): (setup, what the failure must say).
MOVES = {
    "ASTSource-gone": (
        "import triton.compiler\ndel triton.compiler.ASTSource\nCASES = []",
        "cannot import ASTSource and GPUTarget",
    ),
    "ASTSource-arguments": (
        "import triton.compiler\n"
        "from types import SimpleNamespace\n"
        "from tests.kernels.sm90 import CompileCase\n"
        "def moved(**kwargs): raise TypeError('unexpected keyword argument')\n"
        "triton.compiler.ASTSource = moved\n"
        "CASES = [CompileCase('k', SimpleNamespace(arg_names=['x_ptr']), {})]",
        r"ASTSource\(fn=, signature=, constexprs=\) is refused",
    ),
}


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("move", MOVES)
def test_a_moved_triton_api_fails_saying_what_moved(move: str) -> None:
    setup, what = MOVES[move]
    call = setup + "\nfrom tests.kernels.sm90 import compile_cases\ncompile_cases(CASES)"
    with pytest.raises(pytest.fail.Exception, match="compile API has moved") as failure:
        compile_in_child(call)
    assert failure.match(what)
    assert failure.match(r"Triton \d")  # the version it moved in
