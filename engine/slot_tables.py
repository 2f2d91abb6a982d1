"""The runner's persistent copy of each running request's page table.

The scheduler sends only the pages of each step's new tokens; this table accumulates them so
that per-step work is proportional to the new tokens, not to the whole context (vLLM keeps
its block tables the same way). Each running request owns one row of two
``(max_rows, max_len)`` int32 tensors, one for K pages and one for V pages.
"""

from __future__ import annotations

import torch

from engine.batch import ScheduledChunk


class SlotTables:
    """Per-request K/V page tables on the device, updated incrementally.

    Args:
        max_rows: the most requests holding a row at once (``max_num_seqs``).
        max_len: the longest sequence (``max_model_len``).
        device: where the attention kernels read the tables.
    """

    def __init__(self, max_rows: int, max_len: int, device: torch.device) -> None:
        self.max_len = max_len
        self.k = torch.zeros(max_rows, max_len, dtype=torch.int32, device=device)
        self.v = torch.zeros(max_rows, max_len, dtype=torch.int32, device=device)
        self._rows: dict[str, int] = {}
        self._free_rows = list(range(max_rows - 1, -1, -1))

    def release(self, request_ids: list[str]) -> None:
        """Give back the rows of requests that finished, were aborted or were preempted."""
        for request_id in request_ids:
            row = self._rows.pop(request_id, None)
            if row is not None:
                self._free_rows.append(row)

    def write(self, chunks: list[ScheduledChunk]) -> list[int]:
        """Record each chunk's new pages; returns each chunk's row."""
        rows: list[int] = []
        flat_index: list[int] = []
        k_pages: list[int] = []
        v_pages: list[int] = []
        for c in chunks:
            row = self._rows.get(c.request_id)
            if row is None:
                row = self._rows[c.request_id] = self._free_rows.pop()
            rows.append(row)
            base = row * self.max_len
            flat_index.extend(range(base + c.start_pos, base + c.seq_len))
            k_pages.extend(c.new_k_slots)
            v_pages.extend(c.new_v_slots)
        device = self.k.device
        index = torch.tensor(flat_index, dtype=torch.long, device=device)
        self.k.view(-1)[index] = torch.tensor(k_pages, dtype=torch.int32, device=device)
        self.v.view(-1)[index] = torch.tensor(v_pages, dtype=torch.int32, device=device)
        return rows

    def gather(self, rows: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (len(rows), width) K and V tables of the given rows."""
        index = torch.tensor(rows, dtype=torch.long, device=self.k.device)
        return self.k[:, :width].index_select(0, index), self.v[:, :width].index_select(0, index)
