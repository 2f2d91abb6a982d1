"""The Ray Serve ingress of loraserve: the adapter catalog, and forwarding to the replicas
(:mod:`server.ray_serve` has the overview).

One replica of it (the catalog lives in its memory): it checks keys as the server does,
answers ``/v1/models`` and the adapter load and unload routes from the catalog, refuses the
routes that make new adapters on one server (merge, compose, export), and forwards every
other request byte for byte to a :class:`~server.ray_replica.LoraServeReplica`, naming the
request's adapter as the multiplexed model id so that Ray sends it to a replica holding it.
A replica that dies fails only its in-flight requests: a 503 ``replica_unavailable``, or an
error event ending a stream that had started.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from server.auth import authorized, is_open, require_admin, unauthorized
from server.body import read_body
from server.config import ServerConfig
from server.errors import APIError
from server.lora_sources import adapter_cache, resolve_lora
from server.openai_routes import model_list
from server.ray_replica import CatalogEntry, Forwarded, Start
from server.request_models import LoadLoraRequest, UnloadLoraRequest, parse_body

logger = logging.getLogger(__name__)

_MODEL_ROUTES = ("/v1/completions", "/v1/chat/completions")  # the ones naming a model
_ONE_SERVER_ROUTES = "/v1/adapters/"  # merge, compose, export: new adapters on one server


class LoraServeIngress:
    """The HTTP entry: the adapter catalog, and forwarding to replicas."""

    def __init__(
        self,
        replicas: DeploymentHandle[Any],
        config: ServerConfig,
        adapters: dict[str, CatalogEntry],
        max_model_len: int,
    ) -> None:
        self.replicas = replicas
        self.config = config
        self.catalog = dict(adapters)
        # The last version of every name ever loaded: a name unloaded and loaded again gets
        # a newer one, so a replica still holding the old weights swaps them.
        self.last_version = {name: entry.version for name, entry in adapters.items()}
        self.max_model_len = max_model_len
        self.lock = asyncio.Lock()
        self.sources = adapter_cache(config)  # source URIs: on storage every replica sees

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        try:
            if not is_open(self.config, path) and not authorized(self.config, request.headers.raw):
                return unauthorized()
            if path == "/v1/models" and request.method == "GET":
                return JSONResponse(self._models())
            if path == "/v1/load_lora_adapter" and request.method == "POST":
                return await self._load(request)
            if path == "/v1/unload_lora_adapter" and request.method == "POST":
                return await self._unload(request)
            if path == "/v1/adapters/compose" and request.method == "GET":
                require_admin(self.config, request.headers.raw)
                return JSONResponse({"object": "list", "data": []})  # none run here
            if path.startswith(_ONE_SERVER_ROUTES):
                raise APIError(
                    400,
                    "unsupported_with_replicas",
                    "merges, compositions and exports make an adapter on one server: "
                    "run them on loraserve serve without --ray-replicas",
                )
            return await self._forward(request)
        except APIError as e:
            return e.response()

    def _models(self) -> dict[str, Any]:
        adapters = {
            name: {"version": entry.version, "pinned": False, "kind": entry.kind}
            for name, entry in self.catalog.items()
        }
        return model_list(self.config.model_name, self.max_model_len, adapters)

    async def _load(self, request: Request) -> Response:
        if not self.config.admin_routes_enabled:
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
            if name in self.catalog and not body.in_place:
                raise APIError(
                    409, "adapter_already_loaded", f"adapter {name!r} is loaded", "lora_name"
                )
            version = self.last_version.get(name, 0) + 1
            entry = CatalogEntry(str(path), version)
            # Into one replica now: a bad adapter is refused here, as `serve` refuses it.
            reply = await self.replicas.options(multiplexed_model_id=name).load.remote(name, entry)
            if "kind" not in reply:
                raise APIError(reply["status"], reply["code"], reply["message"], "lora_path")
            self.catalog[name] = CatalogEntry(entry.path, version, reply["kind"])
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
        if not self.config.admin_routes_enabled:
            raise APIError(404, "not_found", "no such route")
        require_admin(self.config, request.headers.raw)
        raw = await read_body(request, self.config.max_request_bytes)
        body = parse_body(raw, UnloadLoraRequest)
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
        entry = None
        if adapter is not None:
            entry = self.catalog.get(adapter)
            if entry is None:  # a replica may still hold it: refuse it here
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
            entry,
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
    if path not in _MODEL_ROUTES:
        return None
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None  # the replica's app answers the malformed body
    return model if isinstance(model, str) else None
