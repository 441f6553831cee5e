"""Bearer API keys on the OpenAI routes (/v1/...), as vLLM's --api-key does; /health and /metrics stay open."""

from __future__ import annotations

import secrets
from http import HTTPStatus

from starlette.types import ASGIApp, Receive, Scope, Send

from localmoe.server.errors import APIError


class APIKeyMiddleware:
    """Plain ASGI middleware, so it sees a request before its body is read and never wraps streams."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                error = APIError("Invalid or missing API key.", HTTPStatus.UNAUTHORIZED)
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
