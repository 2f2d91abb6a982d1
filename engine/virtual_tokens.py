"""Prompt and prefix tuning in the engine: the positions a request's adapter takes before the
request's own tokens, and where their rows are in the pool.

Both kinds give a request n *virtual* positions 0 .. n−1; its own token j is at position
n + j, as in PEFT's forward (`adapters/prompt_tuning.py`, `adapters/prefix_tuning.py`).

* **Prompt tuning** (*placeholders*): the request's token sequence is n placeholder tokens
  (:data:`engine.request.PLACEHOLDER_TOKEN_ID`) followed by its prompt and outputs. They are
  computed like any token: the KV cache holds their keys and values, and the prefix cache
  may share them (its keys are rooted in the adapter's identity, so a placeholder block
  never matches another adapter's or the base model's). At a placeholder's position the
  model's input row is the adapter's virtual embedding (:func:`embed_virtual_tokens`), read
  from its ``"prompt"`` rows in the pool.
* **Prefix tuning** (*prefix positions*): nothing is computed for them. Layer ℓ's keys and
  values of positions 0 .. n−1 are the adapter's ``"prefix"`` rows in layer ℓ's pool (K of
  virtual token j at ``pages[j]``, its V at ``pages[n + j]``), shared by every request on
  the adapter by reference, the way a cached block is: a request's first chunk after
  admission carries their page ids (:func:`prefix_pages`) for the runner's page table, and
  its own tokens start at position n. The pages belong to the adapter tenant: the KV cache
  neither holds nor frees them (its page list covers the request's own tokens only), the
  prefix cache's blocks cover own tokens only, and the adapter stays resident while a
  running request pins it.

Both count n positions against the context length; the request's usage (``prompt_tokens``)
counts its own tokens only, as PEFT's ``generate`` returns them.
"""

from __future__ import annotations

import torch

from adapters.lora_tables import BlockTable, LoraTables
from adapters.registry import AdapterEntry
from adapters.weights import PREFIX_TUNING, PROMPT_TUNING
from engine.kinds import KindMetadata
from kernels.lora import read_rows

PROMPT_BLOCK = "prompt"  # `adapters/weights.py`'s block keys
PREFIX_BLOCK = "prefix"


def virtual_positions(adapter: AdapterEntry | None) -> tuple[int, int]:
    """``(placeholders, prefix_positions)`` a request on ``adapter`` takes before its own
    tokens: ``(n, 0)`` for prompt tuning, ``(0, n)`` for prefix tuning, else ``(0, 0)``."""
    if adapter is None:
        return 0, 0
    if adapter.kind == PROMPT_TUNING:
        return adapter.num_virtual_tokens, 0
    if adapter.kind == PREFIX_TUNING:
        return 0, adapter.num_virtual_tokens
    return 0, 0


def prefix_pages(tables: LoraTables, slot: int) -> tuple[list[int], list[int]]:
    """The K pages and the V pages of positions 0 .. n−1 of the prefix-tuned adapter in
    ``slot`` (its ``"prefix"`` rows: one page each, K rows first)."""
    pages = tables.blocks[slot][PREFIX_BLOCK].pages  # (2n, 1): a key fills one page
    assert pages.shape[1] == 1, "a prefix key must fill exactly one page"
    ids: list[int] = pages[:, 0].tolist()
    n = len(ids) // 2
    return ids[:n], ids[n:]


def embed_virtual_tokens(
    meta: KindMetadata, pools: list[torch.Tensor], positions: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """``x`` (num_tokens, hidden_size), the input embeddings, with each prompt-tuned row at
    a position p < n replaced by its adapter's virtual embedding p (in place).

    Semantics (rows ``lo:hi`` of one prompt-tuned adapter, P its (n, hidden) embeddings):
        x[r] = P[positions[r]]   where positions[r] < n, for r in lo:hi
    Decided on the device (``torch.where``), so the step never waits for the positions.
    """
    for slot, lo, hi in meta.runs.get(PROMPT_BLOCK, ()):
        key = (slot, PROMPT_BLOCK)
        virtual = meta.cache.get(key)
        if virtual is None:
            virtual = gather_spread(pools, meta.blocks[slot][PROMPT_BLOCK], x.shape[1])
            meta.cache[key] = virtual
        n = virtual.shape[0]
        pos = positions[lo:hi].long()  # (rows,)
        rows = virtual.index_select(0, pos.clamp(max=n - 1)).to(x.dtype)  # (rows, hidden)
        x[lo:hi] = torch.where((pos < n).unsqueeze(1), rows, x[lo:hi])
    return x


def gather_spread(pools: list[torch.Tensor], table: BlockTable, features: int) -> torch.Tensor:
    """A block spread over the layers (`adapters.weights.spread_rows`) read back whole:
    ``(rows, features)``, row i from layer ``i % L``'s pool at ``pages[i // L]``."""
    num_layers = len(pools)
    out = torch.empty(sum(table.rows), features, dtype=pools[0].dtype, device=pools[0].device)
    for layer, count in enumerate(table.rows):
        if count:
            pages = table.pages[:count].to(pools[layer].device)  # (count, chunks)
            out[layer::num_layers] = read_rows(pools[layer], pages, features)
    return out
