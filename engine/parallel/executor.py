"""The engine process's side of tensor parallelism: it starts the workers, sends each step to
every one of them and takes worker 0's results; it stands where the model runner stands for
one device (``execute``), so the scheduler, the adapters' residency and the page accounting
run once, here, unchanged.

Workers are fresh interpreters (``python -m engine.parallel.worker``; never forked), one per
device (``cuda:RANK``, or the CPU), each with a private socket pair to this process
(`engine/parallel/channel.py`); they meet for their collectives at a torch.distributed
rendezvous on a loopback port. A worker that exits, or says it failed, ends them all: the
others would block in their next collective. The engine then raises :class:`WorkerDied`
from every later step, which the engine process treats as fatal (it exits, the API process
answers 503 and exits after ``--engine-failure-exit-delay``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import select
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import torch.distributed as dist

from engine.checkpoint import DTYPES
from engine.config import EngineConfig
from engine.outputs import CollectiveStats
from engine.parallel.channel import (
    Failed,
    Report,
    Shutdown,
    Step,
    StepDone,
    WorkerReport,
    WorkerSpec,
    frame,
    receive_from_worker,
    send,
    without_generators,
)
from engine.parallel.group import Shard
from engine.parallel.sharding import shard_placement
from engine.quantization import QuantizationReport
from engine.scheduler_output import ChunkResult, SchedulerOutput

logger = logging.getLogger(__name__)
_POLL_S = 1.0  # how often a wait for results also checks that every worker still runs


class WorkerDied(RuntimeError):
    """A tensor-parallel worker exited or failed: the engine cannot step any more."""


class TensorParallelExecutor:
    """N worker processes that run each step together.

    Args:
        config: the engine's config (``config.parallel.tensor_parallel_size`` workers).
        kernels: "torch" or "triton"; by default Triton on CUDA only.
        startup_timeout_s: how long loading may take before the start is given up.

    Raises:
        ValueError: a worker could not start (its error), or they did not in time.
    """

    def __init__(
        self, config: EngineConfig, kernels: str | None, startup_timeout_s: float = 1800.0
    ) -> None:
        self.size = size = config.parallel.tensor_parallel_size
        self.shards = [Shard(rank, size) for rank in range(size)]
        self.last: StepDone | None = None  # worker 0's latest answer (its counters)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.socks: list[socket.socket] = []
        self.dead: str | None = None
        # The rendezvous: a store hosted here, on a port the OS picks as it binds it (a port
        # chosen first and bound later by a worker could be taken in between).
        self.store = dist.TCPStore(  # type: ignore[attr-defined]
            "127.0.0.1",
            0,
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=config.parallel.timeout_s),
        )
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # this checkout, importable
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            for spec in worker_specs(config, kernels, self.store.port):
                ours, theirs = socket.socketpair()
                command = [sys.executable, "-m", "engine.parallel.worker", str(theirs.fileno())]
                proc = subprocess.Popen(
                    [*command, str(os.getpid())],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    pass_fds=(theirs.fileno(),),
                )
                theirs.close()
                self.procs.append(proc)
                self.socks.append(ours)
                send(ours, spec)
            self.reports = self._gather_reports(time.monotonic() + startup_timeout_s)
        except WorkerDied as e:
            self.close()
            raise ValueError(f"the tensor-parallel workers did not start: {e}") from None
        except BaseException:
            self.close()
            raise
        logger.info(
            "%d tensor-parallel workers ready, pages of %d elements each",
            self.size,
            self.reports[0].page_width,
        )

    def execute(self, output: SchedulerOutput) -> dict[str, ChunkResult]:
        """Run one step on every worker (each with its part of the step's placements);
        worker 0's results."""
        self._check_alive()
        output = without_generators(output)
        try:
            if not output.placements:
                message = frame(Step(output))  # encoded once, the same for every worker
                for sock in self.socks:
                    sock.sendall(message)
            for sock, shard in zip(self.socks, self.shards, strict=True):
                if output.placements:
                    parts = tuple(shard_placement(p, shard) for p in output.placements)
                    send(sock, Step(dataclasses.replace(output, placements=parts)))
        except OSError as e:
            self._fail(f"a worker's channel broke: {e}")
        self.last = self._results()
        return self.last.results

    def check(self) -> None:
        """Raise :class:`WorkerDied` if a worker has exited (cheap: one poll each)."""
        self._check_alive()
        for r, proc in enumerate(self.procs):
            if proc.poll() is not None:
                self._fail(f"tensor-parallel worker {r} exited with status {proc.returncode}")

    def worker_reports(self) -> list[WorkerReport]:
        """Every worker's own figures (pages, weights, adapter rows, collectives). From the
        thread that steps, between steps: it talks to the workers."""
        self._check_alive()
        for sock in self.socks:
            send(sock, Report())
        self.reports = self._gather_reports(None)
        return self.reports

    def close(self) -> None:
        """Stop the workers: ask, then, a few seconds on, kill. Stepping afterwards raises
        :class:`WorkerDied`."""
        self.dead = self.dead or "the tensor-parallel workers were shut down"
        goodbye = frame(Shutdown())
        for sock in self.socks:
            sock.setblocking(False)  # a worker stuck in a collective may read nothing
            with contextlib.suppress(OSError):
                sock.send(goodbye)
            sock.close()
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.socks, self.procs = [], []

    # -- waiting --------------------------------------------------------------------------

    def _gather_reports(self, deadline: float | None) -> list[WorkerReport]:
        """One :class:`WorkerReport` from every worker, in whatever order they come."""
        reports: dict[int, WorkerReport] = {}
        while len(reports) < self.size:
            for rank in self._readable(deadline):
                reply = self._receive(rank)
                if not isinstance(reply, WorkerReport):
                    self._fail(f"tensor-parallel worker {rank} answered {type(reply).__name__}")
                reports[rank] = reply
        return [reports[rank] for rank in range(self.size)]

    def _results(self) -> StepDone:
        """Worker 0's results of the step, watching every worker meanwhile: one that exits
        or fails ends the wait with :class:`WorkerDied` (the others say nothing)."""
        while True:
            for r in self._readable(None):
                reply = self._receive(r)
                if r != 0 or not isinstance(reply, StepDone):
                    self._fail(f"tensor-parallel worker {r} answered {type(reply).__name__}")
                return reply

    def _readable(self, deadline: float | None) -> list[int]:
        """The ranks with something to read, within ``_POLL_S``; fails when a worker has
        exited or the deadline has passed."""
        if not self.socks:
            self._fail("no tensor-parallel workers")
        readable, _, _ = select.select(self.socks, [], [], _POLL_S)
        if not readable:
            for r, proc in enumerate(self.procs):
                if proc.poll() is not None:
                    self._fail(f"tensor-parallel worker {r} exited with status {proc.returncode}")
            if deadline is not None and time.monotonic() > deadline:
                self._fail("the tensor-parallel workers did not start in time")
        return [self.socks.index(sock) for sock in readable]

    def _receive(self, rank: int) -> WorkerReport | StepDone:
        """Worker ``rank``'s next message; its failure, or its end, fails the executor."""
        try:
            reply = receive_from_worker(self.socks[rank])
        except (EOFError, OSError):
            self._fail(f"tensor-parallel worker {rank} exited")
        if isinstance(reply, Failed):
            self._fail(reply.message)
        assert not isinstance(reply, Failed)
        return reply

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise WorkerDied(self.dead)

    def _fail(self, reason: str) -> NoReturn:
        self.dead = reason
        logger.error("%s; stopping every tensor-parallel worker", reason)
        for proc in self.procs:
            with contextlib.suppress(OSError):
                proc.kill()
        raise WorkerDied(reason)


def worker_specs(config: EngineConfig, kernels: str | None, store_port: int) -> list[WorkerSpec]:
    """One spec per worker of ``config`` (devices ``cuda:0`` .. ``cuda:N-1``, or the CPU)."""
    mc, size = config.model, config.parallel.tensor_parallel_size
    dtype = next(name for name, d in DTYPES.items() if d == mc.dtype)
    return [
        WorkerSpec(
            rank=rank,
            size=size,
            model_dir=str(mc.model_dir),
            dtype=dtype,
            device=f"cuda:{rank}" if mc.device.type == "cuda" else "cpu",
            quantization=mc.quantization,
            load_format=mc.load_format,
            seed=config.seed,
            num_pages=config.cache.num_pages,
            max_num_seqs=config.scheduler.max_num_seqs,
            max_model_len=mc.max_model_len,
            max_slots=config.lora.max_resident_loras,
            max_lora_rank=config.lora.max_lora_rank,
            kernels=kernels or "",
            store_port=store_port,
            timeout_s=config.parallel.timeout_s,
        )
        for rank in range(size)
    ]


def combined_weights(reports: list[WorkerReport]) -> QuantizationReport:
    """The whole model's weight memory: every worker's part, added up."""
    return QuantizationReport(
        quantized_params=sum(r.weights.quantized_params for r in reports),
        quantized_bytes=sum(r.weights.quantized_bytes for r in reports),
        base_bytes=sum(r.weights.base_bytes for r in reports),
        unquantized_bytes=sum(r.weights.unquantized_bytes for r in reports),
    )


def worker_counters(executor: TensorParallelExecutor) -> tuple[float, dict[str, CollectiveStats]]:
    """Worker 0's seconds in steps and its collectives, as of its latest step."""
    last = executor.last
    if last is None:
        return 0.0, {}
    return last.step_seconds, {n: CollectiveStats(*c) for n, c in last.collectives.items()}
