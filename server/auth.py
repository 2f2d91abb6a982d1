"""API keys: the user key on every route but ``/health`` and the console's static files, the
admin key on adapter management.

Keys are compared in constant time (``hmac.compare_digest``) against every configured key,
so the time taken says nothing about which key, or how much of one, matched.
"""

from __future__ import annotations

import hmac

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from server.config import ServerConfig
from server.errors import APIError

# The console's page and scripts hold no data: a browser must fetch them before it has a key
# to send. What they show comes from routes that need one.
_CONSOLE_PATHS = frozenset({"/"})
_CONSOLE_PREFIX = "/console/"


def is_open(config: ServerConfig, path: str) -> bool:
    """Whether ``path`` is served without a key: ``/health``, and the console's files when
    the console is on."""
    if path == "/health":
        return True
    return config.console and (path in _CONSOLE_PATHS or path.startswith(_CONSOLE_PREFIX))


def unauthorized() -> Response:
    """The 401 for a missing or wrong key, in the error envelope."""
    response = APIError(401, "invalid_api_key", "missing or invalid API key").response()
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, if there is one."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def authorized(config: ServerConfig, headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request carries the user or the admin key (always, without a user key)."""
    if config.api_key is None:
        return True
    token = bearer_token(headers)
    user = _matches(token, config.api_key)
    admin = _matches(token, config.admin_api_key)
    return user or admin


def _matches(token: str | None, key: str | None) -> bool:
    if key is None:
        return False
    # Compare even without a token, so a missing header costs the same as a wrong one.
    given = (token or "").encode()
    return hmac.compare_digest(given, key.encode()) and token is not None


class KeyAuthMiddleware:
    """Refuse HTTP requests without a valid user (or admin) key, with 401 in the envelope.

    Installed only when an API key is set. CORS preflights are answered by the CORS
    middleware outside this one, before a key is asked for.
    """

    def __init__(self, app: ASGIApp, config: ServerConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(self.config, scope["path"]):
            await self.app(scope, receive, send)
            return
        if not authorized(self.config, scope["headers"]):
            await unauthorized()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def is_admin(config: ServerConfig, headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request that passed the key check may use the management routes."""
    if not config.admin_routes_enabled:
        return False
    if config.admin_api_key is None:
        return True
    return _matches(bearer_token(headers), config.admin_api_key)


def require_admin(config: ServerConfig, headers: list[tuple[bytes, bytes]]) -> None:
    """Check a management request's key.

    With an admin key set: the admin key passes, the user key gets 403, anything else 401.
    Without one (runtime loading enabled by flag) the user-key middleware has decided.

    Raises:
        APIError: 401 or 403.
    """
    if config.admin_api_key is None:
        return
    token = bearer_token(headers)
    admin = _matches(token, config.admin_api_key)
    user = _matches(token, config.api_key)
    if admin:
        return
    if user:
        raise APIError(403, "permission_denied", "adapter management needs the admin key")
    raise APIError(401, "invalid_api_key", "missing or invalid admin API key")
