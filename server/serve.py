"""``loraserve serve``: build the engine and the app from the command line and run uvicorn.

    loraserve serve [MODEL_DIR] [--lora-modules NAME=PATH ...] [--pinned-lora-modules NAME ...]
                    [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--admin-api-key KEY]
                    [--adapter-root DIR ...] [--lora-cache-dir DIR [--lora-source NAME=DIR ...]]
                    ...

With no MODEL_DIR it serves the bundled demo model and every adapter directory under
``examples/demo/adapters`` (an adapter still being trained, without its config, is skipped).
SIGTERM stops admitting requests, lets running ones finish for ``--drain-timeout`` seconds,
then aborts the rest (``finish_reason: "abort"``).

The engine runs in its own process (:mod:`server.engine_core`; this one keeps HTTP,
tokenization and streaming), so that the event loop and the engine do not share a GIL;
``--engine-in-process`` steps it in a thread of this process instead. If the engine dies (its
process, or its thread), the server answers 503 for ``--engine-failure-exit-delay`` seconds
(so that health checks see it), then exits with status 1 for its supervisor to restart it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
from collections.abc import Collection, Sequence
from pathlib import Path
from types import FrameType

import uvicorn

from adapters.errors import AdapterError
from engine.config import DEMO_DIR
from engine.llm_engine import LLMEngine
from server.app import create_app, create_app_for_process
from server.bridge import BridgeBase
from server.config import ServerConfig
from server.engine_args import add_engine_args, engine_config
from server.engine_process import EngineProcess
from server.engine_protocol import EngineSpec

# The startup adapters and their pins are read by serve_args (no HTTP stack there, so that
# ``loraserve plan`` sizes the pool for the same adapters); re-exported for server.ray_serve.
from server.serve_args import lora_modules as lora_modules
from server.serve_args import pinned_modules

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "loraserve-demo"  # what the demo adapters' configs call their base


def build_engine(
    args: argparse.Namespace,
    adapters: list[tuple[str, Path]],
    pinned: Collection[str] = (),
    sized_for: Sequence[tuple[str, Path]] = (),
) -> LLMEngine:
    """The engine the flags describe, with ``adapters`` loaded, those named in ``pinned``
    pinned (refusals end the command).

    The pool is sized for the adapters from their configs first (and for ``sized_for``,
    adapters it must hold when loaded later: a Ray replica's), so that one it cannot hold
    is refused, with the flag and the value that would do, before any weight loads.
    """
    config = engine_config(args, args.model_dir, args.seed, [*adapters, *sized_for], list(pinned))
    engine = LLMEngine(config)
    for name, path in adapters:
        try:
            engine.load_lora(name, path, pinned=name in pinned)
        except AdapterError as e:
            raise ValueError(f"adapter {name}: {e.message}") from None
        logger.info("adapter %s loaded%s", name, " (pinned)" if name in pinned else "")
    return engine


def engine_spec(
    args: argparse.Namespace,
    adapters: list[tuple[str, Path]],
    pinned: Collection[str] = (),
    sized_for: Sequence[tuple[str, Path]] = (),
) -> EngineSpec:
    """What the engine process builds: the engine flags as parsed, the adapters it loads,
    and those its pool is sized for (:func:`build_engine`)."""
    probe = argparse.ArgumentParser(add_help=False)
    add_engine_args(probe)
    names = vars(probe.parse_args([])).keys()
    return EngineSpec(
        model_dir=args.model_dir,
        engine_args={name: getattr(args, name) for name in names},
        seed=args.seed,
        lora_modules=[(name, str(path)) for name, path in adapters],
        log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()),
        pinned_lora_modules=list(pinned),
        sized_for=[(name, str(path)) for name, path in sized_for],
    )


def _lora_sources(args: argparse.Namespace) -> tuple[tuple[str, Path], ...]:
    """``--lora-source NAME=DIR`` pairs."""
    sources = []
    for spec in args.lora_source:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"--lora-source takes NAME=DIR, got {spec!r}")
        sources.append((name, Path(directory)))
    return tuple(sources)


def server_config(args: argparse.Namespace) -> ServerConfig:
    if args.model_dir is None:
        name = args.served_model_name or DEMO_MODEL_NAME
        roots = args.adapter_root or [str(DEMO_DIR / "adapters")]
    else:
        name = args.served_model_name or Path(args.model_dir).resolve().name
        roots = args.adapter_root
    return ServerConfig(
        model_name=name,
        api_key=args.api_key or None,
        admin_api_key=args.admin_api_key or None,
        allow_runtime_lora=args.enable_runtime_lora_loading,
        adapter_roots=tuple(Path(r) for r in roots),
        lora_cache_dir=Path(args.lora_cache_dir) if args.lora_cache_dir else None,
        lora_sources=_lora_sources(args),
        lora_fetch_timeout_s=args.lora_fetch_timeout,
        cors_origins=tuple(args.allowed_origins),
        max_waiting=args.max_waiting_requests,
        max_request_bytes=args.max_request_bytes,
        drain_timeout_s=args.drain_timeout,
        watchdog_s=args.watchdog_timeout,
        export_root=Path(args.export_root) if args.export_root else None,
        max_compose_candidates=args.max_compose_candidates,
        max_compose_steps=args.max_compose_steps,
        max_compose_jobs=args.max_compose_jobs,
        max_metric_adapters=args.max_metric_adapters,
        console=not args.disable_console,
        metrics_compat=args.metrics_compat,
    )


class DrainingServer(uvicorn.Server):
    """uvicorn, plus: the first SIGTERM/SIGINT starts the bridge's drain."""

    def __init__(self, config: uvicorn.Config, bridge: BridgeBase, drain_s: float) -> None:
        super().__init__(config)
        self.bridge = bridge
        self.drain_s = drain_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            logger.warning("%s: draining, then exiting", signal.Signals(sig).name)
            self.bridge.request_drain(self.drain_s)
        super().handle_exit(sig, frame)


def run_serve(args: argparse.Namespace) -> int:
    if args.ray_replicas:
        from server.ray_serve import run_ray  # Ray is an optional dependency

        return run_ray(args)
    config = server_config(args)
    adapters = lora_modules(args)
    pinned = pinned_modules(args, adapters)
    server: DrainingServer | None = None
    process: EngineProcess | None = None

    def on_engine_death() -> None:
        delay = args.engine_failure_exit_delay
        logger.error("the engine died; exiting in %.0f s", delay)
        asyncio.get_running_loop().call_later(delay, lambda: setattr(server, "should_exit", True))

    if args.num_pages is not None or args.pool_memory is not None:
        # A given pool too small for the startup adapters ends the command here, before an
        # engine process starts. (A default pool is sized there: it may ask the GPU for its
        # memory, which this process never touches.)
        engine_config(args, args.model_dir, args.seed, adapters, pinned)
    if args.engine_in_process:
        engine = build_engine(args, adapters, pinned)
        app = create_app(engine, config, on_engine_death)
        names = engine.adapters.registry.names()
    else:
        spec = engine_spec(args, adapters, pinned)
        process = EngineProcess.spawn(spec, args.engine_startup_timeout)
        try:
            app = create_app_for_process(process, config, on_engine_death)
        except BaseException:
            process.close()
            raise
        names = process.info.adapters
    uv_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,  # keep the root logging the CLI configured
        access_log=not args.no_access_log,
        # A backstop only: the drain aborts everything at drain_timeout.
        timeout_graceful_shutdown=int(config.drain_timeout_s) + 10,
    )
    logger.info(
        "serving %s with adapters [%s] on http://%s:%d (engine %s)",
        config.model_name,
        ", ".join(names),
        args.host,
        args.port,
        "in process" if process is None else f"process {process.proc.pid}",
    )
    bridge = app.state.server.bridge
    server = DrainingServer(uv_config, bridge, config.drain_timeout_s)
    # What start-up imported and built (torch, transformers, the model) lives until exit:
    # move it out of the collector's sight, so a full collection does not walk it again
    # every few seconds and pause every stream for ~0.2 s.
    gc.collect()
    gc.freeze()
    try:
        server.run()
    finally:
        # Back in the collector's sight, so that the interpreter's exit frees it (extension
        # modules such as Triton's report frozen objects as leaks).
        gc.unfreeze()
        if process is not None and process.proc.poll() is None:
            process.close()  # the app never started (a port in use), so never ended it
    return 1 if bridge.dead else 0
