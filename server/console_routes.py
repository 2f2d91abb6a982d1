"""The operator console: ``GET /`` and its scripts under ``/console/``.

Static files shipped in the package (``server/console/``): no build step, nothing fetched
from elsewhere. The page, its script and its style hold no data, so a browser may fetch them
without a key; the script asks for the key (kept in the tab's session storage) and reads
everything it shows from the API's own routes with it: ``/v1/status`` for the pool, the
queue and the adapters (polled), ``/v1/models``, the completions route for the playground,
and, with the admin key, the composition jobs and the load and unload routes.
"""

from __future__ import annotations

import functools
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.errors import APIError
from server.state import server_state

CONSOLE_DIR = Path(__file__).parent / "console"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# Everything the page runs is its own: no inline scripts, nothing from another origin, and
# no other site may frame it.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


console_router = APIRouter()
_FILES = {p.name: p for p in CONSOLE_DIR.iterdir() if p.suffix in _TYPES}


@functools.cache
def _index(key_required: bool) -> bytes:
    """The page; ``key_required``: it asks for a key before anything."""
    required = b"1" if key_required else b"0"
    return _FILES["index.html"].read_bytes().replace(b"{{KEY_REQUIRED}}", required)


@console_router.get("/", include_in_schema=False)
async def page(request: Request) -> Response:
    key_required = server_state(request).config.api_key is not None
    return Response(_index(key_required), media_type=_TYPES[".html"], headers=_HEADERS)


@console_router.get("/console/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    path = _FILES.get(name)
    if path is None or name == "index.html":
        raise APIError(404, "not_found", "no such console file")
    return Response(path.read_bytes(), media_type=_TYPES[path.suffix], headers=_HEADERS)
