"""Reference outputs from transformers, computed one request at a time (no padding), and
bitsandbytes' NF4 dequantization."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

if TYPE_CHECKING:
    from bitsandbytes.functional import QuantState


@lru_cache(maxsize=8)
def hf_model(model_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(model_dir: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers ``generate``, greedy, stopping at the model's EOS: the tokens after the
    prompt (a final EOS included)."""
    out = hf_model(model_dir).generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return [int(t) for t in out[0, len(prompt) :]]


def bnb_dequantize(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """bitsandbytes' dequantization of a 4-bit weight, through its portable torch kernel.

    Its native CPU kernel (0.50) assigns block scales per row, which is wrong when a row is
    not a whole number of blocks; real models never have such rows, tiny test models do.
    The scales come from bitsandbytes' own double dequantization.
    """
    import bitsandbytes.functional as bnbf  # only the NF4 tests need bitsandbytes

    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    op = torch.ops.bitsandbytes.dequantize_4bit.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    out: torch.Tensor = op.redispatch(
        keys, packed, absmax, state.blocksize, "nf4", list(state.shape), state.dtype
    )
    return out
