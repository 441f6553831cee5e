"""Tool calls the request forces: `tool_choice: "required"` or a named function.

These outputs are constrained by structured output to a JSON schema built from the request's tools, so they
always parse, whatever the model's own tool-call format: a named function's output is its arguments object,
and `required`'s is a non-empty list of {"name", "arguments"} (one call at most without parallel tool calls).
Both read through the same stream as the families' formats, with the whole text as the one section.
"""

from __future__ import annotations

from typing import Any

from localmoe.server.tool_parsers.base import Section, ToolParser, call_list, named_call
from localmoe.server.tool_parsers.json_scan import JsonReader

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def parameters(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool's arguments schema (OpenAI's tool shape); a function without parameters takes an empty object."""
    return tool["function"].get("parameters") or EMPTY_PARAMETERS


def required_schema(tools: list[dict[str, Any]], parallel_tool_calls: bool = True) -> dict[str, Any]:
    calls = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [tool["function"]["name"]]},
                             "arguments": parameters(tool)},
              "required": ["name", "arguments"]} for tool in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


class RequiredToolCalls(ToolParser):
    """Reads the output of `required_schema`."""

    markers = ()

    def scan(self, reader: JsonReader, start: int, final: bool) -> Section:
        i = reader.skip_ws(start)
        return Section([], None) if i == len(reader.text) else call_list(reader, i)


class NamedToolCall(ToolParser):
    """Reads a named function's output: its arguments, constrained to the function's parameters schema."""

    markers = ()

    def __init__(self, name: str) -> None:
        self.name = name

    def scan(self, reader: JsonReader, start: int, final: bool) -> Section:
        return named_call(reader, start, self.name)
