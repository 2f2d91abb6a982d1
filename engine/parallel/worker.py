"""A tensor-parallel worker process (``python -m engine.parallel.worker FD PARENT``),
started by the engine process (``executor.py``), one per device.

It reads its :class:`engine.parallel.channel.WorkerSpec` from the inherited socket ``FD``,
joins the torch.distributed group (NCCL on GPUs, gloo on the CPU) at the rendezvous store
the engine process hosts on loopback, loads its part of the model on its device (each
tensor cut as it streams in, ``sharding.py``), and builds its part of the page pool (pages
of its KV heads, 1/N as wide) and the LoRA tables (the same page ids as every other
worker's). Then, for every step the engine process sends: its part of the placements'
rows, the forward with its collectives, and (worker 0 only) the results back. It exits when
the channel closes, on ``Shutdown``, or on any error (after saying so): a worker that fails
leaves the others blocked in a collective, so the engine process ends them all (one bad
batch thus stops a split model, where one device fails only that batch's requests).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from adapters.lora_tables import LoraTables
from adapters.page_cost import PageCost
from adapters.placement import Placement
from engine.arch import ModelArch
from engine.attention import ATTENTION_BACKENDS
from engine.checkpoint import DTYPES
from engine.loader import load_model
from engine.model import NF4_BACKENDS, Backends, kernel_name
from engine.model_runner import ModelRunner
from engine.page_pool import PagePool
from engine.page_tables import PageTables
from engine.parallel.channel import (
    Failed,
    Report,
    Shutdown,
    Step,
    StepDone,
    WorkerReport,
    WorkerSpec,
    receive_spec,
    receive_to_worker,
    send,
)
from engine.parallel.group import ProcessGroupCollectives, Shard
from engine.parallel.lora import ShardedLora
from engine.quantization import memory_report
from engine.sampler import Sampler
from engine.scheduler_output import SchedulerOutput

logger = logging.getLogger(__name__)


class Worker:
    """One worker's part of the model, pool and tables, and the runner over them."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.shard = Shard(spec.rank, spec.size)
        self.device = torch.device(spec.device)
        dtype = DTYPES[spec.dtype]
        model_dir = Path(spec.model_dir)
        self.collectives = ProcessGroupCollectives(self.shard)
        arch = ModelArch.load(model_dir)
        name = kernel_name(spec.kernels or None, self.device)
        lora = ShardedLora(self.collectives, arch.hidden_size, triton=name == "triton")
        backends = Backends(ATTENTION_BACKENDS[name], lora, NF4_BACKENDS[name], self.collectives)
        self.model = load_model(
            model_dir,
            dtype,
            self.device,
            backends,
            spec.quantization,
            spec.load_format,
            spec.seed,
        )
        self.model.eval()
        self.weights = memory_report(self.model, dtype)
        width = arch.kv_width // spec.size
        self.pool = PagePool(arch.num_layers, spec.num_pages, width, dtype, self.device)
        # The engine process's tables, page for page: a row of a part is 1/N as wide as the
        # whole row, in pages 1/N as wide, so it takes as many pages.
        layout = arch.layout()
        chunks = PageCost.for_shapes(layout.linear_shapes, arch.kv_width).chunks
        self.tables = LoraTables.allocate(
            chunks, arch.num_layers, spec.max_slots, spec.max_lora_rank, self.device
        )
        sampler = Sampler(torch.Generator(device=self.device).manual_seed(spec.seed))
        page_tables = PageTables(
            spec.max_num_seqs, spec.max_model_len, self.device, scratch_page=self.pool.scratch_page
        )
        self.runner = ModelRunner(
            self.model, self.pool.layers, sampler, page_tables, self.tables, lora, None
        )
        self.generators: dict[str, torch.Generator] = {}
        self.adapter_elements = 0
        self.step_seconds = 0.0

    def step(self, output: SchedulerOutput) -> StepDone:
        started = time.perf_counter()
        for request_id in output.finished_ids:  # first: a finished request's id may return
            self.generators.pop(request_id, None)
        for placement in output.placements:
            self._place(placement)
        chunks = []
        for chunk in output.chunks:
            seed = chunk.params.seed
            if seed is not None:
                generator = self.generators.get(chunk.request_id)
                if generator is None:
                    generator = torch.Generator(device=self.device).manual_seed(seed)
                    self.generators[chunk.request_id] = generator
                chunk = dataclasses.replace(chunk, generator=generator)
            chunks.append(chunk)
        step = dataclasses.replace(output, chunks=chunks)
        results = self.runner.execute(step)
        self.step_seconds += time.perf_counter() - started
        return StepDone(results, self.step_seconds, self.collectives.summary())

    def _place(self, part: Placement) -> None:
        """Write the host mirrors the engine process's residency wrote when it placed the
        adapter (``part``: this worker's part of it; the runner writes its rows)."""
        slot = part.slot
        self.tables.host_ranks[slot] = part.ranks
        self.tables.host_scalings[slot] = part.scalings
        self.tables.generation[0] += 1
        for target in part.targets:
            for m in (*target.lora_a, *target.lora_b):
                self.adapter_elements += 0 if m is None else m.numel()

    def report(self) -> WorkerReport:
        return WorkerReport(
            rank=self.shard.rank,
            page_width=self.pool.page_width,
            page_bytes=self.pool.page_bytes,
            weights=self.weights,
            adapter_elements=self.adapter_elements,
            collectives=self.collectives.summary(),
        )


def _die_with_parent(parent: int) -> None:
    """Ask Linux to kill this process when the engine process dies (a worker blocked in a
    collective would otherwise wait out the group's timeout), and exit now if it already
    has. Linux sends the signal when the *thread* that started this process ends, so the
    engine builds its executor on a thread that lives as long as the engine (its main one)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def serve(sock: socket.socket) -> int:
    spec = receive_spec(sock)
    threads = os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(int(threads) if threads else max(1, (os.cpu_count() or 1) // spec.size))
    try:
        backend = "nccl" if spec.device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(torch.device(spec.device))
        timeout = timedelta(seconds=spec.timeout_s)
        store = dist.TCPStore(  # type: ignore[attr-defined]
            "127.0.0.1", spec.store_port, is_master=False, timeout=timeout
        )
        dist.init_process_group(
            backend, store=store, rank=spec.rank, world_size=spec.size, timeout=timeout
        )
        worker = Worker(spec)
        send(sock, worker.report())
        with torch.inference_mode():
            while True:
                try:
                    message = receive_to_worker(sock)
                except EOFError:
                    return 0
                if isinstance(message, Shutdown):
                    return 0
                if isinstance(message, Report):
                    send(sock, worker.report())
                    continue
                assert isinstance(message, Step)
                done = worker.step(message.output)
                if spec.rank == 0:
                    send(sock, done)
    except Exception as e:
        logger.exception("tensor-parallel worker %d failed", spec.rank)
        with contextlib.suppress(OSError):
            send(sock, Failed(f"worker {spec.rank}: {type(e).__name__}: {e}"))
        return 1


def main() -> int:
    _die_with_parent(int(sys.argv[2]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine process ends its workers
    logging.basicConfig(level="WARNING", format="%(levelname)s tp-worker %(name)s: %(message)s")
    sock = socket.socket(fileno=int(sys.argv[1]))
    return serve(sock)


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    os._exit(code)  # no waiting on the process group's threads
