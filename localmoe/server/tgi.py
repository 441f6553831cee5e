"""Text Generation Inference's routes, so a TGI deployment moves by changing its image: POST / (TGI's compat route:
a one-element list, or a stream), /generate, /generate_stream and GET /info, with TGI's request and response
shapes, its error JSON ({"error", "error_type"} with its status codes: 422 validation, 429 overloaded, 424 a
failed generation) and its timing headers. They serve the default model (TGI serves one).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any, Literal

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from localmoe import __version__
from localmoe.outputs import CompletionOutput, Logprob, RequestOutput
from localmoe.sampling_params import SamplingParams, SamplingParamsError, StructuredOutputsParams
from localmoe.server.errors import APIError
from localmoe.server.generation import Generation, Prompt, unless_disconnected
from localmoe.server.model_registry import ModelRegistry, ServedModel
from localmoe.server.rate_limits import key_use_of

# TGI's launcher settings (environment variables) -> ours, (section, key, parse)
TGI_ENVIRONMENT = {
    "MODEL_ID": ("engine", "model_name", str), "REVISION": ("engine", "revision", str),
    "NUM_SHARD": ("engine", "tensor_parallel_size", int), "QUANTIZE": ("engine", "quantization", str),
    "DTYPE": ("engine", "dtype", str), "MAX_TOTAL_TOKENS": ("engine", "max_model_len", int),
    "MAX_BATCH_PREFILL_TOKENS": ("engine", "max_num_batched_tokens", int),
    "MAX_BATCH_SIZE": ("engine", "max_num_seqs", int),
    "TRUST_REMOTE_CODE": ("engine", "trust_remote_code", lambda v: v.lower() == "true"),
    "HOSTNAME": ("server", "host", str), "PORT": ("server", "port", int), "API_KEY": ("server", "api_key", str),
}
MAX_STOP_SEQUENCES = 4  # TGI's default --max-stop-sequences
DEFAULT_MAX_NEW_TOKENS = 100  # what TGI's router generates when a request sets no max_new_tokens
TGI_STATUS = {  # our refusals' statuses -> TGI's (status, error_type)
    HTTPStatus.BAD_REQUEST: (HTTPStatus.UNPROCESSABLE_ENTITY, "validation"),
    HTTPStatus.TOO_MANY_REQUESTS: (HTTPStatus.TOO_MANY_REQUESTS, "overloaded"),  # a full queue (Generation)
}


def tgi_environment(environ: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Settings from TGI's environment variables, by section, for a TGI deployment whose image is swapped for ours
    (flags still win). Read only where MODEL_ID is set, as every TGI deployment sets it: names as common as PORT,
    HOSTNAME or API_KEY mean nothing to us elsewhere. MAX_INPUT_TOKENS has no setting of ours: the context
    (MAX_TOTAL_TOKENS) bounds prompts."""
    settings: dict[str, dict[str, Any]] = {"engine": {}, "server": {}}
    if not environ.get("MODEL_ID"):
        return settings
    for name, (section, key, parse) in TGI_ENVIRONMENT.items():
        if environ.get(name):
            try:
                settings[section][key] = parse(environ[name])
            except ValueError:
                raise ValueError(f"{name}={environ[name]!r} is not a valid {key}") from None
    return settings


class TGIError(Exception):
    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.UNPROCESSABLE_ENTITY,
                 error_type: str = "validation", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.error_type, self.headers = message, status, error_type, headers

    @classmethod
    def of(cls, error: APIError) -> "TGIError":
        status, kind = TGI_STATUS.get(error.status, (HTTPStatus.FAILED_DEPENDENCY, "generation"))
        return cls(error.message, status, kind, error.headers)

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class Grammar(BaseModel):
    type: Literal["json", "regex", "json_object"]
    value: Any


class Parameters(BaseModel):
    """TGI's GenerateParameters; what we cannot honour (typical_p, watermark, best_of > 1) is refused by name."""

    model_config = ConfigDict(extra="forbid")
    best_of: int | None = None
    decoder_input_details: bool | None = False
    details: bool | None = False
    do_sample: bool | None = False
    frequency_penalty: float | None = None
    grammar: Grammar | None = None
    max_new_tokens: int | None = Field(default=None, ge=1)
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: int | None = None
    stop: list[str] | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    top_p: float | None = None
    truncate: int | None = Field(default=None, ge=1)
    typical_p: float | None = None
    watermark: bool | None = False
    adapter_id: str | None = None


class GenerateRequest(BaseModel):
    inputs: str = Field(min_length=1)
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False


def sampling_params(p: Parameters) -> SamplingParams:
    unsupported = [(p.typical_p is not None and p.typical_p < 1.0, "typical_p"), (p.watermark, "watermark"),
                   ((p.best_of or 1) > 1, "best_of"), (p.adapter_id is not None, "adapter_id")]
    for refused, name in unsupported:
        if refused:
            raise TGIError(f"`{name}` is not supported by this server")
    stop = p.stop or []
    if len(stop) > MAX_STOP_SEQUENCES:
        raise TGIError(f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. Given: {len(stop)}")
    # as TGI: any of temperature, top_k, top_p asks for sampling; otherwise greedy
    sample = p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p))
    grammar = None
    if p.grammar is not None:
        grammar = StructuredOutputsParams(**{p.grammar.type: p.grammar.value if p.grammar.type != "json_object"
                                             else True})
    try:
        return SamplingParams(
            temperature=(p.temperature if p.temperature is not None else 1.0) if sample else 0.0,
            top_k=p.top_k or 0, top_p=p.top_p if p.top_p is not None else 1.0, seed=p.seed, stop=stop,
            max_tokens=p.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
            repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
            frequency_penalty=p.frequency_penalty or 0.0, logprobs=p.top_n_tokens or 0,
            prompt_logprobs=0 if p.decoder_input_details else None, structured_outputs=grammar)
    except SamplingParamsError as e:
        raise TGIError(str(e)) from None


def finish_reason(c: CompletionOutput) -> str:
    if c.finish_reason == "length":
        return "length"
    return "stop_sequence" if isinstance(c.stop_reason, str) else "eos_token"


class TGIServing:
    def __init__(self, model: ServedModel) -> None:
        self.model = model
        self.tokenizer = model.serving.tokenizer
        self.special = set(self.tokenizer.all_special_ids)

    async def start(self, request: GenerateRequest, raw: Request) -> tuple[Generation, SamplingParams, Prompt]:
        params = sampling_params(request.parameters)
        ids = self.tokenizer.encode(request.inputs)
        if request.parameters.truncate is not None:
            ids = ids[-request.parameters.truncate:]
        prompt = Prompt(request.inputs, ids)
        serving = self.model.serving
        try:
            await serving.compile_grammar(params)
            generation = Generation(serving.aengine, self.model.metrics, f"tgi-{uuid.uuid4().hex}", [prompt],
                                    [params], busy_status=HTTPStatus.TOO_MANY_REQUESTS, key_use=key_use_of(raw))
            return generation, params, prompt
        except APIError as e:
            raise TGIError.of(e) from None

    def token(self, token_id: int, step: dict[int, Logprob] | None) -> dict[str, Any]:
        text = step[token_id].decoded_token if step else self.tokenizer.decode([token_id])
        return {"id": token_id, "text": text, "logprob": step[token_id].logprob if step else None,
                "special": token_id in self.special}

    def top_tokens(self, step: dict[int, Logprob], n: int) -> list[dict[str, Any]]:
        ranked = sorted(step.items(), key=lambda item: -item[1].logprob)[:n]
        return [self.token(token_id, step) for token_id, _ in ranked]

    def details(self, output: RequestOutput, params: SamplingParams, top_n: int | None) -> dict[str, Any]:
        c = output.outputs[0]
        steps = c.logprobs or [None] * len(c.token_ids)
        prefill = []
        if output.prompt_logprobs is not None:
            prefill = [self.token(t, step) for t, step in zip(output.prompt_token_ids, output.prompt_logprobs)]
            for token in prefill:
                del token["special"]
        return {"finish_reason": finish_reason(c), "generated_tokens": len(c.token_ids), "seed": params.seed,
                "prefill": prefill, "tokens": [self.token(t, step) for t, step in zip(c.token_ids, steps)],
                "top_tokens": [self.top_tokens(step, top_n) for step in steps] if top_n else None}

    def headers(self, output: RequestOutput, started: float) -> dict[str, str]:
        """TGI's timing headers (milliseconds) and counts."""
        times, now = output.metrics, time.monotonic()
        arrival = times.get("arrival_time", started)
        scheduled = times.get("scheduled_time", arrival)
        finished = times.get("finished_time", now)
        generated = len(output.outputs[0].token_ids)
        inference = finished - scheduled
        return {"x-compute-type": self.model.aengine.engine.device.type, "x-compute-time": f"{inference:.6f}",
                "x-compute-characters": str(len(output.prompt or "")),
                "x-total-time": str(round((finished - started) * 1000)),
                "x-validation-time": str(round(max(arrival - started, 0) * 1000)),
                "x-queue-time": str(round((scheduled - arrival) * 1000)),
                "x-inference-time": str(round(inference * 1000)),
                "x-time-per-token": str(round(inference * 1000 / max(generated, 1))),
                "x-prompt-tokens": str(len(output.prompt_token_ids)), "x-generated-tokens": str(generated)}

    async def generate(self, request: GenerateRequest, raw: Request, as_list: bool) -> Response:
        """One answer (in a one-element list on TGI's compat route)."""
        started = time.monotonic()
        generation, params, prompt = await self.start(request, raw)
        try:
            outputs = await unless_disconnected(raw, generation.final_outputs())
        except APIError as e:
            raise TGIError.of(e) from None
        if outputs is None:  # the client went away; its request was aborted
            return Response(status_code=499)
        output = outputs[0]
        text = output.outputs[0].text
        if request.parameters.return_full_text:
            text = prompt.text + text
        body: dict[str, Any] = {"generated_text": text}
        if request.parameters.details or request.parameters.decoder_input_details:
            body["details"] = self.details(output, params, request.parameters.top_n_tokens)
        return JSONResponse([body] if as_list else body, headers=self.headers(output, started))

    async def generate_stream(self, request: GenerateRequest, raw: Request) -> Response:
        generation, params, prompt = await self.start(request, raw)
        top_n = request.parameters.top_n_tokens
        prefix = prompt.text if request.parameters.return_full_text else ""

        async def events() -> AsyncIterator[str]:
            seen, text = 0, ""
            try:
                async for _, output in generation.stream():
                    c = output.outputs[0]
                    steps = c.logprobs or [None] * len(c.token_ids)
                    new = c.token_ids[seen:]
                    for k, token_id in enumerate(new, start=seen):
                        last = k == len(c.token_ids) - 1
                        event: dict[str, Any] = {"index": k + 1, "token": self.token(token_id, steps[k]),
                                                 "top_tokens": self.top_tokens(steps[k], top_n) if top_n else None,
                                                 "generated_text": None, "details": None}
                        event["token"]["text"] = c.text[len(text):] if last else ""  # the text as it stands
                        if last and c.finished:
                            event["generated_text"] = prefix + c.text
                            event["details"] = {"finish_reason": finish_reason(c), "generated_tokens": len(new) + seen,
                                                "seed": params.seed}
                        yield f"data:{json.dumps(event)}\n\n"
                    seen, text = len(c.token_ids), c.text
            except APIError as e:
                yield f"data:{json.dumps(TGIError.of(e).body())}\n\n"
            finally:
                generation.abort_unfinished()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"x-compute-type": self.model.aengine.engine.device.type,
                                          "x-accel-buffering": "no"})


async def _read(raw: Request) -> GenerateRequest:
    try:
        return GenerateRequest.model_validate(await raw.json())
    except json.JSONDecodeError as e:
        raise TGIError(f"Failed to deserialize the JSON body into the target type: {e}") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise TGIError(f"Failed to deserialize the JSON body into the target type: {where}: {first['msg']}") from None


def add_tgi_routes(app: FastAPI, registry: ModelRegistry) -> None:
    async def tgi_error(_: Request, e: TGIError) -> Response:
        return e.response()
    app.add_exception_handler(TGIError, tgi_error)

    async def compat(raw: Request) -> Response:
        request = await _read(raw)
        serving = TGIServing(registry.get(None))
        return await (serving.generate_stream(request, raw) if request.stream
                      else serving.generate(request, raw, True))

    async def generate(raw: Request) -> Response:
        return await TGIServing(registry.get(None)).generate(await _read(raw), raw, False)

    async def generate_stream(raw: Request) -> Response:
        return await TGIServing(registry.get(None)).generate_stream(await _read(raw), raw)

    app.add_api_route("/", compat, methods=["POST"], include_in_schema=False)
    app.add_api_route("/generate", generate, methods=["POST"], include_in_schema=False)
    app.add_api_route("/generate_stream", generate_stream, methods=["POST"], include_in_schema=False)

    @app.get("/info")
    async def info() -> dict[str, Any]:
        model = registry.get(None)
        engine = model.aengine.engine
        return {"model_id": model.name, "model_sha": None, "model_dtype": str(engine.runner.dtype).removeprefix("torch."),
                "model_device_type": engine.device.type, "model_pipeline_tag": "text-generation",
                "max_concurrent_requests": model.aengine.capacity, "max_best_of": 1,
                "max_stop_sequences": MAX_STOP_SEQUENCES, "max_input_tokens": engine.max_model_len - 1,
                "max_total_tokens": engine.max_model_len, "validation_workers": 1, "max_client_batch_size": 1,
                "router": "localmoe", "version": __version__, "sha": None, "docker_label": None,
                "max_batch_total_tokens": engine.config.max_num_batched_tokens}
