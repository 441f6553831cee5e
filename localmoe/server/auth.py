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
from http import HTTPStatus

from starlette.types import ASGIApp, Receive, Scope, Send

from localmoe.server.errors import APIError
from localmoe.server.tenants import APIKey, digest, key_ring

OPEN_PATHS = frozenset({"/health"})  # liveness: answers nothing but its status


class APIKeyMiddleware:
    """Plain ASGI middleware, so it sees a request before its body is read and never wraps streams. The admin
    routes (server/model_admin.py, and `admin_reads`: GET routes such as /v1/stats/usage) take an admin key alone,
    and are closed where none is set; every other route takes any key, or anyone where no user key is set. The key
    a request came with (server/tenants.py) goes into the scope's state, for its limits and priority."""

    def __init__(self, app: ASGIApp, api_key: str | None, admin_key: str | None = None,
                 admin_paths: frozenset[str] = frozenset(), keys: tuple[APIKey, ...] = (),
                 admin_reads: frozenset[str] = frozenset()) -> None:
        """`keys`: those of --api-keys-file, beside --api-key (role user) and --admin-api-key (role admin)."""
        self.app = app
        self.keys = key_ring(api_key, admin_key, keys)
        self.open = not any(key.role == "user" for key in self.keys.values())
        self.has_admin = any(key.role == "admin" for key in self.keys.values())
        self.admin_paths = admin_paths
        self.admin_reads = admin_reads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            # an admin route's other methods go on to the router (a 405), as on every other route
            admin = ((scope["path"] in self.admin_paths and scope["method"] == "POST")
                     or (scope["path"] in self.admin_reads and scope["method"] == "GET"))
            key = self._key(dict(scope["headers"]).get(b"authorization", b""))
            error = self._refusal(admin, key)
            if error is not None:
                await error.response()(scope, receive, send)
                return
            scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)

    def _key(self, header: bytes) -> APIKey | None:
        secret = _secret(header)
        return None if secret is None else self.keys.get(digest(secret))

    def _refusal(self, admin: bool, key: APIKey | None) -> APIError | None:
        if admin and not self.has_admin:
            return APIError("The admin routes are closed: start the server with --admin-api-key (or "
                            "LOCALMOE_ADMIN_API_KEY), or give a key the role admin in --api-keys-file.",
                            HTTPStatus.FORBIDDEN)
        if admin and key is not None and key.role != "admin":
            # OpenAI answers a key that lacks a permission with 401 too
            return APIError(f"The key {key.name!r} has the role {key.role}; this route takes an admin key.",
                            HTTPStatus.UNAUTHORIZED)
        if key is not None or (self.open and not admin):
            return None
        return APIError("Invalid or missing admin key." if admin else "Invalid or missing API key.",
                        HTTPStatus.UNAUTHORIZED,
                        headers={"WWW-Authenticate": 'Basic realm="LocalMoE", charset="UTF-8"'})


def _secret(header: bytes) -> bytes | None:
    """The key a Bearer or Basic (the key as the password) authorization header carries."""
    scheme, _, credentials = header.partition(b" ")
    if scheme.lower() == b"bearer":
        return credentials.strip()
    if scheme.lower() == b"basic":
        try:
            return base64.b64decode(credentials.strip(), validate=True).partition(b":")[2]
        except (binascii.Error, ValueError):
            return None
    return None
