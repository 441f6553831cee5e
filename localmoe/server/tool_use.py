"""How one chat request uses its tools, by vLLM's rules: what the template is shown, what constrains the output,
and how the output is read back into content and tool calls.

- "none": the tools are shown to the model and its output is text.
- "auto" (the default when tools are given): the model decides, and its text is read by the family's parser
  (`--tool-call-parser`), which vLLM enables with `--enable-auto-tool-choice`.
- "required", or a named function: structured output holds the output to calls of the request's tools
  (tool_parsers.forced), so the calls always parse, whatever the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from localmoe.server.tool_parsers import StreamDelta, ToolCall, ToolCallStream, ToolParser, get_tool_parser
from localmoe.server.tool_parsers.forced import NamedToolCall, RequiredToolCalls, parameters, required_schema


class ToolChoiceError(ValueError):
    """A request whose tools or tool_choice this server cannot honour (a 400, naming the field)."""

    def __init__(self, message: str, param: str = "tool_choice") -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolSettings:
    """The server's flags: --enable-auto-tool-choice and --tool-call-parser, vLLM's names."""

    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None

    def __post_init__(self) -> None:
        if self.tool_call_parser is not None:
            get_tool_parser(self.tool_call_parser)  # an unknown name fails at start, listing the known ones
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser to say how the model writes calls")


@dataclass
class ToolResult:
    content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str | None


@dataclass(frozen=True)
class ToolUse:
    tools: list[dict[str, Any]] | None  # what the chat template is given
    reader: ToolParser | None  # reads the output; None: it is plain text
    schema: dict[str, Any] | None  # the JSON schema structured output holds the output to
    calls_finish: bool  # a response that made calls finishes with "tool_calls" (not for a named function)
    parallel: bool

    @classmethod
    def of(cls, tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None,
           parallel_tool_calls: bool, settings: ToolSettings) -> ToolUse:
        if not tools:
            if tool_choice not in (None, "none"):
                raise ToolChoiceError("tool_choice needs tools")
            return cls(None, None, None, False, parallel_tool_calls)
        _check_tools(tools)
        # OpenAI: a function without parameters takes none; the published templates read its `parameters`
        tools = [{**tool, "function": {**tool["function"], "parameters": parameters(tool)}} for tool in tools]
        choice = "auto" if tool_choice is None else tool_choice
        if choice == "none":
            return cls(tools, None, None, False, parallel_tool_calls)
        if choice == "auto":
            if not settings.enable_auto_tool_choice or settings.tool_call_parser is None:
                raise ToolChoiceError('"auto" tool choice requires --enable-auto-tool-choice and '
                                      "--tool-call-parser to be set")
            return cls(tools, get_tool_parser(settings.tool_call_parser), None, True, parallel_tool_calls)
        if choice == "required":
            return cls(tools, RequiredToolCalls(), required_schema(tools, parallel_tool_calls), True,
                       parallel_tool_calls)
        name = _named(choice)
        chosen = [tool for tool in tools if tool["function"]["name"] == name]
        if not chosen:
            raise ToolChoiceError(f"tool_choice names {name!r}, which is not among the request's tools")
        return cls(tools, NamedToolCall(name), parameters(chosen[0]), False, parallel_tool_calls)

    @property
    def keep_special_tokens(self) -> bool:
        """A family's markers may be special tokens (Mistral's [TOOL_CALLS]): the parser must see them."""
        return self.reader is not None and self.schema is None

    def read(self, text: str, finish_reason: str | None) -> ToolResult:
        if self.reader is None:
            return ToolResult(text, [], finish_reason)
        result = self.reader.extract(text)
        calls = result.tool_calls if self.parallel else result.tool_calls[:1]
        return ToolResult(result.content, calls, self.finish_reason(bool(calls), finish_reason))

    def stream(self) -> ToolDeltas | None:
        return None if self.reader is None else ToolDeltas(self, self.reader.stream())

    def finish_reason(self, called: bool, finish_reason: str | None) -> str | None:
        return "tool_calls" if called and self.calls_finish and finish_reason == "stop" else finish_reason


class ToolDeltas:
    """One choice's stream: its text deltas in, content and tool-call deltas out."""

    def __init__(self, use: ToolUse, stream: ToolCallStream) -> None:
        self.use = use
        self.stream = stream
        self.called = False

    def feed(self, text: str, finish_reason: str | None) -> tuple[StreamDelta, str | None]:
        """The deltas `text` releases, and the finish reason to send (once the choice has finished)."""
        delta = self.stream.feed(text, final=finish_reason is not None)
        if not self.use.parallel:
            delta.tool_calls = [d for d in delta.tool_calls if d.index == 0]
        self.called = self.called or bool(delta.tool_calls)
        return delta, self.use.finish_reason(self.called, finish_reason)


def _check_tools(tools: list[dict[str, Any]]) -> None:
    names = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(function, dict) and tool.get("type", "function") == "function"
                and isinstance(function.get("name"), str) and function["name"]):
            raise ToolChoiceError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}", "tools")
        if not isinstance(function.get("parameters", {}), dict):
            raise ToolChoiceError(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        if function["name"] in names:
            raise ToolChoiceError(f"tools[{i}] repeats the name {function['name']!r}", "tools")
        names.add(function["name"])


def _named(choice: Any) -> str:
    function = choice.get("function") if isinstance(choice, dict) else None
    if not (isinstance(function, dict) and choice.get("type") == "function" and isinstance(function.get("name"), str)):
        raise ToolChoiceError('tool_choice must be "none", "auto", "required" or '
                              '{"type": "function", "function": {"name": ...}}')
    return function["name"]
