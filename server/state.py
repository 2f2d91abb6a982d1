"""What every route of one server shares: the engine handle, the bridge, settings, metrics."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from adapters.source_cache import AdapterCache
from engine.llm_engine import LLMEngine
from server.bridge import BridgeBase
from server.config import ServerConfig
from server.engine_handle import EngineHandle
from server.formatting import TokenText
from server.metrics import ServerMetrics


@dataclass
class ServerState:
    """One server's shared objects (the routes' closure, built by ``create_app`` or
    ``create_app_for_process``).

    Attributes:
        engine: the in-process engine (tests reach it here); None when the engine runs in
            its own process.
        bridge: submits requests and streams their outputs.
        config: access rules and limits.
        metrics: the Prometheus registry.
        token_text: cached token texts for log-probs.
        handle: the engine as the routes use it (tokenizer, adapters, merges, ...).
        plan: what the engine's flags plan for (:meth:`engine.plan.Plan.to_json`), shown by
            the status route beside what is live; None when it could not be made.
        sources: the cache that fetches adapters named by source URIs; None when
            ``--lora-cache-dir`` is not set.
        admin_lock: serializes adapter loads and unloads.
    """

    engine: LLMEngine | None
    bridge: BridgeBase
    config: ServerConfig
    metrics: ServerMetrics
    token_text: TokenText
    handle: EngineHandle
    plan: dict[str, Any] | None = None
    sources: AdapterCache | None = None
    admin_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def lora_for(self, model: str) -> str | None:
        """The adapter a request's ``model`` names; None for the base model."""
        return None if model == self.config.model_name else model
