"""The OpenAI error envelope, and the one exception type routes raise to produce it.

Every error the server sends is ``{"error": {"message", "type", "param", "code"}}`` with a
string ``code``. Messages are short and never contain server paths; the handlers here are the
only place an error becomes a response, so that holds for framework errors (unknown route,
wrong method) and unexpected exceptions too.
"""

from __future__ import annotations

import errno
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.errors import AdapterError

logger = logging.getLogger(__name__)

# OpenAI's error ``type`` for each status the server uses.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
    507: "insufficient_storage_error",
}

# The engine process has stopped (process mode): requests in flight and new ones get 503.
ENGINE_UNAVAILABLE = "engine_unavailable"

# A save or an export found the server's disk (or the user's quota) full: 507, as WebDAV's
# Insufficient Storage. The fault is the server's, so 5xx; the request may succeed later.
INSUFFICIENT_STORAGE = "insufficient_storage"
_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})  # disk, quota

# AdapterError codes (adapters.errors and the registry) → HTTP status; anything else is 400
# (``pin_refused`` included: the pins would leave the pool too small, the request's to change).
# A missing adapter directory is a bad lora_path (400: the path is the request's mistake);
# 404 is for names: a request or an unload naming no loaded adapter.
_ADAPTER_STATUS = {
    "model_not_found": 404,
    "adapter_already_loaded": 409,
}


class APIError(Exception):
    """An error response: raise it from a route and the handler sends the envelope.

    Args:
        status: the HTTP status.
        code: a stable, machine-readable string (``model_not_found``, ...).
        message: short, for humans, without server paths.
        param: the request field at fault, when there is one.
        headers: extra response headers (``Retry-After``).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers or {}

    def envelope(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.envelope(), status_code=self.status, headers=self.headers)


def from_adapter_error(error: AdapterError, param: str | None = None) -> APIError:
    """Map the engine's adapter refusal onto a status, keeping its code and message."""
    return APIError(_ADAPTER_STATUS.get(error.code, 400), error.code, error.message, param)


def from_storage_error(error: OSError, what: str) -> APIError:
    """Map a failed write to the server's disk (``what``: "the save", "the export") onto
    507 ``insufficient_storage`` when the disk or quota is full, else 500 ``storage_error``.

    The message gives the system's reason, never the path (``OSError``'s own text has it);
    the writers leave nothing behind, so it says so.
    """
    reason = error.strerror or type(error).__name__
    if error.errno in _FULL:
        return APIError(
            507,
            INSUFFICIENT_STORAGE,
            f"{what} failed: the server's disk is full ({reason}); nothing was kept",
        )
    return APIError(500, "storage_error", f"{what} failed: {reason}; nothing was kept")


def from_engine_value_error(error: ValueError, prompt_param: str) -> APIError:
    """Map ``LLMEngine.add_request``'s ``ValueError`` onto a 400 with a code and a param."""
    message = str(error)
    if message.startswith("priority"):  # a priority under a policy that has none
        return APIError(400, "invalid_value", message, "priority")
    if "exceeds the context length" in message:
        return APIError(400, "context_length_exceeded", message, prompt_param)
    if "prompt" in message:
        return APIError(400, "invalid_prompt", message, prompt_param)
    if "pages" in message:
        return APIError(400, "request_too_large", message, "max_tokens")
    return APIError(400, "invalid_request", message)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error, the framework's included, leave as the envelope."""

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return exc.response()

    async def on_http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
        message = {404: "no such route", 405: "method not allowed"}.get(status, "request failed")
        return APIError(status, code, message).response()

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        # A real bug: log it with its traceback, tell the client nothing about internals.
        logger.exception("unhandled error", exc_info=exc)
        return APIError(500, "internal_error", "internal server error").response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
