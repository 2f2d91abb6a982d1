"""What every route of one server shares: the engine, its bridge, settings and metrics."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from adapters.compose import ComposeJob
from engine.llm_engine import LLMEngine
from server.bridge import EngineBridge
from server.config import ServerConfig
from server.formatting import TokenText
from server.metrics import ServerMetrics


@dataclass
class ServerState:
    """One server's shared objects (the routes' closure, built by ``create_app``).

    Attributes:
        engine: for validation calls and adapter management (any thread); only the bridge's
            thread steps it.
        bridge: submits requests and streams their outputs.
        config: access rules and limits.
        metrics: the Prometheus registry.
        token_text: cached token texts for log-probs.
        admin_lock: serializes adapter loads and unloads.
        compose_jobs: composition jobs by id, finished ones included.
    """

    engine: LLMEngine
    bridge: EngineBridge
    config: ServerConfig
    metrics: ServerMetrics
    token_text: TokenText
    admin_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    compose_jobs: dict[str, ComposeJob] = field(default_factory=dict)

    def lora_for(self, model: str) -> str | None:
        """The adapter a request's ``model`` names; None for the base model."""
        return None if model == self.config.model_name else model
