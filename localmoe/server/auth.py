"""API keys on every route but liveness (/health), as Bearer tokens or HTTP Basic credentials.

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
    """Plain ASGI middleware, so it sees a request before its body is read and never wraps streams."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            if not self._authorized(dict(scope["headers"]).get(b"authorization", b"")):
                error = APIError("Invalid or missing API key.", HTTPStatus.UNAUTHORIZED,
                                 headers={"WWW-Authenticate": 'Basic realm="LocalMoE", charset="UTF-8"'})
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, credentials = header.partition(b" ")
        if scheme.lower() == b"bearer":
            return secrets.compare_digest(credentials.strip(), self.key)
        if scheme.lower() == b"basic":
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True)
            except (binascii.Error, ValueError):
                return False
            return secrets.compare_digest(decoded.partition(b":")[2], self.key)
        return False
