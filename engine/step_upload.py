"""One host-to-device copy of a step's integer metadata.

Every integer a forward needs (token ids, positions, new K/V pages, the page-table updates,
sequence lengths, offsets, rows to sample, LoRA segments) is packed into one int32 host
buffer and moved in one copy, then split into views on the device. On CUDA the copy goes
through a persistent pinned buffer into a persistent device buffer (grown when a step needs
more), without blocking the host; on the CPU the host buffer is the device buffer.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch


class StepUpload:
    """Packs sections of integers into one buffer and uploads it once per call.

    Attributes:
        num_copies: uploads so far (one per step: tests count them).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.num_copies = 0
        self._pinned: torch.Tensor | None = None
        self._on_device: torch.Tensor | None = None

    def upload(self, sections: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """int32 device views of ``sections``, in order, after one host-to-device copy."""
        sizes = [len(s) for s in sections]
        host = torch.tensor(list(itertools.chain.from_iterable(sections)), dtype=torch.int32)
        self.num_copies += 1
        if self.device.type == "cpu":
            return list(host.split_with_sizes(sizes))
        n = host.shape[0]
        if self._pinned is None or self._pinned.shape[0] < n:
            size = max(n, 2 * (0 if self._pinned is None else self._pinned.shape[0]), 1024)
            self._pinned = torch.empty(size, dtype=torch.int32).pin_memory()
            self._on_device = torch.empty(size, dtype=torch.int32, device=self.device)
        assert self._on_device is not None
        self._pinned[:n].copy_(host)
        # Safe to rewrite the pinned buffer at the next step: each step reads its sampled
        # tokens back to the host, which waits for this copy (and everything after it).
        self._on_device[:n].copy_(self._pinned[:n], non_blocking=True)
        return list(self._on_device[:n].split_with_sizes(sizes))
