"""The routes' :class:`~server.engine_handle.EngineHandle` over the engine process: each
operation one call across the channel (:class:`~server.engine_client.ProcessBridge`), with
the time it may take (``QUICK_CALL_S`` between two steps, ``SLOW_CALL_S`` for work on the
engine process's worker threads)."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from adapters.compose import ComposeSpec
from adapters.merge import MergeSpec
from engine.outputs import EngineStats
from server.adapter_ops import AdapterInfo
from server.engine_client import QUICK_CALL_S, SLOW_CALL_S, ProcessBridge
from server.engine_protocol import (
    Compose,
    ComposeStatus,
    EngineInfo,
    Export,
    GetStats,
    ListAdapters,
    ListCompositions,
    LoadLora,
    Merge,
    RegisterMixture,
    UnloadLora,
)
from server.errors import APIError

# Zeros (a pool of one page, so that ratios are defined), until the engine answers.
_REQUIRED_STATS: dict[str, Any] = {
    f.name: 0
    for f in dataclasses.fields(EngineStats)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
}
_EMPTY_STATS = EngineStats(**_REQUIRED_STATS | {"num_pages": 1})


class RemoteEngine:
    """:class:`~server.engine_handle.EngineHandle` over the engine process."""

    def __init__(
        self, bridge: ProcessBridge, info: EngineInfo, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        self.bridge = bridge
        self.info = info
        self._tokenizer = tokenizer
        self._stats: EngineStats | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def scheduling_policy(self) -> str:
        return self.info.scheduling_policy

    def stats(self) -> EngineStats:
        if self._stats is None:  # before the first answer (refreshed at startup)
            return _EMPTY_STATS
        return self._stats

    async def refresh_stats(self) -> None:
        with contextlib.suppress(APIError):  # a dead engine: its last numbers
            self._stats = await self.bridge.call(GetStats, EngineStats, QUICK_CALL_S)

    async def adapters(self) -> dict[str, AdapterInfo]:
        return await self.bridge.call(ListAdapters, dict[str, AdapterInfo], QUICK_CALL_S)  # type: ignore[arg-type]

    async def load_lora(self, name: str, path: Path, replace: bool, pinned: bool = False) -> int:
        make = lambda cid: LoadLora(cid, name, str(path), replace, pinned)  # noqa: E731
        return await self.bridge.call(make, int, SLOW_CALL_S)

    async def unload_lora(self, name: str) -> None:
        await self.bridge.call(lambda cid: UnloadLora(cid, name), type(None), QUICK_CALL_S)

    async def register_mixture(
        self, name: str, components: list[tuple[str, float]], replace: bool = False
    ) -> None:
        make = lambda cid: RegisterMixture(cid, name, components, replace)  # noqa: E731
        await self.bridge.call(make, type(None), QUICK_CALL_S)

    async def merge(self, name: str, spec: MergeSpec, save_to: Path | None) -> int:
        save = None if save_to is None else str(save_to)
        return await self.bridge.call(lambda cid: Merge(cid, name, spec, save), int, SLOW_CALL_S)

    async def compose(
        self,
        spec: ComposeSpec,
        default_candidates: bool,
        save_dir: Path | None,
        max_candidates: int,
        max_steps: int,
        max_jobs: int,
    ) -> dict[str, Any]:
        save = None if save_dir is None else str(save_dir)

        def make(cid: int) -> Compose:
            return Compose(cid, spec, default_candidates, save, max_candidates, max_steps, max_jobs)

        return await self.bridge.call(make, dict[str, Any], QUICK_CALL_S)  # type: ignore[arg-type]

    async def compose_status(self, job_id: str) -> dict[str, Any] | None:
        make = lambda cid: ComposeStatus(cid, job_id)  # noqa: E731
        return await self.bridge.call(make, dict[str, Any] | None, QUICK_CALL_S)  # type: ignore[arg-type]

    async def compositions(self) -> list[dict[str, Any]]:
        return await self.bridge.call(ListCompositions, list[dict[str, Any]], QUICK_CALL_S)

    async def export(self, name: str, out: Path, dtype: str, quantization: str) -> None:
        make = lambda cid: Export(cid, name, str(out), dtype, quantization)  # noqa: E731
        await self.bridge.call(make, type(None), SLOW_CALL_S)
