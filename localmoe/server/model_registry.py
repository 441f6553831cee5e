"""The models one server serves, by served name: each with its own engine (and engine thread), OpenAI serving,
metrics and statistics history. Requests route by their `model`; a request naming none goes to the first model
(the default), so a one-model server answers exactly as before. A served name may have several versions, each its
own engine, sharing its requests by weight (server/canary.py)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http import HTTPStatus

from localmoe.config import Config
from localmoe.engine.async_engine import AsyncEngine
from localmoe.server.canary import choose_version
from localmoe.server.errors import APIError
from localmoe.server.instance_ports import PINNED_MODEL
from localmoe.server.metrics import ModelMetrics, ServerMetrics
from localmoe.server.serving import OpenAIServing
from localmoe.server.stats import StatsHistory
from localmoe.server.tool_use import ToolSettings


@dataclass
class ServedModel:
    name: str
    config: Config  # its own: config.engine holds its engine's settings
    aengine: AsyncEngine
    metrics: ModelMetrics
    serving: OpenAIServing
    history: StatsHistory
    weight: float  # its share of its name's requests, beside its other versions'
    sampler: asyncio.Task | None = None  # the history's, while served

    @property
    def version(self) -> str:
        return self.config.placement.version

    def start(self) -> None:
        """Start its engine loop and history (on the event loop)."""
        self.aengine.start()
        self.sampler = asyncio.create_task(self.history.run())

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.cancel()
        self.aengine.shutdown()


class ModelRegistry:
    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.models: dict[str, dict[str, ServedModel]] = {}  # served name -> version -> its engine's model
        self.rng = random.Random()

    def add(self, aengine: AsyncEngine, config: Config, replace: bool = False) -> ServedModel:
        """Serve `aengine` (built from `config`) as its version of its served name, in place of the engine serving
        that version where `replace` (a switch: requests after this one go to the new engine, at the old one's
        weight)."""
        engine = aengine.engine
        name, version = engine.model_name, config.placement.version
        versions = self.models.get(name, {})
        if version in versions and not replace:
            raise ValueError(f"a model is served as {name!r} version {version!r} already")
        weight = versions[version].weight if version in versions else config.placement.weight
        metrics = self.metrics.add_model(name, version, lambda: engine.snapshot.engine,
                                         lambda: engine.snapshot.experts, lambda: aengine.num_reserved,
                                         lambda: aengine.loop_stats.published)
        tools = ToolSettings(config.server.enable_auto_tool_choice, config.server.tool_call_parser)
        served = ServedModel(name, config, aengine, metrics,
                             OpenAIServing(aengine, metrics, tools, config.server.chat_template),
                             StatsHistory(lambda: engine.snapshot, metrics.totals, metrics.recent), weight)
        self.models[name] = {**versions, version: served}
        return served

    def remove(self, model: ServedModel) -> None:
        """Route no more requests to it (those it is serving finish); a name goes with its last version."""
        versions = {v: m for v, m in self.models[model.name].items() if m is not model}
        if versions:
            self.models[model.name] = versions
        else:
            del self.models[model.name]

    def versions(self, name: str | None) -> dict[str, ServedModel]:
        """The versions of the name a request gives, or of the default where it gives none (on an instance's own
        port: its model, server/instance_ports.py); 404 for a name not served there."""
        pinned = PINNED_MODEL.get()
        if name is None and pinned is None:
            return next(iter(self.models.values()))
        name = name or pinned
        versions = self.models.get(name) or self._adapter_owner(name) if pinned in (None, name) else None
        if versions is None:
            raise APIError(f"The model `{name}` does not exist.", HTTPStatus.NOT_FOUND, "model")
        return versions

    def _adapter_owner(self, name: str) -> dict[str, ServedModel] | None:
        """The versions of the model serving LoRA adapter `name`, if one does (its requests name the adapter)."""
        return next((versions for versions in self.models.values() for m in versions.values()
                     if m.aengine.engine.lora is not None and name in m.aengine.engine.lora.adapters), None)

    def get(self, name: str | None) -> ServedModel:
        """The model a request names (its first version: what statistics and tokenizing ask for)."""
        return next(iter(self.versions(name).values()))

    def route(self, name: str | None, sticky_key: str | None = None) -> ServedModel:
        """The version of the model a request names that serves it: by weight, sticky by `sticky_key`."""
        versions = self.versions(name)
        if len(versions) == 1:
            return next(iter(versions.values()))
        return versions[choose_version([(v, m.weight) for v, m in versions.items()], sticky_key, self.rng)]

    def set_weights(self, name: str, weights: Mapping[str, float]) -> None:
        """New weights for some of a name's versions, all at once; ValueError (changing nothing) for a version it
        does not have, a negative weight, or weights that leave the name no traffic."""
        versions = self.versions(name)
        unknown = sorted(set(weights) - set(versions))
        if unknown:
            raise ValueError(f"{name!r} has no version {unknown[0]!r} (it has {', '.join(versions)})")
        if any(not 0 <= weight < float("inf") for weight in weights.values()):
            raise ValueError("a weight must be a number >= 0")
        if sum(weights.get(v, m.weight) for v, m in versions.items()) <= 0:
            raise ValueError(f"these weights leave {name!r} no traffic: give a version a positive weight")
        for version, weight in weights.items():
            versions[version].weight = weight

    def listed(self) -> dict[str, dict[str, ServedModel]]:
        """The names /v1/models lists: all of them, or on an instance's own port its model alone."""
        pinned = PINNED_MODEL.get()
        return dict(self.models) if pinned is None else {pinned: self.models[pinned]} if pinned in self.models else {}

    def __iter__(self) -> Iterator[ServedModel]:
        return iter([model for versions in self.models.values() for model in versions.values()])

    @property
    def engines(self) -> list[AsyncEngine]:
        return [model.aengine for model in self]
