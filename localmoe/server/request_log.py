"""A request id on every log line of a request's life, and `--log-format json`.

Each HTTP request gets an id: the caller's X-Request-Id where it sends one (so its own logs and ours join up), else
a fresh one; the answer echoes it in X-Request-Id. The id lives in a context variable for as long as the request
is handled, so every line logged meanwhile (ours, uvicorn's access line) is stamped with it by a logging filter,
with no logger having to be handed the id.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID: ContextVar[str | None] = ContextVar("localmoe_request_id", default=None)
REQUEST_ID_HEADER = "x-request-id"
LOG_FORMATS = ("text", "json")
# a caller's id is kept where it is a plausible id; anything else (too long, control characters) gets a fresh one
VALID_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
LOGGERS = ("localmoe", "uvicorn", "uvicorn.access")  # uvicorn.error propagates to uvicorn


class RequestIdMiddleware:
    """Sets REQUEST_ID for the request's life and answers with it in X-Request-Id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = sent if VALID_REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


class RequestIdFilter(logging.Filter):
    """Stamps each record with the request id of the request being handled (None outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, and the exception where there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                                "message": record.getMessage(), "request_id": getattr(record, "request_id", None)}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def json_log_config(level: str) -> dict[str, Any]:
    """A logging.config.dictConfig (what uvicorn's log_config takes) sending uvicorn's lines and LocalMoE's to
    stderr as JSON, each with its request id."""
    level = "DEBUG" if level == "trace" else level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "json",
                                "filters": ["request_id"]}},
        "loggers": {name: {"handlers": ["stderr"], "level": level, "propagate": False} for name in LOGGERS},
    }
