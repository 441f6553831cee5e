"""Tool-call parsers under vLLM's `--tool-call-parser` names: generated text -> content and tool calls."""

from __future__ import annotations

from localmoe.server.tool_parsers.base import (
    ExtractedToolCalls, StreamDelta, ToolCall, ToolCallDelta, ToolCallStream, ToolParser,
)
from localmoe.server.tool_parsers.hermes import HermesToolParser
from localmoe.server.tool_parsers.mistral import MistralToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesToolParser, "mistral": MistralToolParser}


def get_tool_parser(name: str) -> ToolParser:
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; choose one of: {', '.join(TOOL_PARSERS)}") from None


__all__ = ["ExtractedToolCalls", "StreamDelta", "TOOL_PARSERS", "ToolCall", "ToolCallDelta", "ToolCallStream",
           "ToolParser", "get_tool_parser"]
