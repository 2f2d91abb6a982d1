"""Reading a request body: JSON only, bounded in size before it is buffered."""

from __future__ import annotations

from fastapi import Request

from server.errors import APIError


def _check_content_type(request: Request) -> None:
    """JSON, or no content type at all (taken as JSON); anything else is 415."""
    content_type = request.headers.get("content-type")
    if content_type is None:
        return
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime != "application/json" and not mime.endswith("+json"):
        raise APIError(415, "unsupported_media_type", "the body must be application/json")


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it exceeds ``limit`` bytes."""
    _check_content_type(request)
    too_large = APIError(413, "request_too_large", f"the body exceeds {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, "invalid_request", "bad Content-Length")
        if int(declared) > limit:
            raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)
