"""Logs and traces (issue 19): JSON log lines carrying each request's id (the caller's X-Request-Id, echoed), and
OpenTelemetry spans over OTLP/HTTP to an in-process receiver: one trace per request, vLLM's attribute names, queue,
prefill and decode children that add up to the request's latency, and the caller's traceparent honoured."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from server_process import SMALL_KV, auth, free_port, serve

PROMPT = [5, 17, 99, 3, 250, 42, 8]
CALLER_TRACE, CALLER_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
SPANS_TIMEOUT = 60  # only against a hang: the exporter sends its batch every 100 ms here


class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP traces endpoint: keeps every span it is sent, as (trace id, span) pairs."""

    def __init__(self) -> None:
        self.spans: list = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                receiver.spans += [span for resource in request.resource_spans for scope in resource.scope_spans
                                   for span in scope.spans]
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_) -> None:
                pass

        super().__init__(("127.0.0.1", free_port()), Handler)

    def wait_for(self, count: int) -> list:
        """The `llm_request` spans once `count` have arrived (with their children, sent in the same batch)."""
        deadline = time.monotonic() + SPANS_TIMEOUT
        while sum(span.name == "llm_request" for span in self.spans) < count:
            assert time.monotonic() < deadline, f"{len(self.spans)} spans arrived"
            time.sleep(0.05)
        return self.spans


@pytest.fixture(scope="module")
def traced(tiny_mixtral_dir: Path, tmp_path_factory) -> Iterator[tuple[str, Receiver, Path]]:
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    env = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    directory = tmp_path_factory.mktemp("traced")
    endpoint = f"http://127.0.0.1:{receiver.server_port}/v1/traces"
    with serve(directory, "--model", str(tiny_mixtral_dir), "--served-model-name", "tiny", "--dtype", "float32",
               *SMALL_KV, "--log-format", "json",
               "--log-level", "debug", "--otlp-traces-endpoint", endpoint, env=env) as server:
        yield server.url, receiver, server.log_path
    receiver.shutdown()


def complete(url: str, headers: dict[str, str], **body) -> httpx.Response:
    answer = httpx.post(f"{url}/v1/completions", headers={**auth(), **headers}, timeout=120,
                        json={"prompt": PROMPT, "max_tokens": 8, "ignore_eos": True, "temperature": 0.5,
                              "top_p": 0.9, **body})
    assert answer.status_code == 200, answer.text
    return answer


def attributes(span) -> dict:
    return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}


def test_one_trace_per_request_with_queue_prefill_and_decode(traced) -> None:
    url, receiver, _ = traced
    ids = [f"trace-test-{i}" for i in range(3)]
    for request_id in ids:
        assert complete(url, {"X-Request-Id": request_id}).headers["x-request-id"] == request_id
    spans = receiver.wait_for(len(ids))
    roots = {attributes(s)["gen_ai.request.id"]: s for s in spans if s.name == "llm_request"}
    assert set(ids) <= set(roots)
    assert len({roots[i].trace_id for i in ids}) == len(ids)  # one trace each
    for request_id in ids:
        root = roots[request_id]
        seen = attributes(root)
        assert root.kind == root.SPAN_KIND_SERVER and root.parent_span_id == b""
        assert (seen["gen_ai.request.max_tokens"], seen["gen_ai.request.n"]) == (8, 1)
        assert seen["gen_ai.request.temperature"] == pytest.approx(0.5)
        assert seen["gen_ai.request.top_p"] == pytest.approx(0.9)
        assert (seen["gen_ai.usage.prompt_tokens"], seen["gen_ai.usage.completion_tokens"]) == (len(PROMPT), 8)
        assert (seen["gen_ai.response.model"], seen["localmoe.model_version"]) == ("tiny", "default")
        children = {s.name: s for s in spans if s.parent_span_id == root.span_id}
        assert set(children) == {"queue", "prefill", "decode"}
        assert all(s.trace_id == root.trace_id for s in children.values())
        latency = (root.end_time_unix_nano - root.start_time_unix_nano) / 1e9
        parts = sum(s.end_time_unix_nano - s.start_time_unix_nano for s in children.values()) / 1e9
        assert parts == pytest.approx(latency, rel=0.1)
        assert seen["gen_ai.latency.e2e"] == pytest.approx(latency, rel=0.1)
        queue, first = seen["gen_ai.latency.time_in_queue"], seen["gen_ai.latency.time_to_first_token"]
        assert 0 <= queue <= first <= seen["gen_ai.latency.e2e"]


def test_the_callers_traceparent_is_honoured(traced) -> None:
    url, receiver, _ = traced
    before = sum(span.name == "llm_request" for span in receiver.spans)
    complete(url, {"X-Request-Id": "traced-by-caller", "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
             stream=True)
    spans = receiver.wait_for(before + 1)
    root = next(s for s in spans if s.name == "llm_request" and attributes(s)["gen_ai.request.id"]
                == "traced-by-caller")
    assert (root.trace_id.hex(), root.parent_span_id.hex()) == (CALLER_TRACE, CALLER_SPAN)


def test_json_log_lines_carry_the_request_id(traced) -> None:
    url, _, log_path = traced
    answer = complete(url, {"X-Request-Id": "logged-request"})
    generated = complete(url, {}).headers["x-request-id"]  # none sent: a fresh one, echoed
    assert len(generated) == 32 and generated != "logged-request"
    deadline = time.monotonic() + SPANS_TIMEOUT
    while True:  # the access line is written as the answer starts; give the log file a moment to catch up
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
        mine = [line for line in lines if line["request_id"] == "logged-request"]
        loggers = {line["logger"] for line in mine}
        if {"uvicorn.access", "localmoe.server.generation"} <= loggers or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert {"uvicorn.access", "localmoe.server.generation"} <= loggers, mine
    assert any("finished" in line["message"] for line in mine)
    assert any(answer.json()["id"] in line["message"] for line in mine)
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    startup = [line for line in lines if line["logger"].startswith("uvicorn") and line["request_id"] is None]
    assert startup  # lines outside a request carry none


def test_serving_without_an_endpoint_never_imports_opentelemetry_sdk() -> None:
    code = ("import sys; import localmoe.cli, localmoe.server.app, localmoe.server.tracing, localmoe.server.rate_limits; "
            "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
