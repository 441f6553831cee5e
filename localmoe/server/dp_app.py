"""The API server in front of data-parallel replicas (distributed/data_parallel.py): it holds no model, and
forwards each HTTP request, as it came, to one replica and relays the answer, streamed as it arrives.

A POST (completions, chat, TGI's routes, /tokenize) goes where the router sends it (server/dp_router.py); any other
request (/v1/models, /v1/stats/*, /dashboard, /docs) to the first live replica, or to replica N with
`?replica=N`. Keys are checked by the replicas, which run with the same settings. A client that hangs up before
its answer closes the replica connection, and the replica aborts the request. A replica that dies mid-request
ends it with OpenAI's error (503), or with an error event and [DONE] where it was streaming. Model load, unload and
switch, and LoRA adapters' load and unload, would change one replica only, so they are refused here.

/health fails while any replica is dead or unhealthy (the others keep serving). /metrics gathers every replica's
series with a `replica` label added, beside the front's own: requests routed to each replica and why, and
whether each is up. The router's view of each replica's queue and KV usage is polled from the same /metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from http import HTTPStatus
from types import FrameType

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from starlette.background import BackgroundTask

from localmoe import __version__
from localmoe.config import Config
from localmoe.distributed.data_parallel import STOP_TIMEOUT_S, Replica, start_replicas
from localmoe.server.dp_router import Router, prefix_blocks
from localmoe.server.errors import APIError
from localmoe.server.generation import unless_disconnected
from localmoe.server.lora_admin import LORA_PATHS
from localmoe.server.model_admin import ADMIN_PATHS

log = logging.getLogger(__name__)

LOAD_POLL_S = 1.0  # how often the router reads each replica's queue and KV usage
# the front's own requests to a replica (health, metrics): a wedged replica must not wedge /health, /metrics or the
# load poll with it
OWN_REQUEST_TIMEOUT_S = 5.0
HOP_BY_HOP = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "te", "upgrade", "content-length"})


def build_dp_app(replicas: list[Replica], config: Config) -> FastAPI:
    router = Router(len(replicas))
    registry = CollectorRegistry()
    routed = Counter("localmoe:dp_requests_routed", "Requests the API server sent to each data-parallel replica, by "
                     "why it chose that one: prefix (it holds the prompt's prefix) or load (the least loaded).",
                     ["replica", "reason"], registry=registry)
    for replica in replicas:
        for reason in ("prefix", "load"):
            routed.labels(str(replica.index), reason)
    key = config.server.api_key or config.server.admin_api_key
    own_headers = {"Authorization": f"Bearer {key}"} if key else {}
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0),
                               limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    def live() -> list[int]:
        return [replica.index for replica in replicas if replica.alive]

    async def poll_loads() -> None:
        while True:
            await asyncio.sleep(LOAD_POLL_S)
            for index in live():
                try:
                    answer = await client.get(f"{replicas[index].url}/metrics", headers=own_headers,
                                              timeout=OWN_REQUEST_TIMEOUT_S)
                except httpx.HTTPError:
                    continue  # dead or busy: its requests tell it, and /health
                if answer.status_code == HTTPStatus.OK:
                    router.report(index, *_load(text_string_to_metric_families(answer.text)))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        poller = asyncio.create_task(poll_loads())
        try:
            yield
        finally:
            poller.cancel()
            await client.aclose()

    app = FastAPI(title="LocalMoE", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # the replicas' own /docs and /openapi.json are relayed

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> Response:
        return e.response()

    @app.get("/health")
    async def health() -> Response:
        """503 while any replica is dead, unhealthy or draining."""
        async def replica_ok(replica: Replica) -> bool:
            try:
                answer = await client.get(f"{replica.url}/health", timeout=OWN_REQUEST_TIMEOUT_S)
            except httpx.HTTPError:
                return False
            return answer.status_code == HTTPStatus.OK

        problems = [r.index for r, ok in zip(replicas, await asyncio.gather(*map(replica_ok, replicas)))
                    if not ok or not r.alive]
        for index in problems:
            log.warning("unhealthy: replica %d%s", index, "" if replicas[index].alive else
                        f" exited with {replicas[index].process.exitcode}")
        return Response(status_code=HTTPStatus.SERVICE_UNAVAILABLE if problems else HTTPStatus.OK)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        headers = _forwarded(request.headers.items())
        families: dict[str, Metric] = {}
        for index in live():
            try:
                answer = await client.get(f"{replicas[index].url}/metrics", headers=headers,
                                          timeout=OWN_REQUEST_TIMEOUT_S)
            except httpx.HTTPError:
                continue  # it died just now (dp_replica_up says so) or is wedged (/health says so)
            if answer.status_code != HTTPStatus.OK:  # the key was refused: answer as the replica did
                return Response(answer.content, answer.status_code, _forwarded(answer.headers.items()))
            _merge(families, text_string_to_metric_families(answer.text), str(index))
        up = GaugeMetricFamily("localmoe:dp_replica_up", "Whether each data-parallel replica's process is running.",
                               labels=["replica"])
        for replica in replicas:
            up.add_metric([str(replica.index)], float(replica.alive))
        text = generate_latest(_Fixed([*families.values(), up])) + generate_latest(registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    async def forward(path: str, request: Request) -> Response:
        if f"/{path}" in ADMIN_PATHS | LORA_PATHS:
            raise APIError("loading, unloading and switching models or LoRA adapters is not available with data "
                           "parallelism yet: each replica would change alone", HTTPStatus.NOT_IMPLEMENTED)
        body = await request.body()
        index, reason = _pick(request, body, router, live(), len(replicas))
        if reason is not None:
            routed.labels(str(index), reason).inc()
        router.start(index)
        return await _relay(client, replicas[index], request, body, lambda: router.done(index))

    return app


def _pick(request: Request, body: bytes, router: Router, live: list[int], size: int) -> tuple[int, str | None]:
    """The replica for this request, and why where the router chose it; 400 for a bad ?replica, 503 when none (or
    not the one asked for) is alive."""
    asked = request.query_params.get("replica")
    if asked is not None:
        if not asked.isdigit() or int(asked) >= size:
            raise APIError(f"replica must be one of 0..{size - 1}, not {asked!r}", param="replica")
        if int(asked) not in live:
            raise APIError(f"replica {asked} has stopped", HTTPStatus.SERVICE_UNAVAILABLE)
        return int(asked), None
    if not live:
        raise APIError("every replica has stopped; this server cannot serve requests", HTTPStatus.SERVICE_UNAVAILABLE)
    if request.method != "POST":
        return live[0], None
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None  # the replica answers the malformed body
    return router.choose(prefix_blocks(parsed), live)


async def _relay(client: httpx.AsyncClient, replica: Replica, request: Request, body: bytes,
                 done: Callable[[], None]) -> Response:
    """`request` sent to `replica`, its answer relayed; `done` is called once, when the answer has been relayed or
    given up on."""
    upstream = client.build_request(request.method, f"{replica.url}{request.url.path}",
                                    params=request.query_params, headers=_forwarded(request.headers.items()),
                                    content=body)
    answer: httpx.Response | None = None
    settled = streaming = False

    async def finish() -> None:
        nonlocal settled
        if not settled:
            settled = True
            if answer is not None:
                await answer.aclose()
            done()

    try:
        answer = await unless_disconnected(request, client.send(upstream, stream=True))
        if answer is None:  # the client left: the replica saw its connection close and aborted the request
            return Response(status_code=499)
        headers = _forwarded(answer.headers.items())
        streaming = answer.headers.get("content-type", "").startswith("text/event-stream")
        if streaming:
            # the background task runs however the stream ends, even if it never started
            return StreamingResponse(_events(answer, replica.index, finish), answer.status_code, headers,
                                     background=BackgroundTask(finish))
        content = await answer.aread()
        headers.pop("content-encoding", None)  # aread() decoded it
        return Response(content, answer.status_code, headers)
    except httpx.HTTPError as e:
        raise _replica_failed(replica.index, e) from e
    finally:
        if not streaming:
            await finish()


async def _events(answer: httpx.Response, index: int, finish: Callable[[], Awaitable[None]]) -> AsyncIterator[bytes]:
    """A replica's SSE stream; one that breaks off (the replica died) ends with an error event and [DONE], as a
    stream the engine fails does. Closing it (the client left) closes the replica's connection."""
    try:
        async for chunk in answer.aiter_raw():
            yield chunk
    except httpx.HTTPError as e:
        log.error("the stream relayed from replica %d failed: %r", index, e)
        yield f"data: {_replica_failed(index, e).body().model_dump_json()}\n\ndata: [DONE]\n\n".encode()
    finally:
        await finish()


def _replica_failed(index: int, error: Exception) -> APIError:
    return APIError(f"data-parallel replica {index} failed while serving this request: {error!r}",
                    HTTPStatus.SERVICE_UNAVAILABLE)


def _forwarded(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {name: value for name, value in headers if name.lower() not in HOP_BY_HOP}


def _merge(families: dict[str, Metric], scraped: Iterable[Metric], replica: str) -> None:
    """Add one replica's series to `families`, each labelled with the replica."""
    for family in scraped:
        merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
        merged.samples += [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]


def _load(scraped: Iterable[Metric]) -> tuple[int, float]:
    """A replica's waiting requests (over every model it serves) and its fullest KV pool."""
    waiting, usage = 0, 0.0
    for family in scraped:
        if family.name == "vllm:num_requests_waiting":
            waiting = int(sum(s.value for s in family.samples))
        elif family.name == "vllm:kv_cache_usage_perc":
            usage = max((s.value for s in family.samples), default=0.0)
    return waiting, usage


class _Fixed:
    """Metric families already gathered, in the shape generate_latest reads."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


class FrontServer(uvicorn.Server):
    """The front's uvicorn: each exit signal is passed on to the replicas (the first drains them, a second ends them
    at once) and the front exits once they all have; until then it relays their answers (503 for new requests while
    they drain)."""

    def __init__(self, settings: uvicorn.Config, replicas: list[Replica]) -> None:
        super().__init__(settings)
        self.replicas = replicas
        self.stopping = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.stopping = True
        for replica in self.replicas:
            replica.signal_stop()

    async def on_tick(self, counter: int) -> bool:
        if self.stopping and not any(replica.alive for replica in self.replicas):
            self.should_exit = True
        return await super().on_tick(counter)


def serve_data_parallel(config: Config, graceful_close_s: float) -> None:
    """Start the replicas, serve in front of them until a signal has drained them, and leave none behind; raises
    ReplicaStartError when a replica cannot start."""
    replicas = start_replicas(config)
    try:
        host, port = config.server.host, config.server.port
        log.info("serving %d data-parallel replicas at http://%s:%d/v1", len(replicas), host, port)
        settings = uvicorn.Config(build_dp_app(replicas, config), host=host, port=port,
                                  log_level=config.server.log_level, timeout_graceful_shutdown=graceful_close_s)
        FrontServer(settings, replicas).run()
    finally:
        for replica in replicas:
            replica.stop(config.server.shutdown_timeout + STOP_TIMEOUT_S)
