"""OpenTelemetry traces over OTLP, with `--otlp-traces-endpoint` (vLLM's flag, vLLM's span and attribute names).

Each engine request becomes one `llm_request` span from its arrival to its last token, with three children laid
end to end from the timeline the engine keeps for it: `queue` (arrival to the first step that computes it),
`prefill` (to its first token) and `decode` (to its last), so the children add up to the request's latency. A
caller's W3C `traceparent` (and `tracestate`) makes the span a child of the caller's, in the caller's trace.

OpenTelemetry is optional (the `otel` extra) and imported only here, only when the flag is set: a server without
the flag never imports it. The exporter speaks gRPC unless OTEL_EXPORTER_OTLP_TRACES_PROTOCOL says http/protobuf,
as in vLLM.
"""

from __future__ import annotations

import os
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from localmoe.config import ConfigError
from localmoe.outputs import RequestOutput
from localmoe.sampling_params import SamplingParams
from localmoe.server.request_log import REQUEST_ID

TRACE_HEADERS = (b"traceparent", b"tracestate")
PROTOCOLS = ("grpc", "http/protobuf")


class RequestTracer:
    """The tracer provider and OTLP exporter of one app; spans are batched and sent off the event loop."""

    def __init__(self, endpoint: str) -> None:
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
        if protocol not in PROTOCOLS:
            raise ConfigError(f"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL {protocol!r} is not one of {', '.join(PROTOCOLS)}")
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore
        except ImportError:
            raise ConfigError("--otlp-traces-endpoint needs OpenTelemetry: pip install 'localmoe[otel]'") from None
        self.api = trace
        # a provider of its own, not the global one: nothing else in the process (FastAPI's own telemetry) exports
        self.provider = TracerProvider(resource=Resource.create({"service.name": "localmoe"}))
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self.tracer = self.provider.get_tracer("localmoe")
        self.propagator = TraceContextTextMapPropagator()

    def shutdown(self) -> None:
        """Send what is batched, then stop."""
        self.provider.shutdown()

    def record(self, trace: "RequestTrace", output: RequestOutput, params: SamplingParams, model: list[str]) -> None:
        """The spans of one finished engine request (`model`: its served name and version)."""
        times = output.metrics
        now = time.monotonic()
        arrival = times.get("arrival_time", now)
        scheduled, first = times.get("scheduled_time"), times.get("first_token_time")
        finished = times.get("finished_time") or now
        to_wall = time.time() - time.monotonic()

        def ns(moment: float) -> int:
            return int((moment + to_wall) * 1e9)

        attributes: dict[str, Any] = {
            "gen_ai.request.id": trace.request_id, "gen_ai.response.model": model[0],
            "localmoe.model_version": model[1],
            "gen_ai.request.max_tokens": params.max_tokens or 0, "gen_ai.request.temperature": params.temperature,
            "gen_ai.request.top_p": params.top_p, "gen_ai.request.n": params.n,
            "gen_ai.usage.num_sequences": len(output.outputs),
            "gen_ai.usage.prompt_tokens": len(output.prompt_token_ids),
            "gen_ai.usage.completion_tokens": sum(len(c.token_ids) for c in output.outputs),
            "gen_ai.latency.e2e": finished - arrival,
        }
        if scheduled is not None:
            attributes["gen_ai.latency.time_in_queue"] = scheduled - arrival
        if first is not None:
            attributes["gen_ai.latency.time_to_first_token"] = first - arrival
        if scheduled is not None and first is not None:
            attributes["gen_ai.latency.time_in_model_prefill"] = first - scheduled
            attributes["gen_ai.latency.time_in_model_decode"] = finished - first
        span = self.tracer.start_span("llm_request", context=trace.parent, kind=self.api.SpanKind.SERVER,
                                      start_time=ns(arrival), attributes=attributes)
        inside = self.api.set_span_in_context(span)
        for name, start, end in (("queue", arrival, scheduled), ("prefill", scheduled, first),
                                 ("decode", first, finished)):
            if start is not None and end is not None:
                self.tracer.start_span(name, context=inside, start_time=ns(start)).end(end_time=ns(end))
        span.end(end_time=ns(finished))


@dataclass
class RequestTrace:
    """What one HTTP request's spans need: the tracer, the caller's trace context, the request id."""

    tracer: RequestTracer
    parent: Any  # an OpenTelemetry Context: empty where the caller sent no traceparent
    request_id: str | None

    def record(self, output: RequestOutput, params: SamplingParams, model: list[str]) -> None:
        self.tracer.record(self, output, params, model)


# the trace of the request being handled; None where tracing is off
CURRENT_TRACE: ContextVar[RequestTrace | None] = ContextVar("localmoe_trace", default=None)


class TracingMiddleware:
    """Sets CURRENT_TRACE for each HTTP request, from the caller's trace headers (runs inside the request id's)."""

    def __init__(self, app: ASGIApp, tracer: RequestTracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in TRACE_HEADERS}
        token = CURRENT_TRACE.set(RequestTrace(self.tracer, self.tracer.propagator.extract(headers),
                                               REQUEST_ID.get()))
        try:
            await self.app(scope, receive, send)
        finally:
            CURRENT_TRACE.reset(token)
