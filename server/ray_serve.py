"""loraserve on Ray Serve: replicas of the server behind one ingress that sends each request
to a replica already holding its adapter.

Two deployments (``pip install 'loraserve[ray]'``):

- :class:`LoraServeReplica` (``--ray-replicas N`` of them): one whole ``loraserve serve``
  each (its engine, in a process of its own unless ``--engine-in-process``, and the same
  FastAPI app, driven in-process over ASGI), so routes, streaming, keys and errors are the
  server's own. It starts with the base model only. An adapter is loaded into its engine
  when a request for it arrives, through Ray Serve's model multiplexing
  (``serve.multiplexed``) with the adapter's name as the multiplexed model id: Ray routes a
  request to a replica that reports holding its adapter, and drops the least recently used
  adapter of a replica past ``max_num_models_per_replica`` (by default the adapters of the
  largest rank that fit in the pool beside one full-length request).
- :class:`LoraServeIngress` (one replica): the HTTP entry. It owns the adapter catalog
  (name → path, version, kind: the start-up adapters, then the admin routes' loads and
  unloads), answers ``/v1/models`` and the load and unload routes from it, and forwards
  everything else byte for byte to a replica, naming the request's adapter as the
  multiplexed id. A replica that dies mid-request fails only its in-flight requests: a 503
  ``replica_unavailable`` in the error envelope (or, once a stream has started, an error
  event before it ends); Ray starts a new replica in its place.

``loraserve serve --ray-replicas N`` starts a local Ray instance and runs this app on
``--host``/``--port``; ``serve run`` deploys :func:`app_builder` on an existing cluster from
a config file (``docs/scale-out.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import shlex
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from adapters.errors import AdapterError
from engine.config import EngineConfig
from engine.plan import plan_for
from server.auth import authorized, require_admin
from server.body import read_body
from server.config import ServerConfig
from server.errors import APIError, from_adapter_error
from server.lora_sources import adapter_cache, resolve_lora
from server.protocol import LoadLoraRequest, UnloadLoraRequest, parse_body

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-loraserve-replica"  # which replica answered (tests, debugging)
_FORWARDED_ROUTES = ("/v1/completions", "/v1/chat/completions")  # the ones naming a model
_UNLOAD_WAIT_S = 30.0  # how long an adapter Ray drops may wait for its requests to start


@dataclass(frozen=True)
class AdapterSource:
    """A catalog entry: where an adapter's files are, and which load of its name it is."""

    path: str
    version: int
    kind: str = "lora"


@dataclass(frozen=True)
class Forwarded:
    """An HTTP request as the ingress received it, for a replica's app to answer."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    adapter: str | None = None  # the adapter the body names (the multiplexed model id)
    source: AdapterSource | None = None


@dataclass(frozen=True)
class Start:
    """The first item of a forwarded response: its status and headers (the body follows)."""

    status: int
    headers: list[tuple[bytes, bytes]]


# ---------------------------------------------------------------------------------------
# Replicas.


class _HeldAdapter:
    """What the multiplexer keeps for an adapter loaded into one replica's engine. Ray calls
    ``__del__`` (in a worker thread) when it drops it: that schedules the adapter's unload
    and returns at once, so the adapter Ray loads next never waits for it."""

    def __init__(self, replica: LoraServeReplica, name: str, hold: int) -> None:
        self.replica = replica
        self.name = name
        self.hold = hold  # which hold of the name this is (a later one cancels the unload)
        self.released = False

    def __del__(self) -> None:
        if self.released:
            return
        self.released = True
        if not self.replica.loop.is_closed():
            self.replica.loop.call_soon_threadsafe(self.replica.drop, self.name, self.hold)


class LoraServeReplica:
    """One loraserve server (engine and app) answering forwarded requests."""

    # Ray Serve awaits an async constructor: the replica is ready once its engine is.
    async def __init__(self, args: argparse.Namespace, max_adapters: int) -> None:  # type: ignore[misc]
        # Imported here: the app pulls in torch and the engine, which only replicas need.
        from server.app import create_app, create_app_for_process
        from server.engine_client import EngineProcess
        from server.serve import build_engine, engine_spec, server_config

        config = server_config(args)
        if args.engine_in_process:
            engine = await asyncio.to_thread(build_engine, args, [])
            self.app = create_app(engine, config)
        else:
            spec = engine_spec(args, [])
            process = await asyncio.to_thread(
                EngineProcess.spawn, spec, args.engine_startup_timeout
            )
            self.app = create_app_for_process(process, config)
        self.state = self.app.state.server
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self.loop = asyncio.get_running_loop()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.versions: dict[str, int] = {}  # adapter → the catalog version loaded here
        self.holds: Counter[str] = Counter()  # adapter → times the multiplexer loaded it
        self.in_use: Counter[str] = Counter()  # adapter → forwarded requests using it
        self.tasks: set[asyncio.Task[None]] = set()  # unloads under way
        self._sources: dict[str, AdapterSource] = {}
        self._locks: dict[str, asyncio.Lock] = {}

        async def load(name: str) -> _HeldAdapter:
            return await self._load(name)

        self.hold = serve.multiplexed(load, max_num_models_per_replica=max_adapters)

    async def _load(self, name: str) -> _HeldAdapter:
        """The multiplexer's loader (called under ``name``'s lock, from :meth:`_ensure`).
        An adapter dropped but not yet unloaded is simply held again."""
        if name not in self.versions:
            source = self._sources[name]
            await self.state.handle.load_lora(name, Path(source.path), False)
            self.versions[name] = source.version
            logger.info("replica %s: adapter %s loaded", self.replica_id, name)
        self.holds[name] += 1
        return _HeldAdapter(self, name, self.holds[name])

    def drop(self, name: str, hold: int) -> None:
        """Start :meth:`unload` (on the replica's loop)."""
        task = self.loop.create_task(self.unload(name, hold))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def unload(self, name: str, hold: int) -> None:
        """Unload ``name`` (dropped by the multiplexer as its ``hold``-th hold) once the
        requests forwarded for it are done, unless it has been held again since."""
        deadline = time.monotonic() + _UNLOAD_WAIT_S
        while self.in_use[name] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        async with self._locks.setdefault(name, asyncio.Lock()):
            if self.holds[name] != hold or self.in_use[name] or name not in self.versions:
                return  # held again, still in use, or already gone
            del self.versions[name]
            with contextlib.suppress(AdapterError):
                await self.state.handle.unload_lora(name)
        logger.info("replica %s: adapter %s dropped", self.replica_id, name)

    async def _ensure(self, name: str, source: AdapterSource) -> None:
        """Hold ``name`` at the catalog's version: loaded through the multiplexer, or
        replaced in place when the catalog has a newer load of the name."""
        self._sources[name] = source
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            await self.hold(name)
            if self.versions.get(name, source.version) != source.version:
                await self.state.handle.load_lora(name, Path(source.path), True)
                self.versions[name] = source.version

    async def load(self, name: str, source: AdapterSource) -> dict[str, Any] | None:
        """Hold ``name`` now (the admin load route); None, or the refusal's envelope."""
        self.in_use[name] += 1
        try:
            await self._ensure(name, source)
        except AdapterError as e:
            error = from_adapter_error(e, "lora_path")
            return {"status": error.status, "code": error.code, "message": error.message}
        finally:
            self.in_use[name] -= 1
        return None

    async def forward(self, request: Forwarded) -> AsyncIterator[Start | bytes]:
        """The app's response to ``request``: a :class:`Start`, then the body's chunks."""
        name = request.adapter
        if name is not None and request.source is not None:
            self.in_use[name] += 1
        try:
            if name is not None and request.source is not None:
                try:
                    await self._ensure(name, request.source)
                except AdapterError as e:
                    error = from_adapter_error(e, "model").response()
                    yield Start(error.status_code, list(error.raw_headers))
                    yield bytes(error.body)
                    return
            async for item in self._asgi(request):
                yield item
        finally:
            if name is not None and request.source is not None:
                self.in_use[name] -= 1

    async def _asgi(self, request: Forwarded) -> AsyncIterator[Start | bytes]:
        """Run the app on ``request`` as uvicorn would, yielding what it sends. If the
        ingress goes away mid-response, the app hears a disconnect (and aborts the
        request in the engine)."""
        sent: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        gone = asyncio.Event()
        body_given = False

        async def receive() -> dict[str, Any]:
            nonlocal body_given
            if not body_given:
                body_given = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            await sent.put(dict(message))

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": request.method,
            "scheme": "http",
            "path": request.path,
            "raw_path": request.path.encode(),
            "query_string": request.query,
            "root_path": "",
            "headers": request.headers,
            "client": ("127.0.0.1", 0),
            "server": ("127.0.0.1", 0),
            "state": {},
        }
        task = asyncio.create_task(self.app(scope, receive, send))
        task.add_done_callback(lambda _: sent.put_nowait(None))
        try:
            while (message := await sent.get()) is not None:
                if message["type"] == "http.response.start":
                    mark = (REPLICA_HEADER.encode(), self.replica_id.encode())
                    yield Start(message["status"], [*message.get("headers", []), mark])
                elif message["type"] == "http.response.body":
                    # What else the app has sent meanwhile goes in the same item: each item
                    # crosses Ray once, so a busy ingress gets fewer, larger ones.
                    chunks = [bytes(message.get("body", b""))]
                    more = message.get("more_body", False)
                    while more and not sent.empty():
                        queued = sent.get_nowait()
                        if queued is None or queued["type"] != "http.response.body":
                            sent.put_nowait(queued)  # the end; seen on the next turn
                            break
                        chunks.append(bytes(queued.get("body", b"")))
                        more = queued.get("more_body", False)
                    if any(chunks):
                        yield b"".join(chunks)
                    if not more:
                        break
        finally:
            gone.set()
            if not task.done():
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(task), 5)
            task.cancel()

    async def check_health(self) -> None:
        """Ray's health check: a replica whose engine is unhealthy is replaced."""
        health = self.state.bridge.health()
        if not health.ok:
            raise RuntimeError(f"loraserve replica unhealthy: {health.reason}")

    async def __del__(self) -> None:
        await self._lifespan.__aexit__(None, None, None)


# ---------------------------------------------------------------------------------------
# The ingress.


class LoraServeIngress:
    """The HTTP entry: the adapter catalog, and forwarding to replicas."""

    def __init__(
        self,
        replicas: DeploymentHandle[Any],
        config: ServerConfig,
        adapters: dict[str, AdapterSource],
        max_model_len: int,
    ) -> None:
        self.replicas = replicas
        self.config = config
        self.catalog = dict(adapters)
        # The last version of every name ever loaded: a name unloaded and loaded again gets
        # a newer one, so a replica still holding the old weights swaps them.
        self.last_version = {name: source.version for name, source in adapters.items()}
        self.max_model_len = max_model_len
        self.lock = asyncio.Lock()
        self.sources = adapter_cache(config)  # source URIs: on storage every replica sees

    async def __call__(self, request: Request) -> Response:
        try:
            headers = request.headers.raw
            path = request.url.path
            if path != "/health" and not authorized(self.config, headers):
                error = APIError(401, "invalid_api_key", "missing or invalid API key")
                response = error.response()
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
            if path == "/v1/models" and request.method == "GET":
                return JSONResponse(self._models())
            if path == "/v1/load_lora_adapter" and request.method == "POST":
                return await self._load(request)
            if path == "/v1/unload_lora_adapter" and request.method == "POST":
                return await self._unload(request)
            return await self._forward(request)
        except APIError as e:
            return e.response()

    def _models(self) -> dict[str, Any]:
        created = int(time.time())
        base = self.config.model_name

        def card(name: str, parent: str | None) -> dict[str, Any]:
            return {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "loraserve",
                "root": name,
                "parent": parent,
                "max_model_len": self.max_model_len,
            }

        data = [card(base, None)]
        for name, source in self.catalog.items():
            extra = {"version": source.version, "pinned": False, "kind": source.kind}
            data.append(card(name, base) | extra)
        return {"object": "list", "data": data}

    async def _load(self, request: Request) -> Response:
        if not self.config.lora_routes_enabled:
            raise APIError(404, "not_found", "no such route")
        require_admin(self.config, request.headers.raw)
        body = parse_body(await read_body(request, self.config.max_request_bytes), LoadLoraRequest)
        name = body.lora_name
        if name == self.config.model_name:
            raise APIError(
                409, "adapter_already_loaded", "that name is the base model's", "lora_name"
            )
        if body.pinned:
            raise APIError(
                400,
                "pin_refused",
                "pinning is per server: with --ray-replicas, each replica keeps the adapters "
                "its requests need",
                "pinned",
            )
        path = await resolve_lora(body.lora_path, self.config, self.sources)
        async with self.lock:
            old = self.catalog.get(name)
            if old is not None and not body.in_place:
                raise APIError(
                    409, "adapter_already_loaded", f"adapter {name!r} is loaded", "lora_name"
                )
            version = self.last_version.get(name, 0) + 1
            source = AdapterSource(str(path), version, _kind(path))
            # Into one replica now: a bad adapter is refused here, as `serve` refuses it.
            handle = self.replicas.options(multiplexed_model_id=name)
            refusal = await handle.load.remote(name, source)
            if refusal is not None:
                raise APIError(refusal["status"], refusal["code"], refusal["message"], "lora_path")
            self.catalog[name] = source
            self.last_version[name] = version
        logger.info("loaded adapter %s version %d", name, version)
        return JSONResponse(
            {
                "status": "ok",
                "lora_name": name,
                "version": version,
                "pinned": False,
                "message": f"loaded adapter {name} version {version}",
            }
        )

    async def _unload(self, request: Request) -> Response:
        if not self.config.lora_routes_enabled:
            raise APIError(404, "not_found", "no such route")
        require_admin(self.config, request.headers.raw)
        body = parse_body(
            await read_body(request, self.config.max_request_bytes), UnloadLoraRequest
        )
        async with self.lock:
            if self.catalog.pop(body.lora_name, None) is None:
                raise APIError(
                    404, "model_not_found", f"no adapter named {body.lora_name!r}", "lora_name"
                )
        return JSONResponse({"status": "ok", "lora_name": body.lora_name})

    async def _forward(self, request: Request) -> Response:
        # Bounded here too; a body's type is the replica's to judge, as the server's routes do.
        body = b""
        if request.method == "POST":
            body = await read_body(request, self.config.max_request_bytes)
        adapter = _model_of(request.url.path, body)
        if adapter == self.config.model_name:
            adapter = None
        source = None
        if adapter is not None:
            source = self.catalog.get(adapter)
            if source is None:  # a replica may still hold it: refuse it here
                raise APIError(
                    404, "model_not_found", f"the model {adapter!r} does not exist", "model"
                )
        forwarded = Forwarded(
            request.method,
            request.url.path,
            request.url.query.encode(),
            list(request.headers.raw),
            body,
            adapter,
            source,
        )
        options: dict[str, Any] = {"stream": True}
        if adapter is not None:
            options["multiplexed_model_id"] = adapter
        stream = cast(
            "DeploymentResponseGenerator[Any]",
            self.replicas.options(**options).forward.remote(forwarded),
        )
        try:
            first = await stream.__anext__()
        except Exception as e:  # the replica died or could not be reached
            stream.cancel()  # type: ignore[no-untyped-call]
            return _replica_unavailable(e).response()
        assert isinstance(first, Start)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in first.headers}
        headers.pop("content-length", None)
        if headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(
                _stream_body(stream), status_code=first.status, headers=headers
            )
        try:
            chunks = [chunk async for chunk in stream]
        except Exception as e:
            return _replica_unavailable(e).response()
        return Response(b"".join(c for c in chunks if isinstance(c, bytes)), first.status, headers)


async def _stream_body(stream: Any) -> AsyncIterator[bytes]:
    """A forwarded event stream; if the replica dies mid-stream, an error event ends it."""
    try:
        async for chunk in stream:
            yield chunk
    except Exception as e:
        error = _replica_unavailable(e)
        payload = {"error": {"message": error.message, "type": "server_error", "code": error.code}}
        yield f"data: {json.dumps(payload)}\n\n".encode()
    finally:
        stream.cancel()  # type: ignore[no-untyped-call]


def _replica_unavailable(e: Exception) -> APIError:
    logger.warning("a replica failed a request: %s", type(e).__name__)
    return APIError(
        503, "replica_unavailable", "the replica serving this request went away; retry it"
    )


def _model_of(path: str, body: bytes) -> str | None:
    """The ``model`` a generation request names (None for other routes, or no name)."""
    if path not in _FORWARDED_ROUTES:
        return None
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None  # the replica's app answers the malformed body
    return model if isinstance(model, str) else None


def _kind(path: Path) -> str:
    """An adapter directory's kind as ``/v1/models`` names it."""
    try:
        raw = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return "lora"
    kind = {"ADALORA": "adalora", "IA3": "ia3", "PROMPT_TUNING": "prompt_tuning"}
    kind |= {"PREFIX_TUNING": "prefix_tuning"}
    peft_type = raw.get("peft_type", "LORA")
    if peft_type == "LORA" and raw.get("use_dora"):
        return "dora"
    return kind.get(peft_type, "lora")


# ---------------------------------------------------------------------------------------
# Building the application.


def adapters_per_replica(args: argparse.Namespace) -> int:
    """How many adapters one replica holds at once: those of ``--max-lora-rank`` on every
    linear layer that fit in its pool beside one full-length request (the plan's figure),
    at most ``--max-resident-loras``, at least one."""
    from server.engine_args import engine_config

    config: EngineConfig = engine_config(args, args.model_dir, args.seed)
    plan = plan_for(config, ranks=[config.lora.max_lora_rank])
    fits = plan.adapters[0].fits
    most = fits[-1][0] if fits else 1
    return max(1, min(most, config.lora.max_resident_loras))


def _replica_gpus(args: argparse.Namespace) -> float:
    """GPUs per replica: ``--ray-replica-gpus``, else one where this machine has CUDA."""
    if args.ray_replica_gpus is not None:
        return float(args.ray_replica_gpus)
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def build_application(args: argparse.Namespace) -> Any:
    """The Ray Serve application ``loraserve serve --ray-replicas N ...`` runs."""
    from server.serve import _lora_modules, server_config

    config = server_config(args)
    if args.pinned_lora_modules:
        raise ValueError("--pinned-lora-modules: pinning is per server, not with --ray-replicas")
    adapters = {
        name: AdapterSource(str(path.resolve()), 1, _kind(path))
        for name, path in _lora_modules(args)
    }
    per_replica = args.ray_max_adapters_per_replica or adapters_per_replica(args)
    from server.engine_args import engine_config

    max_model_len = engine_config(args, args.model_dir, args.seed).model.max_model_len
    replica = serve.deployment(
        name="LoraServeReplica",
        num_replicas=args.ray_replicas,
        ray_actor_options={"num_cpus": 0, "num_gpus": _replica_gpus(args)},
        max_ongoing_requests=args.max_num_seqs + args.max_waiting_requests,
        health_check_period_s=5,
        graceful_shutdown_timeout_s=args.drain_timeout,  # as --drain-timeout on SIGTERM
        graceful_shutdown_wait_loop_s=1,
    )(LoraServeReplica)
    ingress = serve.deployment(
        name="LoraServeIngress",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=100_000,
    )(LoraServeIngress)
    return ingress.bind(replica.bind(args, per_replica), config, adapters, max_model_len)


def app_builder(builder_args: dict[str, str]) -> Any:
    """``serve run`` entry: ``args`` in the config file are ``loraserve serve``'s flags,
    e.g. ``{"flags": "/models/llama --lora-modules a=/adapters/a --ray-replicas 4"}``."""
    from server.serve_args import add_serve_args

    parser = argparse.ArgumentParser(prog="loraserve serve")
    add_serve_args(parser)
    args = parser.parse_args(shlex.split(builder_args.get("flags", "")))
    args.ray_replicas = args.ray_replicas or 1
    return build_application(args)


def run_ray(args: argparse.Namespace) -> int:
    """``loraserve serve --ray-replicas N``: a local Ray instance, the app on host:port."""
    import ray

    application = build_application(args)
    ray.init(include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application, name="loraserve", route_prefix="/")
    logger.info(
        "serving with %d replicas on http://%s:%d (Ray Serve)",
        args.ray_replicas,
        args.host,
        args.port,
    )
    stop = threading.Event()
    try:
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
    return 0
