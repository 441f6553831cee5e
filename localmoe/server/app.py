"""The HTTP app: OpenAI routes plus vLLM's /health, /version, /tokenize, /detokenize and /metrics, and
LocalMoE's own /v1/stats/{experts,memory,performance} and the /dashboard page drawn from them.

Every refusal is OpenAI's error JSON with vLLM's status code (400 for anything malformed, where
FastAPI alone would say 422), and no refusal disturbs the requests around it.
"""

from __future__ import annotations

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
from localmoe.layers import cpu_kernels
from localmoe.server.auth import APIKeyMiddleware
from localmoe.server.errors import APIError
from localmoe.server.metrics import HTTPMetricsMiddleware, ServerMetrics
from localmoe.server.openapi import install_openapi
from localmoe.server.stats import process_rss_bytes, spec_decode_summary
from localmoe.server.dashboard import DASHBOARD_PAGE
from localmoe.server.drain import Drain, DrainMiddleware
from localmoe.server.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList,
    ModelVersionCard, TokenizeRequest, TokenizeResponse,
)
from localmoe.server.model_admin import ADMIN_PATHS, add_admin_routes
from localmoe.server.model_registry import ModelRegistry, ServedModel
from localmoe.server.canary import VERSION_HEADER, sticky_key
from localmoe.server.instance_ports import PinnedPortMiddleware, instance_ports
from localmoe.server.request_log import RequestIdMiddleware
from localmoe.server.tracing import RequestTracer, TracingMiddleware
from localmoe.server.lora_admin import add_lora_routes, lora_admin_paths, lora_cards
from localmoe.server.tgi import add_tgi_routes
from localmoe.server.rate_limits import USAGE_PATH, RateLimitMiddleware, add_usage_route, rate_limiter
from localmoe.server.tenants import key_ring

log = logging.getLogger(__name__)


def build_app(aengines: list[tuple[AsyncEngine, Config]], config: Config) -> FastAPI:
    """An app serving each engine (with the config it was built from; the first is the default model); the engine
    loops start and stop with the app's lifespan."""
    metrics = ServerMetrics(max(aengine.engine.max_model_len for aengine, _ in aengines))
    registry = ModelRegistry(metrics)
    for aengine, own in aengines:
        registry.add(aengine, own)

    # tenants: the keys' limits, priorities and usage (server/rate_limits.py)
    file_keys = config.server.file_keys()
    keys = list(key_ring(config.server.api_key, config.server.admin_api_key, file_keys).values())
    limiter = rate_limiter(metrics.registry, keys, config.server.redis_url)
    # OpenTelemetry only where asked for (server/tracing.py imports it then)
    tracer = RequestTracer(config.server.otlp_traces_endpoint) if config.server.otlp_traces_endpoint else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for model in registry:
            model.start()
        try:
            yield
        finally:
            for model in registry:
                model.stop()
            await limiter.counters.close()
            if tracer is not None:
                tracer.shutdown()

    app = FastAPI(title="LocalMoE", version=__version__, lifespan=lifespan)
    install_openapi(app)
    app.state.models = registry
    app.state.drain = drain = Drain(lambda: registry.engines, config.server.shutdown_timeout)
    app.add_middleware(RateLimitMiddleware, limiter=limiter)  # inside the drain: a refused request counts nothing
    app.add_middleware(DrainMiddleware, drain=drain)
    # outermost but one: nothing is answered before the key is checked; the admin routes take the admin key only
    app.add_middleware(APIKeyMiddleware, api_key=config.server.api_key, admin_key=config.server.admin_api_key,
                       admin_paths=ADMIN_PATHS | lora_admin_paths(), keys=file_keys,
                       admin_reads=frozenset({USAGE_PATH}))
    ports = instance_ports(config)
    if ports:  # vllm_instances' own ports (server/instance_ports.py): pins requests on them to their model
        app.add_middleware(PinnedPortMiddleware, ports=ports)
    app.add_middleware(HTTPMetricsMiddleware, counter=metrics.http_requests)  # counts every answer
    if tracer is not None:
        app.add_middleware(TracingMiddleware, tracer=tracer)
    app.add_middleware(RequestIdMiddleware)  # outermost: every line logged about a request carries its id
    _add_error_handlers(app)
    add_admin_routes(app, registry, config)
    add_tgi_routes(app, registry)
    add_usage_route(app, limiter)
    add_lora_routes(app, registry)

    @app.get("/health")
    async def health() -> Response:
        """Liveness: 503 when an engine thread is dead or wedged (and, by DrainMiddleware, while draining)."""
        problems = [f"{model.name}: {problem}" for model in registry
                    if (problem := model.aengine.health_problem()) is not None]
        for problem in problems:
            log.warning("unhealthy: %s", problem)
        return Response(status_code=HTTPStatus.SERVICE_UNAVAILABLE if problems else HTTPStatus.OK)

    @app.get("/version")
    async def server_version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/stats/experts")
    async def stats_experts(model: str | None = None) -> dict:
        return registry.get(model).aengine.engine.snapshot.experts

    @app.get("/v1/stats/memory")
    async def stats_memory(model: str | None = None) -> dict:
        return {**registry.get(model).aengine.engine.snapshot.memory, "process_rss_bytes": process_rss_bytes()}

    @app.get("/v1/stats/performance")
    async def stats_performance(model: str | None = None) -> dict:
        metrics = registry.get(model).metrics
        return {**metrics.recent.summary(), "cpu_kernels": cpu_kernels.status(),
                "spec_decode": spec_decode_summary(metrics.read_stats().spec_decode)}

    @app.get("/v1/stats/history")
    async def stats_history(model: str | None = None) -> dict:
        return registry.get(model).history.summary()

    @app.get("/dashboard")
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(DASHBOARD_PAGE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        cards = []
        for name, versions in registry.listed().items():
            model = next(iter(versions.values()))
            cards.append(ModelCard(id=name, root=model.config.engine.model_name or name,
                                   max_model_len=model.serving.max_model_len, state="loaded",
                                   versions=[ModelVersionCard(version=v, root=m.config.engine.model_name or name,
                                                              weight=m.weight) for v, m in versions.items()]))
        return ModelList(data=cards + lora_cards(registry))

    # canary (server/canary.py): the version that serves a request is drawn by weight, sticky by a key it carries,
    # and named in the answer's headers
    def routed(request: CompletionRequest | ChatCompletionRequest, raw_request: Request) -> ServedModel:
        return registry.route(request.model, sticky_key(raw_request.headers, request.user))

    def with_version(response: Response, model: ServedModel) -> Response:
        response.headers[VERSION_HEADER] = model.version
        return response

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw_request: Request) -> Response:
        model = routed(request, raw_request)
        return with_version(await model.serving.create_completion(request, raw_request), model)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw_request: Request) -> Response:
        model = routed(request, raw_request)
        return with_version(await model.serving.create_chat_completion(request, raw_request), model)

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> TokenizeResponse:
        serving = registry.get(request.model).serving
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
        serving = registry.get(request.model).serving
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
