"""OpenAI completions and chat completions: HTTP request -> prompts and SamplingParams -> JSON or SSE."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from localmoe.engine.async_engine import AsyncEngine
from localmoe.engine.structured_output import GrammarError
from localmoe.lora.request import LoRARequest
from localmoe.outputs import CompletionOutput, Logprob, RequestOutput
from localmoe.sampling_params import SamplingParams, SamplingParamsError, StructuredOutputsParams
from localmoe.server.chat_template import ChatTemplates
from localmoe.server.errors import APIError
from localmoe.server.generation import Generation, Prompt, unless_disconnected
from localmoe.server.metrics import ServerMetrics
from localmoe.server.protocol import (
    ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs, ChatMessage,
    ChatResponseMessage, ChatStreamChoice, CompletionChoice, CompletionLogprobs, CompletionRequest,
    CompletionResponse, DeltaMessage, DeltaToolCall, FunctionCall, SamplingRequest, TokenLogprob, ToolCall,
    TopLogprob, UsageInfo,
)
from localmoe.server.rate_limits import key_use_of
from localmoe.server.tool_use import ToolChoiceError, ToolDeltas, ToolSettings, ToolUse

log = logging.getLogger(__name__)


class OpenAIServing:
    def __init__(self, aengine: AsyncEngine, metrics: ServerMetrics, tools: ToolSettings = ToolSettings(),
                 chat_template: str | None = None) -> None:
        """`chat_template`: the --chat-template value, if given."""
        self.aengine = aengine
        self.metrics = metrics
        self.tokenizer = aengine.engine.tokenizer
        self.model_name: str = aengine.engine.model_name
        self.max_model_len: int = aengine.engine.max_model_len
        self.tools = tools
        self.templates = ChatTemplates.choose(self.tokenizer.chat_template, chat_template, tools.tool_call_parser)

    # ---- prompts -------------------------------------------------------------------------------

    def text_prompt(self, text: str) -> Prompt:
        return Prompt(text, self.tokenizer.encode(text))

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        vocab_size = len(self.tokenizer)
        bad = [t for t in token_ids if not 0 <= t < vocab_size]
        if bad:
            raise APIError(f"token id {bad[0]} is out of vocabulary (size {vocab_size})", param=param)

    def token_prompt(self, token_ids: list[int]) -> Prompt:
        """Checked by the engine with the rest of the request (make_request), decoded only for an echo."""
        return Prompt(None, list(token_ids))

    def prompt_text(self, prompt: Prompt) -> str:
        return prompt.text if prompt.text is not None else self.tokenizer.decode(prompt.token_ids)

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool,
                    tools: list[dict[str, Any]] | None = None) -> str:
        try:
            return self.templates.render(self.tokenizer, [_message_dict(m) for m in messages], tools,
                                         add_generation_prompt)
        except Exception as e:  # noqa: BLE001 -- the template runs on the request's messages: any failure is theirs
            raise APIError(f"cannot apply the chat template: {e}", param="messages") from e

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool,
                    tools: list[dict[str, Any]] | None) -> Prompt:
        """The rendered chat; the template itself supplies the special tokens, so none are added."""
        text = self.render_chat(messages, add_generation_prompt, tools)
        return Prompt(text, self.tokenizer.encode(text, add_special_tokens=False))

    def completion_prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
        items: list[Any] = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
        if not items:
            raise APIError("prompt must not be empty", param="prompt")
        return [self.text_prompt(p) if isinstance(p, str) else self.token_prompt(p) for p in items]

    def sampling_params(self, request: SamplingRequest, max_tokens: int | None, logprobs: int | None,
                        structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
        """SamplingParams as the request gives them (max_tokens None: all the room the context leaves); the
        engine checks them against the prompt and the model when the Generation makes its requests.
        `structured_outputs` is a constraint the server imposes (a tool call that must be made), in place of any
        the request asks for."""
        fields = request.sampling_fields()
        if "logit_bias" in fields:
            fields["logit_bias"] = _token_keys(fields["logit_bias"])
        try:
            structured_outputs = structured_outputs or request.structured_outputs_params()
            return SamplingParams(**fields, max_tokens=max_tokens, logprobs=logprobs,
                                  structured_outputs=structured_outputs)
        except SamplingParamsError as e:
            raise APIError(str(e), param=e.param) from e

    async def compile_grammar(self, params: SamplingParams) -> None:
        """Compile the request's structured-output grammar (one for all its prompts) on a worker thread, into the
        compiler's cache, so the event loop never waits on one (a large vocabulary takes a while): the engine's
        make_request then finds it compiled."""
        if params.structured_outputs is None:
            return
        try:
            await asyncio.to_thread(self.aengine.engine.structured.compile, params.structured_outputs)
        except GrammarError as e:
            raise APIError(str(e), param="structured_outputs") from e

    def tool_use(self, request: ChatCompletionRequest) -> ToolUse:
        tools = None if request.tools is None else [tool.model_dump(exclude_none=True) for tool in request.tools]
        choice = request.tool_choice
        try:
            return ToolUse.of(tools, choice if isinstance(choice, str | None) else choice.model_dump(),
                              request.parallel_tool_calls, self.tools)
        except ToolChoiceError as e:
            raise APIError(str(e), param=e.param) from e

    def lora_request(self, model: str | None) -> LoRARequest | None:
        """The LoRA adapter a request's `model` names, where it names one of this engine's (vLLM's routing)."""
        lora = self.aengine.engine.lora
        return LoRARequest(model) if lora is not None and model in lora.adapters else None

    # ---- endpoints -----------------------------------------------------------------------------

    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Response:
        prompts = self.completion_prompts(request.prompt)
        params = [self.sampling_params(request, request.max_tokens, request.logprobs) for _ in prompts]
        if request.echo and request.logprobs is not None:  # the echoed prompt comes with its tokens' logprobs
            params = [dataclasses.replace(p, prompt_logprobs=request.logprobs) for p in params]
        await self.compile_grammar(params[0])
        generation = Generation(self.aengine, self.metrics, f"cmpl-{uuid.uuid4().hex}", prompts, params,
                                request.asked_priority(), key_use=key_use_of(raw_request),
                                lora=self.lora_request(request.model))
        if request.stream:
            return _sse(self._completion_stream(request, generation), generation)
        outputs = await _final_outputs(raw_request, generation)
        if outputs is None:
            return Response(status_code=499)
        choices = []
        for i, output in enumerate(outputs):
            echo = self.prompt_text(prompts[i]) if request.echo else ""
            for c in output.outputs:
                logprobs = None
                if request.logprobs is not None:
                    logprobs = _completion_logprobs(c, 0, len(echo))
                    if request.echo:
                        logprobs = self._prompt_logprobs(output).followed_by(logprobs)
                choices.append(CompletionChoice(
                    index=i * request.n + c.index, text=echo + c.text, finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason, logprobs=logprobs))
        choices.sort(key=lambda choice: choice.index)
        return JSONResponse(CompletionResponse(id=generation.base_id, model=generation.model_name,
                                               choices=choices, usage=_usage(outputs)).model_dump())

    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        use = self.tool_use(request)
        prompt = self.chat_prompt(request.messages, request.add_generation_prompt, use.tools)
        forced = None if use.schema is None else StructuredOutputsParams(json=use.schema)
        params = self.sampling_params(request, request.max_new_tokens, request.num_logprobs, forced)
        if use.keep_special_tokens:
            params = dataclasses.replace(params, skip_special_tokens=False)
        await self.compile_grammar(params)
        generation = Generation(self.aengine, self.metrics, f"chatcmpl-{uuid.uuid4().hex}", [prompt], [params],
                                request.asked_priority(), key_use=key_use_of(raw_request),
                                lora=self.lora_request(request.model))
        if request.stream:
            return _sse(self._chat_stream(request, use, generation), generation)
        outputs = await _final_outputs(raw_request, generation)
        if outputs is None:
            return Response(status_code=499)
        choices = []
        for c in sorted(outputs[0].outputs, key=lambda c: c.index):
            read = use.read(c.text, c.finish_reason)
            calls = [ToolCall(id=t.id, function=FunctionCall(name=t.name, arguments=t.arguments))
                     for t in read.tool_calls]
            choices.append(ChatChoice(
                index=c.index, message=ChatResponseMessage(content=read.content, tool_calls=calls),
                finish_reason=read.finish_reason, stop_reason=c.stop_reason,
                logprobs=_chat_logprobs(c, 0, params.logprobs) if params.logprobs is not None else None))
        return JSONResponse(ChatCompletionResponse(id=generation.base_id,
                                                   model=generation.model_name, choices=choices,
                                                   usage=_usage(outputs)).model_dump())

    def _prompt_logprobs(self, output: RequestOutput) -> CompletionLogprobs:
        """Legacy completions logprobs of the prompt's own tokens, for echo: the first has none (nothing
        precedes it), as in vLLM."""
        result = CompletionLogprobs()
        position = 0
        for token_id, step in zip(output.prompt_token_ids, output.prompt_logprobs or []):
            token = step[token_id].decoded_token if step else self.tokenizer.decode([token_id])
            result.tokens.append(token)
            result.token_logprobs.append(step[token_id].logprob if step else None)
            result.top_logprobs.append({lp.decoded_token: lp.logprob for lp in _ranked(step)} if step else None)
            result.text_offset.append(position)
            position += len(token)
        return result

    # ---- streams -------------------------------------------------------------------------------

    async def _completion_stream(self, request: CompletionRequest, generation: Generation) -> AsyncIterator[str]:
        stream_id, created, n = generation.base_id, int(time.time()), request.n

        def chunk(index: int, text: str, **fields: Any) -> str:
            choice = CompletionChoice(index=index, text=text, **fields)
            return _data(CompletionResponse(id=stream_id, created=created, model=generation.model_name, choices=[choice]))

        sent = _Progress()
        last: dict[int, RequestOutput] = {}
        async for i, output in generation.stream():
            echo = self.prompt_text(generation.prompts[i]) if request.echo else ""
            if request.echo and i not in last:  # the prompt first, once it is computed (its logprobs with it)
                logprobs = self._prompt_logprobs(output) if request.logprobs is not None else None
                for j in range(n):
                    yield chunk(i * n + j, echo, logprobs=logprobs)
            last[i] = output
            for c in output.outputs:
                delta = sent.advance(i * n + c.index, c)
                if delta is None or not (delta.text or delta.finish_reason or request.logprobs is not None):
                    continue
                logprobs = (_completion_logprobs(c, delta.first_token, len(echo) + delta.first_char)
                            if request.logprobs is not None else None)
                yield chunk(i * n + c.index, delta.text, logprobs=logprobs, finish_reason=delta.finish_reason,
                            stop_reason=delta.stop_reason)
        if request.include_usage:
            usage = _usage([last[i] for i in sorted(last)])
            yield _data(CompletionResponse(id=stream_id, created=created, model=generation.model_name, choices=[],
                                           usage=usage))

    async def _chat_stream(self, request: ChatCompletionRequest, use: ToolUse,
                           generation: Generation) -> AsyncIterator[str]:
        stream_id, created, top_logprobs = generation.base_id, int(time.time()), request.num_logprobs

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
            return _data(ChatCompletionChunk(id=stream_id, created=created, model=generation.model_name,
                                             choices=choices, usage=usage))

        for index in range(request.n):
            yield chunk([ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
        sent = _Progress()
        readers = {index: use.stream() for index in range(request.n)}
        last: RequestOutput | None = None
        async for _, output in generation.stream():
            last = output
            for c in output.outputs:
                delta = sent.advance(c.index, c)
                if delta is None:
                    continue
                message, finish_reason = _delta_message(readers[c.index], delta)
                if not (message.content or message.tool_calls or finish_reason or top_logprobs is not None):
                    continue
                logprobs = _chat_logprobs(c, delta.first_token, top_logprobs) if top_logprobs is not None else None
                yield chunk([ChatStreamChoice(index=c.index, delta=message, logprobs=logprobs,
                                              finish_reason=finish_reason, stop_reason=delta.stop_reason)])
        if request.include_usage and last is not None:
            yield chunk([], _usage([last]))


@dataclass
class _Delta:
    text: str
    first_char: int  # where `text` starts in the choice's cumulative text
    first_token: int  # index of the first generated token this delta covers
    finish_reason: str | None
    stop_reason: int | str | None


class _Progress:
    """How much of each choice has been sent, so each chunk carries only what is new."""

    def __init__(self) -> None:
        self.chars: dict[int, int] = {}
        self.tokens: dict[int, int] = {}
        self.finished: set[int] = set()

    def advance(self, index: int, c: CompletionOutput) -> _Delta | None:
        if index in self.finished:
            return None
        first_char, first_token = self.chars.get(index, 0), self.tokens.get(index, 0)
        if len(c.token_ids) == first_token and c.finish_reason is None:
            return None
        self.chars[index], self.tokens[index] = len(c.text), len(c.token_ids)
        if c.finish_reason is not None:
            self.finished.add(index)
        return _Delta(c.text[first_char:], first_char, first_token, c.finish_reason, c.stop_reason)


def _delta_message(reader: ToolDeltas | None, delta: _Delta) -> tuple[DeltaMessage, str | None]:
    """A choice's delta as content and tool-call deltas, and the finish reason to send with it."""
    if reader is None:
        return DeltaMessage(content=delta.text), delta.finish_reason
    parsed, finish_reason = reader.feed(delta.text, delta.finish_reason)
    calls = [DeltaToolCall.model_validate(call.openai()) for call in parsed.tool_calls]
    return DeltaMessage(content=parsed.content or None, tool_calls=calls or None), finish_reason


async def _final_outputs(raw_request: Request, generation: Generation) -> list[RequestOutput] | None:
    """The finished outputs, or None if the client left first; the generation's places are given back either way
    (even when its task was cancelled before it ran)."""
    try:
        return await unless_disconnected(raw_request, generation.final_outputs())
    finally:
        generation.abort_unfinished()


def _sse(events: AsyncIterator[str], generation: Generation) -> StreamingResponse:
    """An SSE response ending in [DONE]; an error found mid-stream is sent as an OpenAI error event first, so a
    failed stream still ends the way clients expect.

    The background task runs after the stream ends for any reason, including a client that hung up
    while a chunk was being sent (when the generator itself may not see the cancellation).
    """

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except APIError as e:
            yield _data(e.body())
        except Exception as e:  # noqa: BLE001 -- the engine failed this request; the stream still ends cleanly
            log.error("stream %s failed: %r", generation.base_id, e)
            yield _data(APIError(str(e), HTTPStatus.INTERNAL_SERVER_ERROR).body())
        finally:
            generation.abort_unfinished()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             background=BackgroundTask(generation.abort_unfinished))


def _token_keys(bias: dict[str, float]) -> dict[int, float]:
    """OpenAI's logit_bias names tokens by their id written as a string."""
    try:
        return {int(key): value for key, value in bias.items()}
    except ValueError:
        raise APIError("logit_bias keys must be token ids (integers written as strings)", param="logit_bias") from None


def _data(model: BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"


def _usage(outputs: list[RequestOutput]) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates expect it: content flattened to one string."""
    content = message.content
    if isinstance(content, list):
        unsupported = [part.type for part in content if part.type != "text" or part.text is None]
        if unsupported:
            raise APIError(f"content parts of type {unsupported[0]!r} are not supported (text only)", param="messages")
        content = "\n".join(part.text or "" for part in content)
    return {**message.model_dump(exclude_none=True), "content": content or ""}


def _ranked(step: dict[int, Logprob]) -> list[Logprob]:
    return sorted(step.values(), key=lambda lp: lp.logprob, reverse=True)


def _completion_logprobs(c: CompletionOutput, first_token: int, first_char: int) -> CompletionLogprobs:
    """Legacy completions logprobs for tokens from `first_token` on (text offsets from `first_char`)."""
    result = CompletionLogprobs()
    position = first_char
    for token_id, step in zip(c.token_ids[first_token:], (c.logprobs or [])[first_token:]):
        sampled = step[token_id]
        result.tokens.append(sampled.decoded_token)
        result.token_logprobs.append(sampled.logprob)
        result.top_logprobs.append({lp.decoded_token: lp.logprob for lp in _ranked(step)})
        result.text_offset.append(position)
        position += len(sampled.decoded_token)
    return result


def _chat_logprobs(c: CompletionOutput, first_token: int, top: int) -> ChatLogprobs:
    def entry(lp: Logprob) -> TopLogprob:
        return TopLogprob(token=lp.decoded_token, logprob=lp.logprob, bytes=list(lp.decoded_token.encode()))

    content = []
    for token_id, step in zip(c.token_ids[first_token:], (c.logprobs or [])[first_token:]):
        sampled = entry(step[token_id])
        content.append(TokenLogprob(**sampled.model_dump(), top_logprobs=[entry(lp) for lp in _ranked(step)[:top]]))
    return ChatLogprobs(content=content)
