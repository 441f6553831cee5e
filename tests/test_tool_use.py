"""How a chat request's tools and tool_choice are honoured (vLLM's rules), and reading its output back."""

from __future__ import annotations

import json

import pytest

from localmoe.server.tool_parsers.forced import NamedToolCall, RequiredToolCalls
from localmoe.server.tool_parsers.hermes import HermesToolParser
from localmoe.server.tool_use import ToolChoiceError, ToolSettings, ToolUse

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER, TIME]
AUTO = ToolSettings(enable_auto_tool_choice=True, tool_call_parser="hermes")
TWO_CALLS = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


def test_settings() -> None:
    with pytest.raises(ValueError, match="--tool-call-parser"):
        ToolSettings(enable_auto_tool_choice=True)
    with pytest.raises(ValueError, match="hermes, mistral"):
        ToolSettings(tool_call_parser="pythonic")


def test_tool_choice_rules() -> None:
    use = ToolUse.of(TOOLS, None, True, AUTO)  # tools without tool_choice: "auto"
    assert isinstance(use.reader, HermesToolParser) and use.schema is None and use.keep_special_tokens
    with pytest.raises(ToolChoiceError, match="--enable-auto-tool-choice"):
        ToolUse.of(TOOLS, "auto", True, ToolSettings(tool_call_parser="hermes"))
    with pytest.raises(ToolChoiceError, match="--enable-auto-tool-choice"):
        ToolUse.of(TOOLS, None, True, ToolSettings())
    none = ToolUse.of(TOOLS, "none", True, ToolSettings())
    assert none.tools == [WEATHER, {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {}}}}] and none.reader is None and none.schema is None
    assert ToolUse.of(None, None, True, ToolSettings()).tools is None
    with pytest.raises(ToolChoiceError, match="needs tools"):
        ToolUse.of([], "required", True, AUTO)

    required = ToolUse.of(TOOLS, "required", False, ToolSettings())
    assert isinstance(required.reader, RequiredToolCalls) and not required.keep_special_tokens
    assert required.schema is not None and required.schema["minItems"] == 1 and required.schema["maxItems"] == 1
    named = ToolUse.of(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, True, ToolSettings())
    assert isinstance(named.reader, NamedToolCall) and named.schema == WEATHER["function"]["parameters"]
    assert ToolUse.of(TOOLS, {"type": "function", "function": {"name": "get_time"}}, True, ToolSettings()).schema == {
        "type": "object", "properties": {}}


@pytest.mark.parametrize("tools,choice,param", [
    (TOOLS, {"type": "function", "function": {"name": "get_news"}}, "tool_choice"),
    (TOOLS, {"function": {"name": "get_weather"}}, "tool_choice"),
    (TOOLS, "sometimes", "tool_choice"),
    ([{"type": "function", "function": {"description": "no name"}}], "required", "tools"),
    ([{"type": "retrieval", "function": {"name": "x"}}], "required", "tools"),
    ([{"type": "function", "function": {"name": "x", "parameters": "object"}}], "required", "tools"),
    ([WEATHER, WEATHER], "required", "tools"),
])
def test_refusals_name_the_field(tools: list, choice: object, param: str) -> None:
    with pytest.raises(ToolChoiceError) as refused:
        ToolUse.of(tools, choice, True, AUTO)  # type: ignore[arg-type]
    assert refused.value.param == param


def test_reading_auto_output() -> None:
    result = ToolUse.of(TOOLS, "auto", True, AUTO).read(TWO_CALLS, "stop")
    assert result.content == "Checking." and result.finish_reason == "tool_calls"
    assert [(c.name, json.loads(c.arguments)) for c in result.tool_calls] == [("get_weather", {"city": "Oslo"}),
                                                                            ("get_time", {})]
    one = ToolUse.of(TOOLS, "auto", False, AUTO).read(TWO_CALLS, "stop")
    assert [c.name for c in one.tool_calls] == ["get_weather"]
    text = ToolUse.of(TOOLS, "auto", True, AUTO).read("It is sunny.", "stop")
    assert (text.content, text.tool_calls, text.finish_reason) == ("It is sunny.", [], "stop")
    assert ToolUse.of(TOOLS, "auto", True, AUTO).read(TWO_CALLS, "length").finish_reason == "length"
    plain = ToolUse.of(TOOLS, "none", True, AUTO).read(TWO_CALLS, "stop")
    assert (plain.content, plain.tool_calls) == (TWO_CALLS, [])


def test_reading_forced_output() -> None:
    named = ToolUse.of(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, True, AUTO)
    result = named.read('{"city": "Lima"}', "stop")
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("get_weather", '{"city": "Lima"}')]
    assert result.content is None and result.finish_reason == "stop"  # OpenAI's and vLLM's for a named function
    required = ToolUse.of(TOOLS, "required", True, ToolSettings()).read(
        '[{"name": "get_time", "arguments": {}}]', "stop")
    assert [c.name for c in required.tool_calls] == ["get_time"] and required.finish_reason == "tool_calls"


def test_streamed_choice() -> None:
    deltas = ToolUse.of(TOOLS, "auto", False, AUTO).stream()
    assert deltas is not None
    sent, reasons = [], []
    for i in range(0, len(TWO_CALLS), 7):
        delta, reason = deltas.feed(TWO_CALLS[i:i + 7], None)
        sent += delta.tool_calls
        reasons.append(reason)
    delta, reason = deltas.feed("", "stop")
    sent += delta.tool_calls
    assert {d.index for d in sent} == {0} and set(reasons) == {None} and reason == "tool_calls"
    assert "".join(d.arguments for d in sent) == '{"city": "Oslo"}'
    assert ToolUse.of(TOOLS, "none", True, AUTO).stream() is None
