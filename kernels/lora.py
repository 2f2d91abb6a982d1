"""LoRA for mixed-adapter batches, adapter weights read from the unified page pool.

The LoRA path of a target linear layer adds, to every row t of the base layer's output, the
low-rank update of the row's own adapter a (S-LoRA / Punica):

Semantics:
    out[t] += scaling[a] · (x[t] · A_aᵀ) · B_aᵀ      A_a: (rank, in), B_a: (out, rank)
    computed as two ops, in PEFT's order lora_B(lora_A(x)) * scaling:
        y = x · Aᵀ                       shrink (`kernels/lora_shrink.py`), y float32
        out += (round(y) · Bᵀ) · scaling   expand (`kernels/lora_expand.py`), in place;
                                           round() to out's dtype, a no-op for float32
    Rows with adapter -1 (or an adapter of rank 0 for this layer) are left untouched. Each op
    comes in a segmented form (SGMV: prefill chunks, one adapter per segment of rows) and a
    per-token form (BGMV: decode, one adapter per row); each has a torch `*_ref` twin with the
    same signature, the CPU backend. The page layout and `write_rows` / `read_rows` are in
    `kernels/lora_layout.py`.

A packed projection (q, k and v as one matmul; gate and up) runs its slices' LoRA in one
launch of each op: `lora_shrink_sgmv_packed` shrinks x by every slice's A into one y of
num_slices · max_rank columns, `lora_expand_sgmv_packed` adds each slice's part of y times its
own Bᵀ into that slice's columns of the packed output. Each slice has its own page tables,
ranks and scalings (an adapter may touch q and not k).

On the CPU the engine runs neither form's reference directly: it sorts a step's rows by
adapter and uses `kernels/lora_grouped.py`, which gathers each adapter's weights once per
call (the per-token references gather every row's, padded to the largest rank).

This module is the public face of the three: import the ops from here.
"""

from kernels.lora_expand import (
    lora_expand_bgmv,
    lora_expand_bgmv_ref,
    lora_expand_sgmv,
    lora_expand_sgmv_packed,
    lora_expand_sgmv_packed_ref,
    lora_expand_sgmv_ref,
)
from kernels.lora_layout import read_rows, write_rows
from kernels.lora_shrink import (
    lora_shrink_bgmv,
    lora_shrink_bgmv_ref,
    lora_shrink_sgmv,
    lora_shrink_sgmv_packed,
    lora_shrink_sgmv_packed_ref,
    lora_shrink_sgmv_ref,
)

__all__ = [
    "lora_expand_bgmv",
    "lora_expand_bgmv_ref",
    "lora_expand_sgmv",
    "lora_expand_sgmv_packed",
    "lora_expand_sgmv_packed_ref",
    "lora_expand_sgmv_ref",
    "lora_shrink_bgmv",
    "lora_shrink_bgmv_ref",
    "lora_shrink_sgmv",
    "lora_shrink_sgmv_packed",
    "lora_shrink_sgmv_packed_ref",
    "lora_shrink_sgmv_ref",
    "read_rows",
    "write_rows",
]
