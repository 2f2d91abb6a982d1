"""The HTTP server's own settings (the engine's are :class:`engine.EngineConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

METRICS_COMPAT = ("none", "vllm")  # --metrics-compat: whose names /metrics adds to its own


@dataclass(frozen=True)
class ServerConfig:
    """Access, limits and shutdown behaviour of one server.

    Attributes:
        model_name: what clients call the base model (the OpenAI ``model`` field).
        api_key: when set, every route but ``/health`` and the console's files needs
            ``Authorization: Bearer KEY``.
        admin_api_key: when set, adapter management needs it (the user key gets 403), and
            the management routes exist.
        allow_runtime_lora: expose the management routes without an admin key (then guarded
            by ``api_key`` only). Off by default: no admin key and no flag means no routes.
        adapter_roots: runtime ``lora_path`` values must resolve inside one of these.
        lora_cache_dir: where adapters fetched from source URIs (``hf://``, ``s3://``, ...)
            are kept; None refuses a URI ``lora_path`` (adapter sources are off).
        lora_sources: ``(scheme, directory)`` pairs: ``scheme://sub/path`` is served from a
            copy of ``directory/sub/path`` (a mounted bucket); needs ``lora_cache_dir``.
        lora_fetch_timeout_s: how long a load waits for a source before it is refused.
        cors_origins: origins allowed cross-origin access; empty means no CORS headers.
        max_waiting: requests (choices) accepted beyond what the engine runs at once;
            past it, 429 with ``Retry-After``.
        max_request_bytes: the largest request body accepted (413 past it).
        max_choices: the most choices (prompts × n) one request may ask for.
        drain_timeout_s: on SIGTERM, how long running requests may finish before they are
            aborted.
        watchdog_s: an engine step running longer than this makes ``/health`` report 503.
        max_metric_adapters: adapters that get their own metric label; the rest share
            ``other`` (bounded cardinality).
        metrics_compat: "vllm" also exports the metrics routers read under vLLM's names
            (``vllm:num_requests_waiting``, ``vllm:lora_requests_info``, ...); "none" does not.
        export_root: where ``/v1/adapters/{name}/export`` writes merged models; None
            refuses exports.
        max_compose_candidates: the most candidate adapters one composition may weigh.
        max_compose_steps: the largest ``max_steps`` one composition may ask for.
        max_compose_jobs: compositions running at once.
        console: serve the operator console at ``/`` (its page and scripts need no key;
            every figure it shows comes from routes that do).
    """

    model_name: str
    api_key: str | None = None
    admin_api_key: str | None = None
    allow_runtime_lora: bool = False
    adapter_roots: tuple[Path, ...] = ()
    lora_cache_dir: Path | None = None
    lora_sources: tuple[tuple[str, Path], ...] = ()
    lora_fetch_timeout_s: float = 300.0
    cors_origins: tuple[str, ...] = ()
    max_waiting: int = 256
    max_request_bytes: int = 1 << 20
    max_choices: int = 64
    drain_timeout_s: float = 30.0
    watchdog_s: float = 60.0
    max_metric_adapters: int = 32
    metrics_compat: str = "none"
    export_root: Path | None = None
    max_compose_candidates: int = 32
    max_compose_steps: int = 200
    max_compose_jobs: int = 2
    console: bool = True

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("the served model name must not be empty")
        if self.api_key == "" or self.admin_api_key == "":
            raise ValueError("API keys must not be empty strings")
        if self.max_waiting < 0 or self.max_request_bytes < 1024 or self.max_choices < 1:
            raise ValueError("max_waiting >= 0, max_request_bytes >= 1024, max_choices >= 1")
        if self.drain_timeout_s < 0 or self.watchdog_s <= 0:
            raise ValueError("drain_timeout_s must be >= 0 and watchdog_s > 0")
        if self.metrics_compat not in METRICS_COMPAT:
            raise ValueError(f"metrics_compat must be one of {', '.join(METRICS_COMPAT)}")
        if self.lora_sources and self.lora_cache_dir is None:
            raise ValueError("--lora-source needs --lora-cache-dir (where fetched adapters go)")
        if self.lora_fetch_timeout_s <= 0:
            raise ValueError("lora_fetch_timeout_s must be > 0")

    @property
    def admin_routes_enabled(self) -> bool:
        """Whether the adapter management routes exist: loading and unloading
        (:mod:`server.lora_loading_routes`) and merge, compose and export
        (:mod:`server.merge_routes`)."""
        return self.admin_api_key is not None or self.allow_runtime_lora
