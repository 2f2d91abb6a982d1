"""What the routes ask of the engine besides generation, in either form of the server.

:class:`EngineHandle` is the interface; :class:`LocalEngine` serves it from an in-process
:class:`~engine.LLMEngine` (slow work in worker threads, compositions scoring through the
bridge), :class:`server.remote_engine.RemoteEngine` by calls to the engine process. Both
raise the same exceptions (``AdapterError``, ``ValueError``, :class:`APIError`), so the
routes map them onto the same responses.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Protocol

from transformers import PreTrainedTokenizerBase

from adapters.compose import ComposeSpec
from adapters.merge import MergeSpec
from engine.composition import RunBatch
from engine.llm_engine import LLMEngine
from engine.outputs import EngineStats, RequestOutput
from engine.scoring import SCORING_PARAMS
from server.adapter_ops import (
    AdapterInfo,
    ComposeJobs,
    adapter_infos,
    export_adapter,
    load_adapter,
    merge_adapter,
)
from server.bridge import BridgeBase
from server.request_group import RequestGroup


class EngineHandle(Protocol):
    """The engine as the routes see it (tokenization stays in the API process)."""

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...

    @property
    def max_model_len(self) -> int: ...

    def stats(self) -> EngineStats:
        """The latest snapshot (what ``/metrics`` renders)."""
        ...

    async def refresh_stats(self) -> None:
        """Bring :meth:`stats` up to date (a scrape awaits it)."""

    @property
    def scheduling_policy(self) -> str:
        """The engine's ``--scheduling-policy`` ("fcfs", "fair" or "priority")."""
        ...

    async def adapters(self) -> dict[str, AdapterInfo]:
        """Every registered name (temporary ``_`` ones included), its version and pin."""
        ...

    async def load_lora(self, name: str, path: Path, replace: bool, pinned: bool = False) -> int:
        """Load ``name`` (``replace``: swap a loaded one's weights; ``pinned``: keep it in
        the pool until unloaded); returns its version."""
        ...

    async def unload_lora(self, name: str) -> None: ...

    async def merge(self, name: str, spec: MergeSpec, save_to: Path | None) -> int:
        """Register the merge (or mixture) ``name``; returns the rank served."""
        ...

    async def compose(
        self,
        spec: ComposeSpec,
        default_candidates: bool,
        save_dir: Path | None,
        max_candidates: int,
        max_steps: int,
        max_jobs: int,
    ) -> dict[str, Any]:
        """Start a composition; returns the job's snapshot."""
        ...

    async def compose_status(self, job_id: str) -> dict[str, Any] | None: ...

    async def compositions(self) -> list[dict[str, Any]]:
        """Every kept composition job's snapshot, newest first."""
        ...

    async def export(self, name: str, out: Path, dtype: str, quantization: str) -> None: ...


class LocalEngine:
    """:class:`EngineHandle` over an engine in this process, stepped by ``bridge``."""

    def __init__(self, engine: LLMEngine, bridge: BridgeBase) -> None:
        self.engine = engine
        self.bridge = bridge
        self.jobs = ComposeJobs()

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.config.model.max_model_len

    @property
    def scheduling_policy(self) -> str:
        return self.engine.config.scheduler.policy

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def refresh_stats(self) -> None:
        pass  # stats() reads the engine itself

    async def adapters(self) -> dict[str, AdapterInfo]:
        return adapter_infos(self.engine)

    async def load_lora(self, name: str, path: Path, replace: bool, pinned: bool = False) -> int:
        return await asyncio.to_thread(load_adapter, self.engine, name, path, replace, pinned)

    async def unload_lora(self, name: str) -> None:
        self.engine.unload_lora(name)

    async def merge(self, name: str, spec: MergeSpec, save_to: Path | None) -> int:
        return await asyncio.to_thread(merge_adapter, self.engine, name, spec, save_to)

    async def compose(
        self,
        spec: ComposeSpec,
        default_candidates: bool,
        save_dir: Path | None,
        max_candidates: int,
        max_steps: int,
        max_jobs: int,
    ) -> dict[str, Any]:
        run_batch = bridge_runner(self.bridge, asyncio.get_running_loop())
        job = self.jobs.start(
            self.engine,
            spec,
            default_candidates,
            run_batch,
            save_dir,
            max_candidates,
            max_steps,
            max_jobs,
        )
        return job.snapshot()

    async def compose_status(self, job_id: str) -> dict[str, Any] | None:
        job = self.jobs.get(job_id)
        return None if job is None else job.snapshot()

    async def compositions(self) -> list[dict[str, Any]]:
        return [job.snapshot() for job in self.jobs.all()]

    async def export(self, name: str, out: Path, dtype: str, quantization: str) -> None:
        await asyncio.to_thread(export_adapter, self.engine, name, out, dtype, quantization)


def bridge_runner(bridge: BridgeBase, loop: asyncio.AbstractEventLoop) -> RunBatch:
    """A composition's ``run_batch``: submits through the bridge from the job's thread.

    At most a quarter of the bridge's queue at a time, so a composition never crowds out
    (or is refused for) ordinary traffic; a refused submission aborts what it had queued.
    """
    chunk = max(1, bridge.max_pending // 4)

    async def run(batch: list[tuple[list[int], str]]) -> list[RequestOutput]:
        finals: list[RequestOutput] = []
        for lo in range(0, len(batch), chunk):
            groups: list[RequestGroup] = []
            try:
                for ids, adapter in batch[lo : lo + chunk]:
                    groups.append(await bridge.submit_async([(ids, SCORING_PARAMS)], adapter))
                for group in groups:
                    final = None
                    async for _, output in group:
                        if output.finished:
                            final = output
                    assert final is not None
                    finals.append(final)
            except BaseException:
                for group in groups:
                    bridge.abort(group)
                raise
        return finals

    def run_batch(batch: list[tuple[list[int], str]]) -> list[RequestOutput]:
        return asyncio.run_coroutine_threadsafe(run(batch), loop).result()

    return run_batch
