"""One Ray Serve replica of loraserve: a whole server answering the requests the ingress
forwards (:mod:`server.ray_serve` has the overview).

The replica builds what ``loraserve serve`` builds (the engine, in its own process unless
``--engine-in-process``, and the same FastAPI app) and drives the app over ASGI, so every
route, stream, key check and error is the server's own. It starts with the base model only.
Adapters come and go through Ray Serve's model multiplexing: the ingress names a request's
adapter as the multiplexed model id, the replica holds it (:meth:`LoraServeReplica._ensure`),
and Ray routes later requests for it here. Past ``max_num_models_per_replica`` Ray drops the
least recently used one, which the replica unloads once the requests forwarded for it are
done, unless it is asked for again first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve
from starlette.responses import Response

from adapters.errors import AdapterError
from server.errors import APIError, from_adapter_error

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-loraserve-replica"  # which replica answered (tests, debugging)
_INTERNAL = APIError(500, "internal_error", "internal server error")


@dataclass(frozen=True)
class CatalogEntry:
    """An adapter as the ingress's catalog knows it: where its files are, which load of its
    name it is (replicas holding an older one swap it), and its kind (``/v1/models``)."""

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
    entry: CatalogEntry | None = None


@dataclass(frozen=True)
class Start:
    """The first item of a forwarded response: its status and headers (the body follows)."""

    status: int
    headers: list[tuple[bytes, bytes]]


class _HeldAdapter:
    """What the multiplexer keeps for an adapter held by one replica. Ray calls ``__del__``
    (in a worker thread) when it drops it: that schedules the unload and returns at once, so
    the adapter Ray holds next never waits for it."""

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
        from server.engine_process import EngineProcess
        from server.serve import build_engine, engine_spec, lora_modules, server_config

        config = server_config(args)
        # Adapters load on demand, but the default pool is sized for the startup ones, as
        # one server's is: one full-length request fits beside the largest of them.
        startup = lora_modules(args)
        if args.engine_in_process:
            engine = await asyncio.to_thread(build_engine, args, [], (), startup)
            self.app = create_app(engine, config)
        else:
            spec = engine_spec(args, [], (), startup)
            process = await asyncio.to_thread(
                EngineProcess.spawn, spec, args.engine_startup_timeout
            )
            self.app = create_app_for_process(process, config)
        self.state = self.app.state.server
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self.loop = asyncio.get_running_loop()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.versions: dict[str, int] = {}  # adapter in the engine → its catalog version
        self.holds: Counter[str] = Counter()  # adapter → times the multiplexer held it
        self.in_use: Counter[str] = Counter()  # adapter → forwarded requests using it
        self.tasks: set[asyncio.Task[None]] = set()  # unloads under way
        self._locks: dict[str, asyncio.Lock] = {}  # per adapter: loads, swaps and unloads

        async def hold(name: str) -> _HeldAdapter:
            self.holds[name] += 1
            return _HeldAdapter(self, name, self.holds[name])

        self.hold = serve.multiplexed(hold, max_num_models_per_replica=max_adapters)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _ensure(self, name: str, entry: CatalogEntry) -> None:
        """Have ``name`` in the engine at ``entry``'s version (or a newer one), and held by
        the multiplexer. The adapter is loaded before Ray is told it is held, so a refused
        one never makes Ray drop another."""
        async with self._lock(name):
            loaded = self.versions.get(name)
            if loaded is None:
                await self.state.handle.load_lora(name, Path(entry.path), False)
                logger.info("replica %s: adapter %s loaded", self.replica_id, name)
            elif entry.version > loaded:
                await self.state.handle.load_lora(name, Path(entry.path), True)
            self.versions[name] = max(entry.version, loaded or 0)
            await self.hold(name)

    def drop(self, name: str, hold: int) -> None:
        """Start :meth:`unload` (on the replica's loop)."""
        task = self.loop.create_task(self.unload(name, hold))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def unload(self, name: str, hold: int) -> None:
        """Unload ``name``, dropped by the multiplexer as its ``hold``-th hold, once the
        requests forwarded for it are done; unless it has been held again meanwhile."""
        while self.in_use[name] and self.holds[name] == hold:
            await asyncio.sleep(0.05)
        async with self._lock(name):
            if self.holds[name] != hold or name not in self.versions:
                return  # held again, or already gone
            del self.versions[name]
            with contextlib.suppress(AdapterError):
                await self.state.handle.unload_lora(name)
        logger.info("replica %s: adapter %s dropped", self.replica_id, name)

    async def load(self, name: str, entry: CatalogEntry) -> dict[str, Any]:
        """The admin load route's work here: hold ``name`` now. Returns its kind, or the
        refusal (``status``, ``code``, ``message``)."""
        self.in_use[name] += 1
        try:
            await self._ensure(name, entry)
        except AdapterError as e:
            error = from_adapter_error(e, "lora_path")
            return {"status": error.status, "code": error.code, "message": error.message}
        finally:
            self.in_use[name] -= 1
        return {"kind": (await self.state.handle.adapters())[name].kind}

    async def forward(self, request: Forwarded) -> AsyncIterator[Start | bytes]:
        """The app's response to ``request``: a :class:`Start`, then the body's chunks."""
        name, entry = request.adapter, request.entry
        if name is not None:
            self.in_use[name] += 1
        try:
            if name is not None and entry is not None:
                try:
                    await self._ensure(name, entry)
                except AdapterError as e:
                    for item in _answer(from_adapter_error(e, "model").response()):
                        yield item
                    return
                except Exception:  # a bug, not a dead replica: what the server answers
                    logger.exception("replica %s: holding adapter %s failed", self.replica_id, name)
                    for item in _answer(_INTERNAL.response()):
                        yield item
                    return
            async for item in self._asgi(request):
                yield item
        finally:
            if name is not None:
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
        started = False
        try:
            while (message := await sent.get()) is not None:
                if message["type"] == "http.response.start":
                    started = True
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
            if not started:  # the app failed before answering: what uvicorn would send
                if task.done() and not task.cancelled() and task.exception() is not None:
                    logger.error("the app failed a forwarded request", exc_info=task.exception())
                for item in _answer(_INTERNAL.response()):
                    yield item
        finally:
            gone.set()
            if not task.done():
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(task), 5)
            task.cancel()
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: logged above when it mattered

    async def check_health(self) -> None:
        """Ray's health check: a replica whose engine is unhealthy is replaced."""
        health = self.state.bridge.health()
        if not health.ok:
            raise RuntimeError(f"loraserve replica unhealthy: {health.reason}")

    # Ray Serve's shutdown hook for a replica is its ``__del__`` (awaited when async).
    async def __del__(self) -> None:
        await self._lifespan.__aexit__(None, None, None)


def _answer(response: Response) -> list[Start | bytes]:
    """A whole response as the items :meth:`LoraServeReplica.forward` yields."""
    return [Start(response.status_code, list(response.raw_headers)), bytes(response.body)]
