"""Hermes 2 Pro's tool calls, which Qwen2.5 and later Qwen models write too (vLLM's `hermes` parser).

Each call is a JSON object with the function's name and its arguments, between XML-like tags:

    <tool_call>
    {"name": "get_current_temperature", "arguments": {"location": "Paris"}}
    </tool_call>

Hermes' own prompt asks for the arguments first, Qwen's for the name first; both are read. Several calls
follow one another, and text may come before them. A last call whose closing tag never came (generation
stopped on it, or on the end-of-turn token) counts if its JSON is complete.
"""

from __future__ import annotations

from localmoe.server.tool_parsers.base import Section, ToolParser, object_call
from localmoe.server.tool_parsers.json_scan import JsonReader, Malformed

CLOSE = "</tool_call>"


class HermesToolParser(ToolParser):
    markers = ("<tool_call>",)

    def scan(self, reader: JsonReader, start: int, final: bool) -> Section:
        text = reader.text
        i = reader.skip_ws(start)
        if i == len(text):
            return Section([], None)
        call, end = object_call(reader, i)
        if end is None:
            return Section([call], None)
        j = reader.skip_ws(end)
        if text.startswith(CLOSE, j):
            return Section([call], j + len(CLOSE))
        if CLOSE.startswith(text[j:]):
            return Section([call], len(text) if final else None)
        raise Malformed(j)
