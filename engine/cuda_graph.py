"""Decode under CUDA graphs: one static-shape decode forward per batch size, replayed.

On a GPU a decode step of a 7B model computes for a few milliseconds, and launching its
hundreds of kernels one by one from Python costs as much again. A decode-only step (every
request one new token) is therefore run on **static buffers**, padded up to the next size
of a ladder (1, 2, 4, 8, 16, 24, 32, 48, 64, ...), and the forward of each size is captured
once at start-up as a CUDA graph and replayed every step.

What a step changes lives in those buffers, written by one host-to-device copy:

    input_ids, positions           the new token of each row and its position
    new_k, new_v                   the pages its K and V go to
    rows                           its row of the runner's page tables (``PageTables``)
    seq_lens                       its context length, the new token included
    adapters                       its adapter slot, -1 for none

Everything else the forward reads already has a fixed address: the page pool, the page
tables, and the adapters' page tables, ranks and scalings (``LoraTables``), which placing or
evicting an adapter rewrites in place, so residency changes never need a new capture. The
LoRA kernels see one segment per row (``seg_starts = 0, 1, ..., size``) and the server's
largest rank, so their grids are fixed too. Padded rows read and write only the pool's
scratch page, through the page tables' padding row, and use no adapter: they change nothing
that a real row reads.

A batch with no adapter replays a second, LoRA-free set of graphs. Prefill and mixed steps,
mixtures (several adapters per row) and batches past the largest size run eagerly.

Modes (``GraphConfig.mode``): ``graphs`` captures and replays (CUDA with the Triton kernels);
``static`` runs the very same padded forward eagerly, without capture (on the CPU this is how
the path is tested); ``eager`` (``--enforce-eager``) skips it all.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from adapters.lora_tables import LoraTables
from engine.attention import AttentionMetadata
from engine.forward_batch import ForwardBatch
from engine.lora import LoraBackend, LoraMetadata, LoraPass
from engine.model import CausalLM
from engine.page_tables import PageTables
from engine.scheduler_output import ScheduledChunk

logger = logging.getLogger(__name__)

GRAPH_MODES = ("eager", "static", "graphs")

# Batch sizes captured: small sizes one by one (a decode batch is often small), then wider
# steps; the top is always ``max_num_seqs``.
CAPTURE_LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)

_FIELDS = ("input_ids", "positions", "new_k", "new_v", "rows", "seq_lens", "adapters")


def capture_sizes(max_num_seqs: int, sizes: Sequence[int] = ()) -> tuple[int, ...]:
    """The batch sizes to capture: ``sizes`` if given, else the ladder up to ``max_num_seqs``
    (which is always the largest, so every decode batch the scheduler can form fits)."""
    if max_num_seqs <= 0:
        raise ValueError("max_num_seqs must be positive")
    if sizes:
        if any(s <= 0 for s in sizes):
            raise ValueError("CUDA graph sizes must be positive")
        return tuple(sorted({min(s, max_num_seqs) for s in sizes}))
    return (*(s for s in CAPTURE_LADDER if s < max_num_seqs), max_num_seqs)


def bucket_for(num_rows: int, sizes: Sequence[int]) -> int | None:
    """The smallest size that holds ``num_rows`` rows; None when none does."""
    i = bisect.bisect_left(sizes, num_rows)
    return sizes[i] if i < len(sizes) else None


@dataclass(frozen=True)
class GraphShape:
    """What decides the graphs' memory: the model's widths and the capture."""

    hidden_size: int
    intermediate_size: int
    q_width: int
    kv_width: int
    max_lora_rank: int
    sizes: tuple[int, ...]
    itemsize: int


# Per captured graph: its own kernel nodes and small allocations, beyond the shared pool.
_PER_GRAPH_BYTES = 2 << 20


def graph_memory_bytes(shape: GraphShape) -> int:
    """An upper estimate of what capturing takes on the device, set aside before the pool
    is sized.

    The graphs share one memory pool and are captured largest first, so the pool holds what
    the largest batch's forward allocates at its peak: the residual stream and the norms in
    float32, the projections, attention's output, the MLP's three intermediate-wide tensors
    and the LoRA shrinks' float32 outputs (7 targets) per row, twice over for the allocator's
    rounding and for temporaries alive across a layer boundary. Each graph then adds its own
    bookkeeping; two sets are captured (with and without LoRA).
    """
    largest = max(shape.sizes, default=0)
    per_row = (
        4 * 4 * shape.hidden_size  # residual, normed input, float32 norm temporaries
        + shape.itemsize * (2 * shape.q_width + 2 * shape.kv_width)  # q, k, v, attention
        + shape.itemsize * 3 * shape.intermediate_size  # gate, up, silu(gate) * up
        + 4 * 7 * shape.max_lora_rank  # LoRA shrink outputs, float32
    )
    return 2 * largest * per_row + 2 * len(shape.sizes) * _PER_GRAPH_BYTES


class DecodeGraphs:
    """Static buffers, the padded decode forward, and its captured graphs.

    Args:
        model: the model (its LoRA and attention backends are those it was built with).
        pools: the page pool's per-layer tensors (the last row is the scratch page).
        page_tables: the runner's page tables (their padding row points at the scratch page).
        lora_tables: the adapters' page tables, ranks and scalings.
        lora_backend: the model's LoRA backend.
        sizes: the batch sizes of the ladder, ascending.
        max_lora_rank: the largest adapter rank (fixes the LoRA kernels' grids).
        scratch_page: the pool's scratch page.

    Attributes:
        runs: how many steps ran at each (padded size, with LoRA) (tests count them).
        replays: how many of those replayed a captured graph.
    """

    def __init__(
        self,
        model: CausalLM,
        pools: list[torch.Tensor],
        page_tables: PageTables,
        lora_tables: LoraTables,
        lora_backend: LoraBackend,
        sizes: Sequence[int],
        max_lora_rank: int,
        scratch_page: int,
    ) -> None:
        if not sizes:
            raise ValueError("no batch sizes to run decode graphs at")
        self.model = model
        self.pools = pools
        self.page_tables = page_tables
        self.lora_tables = lora_tables
        self.lora_backend = lora_backend
        self.sizes = tuple(sorted(sizes))
        self.max_size = self.sizes[-1]
        self.max_lora_rank = max_lora_rank
        self.scratch_page = scratch_page
        self.device = device = pools[0].device
        # Every per-step integer in one (fields, max_size) int32 tensor: one copy per step.
        self._static = torch.zeros(len(_FIELDS), self.max_size, dtype=torch.int32, device=device)
        self._host = torch.zeros(len(_FIELDS), self.max_size, dtype=torch.int32)
        if device.type == "cuda":
            self._host = self._host.pin_memory()
        (
            self.input_ids,
            self.positions,
            self.new_k,
            self.new_v,
            self.rows,
            self.seq_lens,
            self.adapters,
        ) = self._static.unbind(0)
        self._seg_starts = torch.arange(self.max_size + 1, dtype=torch.int32, device=device)
        self._no_prefill = torch.zeros(1, dtype=torch.int32, device=device)
        self._no_tables = torch.zeros(0, 1, dtype=torch.int32, device=device)
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.runs: Counter[tuple[int, bool]] = Counter()
        self.replays = 0
        self.capture_bytes = 0

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def accepts(self, chunks: Sequence[ScheduledChunk]) -> bool:
        """Whether the step is a decode this path runs: every chunk one token that samples,
        at most one adapter per row (no mixture), no cached blocks to record in the page
        tables, and no more rows than the largest size."""
        if not chunks or len(chunks) > self.max_size:
            return False
        for c in chunks:
            if c.num_tokens != 1 or not c.sample or c.prompt_targets or c.cached_k_pages:
                return False
            if len(c.adapter_slots) > 1 or any(w != 1.0 for w in c.adapter_weights):
                return False
        return True

    # -- one step ---------------------------------------------------------------------------

    def run(self, chunks: Sequence[ScheduledChunk], rows: Sequence[int]) -> torch.Tensor:
        """Hidden states (len(chunks), hidden_size) of a decode step, rows in chunk order.

        ``rows`` are the chunks' page-table rows (``PageTables.assign``); the new tokens'
        pages are recorded in the tables by the forward itself.
        """
        n = len(chunks)
        size = bucket_for(n, self.sizes)
        assert size is not None and self.accepts(chunks), "not a decode step for the graphs"
        self._fill(chunks, rows, size)
        has_lora = any(c.adapter_slots for c in chunks)
        self.runs[size, has_lora] += 1
        graph = self._graphs.get((size, has_lora))
        if graph is not None:
            graph[0].replay()
            self.replays += 1
            return graph[1][:n]
        lora = self._lora_metadata(size, chunks) if has_lora else None
        return self._forward(size, lora)[:n]

    def _fill(self, chunks: Sequence[ScheduledChunk], rows: Sequence[int], size: int) -> None:
        """Write the step's integers, padding included, into the static buffers."""
        n = len(chunks)
        pad = size - n
        scratch = self.scratch_page
        values = [
            [c.token_ids[0] for c in chunks] + [0] * pad,
            [c.start_pos for c in chunks] + [0] * pad,
            [c.new_k_pages[0] for c in chunks] + [scratch] * pad,
            [c.new_v_pages[0] for c in chunks] + [scratch] * pad,
            list(rows) + [self.page_tables.pad_row] * pad,
            [c.seq_len for c in chunks] + [1] * pad,
            [c.adapter_slots[0] if c.adapter_slots else -1 for c in chunks] + [-1] * pad,
        ]
        host = self._host[:, :size]
        host.copy_(torch.tensor(values, dtype=torch.int32))
        # Safe to rewrite the pinned buffer next step: the step reads its sampled tokens back
        # to the host, which waits for this copy.
        self._static[:, :size].copy_(host, non_blocking=True)

    def _forward(self, size: int, lora: LoraMetadata | None) -> torch.Tensor:
        """The padded decode forward over the first ``size`` rows of the static buffers: what
        is captured, and what ``static`` mode runs eagerly."""
        rows, positions = self.rows[:size], self.positions[:size]
        new_k, new_v = self.new_k[:size], self.new_v[:size]
        tables = self.page_tables
        # Record the new tokens' pages (the padding row's entry 0 is the scratch page again).
        tables.k[rows, positions] = new_k
        tables.v[rows, positions] = new_v
        attn = AttentionMetadata(
            new_k_pages=new_k,
            new_v_pages=new_v,
            num_decodes=size,
            decode_seq_lens=self.seq_lens[:size],
            decode_k_pages=tables.k.index_select(0, rows),
            decode_v_pages=tables.v.index_select(0, rows),
            prefill_cu_seqlens=self._no_prefill,
            prefill_seq_lens=self._no_prefill[:0],
            prefill_k_pages=self._no_tables,
            prefill_v_pages=self._no_tables,
        )
        batch = ForwardBatch(attn, self.pools, lora)
        hidden: torch.Tensor = self.model(self.input_ids[:size], positions, batch)
        return hidden

    def _lora_metadata(self, size: int, chunks: Sequence[ScheduledChunk] = ()) -> LoraMetadata:
        """The LoRA metadata of a padded batch: the device pass over the static buffers (one
        segment per row), and, for the CPU backend, the same rows' runs on the host."""
        slots = [c.adapter_slots[0] if c.adapter_slots else -1 for c in chunks]
        slots += [-1] * (size - len(slots))
        runs: list[tuple[int, int, int, float]] = []
        for row, slot in enumerate(slots):
            if runs and runs[-1][0] == slot and runs[-1][2] == row:
                runs[-1] = (slot, runs[-1][1], row + 1, 1.0)
            else:
                runs.append((slot, row, row + 1, 1.0))
        distinct = list(dict.fromkeys(s for s in slots if s >= 0))
        tables = self.lora_tables
        passes = None
        if self.lora_backend.needs_device_passes:
            passes = (
                LoraPass(
                    seg_starts=self._seg_starts[: size + 1],
                    seg_adapters=self.adapters[:size],
                    token_weights=None,
                    max_seg_len=1,
                ),
            )
        return LoraMetadata(
            num_tokens=size,
            segments=(tuple(r for r in runs if r[0] >= 0),),
            row_slots=((slots, [1.0] * size),),
            ranks={s: tables.host_ranks[s].tolist() for s in distinct},
            scalings={s: tables.host_scalings[s].tolist() for s in distinct},
            max_rank=self.max_lora_rank,
            tables=tables,
            passes=passes,
        )

    # -- capture ----------------------------------------------------------------------------

    @torch.inference_mode()
    def capture(self, progress: bool = True) -> None:
        """Capture the forward of every size, with and without LoRA, largest first, into one
        shared memory pool (CUDA only). The buffers hold a valid all-padding batch while
        capturing, so the warm-up runs touch only the scratch page."""
        assert self.device.type == "cuda", "CUDA graphs need a CUDA device"
        assert self.lora_backend.needs_device_passes, "capture needs the Triton LoRA kernels"
        self._fill([], [], self.max_size)
        keys = [(size, lora) for size in reversed(self.sizes) for lora in (False, True)]
        bar = _progress(len(keys), progress)
        start = time.monotonic()
        torch.cuda.synchronize(self.device)
        before = torch.cuda.mem_get_info(self.device)[0]
        memory_pool = torch.cuda.graph_pool_handle()
        for size, has_lora in keys:
            lora = self._lora_metadata(size) if has_lora else None
            stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile the Triton kernels, settle the allocator
                    self._forward(size, lora)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=memory_pool):
                out = self._forward(size, lora)
            self._graphs[(size, has_lora)] = (graph, out)
            bar(f"decode batch {size}{' + LoRA' if has_lora else ''}")
        torch.cuda.synchronize(self.device)
        self.capture_bytes = before - torch.cuda.mem_get_info(self.device)[0]
        logger.info(
            "captured %d decode graphs (batch sizes %s) in %.1f s, %.0f MiB",
            len(self._graphs),
            ",".join(map(str, self.sizes)),
            time.monotonic() - start,
            self.capture_bytes / 2**20,
        )


def _progress(total: int, enabled: bool) -> Callable[[str], None]:
    """A callable advancing a progress bar on stderr by one, with a label."""
    if not enabled:
        return lambda label: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc="capturing CUDA graphs", unit="graph", leave=True)

    def advance(label: str) -> None:
        bar.set_postfix_str(label)
        bar.update(1)
        if bar.n == total:
            bar.close()

    return advance
