"""The ASGI application: routes, access control, error envelope, health and metrics.

Middleware, outermost first: CORS (only when origins are listed, so preflights are answered
before a key is asked for), then the API-key check (only when a key is set). The engine
thread (or the connection to the engine process) starts with the application and stops
after its last request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers

from engine.llm_engine import LLMEngine
from engine.loader import load_tokenizer
from engine.plan import served_plan
from server.auth import KeyAuthMiddleware
from server.config import ServerConfig
from server.console_routes import console_router
from server.engine_client import ProcessBridge
from server.engine_handle import LocalEngine
from server.engine_process import EngineProcess
from server.engine_thread import EngineBridge
from server.errors import APIError, install_error_handlers
from server.formatting import TokenText
from server.lora_loading_routes import lora_loading_router
from server.lora_sources import adapter_cache
from server.merge_routes import merge_router
from server.metrics import CONTENT_TYPE, ServerMetrics
from server.openai_routes import openai_router
from server.openapi import openapi_spec
from server.remote_engine import RemoteEngine
from server.state import ServerState, server_state
from server.status import status_router


class _CORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered in the error envelope."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 400:  # origin, method or header not allowed
            return APIError(400, "cors_preflight_refused", "CORS preflight refused").response()
        return response


def create_app(
    engine: LLMEngine, config: ServerConfig, on_dead: Callable[[], None] | None = None
) -> FastAPI:
    """Build the server for a constructed engine (adapters given at startup already loaded),
    stepped by a thread of this process. ``on_dead`` runs (on the event loop) if that thread
    dies.

    The returned app's ``state.server`` holds the :class:`ServerState` (tests and the load
    test reach the bridge through it).
    """
    metrics = ServerMetrics(
        engine.stats, config.max_metric_adapters, config.model_name, config.metrics_compat
    )
    max_pending = engine.config.scheduler.max_num_seqs + config.max_waiting
    bridge = EngineBridge(engine, max_pending, config.watchdog_s, metrics, on_dead)
    handle = LocalEngine(engine, bridge)
    text = TokenText(engine.tokenizer)
    plan = served_plan(engine.config)
    state = ServerState(engine, bridge, config, metrics, text, handle, plan, adapter_cache(config))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        bridge.start()
        try:
            yield
        finally:
            bridge.stop()

    return build_app(state, lifespan)


def build_app(
    state: ServerState, lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]]
) -> FastAPI:
    """The routes over ``state``; ``lifespan`` starts and stops its bridge.

    The routes reach ``state`` through the app (:func:`server.state.server_state`), so
    nothing outside the app holds it once the app is gone.
    """
    config = state.config
    app = FastAPI(
        title="loraserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.server = state
    install_error_handlers(app)
    if config.api_key is not None:
        app.add_middleware(KeyAuthMiddleware, config=config)
    if config.cors_origins:
        app.add_middleware(
            _CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", prometheus, methods=["GET"])
    app.add_api_route("/openapi.json", openapi, methods=["GET"])
    app.include_router(openai_router)
    app.include_router(status_router)
    if config.console:
        app.include_router(console_router)
    if config.admin_routes_enabled:
        app.include_router(lora_loading_router)
        app.include_router(merge_router)
    return app


async def health(request: Request) -> Response:
    status = server_state(request).bridge.health()
    if not status.ok:
        return APIError(503, "unhealthy", status.reason).response()
    return JSONResponse({"status": "ok"})


async def prometheus(request: Request) -> Response:
    state = server_state(request)
    await state.handle.refresh_stats()
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


async def openapi(request: Request) -> dict[str, Any]:
    """The API as this server serves it (``server/openapi.py``), built once."""
    app = request.app
    if getattr(app.state, "openapi", None) is None:
        app.state.openapi = openapi_spec(app, server_state(request).config)
    spec: dict[str, Any] = app.state.openapi
    return spec


def create_app_for_process(
    process: EngineProcess, config: ServerConfig, on_dead: Callable[[], None] | None = None
) -> FastAPI:
    """Build the server for a ready engine process (:meth:`EngineProcess.spawn`); the app
    owns it from then on and ends it when it stops.

    The tokenizer is loaded here, from the model directory the engine process reports, the
    way the engine loads its own. ``on_dead`` runs (on the event loop) if the engine
    process dies; ``loraserve serve`` exits then.
    """
    info = process.info
    tokenizer = load_tokenizer(Path(info.model_dir), info.load_format)
    metrics = ServerMetrics(
        None, config.max_metric_adapters, config.model_name, config.metrics_compat
    )
    max_pending = info.max_num_seqs + config.max_waiting
    bridge = ProcessBridge(process, tokenizer, max_pending, config.watchdog_s, metrics, on_dead)
    handle = RemoteEngine(bridge, info, tokenizer)
    metrics.watch_engine(handle.stats)
    text = TokenText(tokenizer)
    sources = adapter_cache(config)
    state = ServerState(None, bridge, config, metrics, text, handle, info.plan, sources)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await bridge.start()
        try:
            await handle.refresh_stats()
            yield
        finally:
            await bridge.stop()

    return build_app(state, lifespan)
