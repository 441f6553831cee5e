"""API keys on every route but liveness (/health), as Bearer tokens or HTTP Basic credentials, and an admin key
for the routes that change what is served.

Bearer is what the OpenAI client and Prometheus (`authorization: credentials`) send. Basic, with the
key as the password and any user name, is what a browser can send: a 401 asks for it, the browser
prompts once and sends it with the dashboard's own requests, so the key never has to be put in a
URL (where it would reach access logs and browser history).
"""

from __future__ import annotations

import base64
import binascii
import secrets
from http import HTTPStatus

from starlette.types import ASGIApp, Receive, Scope, Send

from localmoe.server.errors import APIError

OPEN_PATHS = frozenset({"/health"})  # liveness: answers nothing but its status


class APIKeyMiddleware:
    """Plain ASGI middleware, so it sees a request before its body is read and never wraps streams. The admin
    routes (server/model_admin.py) take the admin key alone, and are closed where none is set; every other route
    takes the API key (or the admin key), or anyone where no API key is set."""

    def __init__(self, app: ASGIApp, api_key: str | None, admin_key: str | None = None,
                 admin_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.admin_key = admin_key.encode() if admin_key else None
        self.admin_paths = admin_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            # an admin route's other methods go on to the router (a 405), as on every other route
            admin = scope["path"] in self.admin_paths and scope["method"] == "POST"
            error = self._refusal(admin, dict(scope["headers"]).get(b"authorization", b""))
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, admin: bool, header: bytes) -> APIError | None:
        if admin and self.admin_key is None:
            return APIError("The admin routes are closed: start the server with --admin-api-key (or "
                            "LOCALMOE_ADMIN_API_KEY).", HTTPStatus.FORBIDDEN)
        keys = [self.admin_key] if admin else [k for k in (self.key, self.admin_key) if k is not None]
        if not admin and self.key is None:
            return None
        if any(_matches(header, key) for key in keys):
            return None
        return APIError("Invalid or missing admin key." if admin else "Invalid or missing API key.",
                        HTTPStatus.UNAUTHORIZED,
                        headers={"WWW-Authenticate": 'Basic realm="LocalMoE", charset="UTF-8"'})


def _matches(header: bytes, key: bytes) -> bool:
    scheme, _, credentials = header.partition(b" ")
    if scheme.lower() == b"bearer":
        return secrets.compare_digest(credentials.strip(), key)
    if scheme.lower() == b"basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return secrets.compare_digest(decoded.partition(b":")[2], key)
    return False
