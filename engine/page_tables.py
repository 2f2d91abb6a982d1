"""The runner's persistent copy of each running request's page table.

The scheduler sends only the pages of each step's new tokens; this table accumulates them so
that per-step work is proportional to the new tokens, not to the whole context (vLLM keeps
its block tables the same way). Each running request owns one row of two
``(max_rows, max_len)`` int32 tensors, one for K pages and one for V pages; one more row,
never assigned, points every position at a scratch page, for the padded rows of a
static-shape decode batch (``engine/cuda_graph.py``).
"""

from __future__ import annotations

import torch

from engine.scheduler_output import ScheduledChunk


class PageTables:
    """Per-request K/V page tables on the device, updated incrementally.

    Args:
        max_rows: the most requests holding a row at once (``max_num_seqs``).
        max_len: the longest sequence (``max_model_len``).
        device: where the attention kernels read the tables.
        scratch_page: the page the padding row points at (the pool's scratch page).
    """

    def __init__(
        self, max_rows: int, max_len: int, device: torch.device, scratch_page: int = 0
    ) -> None:
        self.max_len = max_len
        self.k = torch.zeros(max_rows + 1, max_len, dtype=torch.int32, device=device)
        self.v = torch.zeros(max_rows + 1, max_len, dtype=torch.int32, device=device)
        self.pad_row = max_rows
        self.k[max_rows] = scratch_page
        self.v[max_rows] = scratch_page
        self._rows: dict[str, int] = {}
        self._free_rows = list(range(max_rows - 1, -1, -1))

    def release(self, request_ids: list[str]) -> None:
        """Give back the rows of requests that finished, were aborted or were preempted."""
        for request_id in request_ids:
            row = self._rows.pop(request_id, None)
            if row is not None:
                self._free_rows.append(row)

    def assign(self, chunks: list[ScheduledChunk]) -> list[int]:
        """Each chunk's row (a new row for a request seen for the first time)."""
        rows: list[int] = []
        for c in chunks:
            row = self._rows.get(c.request_id)
            if row is None:
                row = self._rows[c.request_id] = self._free_rows.pop()
            rows.append(row)
        return rows

    def write(self, flat_index: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor) -> None:
        """Record new pages: entry ``flat_index[i]`` of the row-major (row, position) tables
        gets ``k_pages[i]`` and ``v_pages[i]`` (int32 device tensors from the step's upload)."""
        self.k.view(-1)[flat_index] = k_pages
        self.v.view(-1)[flat_index] = v_pages

    def gather(self, rows: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (len(rows), width) K and V tables of the given rows (an int32 device tensor)."""
        return self.k[:, :width].index_select(0, rows), self.v[:, :width].index_select(0, rows)
