"""Loading and unloading adapters, vLLM's routes: ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` (new adapters made from loaded ones: :mod:`server.merge_routes`).

Registered only when an admin key is set or runtime loading was enabled by flag (otherwise
they do not exist: 404). ``lora_path`` is a directory under an ``--adapter-root`` or, with
``--lora-cache-dir``, a source URI fetched into the cache (``server/lora_sources.py``).
Loads and unloads are serialized; a load validates the adapter fully, in a worker thread
(of the engine's process), before its name becomes servable.
``replace`` (or vLLM's ``load_inplace``) swaps a loaded name's weights: requests already
running finish on the old ones, later ones get the new. Every load of a name is its next
version (1, 2, ... over the server's life, whether the name was replaced or unloaded in
between), which the response and ``/v1/models`` report. ``pinned`` keeps the adapter in
the page pool until it is unloaded (or replaced without ``pinned``); a pin that would leave
too little of the pool for a request is refused (400 ``pin_refused``).
"""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, Request

from adapters.errors import AdapterError
from server.auth import require_admin
from server.body import read_body
from server.errors import APIError, from_adapter_error
from server.lora_sources import resolve_lora
from server.request_models import LoadLoraRequest, UnloadLoraRequest, parse_body
from server.state import server_state

logger = logging.getLogger(__name__)

# The field a load's refusal is about, by AdapterError code (the rest: the adapter's files).
_LOAD_PARAMS = {"adapter_already_loaded": "lora_name", "pin_refused": "pinned"}


lora_loading_router = APIRouter()


@lora_loading_router.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request) -> dict[str, str | int | bool]:
    state = server_state(request)
    config = state.config
    require_admin(config, request.headers.raw)
    body = parse_body(await read_body(request, config.max_request_bytes), LoadLoraRequest)
    if body.lora_name == config.model_name:
        raise APIError(409, "adapter_already_loaded", "that name is the base model's", "lora_name")
    # A source URI is fetched first, outside the lock: a slow source delays no other load.
    path = await resolve_lora(body.lora_path, config, state.sources)
    async with state.admin_lock:
        started = time.monotonic()
        try:
            version = await state.handle.load_lora(body.lora_name, path, body.in_place, body.pinned)
        except AdapterError as e:
            param = _LOAD_PARAMS.get(e.code, "lora_path")
            raise from_adapter_error(e, param) from None
        state.metrics.adapter_api_seconds.observe(time.monotonic() - started)
    pinned = " (pinned)" if body.pinned else ""
    logger.info("loaded adapter %s version %d%s", body.lora_name, version, pinned)
    return {
        "status": "ok",
        "lora_name": body.lora_name,
        "version": version,
        "pinned": body.pinned,
        "message": f"loaded adapter {body.lora_name} version {version}{pinned}",
    }


@lora_loading_router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request) -> dict[str, str]:
    state = server_state(request)
    require_admin(state.config, request.headers.raw)
    raw = await read_body(request, state.config.max_request_bytes)
    body = parse_body(raw, UnloadLoraRequest)
    async with state.admin_lock:
        try:
            await state.handle.unload_lora(body.lora_name)
        except AdapterError as e:
            raise from_adapter_error(e, "lora_name") from None
    logger.info("unloaded adapter %s", body.lora_name)
    return {"status": "ok", "lora_name": body.lora_name}
