"""What every route of one server shares: the engine handle, the bridge, settings, metrics.

Routes are module-level functions that reach this state through the request
(:func:`server_state`), never through a closure: FastAPI keeps every endpoint function it
has seen in process-wide caches, so a handler closing over the state would keep a stopped
server's engine alive for as long as the process runs (tests and soaks build many servers).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from adapters.source_cache import AdapterCache
from engine.llm_engine import LLMEngine
from server.bridge import BridgeBase
from server.config import ServerConfig
from server.engine_handle import EngineHandle
from server.formatting import TokenText
from server.metrics import ServerMetrics


@dataclass
class ServerState:
    """One server's shared objects, built by ``create_app`` or ``create_app_for_process``
    and kept in its app's ``state.server``.

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
        admin_lock: serializes adapter loads, unloads and merges.
        export_lock: one export at a time (loads and unloads go on meanwhile).
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
    export_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def lora_for(self, model: str) -> str | None:
        """The adapter a request's ``model`` names; None for the base model."""
        return None if model == self.config.model_name else model


def server_state(request: Request) -> ServerState:
    """The state of the server that ``request`` came to (its app's ``state.server``)."""
    state = request.app.state.server
    assert isinstance(state, ServerState)
    return state
