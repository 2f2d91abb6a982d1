"""A worker's place in the tensor-parallel group and the collectives the model calls.

:class:`Shard` says which part of each split dimension a worker holds (the package's
docstring has the partition); :class:`Collectives` is what the model calls, :data:`SINGLE`
the one-device identity, :class:`ProcessGroupCollectives` torch.distributed's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """Worker ``rank`` of ``size``: which part of each partitioned dimension it holds."""

    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} of {self.size} workers")

    def part(self, length: int) -> slice:
        """This worker's part of a dimension of ``length`` (N divides it)."""
        step = length // self.size
        return slice(self.rank * step, (self.rank + 1) * step)

    def rows(self, length: int) -> int:
        """Rows of each worker's part of a dimension N need not divide (the vocabulary):
        ceil(length / N), the last part padded."""
        return -(-length // self.size)


class Collectives:
    """The model's communication: identity on one device (this class); torch.distributed
    collectives across the workers (:class:`ProcessGroupCollectives`)."""

    shard = Shard()

    @property
    def size(self) -> int:
        return self.shard.size

    def all_reduce(self, t: torch.Tensor, purpose: str = "base") -> torch.Tensor:
        """The sum of ``t`` over the workers, in place; returns ``t``. ``purpose`` ("base",
        "lora") only labels the counts."""
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every worker's ``t`` side by side along the last dimension, in rank order."""
        return t


SINGLE = Collectives()


class ProcessGroupCollectives(Collectives):
    """The default torch.distributed process group (NCCL on GPUs, gloo on the CPU), with a
    count of each collective, of the elements it moved and of the host time it took, by
    purpose (``all_reduce`` of the base's partial sums, ``all_reduce:lora`` of the LoRA's
    rank-sized intermediates, ``all_gather`` of the logits): what the tests count and the
    benchmark reports. The host time includes waiting for the slowest worker."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.calls: dict[str, int] = {}
        self.elements: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    def all_reduce(self, t: torch.Tensor, purpose: str = "base") -> torch.Tensor:
        started = time.perf_counter()
        dist.all_reduce(t)
        self._count("all_reduce" if purpose == "base" else f"all_reduce:{purpose}", t, started)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.shard.size)]
        dist.all_gather(parts, t)
        self._count("all_gather", t, started)
        return torch.cat(parts, dim=-1)

    def summary(self) -> dict[str, tuple[int, int, float]]:
        """Each kind's (calls, elements, seconds)."""
        return {n: (c, self.elements[n], self.seconds[n]) for n, c in self.calls.items()}

    def _count(self, name: str, t: torch.Tensor, started: float) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.elements[name] = self.elements.get(name, 0) + t.numel()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def check_divisible(
    size: int,
    *,
    hidden_size: int,
    intermediate_size: int,
    num_heads: int,
    num_kv_heads: int,
) -> None:
    """Raise ValueError unless ``size`` workers can split every evenly split dimension (the
    vocabulary need not divide: its last part is padded)."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1; got {size}")
    dims = {
        "num_key_value_heads": num_kv_heads,
        "num_attention_heads": num_heads,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
    }
    for name, value in dims.items():
        if value % size:
            raise ValueError(
                f"--tensor-parallel-size {size} must divide the model's {name} ({value})"
            )
