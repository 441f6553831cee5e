"""LoRA adapters loaded and unloaded while the server runs, on vLLM's routes: `POST /v1/load_lora_adapter
{"lora_name", "lora_path"}` and `POST /v1/unload_lora_adapter {"lora_name"}`, and the adapters' entries in
/v1/models (`parent`: the model they adapt).

vLLM opens these routes only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, to whoever holds the API key. Here that
variable (or LOCALMOE_ALLOW_RUNTIME_LORA_UPDATING) does the same; without it they are admin routes
(server/auth.py: the admin key only, closed where none is set), as loading a model is.

An adapter is read on a worker thread and known by its name once read; an unloaded one takes no new requests, and
those running on it finish on its weights (lora/manager.py).
"""

from __future__ import annotations

import asyncio
import os
from http import HTTPStatus

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from localmoe.lora.adapter import AdapterError
from localmoe.lora.manager import LoraManager
from localmoe.server.errors import APIError
from localmoe.server.model_registry import ModelRegistry
from localmoe.server.protocol import ModelCard

LORA_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
RUNTIME_UPDATING = ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "LOCALMOE_ALLOW_RUNTIME_LORA_UPDATING")


def lora_admin_paths() -> frozenset[str]:
    """The LoRA routes that take the admin key: none where runtime updating is allowed to API-key holders."""
    allowed = any(os.environ.get(name, "").lower() in ("1", "true") for name in RUNTIME_UPDATING)
    return frozenset() if allowed else LORA_PATHS


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str
    base_model_name: str | None = None  # LocalMoE: which served model it adapts; the default model if omitted


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str


def lora_cards(registry: ModelRegistry) -> list[ModelCard]:
    """/v1/models entries of every adapter, as vLLM lists them."""
    return [ModelCard(id=name, root=adapter.path, parent=model.name, max_model_len=model.serving.max_model_len)
            for model in registry if model.aengine.engine.lora is not None
            for name, adapter in list(model.aengine.engine.lora.adapters.items())]


def add_lora_routes(app: FastAPI, registry: ModelRegistry) -> None:
    def manager(model_name: str | None) -> LoraManager:
        lora = registry.get(model_name).aengine.engine.lora
        if lora is None:
            raise APIError("LoRA adapters are not enabled: start the server with --enable-lora", param="lora_name")
        return lora

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: LoadLoRAAdapterRequest) -> PlainTextResponse:
        lora = manager(request.base_model_name)
        if request.lora_name in registry.models:
            raise APIError(f"{request.lora_name!r} is the name of a served model", param="lora_name")
        try:
            await asyncio.to_thread(lora.load, request.lora_name, request.lora_path)
        except AdapterError as error:
            raise APIError(str(error), param="lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        owners = [model.aengine.engine.lora for model in registry
                  if model.aengine.engine.lora is not None and request.lora_name in model.aengine.engine.lora.adapters]
        if not owners:
            raise APIError(f"The lora adapter '{request.lora_name}' cannot be found.", HTTPStatus.NOT_FOUND,
                           "lora_name")
        owners[0].unload(request.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{request.lora_name}' removed successfully.")
