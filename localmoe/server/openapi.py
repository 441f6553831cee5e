"""The OpenAPI schema as the server really answers, since clients and the fuzz test both trust it.

FastAPI alone documents a 422 that never comes (every refusal is a 400 in OpenAI's error JSON), no
401 or 404, JSON for every 200 and no stream. No 5xx is documented on purpose: a 5xx is always a bug
(the 503 of a full waiting queue aside, which a serial client never meets; and the admin routes' 507, a model
that does not fit the memory left).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from localmoe.server.auth import OPEN_PATHS
from localmoe.server.lora_admin import lora_admin_paths
from localmoe.server.model_admin import ADMIN_PATHS
from localmoe.server.protocol import ChatCompletionResponse, CompletionResponse, ErrorResponse

REF = "#/components/schemas/{model}"
UNUSED = ("HTTPValidationError", "ValidationError")  # FastAPI's 422 body, dropped with the 422s


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(ErrorResponse)}}}


def _text(description: str, media_type: str) -> dict[str, Any]:
    return {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}


def _generation(model: type[BaseModel], chunk: str) -> dict[str, Any]:
    # Before OpenAPI 3.2 (FastAPI writes 3.1) an event stream's schema describes each event.
    data = f"One {chunk} (JSON), or an ErrorResponse (JSON) when generation fails mid-stream; `[DONE]` last."
    event = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string", "description": data}}}
    return {"description": f"The {model.__name__}, or with `stream: true` its chunks as server-sent events.",
            "content": {"application/json": {"schema": _ref(model)}, "text/event-stream": {"schema": event}}}


# The 200 of each route whose answer is not the JSON that FastAPI reads off its return annotation.
SUCCESS: dict[str, dict[str, Any]] = {
    "/health": {"description": "The server is up (an empty body)."},
    "/metrics": _text("Prometheus text exposition.", "text/plain"),
    "/dashboard": _text("The dashboard page.", "text/html"),
    "/v1/completions": _generation(CompletionResponse, "CompletionResponse chunk"),
    "/v1/chat/completions": _generation(ChatCompletionResponse, "ChatCompletionChunk"),
}
BAD_REQUEST = _error("The request is malformed, or out of range for the model (its context length, "
                     "vocabulary, chat template).")
UNAUTHORIZED = _error("The API key is missing or wrong (only when the server runs with --api-key).")
NOT_FOUND = _error("`model` names a model this server does not serve.")
ADMIN = {  # server/model_admin.py's refusals
    "403": _error("The admin routes are closed: the server runs without --admin-api-key."),
    "404": _error("`served_model_name` names a model this server does not serve."),
    "409": _error("The served name is taken (load), or the model is the only one served (unload)."),
    "507": _error("The memory left cannot hold the model (its weights and KV pool); nothing was changed."),
}


def install_openapi(app: FastAPI) -> None:
    """Make `app` serve the honest schema at /openapi.json and /docs (built once, on first use)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, openapi_version=app.openapi_version,
                                 description=app.description, routes=app.routes)
            app.openapi_schema = honest(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the schema


def honest(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` (as FastAPI generates it) with the responses the server really gives; edited in place."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            responses = operation["responses"]
            responses.pop("422", None)
            if path in SUCCESS:
                responses["200"] = SUCCESS[path]
            body = _body_schema(operation, components)
            if body is not None:
                responses["400"] = BAD_REQUEST
            if path not in OPEN_PATHS:
                responses["401"] = UNAUTHORIZED
            if body is not None and "model" in body.get("properties", {}) or any(
                    parameter["name"] == "model" for parameter in operation.get("parameters", [])):
                responses["404"] = NOT_FOUND
            if path in ADMIN_PATHS | lora_admin_paths():
                responses.update(ADMIN)
            operation["responses"] = dict(sorted(responses.items()))
    for name in UNUSED:  # in this order: HTTPValidationError is what refers to ValidationError
        if f'"{REF.format(model=name)}"' not in json.dumps(schema):
            components.pop(name, None)
    _, definitions = models_json_schema(
        [(model, "serialization") for model in (ErrorResponse, CompletionResponse, ChatCompletionResponse)],
        ref_template=REF)
    components.update(definitions["$defs"])
    return schema


def _body_schema(operation: dict[str, Any], components: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema of the operation's request body (its component resolved), None without a body."""
    if "requestBody" not in operation:
        return None
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    return components[body["$ref"].rsplit("/", 1)[1]] if "$ref" in body else body
