"""Mistral's tool calls (vLLM's `mistral` parser), as mistral-common's instruct tokenizers write them.

Tokenizers v2 to v7 (Mistral 7B v0.3, Mixtral 8x22B, Nemo, Large 2407) write the special token
`[TOOL_CALLS]` and then every call in one JSON list:

    [TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": "Paris"}}]

From v11 on (Mistral Small 3.2, Magistral, Devstral) each call is its own `[TOOL_CALLS]`, the name as plain
text, then `[ARGS]` and the arguments' JSON; v11 may put `[CALL_ID]` and an id between name and `[ARGS]`:

    [TOOL_CALLS]get_current_weather[ARGS]{"location": "Paris"}[TOOL_CALLS]get_time[ARGS]{}

`[TOOL_CALLS]` is a special token: the text must be decoded with special tokens kept. A bare object after
the marker (some v3 models leave out the list) is read as a one-call list. Ids the model writes are
ignored; the server names each call itself, with the nine alphanumerics Mistral's validator requires.
"""

from __future__ import annotations

import random
import re
import string

from localmoe.server.tool_parsers.base import Section, ToolParser, call_list, named_call, object_call
from localmoe.server.tool_parsers.json_scan import JsonReader, Malformed

ARGS, CALL_ID = "[ARGS]", "[CALL_ID]"
_NAME = re.compile(r"[A-Za-z0-9_.\-]*")
_ID_CHARS = string.ascii_letters + string.digits


class MistralToolParser(ToolParser):
    markers = ("[TOOL_CALLS]",)

    def new_id(self) -> str:
        return "".join(random.choices(_ID_CHARS, k=9))

    def scan(self, reader: JsonReader, start: int, final: bool) -> Section:
        text = reader.text
        i = reader.skip_ws(start)
        if i == len(text):
            return Section([], None)
        if text[i] == "[":
            return call_list(reader, i)
        if text[i] == "{":
            call, end = object_call(reader, i)
            return Section([call], end)
        return _named_call(reader, i)


def _named_call(reader: JsonReader, i: int) -> Section:
    """`name[ARGS]{...}` or `name[CALL_ID]id[ARGS]{...}` at text[i] (tokenizer v11 and later)."""
    text = reader.text
    j = _NAME.match(text, i).end()  # type: ignore[union-attr]  # the pattern matches the empty string
    if text.startswith(ARGS, j):
        args = j + len(ARGS)
    elif text.startswith(CALL_ID, j):
        k = text.find(ARGS, j + len(CALL_ID))
        if k < 0:
            return Section([], None)
        args = k + len(ARGS)
    elif ARGS.startswith(text[j:]) or CALL_ID.startswith(text[j:]):  # a tag still being written
        return Section([], None)
    else:
        raise Malformed(j)
    if j == i:
        raise Malformed(i)
    return named_call(reader, args, text[i:j])
