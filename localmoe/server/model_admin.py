"""Models loaded, unloaded and switched while the server runs (the original LocalMoE's /v1/models/switch), on the
admin routes (server/auth.py: the admin key only).

A load builds the new engine beside the models already served, on a worker thread so that serving goes on; only
once it is ready does its served name appear (a switch: move to it, in one step of the event loop). A model that
stops being served takes no new requests; those in flight on it finish, then its engine shuts down and its
memory goes. A load that fails, or that the memory left cannot hold (checked first, with the planner's count of
the checkpoint's parameters), changes nothing and answers with the reason.

Versions (server/canary.py): a load with a `version` adds that version beside a name's others (at `weight`, 0 by
default there: it takes traffic once /v1/models/weights gives it some); a switch with a `version` replaces that
version's engine, keeping its weight; an unload with a `version` retires that version alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from localmoe.config import DEFAULT_VERSION, Config, ConfigError, EngineConfig, Placement, config_for
from localmoe.engine.async_engine import AsyncEngine
from localmoe.engine.llm_engine import LLMEngine
from localmoe.engine.model_runner import DEFAULT_KV_BYTES
from localmoe.experts.memory_budget import memory_left
from localmoe.models.builtin import resolve_model
from localmoe.planner.params import count_params
from localmoe.planner.shape import PlanError, load_config as plan_config, model_shape
from localmoe.server.errors import APIError
from localmoe.server.model_registry import ModelRegistry, ServedModel

log = logging.getLogger(__name__)

ADMIN_PATHS = frozenset({"/v1/models/load", "/v1/models/unload", "/v1/models/switch", "/v1/models/weights"})
# what names a model rather than how it is served: a loaded model takes the rest from the default model's settings
IDENTITY_KEYS = ("model_name", "served_model_name", "tokenizer", "revision", "tokenizer_revision", "quantization")
BYTES_PER_ELEMENT = {"float32": 4, "float": 4, "fp32": 4}  # else 2 (bf16, fp16, auto on a CPU)


class LoadRequest(BaseModel):
    """The original project's body: the checkpoint, the served name (for a switch: the one that moves to it), and
    any engine settings under vLLM's names (tensor_parallel_size, dtype, max_model_len, ...)."""

    model_config = ConfigDict(extra="allow")
    model_name: str
    served_model_name: str | None = None
    version: str | None = Field(None, min_length=1)  # canary: which version of the served name this engine is
    weight: float | None = Field(None, ge=0, allow_inf_nan=False)


class UnloadRequest(BaseModel):
    served_model_name: str
    version: str | None = None  # one version alone; else every version of the name


class WeightsRequest(BaseModel):
    """New canary weights for some versions of a served name (relative: 90 and 10 send 90% and 10%)."""

    served_model_name: str
    weights: dict[str, float]


async def retire(model: ServedModel, registry: ModelRegistry) -> None:
    """Once `model` (no longer routed to) has finished what it was serving, shut its engine down."""
    while model.aengine.num_reserved:
        await asyncio.sleep(0.05)
    registry.metrics.remove_model(model.metrics)
    await asyncio.to_thread(model.stop)
    log.info("unloaded %s", model.config.engine.model_name)


def planned_bytes(engine: EngineConfig, config: Config) -> int | None:
    """Weights by the planner's parameter count at the serving dtype, plus the KV pool; None where the planner
    does not know the architecture (the load then goes ahead unchecked)."""
    try:
        directory, name = resolve_model(engine.model_name, config.model)
        shape = model_shape(name, plan_config(str(directory))[1])
    except (PlanError, OSError, KeyError, ValueError):
        return None
    element = BYTES_PER_ELEMENT.get(engine.dtype, 2)
    kv = engine.kv_cache_bytes if isinstance(engine.kv_cache_bytes, int) else min(DEFAULT_KV_BYTES, memory_left() // 8)
    return count_params(shape).total * element + kv


def add_admin_routes(app: FastAPI, registry: ModelRegistry, config: Config) -> None:
    async def build(request: LoadRequest, served_name: str | None,
                    placement: Placement) -> tuple[AsyncEngine, Config]:
        base = dataclasses.asdict(registry.get(None).config.engine)
        fields = {**{k: v for k, v in base.items() if k not in IDENTITY_KEYS},
                  **request.model_dump(exclude={"version", "weight"}), "served_model_name": served_name}
        try:
            unknown = sorted(set(fields) - set(base))
            if unknown:
                raise ConfigError(f"unknown engine setting {unknown[0]!r}")
            own = dataclasses.replace(config_for(config, EngineConfig(**fields)), placement=placement)
        except ConfigError as e:
            raise APIError(str(e), param="model_name") from None
        need, left = planned_bytes(own.engine, own), memory_left()
        if need is not None and need > left:
            raise APIError(f"{request.model_name} needs about {need} bytes (its weights by the planner's count and "
                           f"its KV pool), more than the {left} this process may still use beside the models it "
                           "serves; nothing was changed", HTTPStatus.INSUFFICIENT_STORAGE, "model_name")
        try:
            aengine = await asyncio.to_thread(AsyncEngine, lambda: LLMEngine.from_config(own),
                                              config.server.engine_stall_timeout)
        except ValueError as e:  # the checkpoint cannot be served (ConfigError too); the models served are untouched
            raise APIError(f"cannot load {request.model_name}: {e}", param="model_name") from None
        return aengine, own

    def start(aengine: AsyncEngine, own: Config, replacing: bool) -> dict[str, Any]:
        model = registry.add(aengine, own, replace=replacing)
        model.start()
        return {"served_model_name": model.name, "model_name": own.engine.model_name, "version": model.version,
                "weight": model.weight, "state": "loaded"}

    @app.post("/v1/models/load")
    async def load(request: LoadRequest) -> dict[str, Any]:
        name = request.served_model_name or request.model_name
        versions = registry.models.get(name, {})
        if versions and (request.version is None or request.version in versions):
            raise APIError(f"a model is served as {name!r}{f' version {request.version!r}' if request.version else ''}"
                           " already; switch it, unload it first, or load another version of it",
                           HTTPStatus.CONFLICT, "served_model_name")
        weight = request.weight if request.weight is not None else 0.0 if versions else 1.0
        placement = Placement(request.version or DEFAULT_VERSION, weight)
        aengine, own = await build(request, request.served_model_name, placement)
        return start(aengine, own, replacing=False)

    @app.post("/v1/models/switch")
    async def switch(request: LoadRequest) -> dict[str, Any]:
        name = request.served_model_name or registry.get(None).name
        versions = registry.versions(name)
        old = versions.get(request.version) if request.version else next(iter(versions.values()))
        if old is None:
            raise APIError(f"{name!r} has no version {request.version!r} (it has {', '.join(versions)})",
                           HTTPStatus.NOT_FOUND, "version")
        aengine, own = await build(request, name, Placement(old.version, old.weight))
        answer = start(aengine, own, replacing=True)
        asyncio.create_task(retire(old, registry))
        return {**answer, "previous_model_name": old.config.engine.model_name}

    @app.post("/v1/models/unload")
    async def unload(request: UnloadRequest) -> dict[str, Any]:
        versions = registry.versions(request.served_model_name)
        if request.version is not None and request.version not in versions:
            raise APIError(f"{request.served_model_name!r} has no version {request.version!r} (it has "
                           f"{', '.join(versions)})", HTTPStatus.NOT_FOUND, "version")
        going = [versions[request.version]] if request.version is not None else list(versions.values())
        left = [m for v, m in versions.items() if request.version is not None and v != request.version]
        if len(registry.models) == 1 and not left:
            raise APIError("this is the only model served; load another before unloading it", HTTPStatus.CONFLICT,
                           "served_model_name")
        if left and sum(m.weight for m in left) <= 0:
            raise APIError("the versions left would take no traffic: give one a weight first (/v1/models/weights)",
                           HTTPStatus.CONFLICT, "version")
        for model in going:
            registry.remove(model)
        await asyncio.gather(*(retire(model, registry) for model in going))
        return {"served_model_name": request.served_model_name, "versions": [m.version for m in going],
                "state": "unloaded"}

    @app.post("/v1/models/weights")
    async def weights(request: WeightsRequest) -> dict[str, Any]:
        try:
            registry.set_weights(request.served_model_name, request.weights)
        except ValueError as e:
            raise APIError(str(e), param="weights") from None
        versions = registry.versions(request.served_model_name)
        log.info("weights of %s: %s", request.served_model_name, {v: m.weight for v, m in versions.items()})
        return {"served_model_name": request.served_model_name,
                "weights": {v: m.weight for v, m in versions.items()}}
