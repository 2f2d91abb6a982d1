"""New adapters from loaded ones, while serving: merge, LoRAHub composition, export.

    POST /v1/adapters/merge              PEFT's add_weighted_adapter, or an exact mixture
    POST /v1/adapters/compose            202 + a job id; LoRAHub from a few examples
    GET  /v1/adapters/compose            every kept job, newest first (the console's list)
    GET  /v1/adapters/compose/{job}      the job's status, step, loss history and weights
    POST /v1/adapters/{name}/export      the base with the adapter merged in, as a model dir

Admin routes (registered with the loading routes of :mod:`server.lora_loading_routes`,
same keys). The work runs next to the engine (:mod:`server.adapter_ops`, through
:mod:`server.engine_handle`): tensor work in worker threads, never on the event loop or the
engine's stepping thread; composition jobs run in their own thread and score their examples
as ordinary requests between the engine's steps, so serving never pauses. ``save`` writes a
PEFT directory under the first ``--adapter-root``; exports go under ``--export-root``.

Saves and exports are written whole or not at all (under a hidden name, renamed into place
once complete). When the server's disk is full the route answers 507
``insufficient_storage`` (another write failure: 500 ``storage_error``): nothing is left on
disk and, for a merge, nothing is registered; serving goes on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from adapters.compose import ComposeSpec, Example
from adapters.errors import AdapterError
from adapters.merge import MergeSpec
from server.auth import require_admin
from server.body import read_body
from server.config import ServerConfig
from server.errors import APIError, from_adapter_error
from server.request_models import ComposeRequest, ExportRequest, MergeAdaptersRequest, parse_body
from server.state import server_state

logger = logging.getLogger(__name__)


merge_router = APIRouter()


def _save_dir(config: ServerConfig, save: bool, name: str) -> Path | None:
    """Where ``save`` writes ``name`` (400 without an adapter root, 409 if taken)."""
    if not save:
        return None
    if not config.adapter_roots:
        raise APIError(400, "invalid_request", "save needs an --adapter-root to save into")
    root = config.adapter_roots[0]
    if (root / name).exists():
        raise APIError(
            409, "adapter_already_saved", f"the adapter root already holds {name!r}", "name"
        )
    return root


@merge_router.post("/v1/adapters/merge")
async def merge(request: Request) -> dict[str, Any]:
    state = server_state(request)
    config = state.config
    require_admin(config, request.headers.raw)
    body = parse_body(await read_body(request, config.max_request_bytes), MergeAdaptersRequest)
    if body.name == config.model_name:
        raise APIError(409, "adapter_already_loaded", "that name is the base model's", "name")
    root = _save_dir(config, body.save, body.name)
    try:
        spec = MergeSpec(
            adapters=tuple(body.adapters),
            weights=tuple(body.weights),
            combination_type=body.combination_type,
            density=body.density,
            majority_sign_method=body.majority_sign_method,
            svd_rank=body.svd_rank,
            svd_clamp=body.svd_clamp,
            svd_full_matrices=body.svd_full_matrices,
            seed=body.seed,
        )
        async with state.admin_lock:
            rank = await state.handle.merge(body.name, spec, root)
    except AdapterError as e:
        taken = e.code == "adapter_already_loaded"
        raise from_adapter_error(e, "name" if taken else "adapters") from None
    logger.info(
        "merged %s into %s (%s)", ", ".join(body.adapters), body.name, spec.combination_type
    )
    return {
        "status": "ok",
        "name": body.name,
        "combination_type": spec.combination_type,
        "rank": rank,
        "saved": root is not None,
    }


@merge_router.post("/v1/adapters/compose", status_code=202)
async def compose(request: Request) -> JSONResponse:
    state = server_state(request)
    config = state.config
    require_admin(config, request.headers.raw)
    body = parse_body(await read_body(request, config.max_request_bytes), ComposeRequest)
    if body.name == config.model_name:
        raise APIError(409, "adapter_already_loaded", "that name is the base model's", "name")
    root = _save_dir(config, body.save, body.name)
    spec = ComposeSpec(
        name=body.name,
        candidates=tuple(body.candidates or ()),
        examples=tuple(Example(e.prompt, e.completion) for e in body.examples),
        method=body.method,
        max_steps=body.max_steps,
        l1=body.l1,
        bounds=(body.bounds[0], body.bounds[1]),
        seed=body.seed,
        save=body.save,
    )
    try:
        job = await state.handle.compose(
            spec,
            default_candidates=body.candidates is None,
            save_dir=root,
            max_candidates=config.max_compose_candidates,
            max_steps=config.max_compose_steps,
            max_jobs=config.max_compose_jobs,
        )
    except AdapterError as e:
        raise from_adapter_error(e, "candidates") from None
    logger.info("composition %s started: %s", job["id"], spec.method)
    return JSONResponse(job, status_code=202)


@merge_router.get("/v1/adapters/compose")
async def compositions(request: Request) -> dict[str, Any]:
    state = server_state(request)
    require_admin(state.config, request.headers.raw)
    return {"object": "list", "data": await state.handle.compositions()}


@merge_router.get("/v1/adapters/compose/{job_id}")
async def compose_status(job_id: str, request: Request) -> dict[str, Any]:
    state = server_state(request)
    require_admin(state.config, request.headers.raw)
    job = await state.handle.compose_status(job_id)
    if job is None:
        raise APIError(404, "job_not_found", f"no composition job {job_id!r}", "job")
    return job


@merge_router.post("/v1/adapters/{name}/export")
async def export(name: str, request: Request) -> dict[str, Any]:
    state = server_state(request)
    config = state.config
    require_admin(config, request.headers.raw)
    body = parse_body(await read_body(request, config.max_request_bytes), ExportRequest)
    if config.export_root is None:
        raise APIError(400, "export_disabled", "exports need the server's --export-root")
    out = config.export_root / (body.out or name)
    async with state.export_lock:  # one export at a time; loads and unloads go on meanwhile
        if out.exists():
            raise APIError(409, "export_exists", f"the export root already holds {out.name!r}")
        try:
            await state.handle.export(name, out, body.dtype, body.quantization)
        except AdapterError as e:  # no such adapter (one that does not fit: export_failed)
            raise from_adapter_error(e, "name") from None
    logger.info("exported %s merged into the base to %s", name, out)
    return {
        "status": "ok",
        "name": name,
        "out": out.name,
        "dtype": body.dtype,
        "quantization": body.quantization,
    }
