"""OpenAI request and response schema (plus vLLM's extras), as pydantic models.

Requests ignore fields they do not know, as the OpenAI and vLLM servers do. Every string in a
request must be text the tokenizer can encode (a lone surrogate such as "\\ud800" is refused here);
ranges are checked by SamplingParams and the engine, which know the model's limits.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from localmoe.sampling_params import SamplingParamsError, StructuredOutputsParams

# JSON types are taken as they are: `false` is no token id and `1.5` no count (pydantic would otherwise convert).
STRICT = ConfigDict(strict=True)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class OpenAIRequest(BaseModel):
    """A request body: any string in it, however deeply nested, must be encodable as UTF-8."""

    model_config = STRICT

    @model_validator(mode="before")
    @classmethod
    def _encodable_text(cls, data: Any) -> Any:
        where = _unencodable(data, ())
        if where is not None:
            path = ".".join(map(str, where)) or "body"
            raise ValueError(f"{path} is not valid Unicode text (a lone surrogate cannot be encoded)")
        return data


def _unencodable(value: Any, path: tuple) -> tuple | None:
    """The path of the first string under `value` that UTF-8 cannot encode, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        items = [(k, k) for k in value] + list(value.items())  # keys are text too
    elif isinstance(value, list):
        items = list(enumerate(value))
    else:
        return None
    for key, item in items:
        found = _unencodable(item, (*path, key))
        if found is not None:
            return found
    return None


class JSONSchemaFormat(BaseModel):
    """OpenAI's response_format.json_schema; without a schema, any JSON object."""

    model_config = ConfigDict(strict=True, populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the schema is always enforced, as in vLLM


class ResponseFormat(BaseModel):
    model_config = STRICT

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputsRequest(BaseModel):
    """vLLM's `structured_outputs` object: one of json, regex, choice, grammar, json_object. Its other keys
    (structural_tag, whitespace_pattern, ...) are refused by name rather than ignored: a client relying on one
    would otherwise get output it did not constrain."""

    model_config = ConfigDict(strict=True, populate_by_name=True, extra="forbid")

    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False


class SamplingRequest(OpenAIRequest):
    """Sampling fields shared by completions and chat completions (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    n: int = 1
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's form) -> bias in [-100, 100]
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0  # lower is served first (vLLM's priority scheduling)
    # structured output: OpenAI's response_format, vLLM's structured_outputs, or vLLM's older guided_* fields
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def asked_priority(self) -> int | None:
        """The priority the request sets, None where it sets none (its API key's then holds)."""
        return self.priority if "priority" in self.model_fields_set else None

    def sampling_fields(self) -> dict[str, Any]:
        """The SamplingParams keyword arguments this request sets (None: keep the default)."""
        names = ("n", "temperature", "top_p", "presence_penalty", "frequency_penalty", "stop", "seed", "top_k",
                 "min_p", "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids", "logit_bias",
                 "skip_special_tokens", "include_stop_str_in_output")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The constraint on the output, from whichever structured-output field the request sets (one at most);
        raises SamplingParamsError naming the field."""
        given: dict[str, dict[str, Any]] = {}  # request field -> StructuredOutputsParams arguments
        if self.response_format is not None and self.response_format.type != "text":
            given["response_format"] = self._response_format_arguments()
        if self.structured_outputs is not None:
            given["structured_outputs"] = self.structured_outputs.model_dump(by_alias=True)
        for kind in ("json", "regex", "choice", "grammar"):
            if getattr(self, f"guided_{kind}") is not None:
                given[f"guided_{kind}"] = {kind: getattr(self, f"guided_{kind}")}
        if len(given) > 1:
            raise SamplingParamsError(f"give one structured-output field, not {', '.join(given)}", list(given)[1])
        for param, arguments in given.items():
            try:
                return StructuredOutputsParams(**arguments)
            except SamplingParamsError as e:
                raise SamplingParamsError(str(e), param) from None
        return None

    def _response_format_arguments(self) -> dict[str, Any]:
        kind, schema = self.response_format.type, self.response_format.json_schema
        if kind == "json_schema" and schema is None:
            raise SamplingParamsError('a response_format of type "json_schema" needs its json_schema',
                                      "response_format")
        if kind == "json_object" or schema.schema_ is None:
            return {"json_object": True}
        return {"json": schema.schema_}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False


class ContentPart(BaseModel):
    model_config = STRICT

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # name, tool_calls, ... reach the chat template unchanged

    role: str
    content: str | list[ContentPart] | None = None


class FunctionDefinition(BaseModel):
    model_config = STRICT

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # the schema is enforced where the server constrains a call (required, named)


class ChatTool(BaseModel):
    model_config = STRICT

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = STRICT

    name: str


class NamedToolChoice(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # default: auto with tools
    parallel_tool_calls: bool = True
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    add_generation_prompt: bool = True

    @property
    def num_logprobs(self) -> int | None:
        """SamplingParams.logprobs: how many alternatives per token, None when logprobs are off."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)

    def followed_by(self, other: "CompletionLogprobs") -> "CompletionLogprobs":
        return CompletionLogprobs(text_offset=self.text_offset + other.text_offset,
                                  token_logprobs=self.token_logprobs + other.token_logprobs,
                                  tokens=self.tokens + other.tokens, top_logprobs=self.top_logprobs + other.top_logprobs)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A call's first delta has its id, type and name; the next ones add to its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelVersionCard(BaseModel):
    """One version of a served name (server/canary.py): its checkpoint and its share of the name's requests."""

    version: str
    root: str
    weight: float


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "localmoe"
    root: str | None = None
    parent: str | None = None
    max_model_len: int
    state: str = "loaded"  # LocalMoE: where a model served beside others stands
    versions: list[ModelVersionCard] = Field(default_factory=list)  # LocalMoE: its versions, canary weights


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(OpenAIRequest):
    """vLLM's /tokenize: either a prompt or chat messages (rendered with the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ChatTool] | None = None  # rendered with the messages, as for a chat completion
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(OpenAIRequest):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
