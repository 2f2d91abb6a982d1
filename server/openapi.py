"""The published description of the API: ``GET /openapi.json``, OpenAPI 3.1.

Request bodies are described by the same pydantic models that validate them
(``server/request_models.py``), so the spec says exactly what the server accepts: strict
types, bounds, the vLLM extensions. Every operation documents the OpenAI error envelope for its
4xx and 5xx answers, and a success body whose required fields are the ones clients read.
Only the routes this server serves are listed: the adapter routes with runtime loading on,
the key scheme with a key set. ``tests/server/test_openapi.py`` checks that every route is
described and fuzzes the server against the description.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server.config import ServerConfig
from server.request_models import (
    ChatCompletionRequest,
    CompletionRequest,
    ComposeRequest,
    ExportRequest,
    LoadLoraRequest,
    MergeAdaptersRequest,
    UnloadLoraRequest,
)

OPENAPI_VERSION = "3.1.0"
_REF = "#/components/schemas/{model}"
_JSON, _EVENTS, _TEXT = "application/json", "text/event-stream", "text/plain"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error the server sends, whatever the route (the OpenAI error envelope)."""

    error: ErrorDetail


def _object(*required: str, **properties: dict[str, Any]) -> dict[str, Any]:
    """A JSON object with these fields required (more may come)."""
    return {"type": "object", "required": list(required), "properties": properties}


_STRING, _INT, _BOOL = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
_CHOICES = {"type": "array", "items": _object("index", "finish_reason", index=_INT)}
_USAGE = _object("prompt_tokens", "completion_tokens", "total_tokens")
_COMPLETION = _object(
    "id", "object", "created", "model", "choices", "usage",
    id=_STRING, object=_STRING, created=_INT, model=_STRING, choices=_CHOICES, usage=_USAGE,
)  # fmt: skip
_MODEL_CARD = _object("id", "object", "created", "owned_by", id=_STRING, object=_STRING)
_MODELS = _object("object", "data", data={"type": "array", "items": _MODEL_CARD})
_STATUS_OK = _object("status", status={"const": "ok"})
_JOB = _object("id", "status", id=_STRING, status=_STRING)


@dataclass(frozen=True)
class Operation:
    """One route as published: its body, its success answer, and who may call it."""

    summary: str
    body: type[BaseModel] | None = None
    success: dict[str, Any] = field(default_factory=lambda: _object())
    status: int = 200
    media: str = _JSON
    stream: bool = False  # ``"stream": true`` answers server-sent events instead
    open: bool = False  # served without a key
    admin: bool = False  # the admin key, where one is set


OPERATIONS: dict[tuple[str, str], Operation] = {
    ("GET", "/health"): Operation(
        "Whether the engine is serving (503 in the envelope when not)",
        success=_STATUS_OK,
        open=True,
    ),
    ("GET", "/metrics"): Operation(
        "Prometheus metrics (vLLM's names under the loraserve: prefix)",
        success=_STRING,
        media=_TEXT,
    ),
    ("GET", "/openapi.json"): Operation("This description", success=_object("openapi", "paths")),
    ("POST", "/v1/completions"): Operation(
        "Text completions, for the base model or any loaded adapter",
        body=CompletionRequest,
        success=_COMPLETION,
        stream=True,
    ),
    ("POST", "/v1/chat/completions"): Operation(
        "Chat completions through the model's chat template",
        body=ChatCompletionRequest,
        success=_COMPLETION,
        stream=True,
    ),
    ("GET", "/v1/models"): Operation(
        "The base model and every loaded adapter (parent: the base)", success=_MODELS
    ),
    ("GET", "/v1/status"): Operation(
        "The engine's live state: pool, adapters, requests, plan (docs/status.md)",
        success=_object("pool", "adapters"),
    ),
    ("POST", "/v1/load_lora_adapter"): Operation(
        "Load an adapter from an --adapter-root path or a source URI (vLLM's route)",
        body=LoadLoraRequest,
        success=_object("status", "lora_name", "version", status={"const": "ok"}),
        admin=True,
    ),
    ("POST", "/v1/unload_lora_adapter"): Operation(
        "Unload an adapter (requests running on it finish first)",
        body=UnloadLoraRequest,
        success=_object("status", "lora_name", status={"const": "ok"}),
        admin=True,
    ),
    ("POST", "/v1/adapters/merge"): Operation(
        "Merge loaded adapters into a new one (PEFT's add_weighted_adapter, or a mixture)",
        body=MergeAdaptersRequest,
        success=_object("status", "name", "rank", status={"const": "ok"}),
        admin=True,
    ),
    ("POST", "/v1/adapters/compose"): Operation(
        "Start a LoRAHub composition job (poll it by id)",
        body=ComposeRequest,
        success=_JOB,
        status=202,
        admin=True,
    ),
    ("GET", "/v1/adapters/compose"): Operation(
        "Every kept composition job, newest first",
        success=_object("object", "data", data={"type": "array", "items": _JOB}),
        admin=True,
    ),
    ("GET", "/v1/adapters/compose/{job_id}"): Operation(
        "One composition job: its status, losses and result", success=_JOB, admin=True
    ),
    ("POST", "/v1/adapters/{name}/export"): Operation(
        "Write the base with the adapter merged in under --export-root",
        body=ExportRequest,
        success=_object("status", status={"const": "ok"}),
        admin=True,
    ),
}
_BODIES: tuple[type[BaseModel], ...] = (
    CompletionRequest,
    ChatCompletionRequest,
    LoadLoraRequest,
    UnloadLoraRequest,
    MergeAdaptersRequest,
    ComposeRequest,
    ExportRequest,
    ErrorResponse,
)


def served_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every route ``app`` serves that belongs in the description (as
    FastAPI lists them: routers included, the console's files left out)."""
    listed = get_openapi(title=app.title, version=app.version, routes=app.routes)["paths"]
    return {(method.upper(), path) for path, ops in listed.items() for method in ops}


def openapi_spec(app: FastAPI, config: ServerConfig) -> dict[str, Any]:
    """The description of ``app`` as configured by ``config``.

    Raises:
        KeyError: a route of ``app`` that :data:`OPERATIONS` does not describe.
    """
    _, definitions = models_json_schema(
        [(model, "validation") for model in _BODIES], ref_template=_REF
    )
    paths: dict[str, dict[str, Any]] = {}
    for method, path in sorted(served_routes(app), key=lambda r: (r[1], r[0])):
        op = OPERATIONS[method, path]
        paths.setdefault(path, {})[method.lower()] = _operation(method, path, op, config)
    schemas = definitions.get("$defs", {})
    for body in (CompletionRequest, ChatCompletionRequest):  # a model every server serves
        schemas[body.__name__]["properties"]["model"]["examples"] = [config.model_name]
    spec: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "loraserve",
            "version": app.version,
            "description": "Many LoRA adapters on one base model, behind the OpenAI API.",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if config.api_key is not None or config.admin_api_key is not None:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return spec


def _operation(method: str, path: str, op: Operation, config: ServerConfig) -> dict[str, Any]:
    content: dict[str, Any] = {op.media: {"schema": op.success}}
    if op.stream:  # each server-sent event: a JSON chunk as data, "[DONE]" last
        content[_EVENTS] = {"schema": _object("data", data=_STRING)}
    error = {"$ref": _REF.format(model="ErrorResponse")}
    responses: dict[str, Any] = {
        str(op.status): {"description": "success", "content": content},
        "4XX": {"description": "a refused request", "content": {_JSON: {"schema": error}}},
        "5XX": {"description": "the server cannot serve", "content": {_JSON: {"schema": error}}},
    }
    name = "".join(c if c.isalnum() else "_" for c in path).strip("_")
    operation: dict[str, Any] = {
        "operationId": f"{method.lower()}_{name}",
        "summary": op.summary,
        "responses": responses,
    }
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": _STRING}
        for name in _path_names(path)
    ]
    if parameters:
        operation["parameters"] = parameters
    if op.body is not None:
        schema = {"$ref": _REF.format(model=op.body.__name__)}
        operation["requestBody"] = {"required": True, "content": {_JSON: {"schema": schema}}}
    keyed = config.admin_api_key if op.admin and config.admin_api_key else config.api_key
    if not op.open and keyed is not None:
        operation["security"] = [{"bearer": []}]
    return operation


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]
