"""The models one server serves, by served name: each with its own engine (and engine thread), OpenAI serving,
metrics and statistics history. Requests route by their `model`; a request naming none goes to the first model
(the default), so a one-model server answers exactly as before."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus

from localmoe.config import Config
from localmoe.engine.async_engine import AsyncEngine
from localmoe.server.errors import APIError
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
    sampler: asyncio.Task | None = None  # the history's, while served

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
        self.models: dict[str, ServedModel] = {}

    def add(self, aengine: AsyncEngine, config: Config, replace: bool = False) -> ServedModel:
        """Serve `aengine` (built from `config`) under its served name, in place of the model served under it
        where `replace` (a switch: requests after this one go to the new model)."""
        engine = aengine.engine
        name = engine.model_name
        if name in self.models and not replace:
            raise ValueError(f"a model is served as {name!r} already")
        metrics = self.metrics.add_model(name, lambda: engine.snapshot.engine, lambda: engine.snapshot.experts,
                                         lambda: aengine.num_reserved, lambda: aengine.loop_stats.published)
        tools = ToolSettings(config.server.enable_auto_tool_choice, config.server.tool_call_parser)
        served = ServedModel(name, config, aengine, metrics,
                             OpenAIServing(aengine, metrics, tools, config.server.chat_template),
                             StatsHistory(lambda: engine.snapshot, metrics.totals, metrics.recent))
        self.models[name] = served
        return served

    def remove(self, name: str) -> None:
        """Route no more requests to it (those it is serving finish)."""
        del self.models[name]

    def get(self, name: str | None) -> ServedModel:
        """The model a request names (or whose LoRA adapter it names), or the default where it names none; 404 for a
        name not served."""
        if name is None:
            return next(iter(self.models.values()))
        model = self.models.get(name) or next(
            (m for m in self.models.values() if m.aengine.engine.lora and name in m.aengine.engine.lora.adapters),
            None)
        if model is None:
            raise APIError(f"The model `{name}` does not exist.", HTTPStatus.NOT_FOUND, "model")
        return model

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(list(self.models.values()))

    @property
    def engines(self) -> list[AsyncEngine]:
        return [model.aengine for model in self.models.values()]
