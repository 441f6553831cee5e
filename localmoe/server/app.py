"""The HTTP app: OpenAI routes plus vLLM's /health, /version, /tokenize, /detokenize and /metrics, and
LocalMoE's own /v1/stats/{experts,memory,performance} and the /dashboard page drawn from them.

Every refusal is OpenAI's error JSON with vLLM's status code (400 for anything malformed, where
FastAPI alone would say 422), and no refusal disturbs the requests around it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from localmoe import __version__
from localmoe.config import Config
from localmoe.engine.async_engine import AsyncEngine
from localmoe.server.auth import APIKeyMiddleware
from localmoe.server.errors import APIError
from localmoe.server.metrics import HTTPMetricsMiddleware, ServerMetrics
from localmoe.server.openapi import install_openapi
from localmoe.server.stats import StatsHistory, process_rss_bytes
from localmoe.server.dashboard import DASHBOARD_PAGE
from localmoe.server.drain import Drain, DrainMiddleware
from localmoe.server.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList,
    TokenizeRequest, TokenizeResponse,
)
from localmoe.server.serving import OpenAIServing
from localmoe.server.tool_use import ToolSettings

log = logging.getLogger(__name__)


def build_app(aengine: AsyncEngine, config: Config) -> FastAPI:
    """An app serving `aengine`; the engine loop starts and stops with the app's lifespan."""
    engine = aengine.engine
    metrics = ServerMetrics(lambda: engine.snapshot.engine, engine.model_name, engine.max_model_len,
                            lambda: engine.snapshot.experts, lambda: aengine.num_reserved,
                            lambda: aengine.loop_stats.published)
    history = StatsHistory(lambda: engine.snapshot, metrics.totals, metrics.recent)
    tools = ToolSettings(config.server.enable_auto_tool_choice, config.server.tool_call_parser)
    serving = OpenAIServing(aengine, metrics, tools, config.server.chat_template)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        aengine.start()
        sampler = asyncio.create_task(history.run())
        try:
            yield
        finally:
            sampler.cancel()
            aengine.shutdown()

    app = FastAPI(title="LocalMoE", version=__version__, lifespan=lifespan)
    install_openapi(app)
    app.state.drain = drain = Drain(aengine, config.server.shutdown_timeout)
    app.add_middleware(DrainMiddleware, drain=drain)
    if config.server.api_key:  # outermost but one: nothing is answered before the key is checked
        app.add_middleware(APIKeyMiddleware, api_key=config.server.api_key)
    app.add_middleware(HTTPMetricsMiddleware, counter=metrics.http_requests)  # outermost: counts every answer
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        """Liveness: 503 when the engine thread is dead or wedged (and, by DrainMiddleware, while draining)."""
        problem = aengine.health_problem()
        if problem is not None:
            log.warning("unhealthy: %s", problem)
        return Response(status_code=HTTPStatus.OK if problem is None else HTTPStatus.SERVICE_UNAVAILABLE)

    @app.get("/version")
    async def server_version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/stats/experts")
    async def stats_experts() -> dict:
        return engine.snapshot.experts

    @app.get("/v1/stats/memory")
    async def stats_memory() -> dict:
        return {**engine.snapshot.memory, "process_rss_bytes": process_rss_bytes()}

    @app.get("/v1/stats/performance")
    async def stats_performance() -> dict:
        return metrics.recent.summary()

    @app.get("/v1/stats/history")
    async def stats_history() -> dict:
        return history.summary()

    @app.get("/dashboard")
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(DASHBOARD_PAGE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        card = ModelCard(id=serving.model_name, root=config.engine.model_name or serving.model_name,
                         max_model_len=serving.max_model_len)
        return ModelList(data=[card])

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw_request: Request) -> Response:
        return await serving.create_completion(request, raw_request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw_request: Request) -> Response:
        return await serving.create_chat_completion(request, raw_request)

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> TokenizeResponse:
        serving.check_model(request.model)
        if request.messages is not None:
            tools = None if request.tools is None else [tool.model_dump(exclude_none=True) for tool in request.tools]
            text = serving.render_chat(request.messages, request.add_generation_prompt, tools)
        elif request.prompt is not None:
            text = request.prompt
        else:
            raise APIError("give either `prompt` or `messages`", param="prompt")
        add_special = request.add_special_tokens if request.add_special_tokens is not None else request.messages is None
        tokens = serving.tokenizer.encode(text, add_special_tokens=add_special)
        return TokenizeResponse(count=len(tokens), max_model_len=serving.max_model_len, tokens=tokens)

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
        serving.check_model(request.model)
        serving.check_token_ids(request.tokens, "tokens")
        return DetokenizeResponse(prompt=serving.tokenizer.decode(request.tokens))

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> Response:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, e: RequestValidationError) -> Response:
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            return APIError(f"invalid JSON body: {first['ctx']['error']}").response()
        where = first["loc"][1:]  # loc starts with "body"; then the field, then any nested position
        field = str(where[0]) if where else None
        text = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for our own validators' messages
        message = f"{'.'.join(map(str, where))}: {text}" if where else text
        return APIError(message, param=field).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> Response:
        return APIError(str(e.detail), HTTPStatus(e.status_code), headers=e.headers).response()  # 405: Allow

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> Response:
        return APIError(f"internal server error: {e}", HTTPStatus.INTERNAL_SERVER_ERROR).response()
