"""The tool-call parser interface, and the stream that turns generated text into OpenAI's deltas.

A parser knows one family's syntax: the markers that open a tool-call section and how to read a section
(`scan`). The stream does the rest for every family: content until a marker, then each call's name once it
is complete and its arguments as they grow. Whole-text extraction is the same stream fed everything at
once, so a response and its streamed deltas agree by construction. Text that cannot be read as a call is
content, never an error.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from localmoe.server.tool_parsers.json_scan import WHITESPACE, JsonReader, Malformed


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text


@dataclass(frozen=True)
class ExtractedToolCalls:
    content: str | None  # the text outside the calls; None when there is none
    tool_calls: list[ToolCall]


@dataclass
class ToolCallDelta:
    """One entry of a chunk's `delta.tool_calls`: the first for a call carries its id and name."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def openai(self) -> dict[str, Any]:
        function = {"arguments": self.arguments} if self.name is None else {"name": self.name,
                                                                             "arguments": self.arguments}
        head: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            head.update(id=self.id, type="function")
        return {**head, "function": function}


@dataclass
class StreamDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass
class PartialCall:
    name: str | None  # None until the name is complete
    arguments: str  # the arguments' text so far; only ever grows


@dataclass
class Section:
    """The calls read from one section, and where it ends (None while it may go on)."""

    calls: list[PartialCall]
    end: int | None


class ToolParser:
    """One family's tool-call syntax; it keeps no state, so one instance serves every request."""

    markers: ClassVar[tuple[str, ...]]  # none: the whole text is one section

    def scan(self, reader: JsonReader, start: int, final: bool) -> Section:
        """The section whose marker ends at `start`; raises Malformed where it cannot be a call. `final`: the
        text is all there will be."""
        raise NotImplementedError

    def new_id(self) -> str:
        return f"call_{uuid.uuid4().hex[:24]}"

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)

    def extract(self, text: str) -> ExtractedToolCalls:
        delta = self.stream().feed(text, final=True)
        calls = []
        for d in delta.tool_calls:
            assert d.id is not None and d.name is not None  # fed at once, every call comes whole
            calls.append(ToolCall(d.id, d.name, d.arguments))
        return ExtractedToolCalls(delta.content or None, calls)


def object_call(reader: JsonReader, i: int) -> tuple[PartialCall, int | None]:
    """A call written as {"name": ..., "arguments": {...}} at text[i] (either key first), and its end."""
    text = reader.text
    scan = reader.scan_object(i)
    name, arguments = None, ""
    for member in scan.members:
        if member.key == "name" and member.end is not None:
            name = reader.load(member.start, member.end)
            if not isinstance(name, str) or not name:
                raise Malformed(member.start)
        elif member.key == "arguments":
            if text[member.start] != "{":
                raise Malformed(member.start)
            arguments = text[member.start:member.end]  # to the end of the text while it is open
    if scan.end is not None:
        if name is None:
            raise Malformed(i)
        arguments = arguments or "{}"
    return PartialCall(name, arguments), scan.end


def named_call(reader: JsonReader, start: int, name: str) -> Section:
    """A call whose name is already known, its arguments object at or after text[start]."""
    text = reader.text
    i = reader.skip_ws(start)
    if i == len(text):
        return Section([PartialCall(name, "")], None)
    if text[i] != "{":
        raise Malformed(i)
    end = reader.value_end(i)
    return Section([PartialCall(name, text[i:end])], end)


def call_list(reader: JsonReader, i: int) -> Section:
    """A JSON list of call objects at text[i]."""
    text = reader.text
    if text[i] != "[":
        raise Malformed(i)
    calls: list[PartialCall] = []
    j = reader.skip_ws(i + 1)
    while j < len(text):
        call, end = object_call(reader, j)
        calls.append(call)
        if end is None:
            break
        j = reader.skip_ws(end)
        if j == len(text):
            break
        if text[j] == "]":
            return Section(calls, j + 1)
        if text[j] != ",":
            raise Malformed(j)
        j = reader.skip_ws(j + 1)
    return Section(calls, None)


class ToolCallStream:
    """Text deltas in, OpenAI deltas out. Text is held back only while it may still belong to a call: the
    first characters of a marker, and whitespace before one (whitespace around a call frames it and is not
    content). A call whose text breaks after its name was sent stays as sent; everything else that breaks
    is content, exactly as whole-text extraction reads it."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.reader = JsonReader()
        self.pos = 0  # the text before it has been sent or dropped
        self.after_call = False
        # where the open section starts (just past its marker); a parser without markers reads one from the start
        self.section: int | None = None if parser.markers else 0
        self.framing = 0  # where the open section's framing starts (the whitespace before its marker)
        self.sent_args: list[int] = []  # per call of the open section that has been sent: argument chars sent
        self.calls_before = 0  # calls of earlier sections
        self.scanned = 0  # how much text the open section's last reading saw: what was sent came from it

    def feed(self, delta: str, final: bool = False) -> StreamDelta:
        """The deltas `delta` releases; `final`: the generation has ended, release everything."""
        self.reader.text += delta
        out = StreamDelta()
        while self._content(out, final) if self.section is None else self._calls(out, final):
            pass
        return out

    def _content(self, out: StreamDelta, final: bool) -> bool:
        text = self.reader.text
        if self.after_call:
            self.pos = self.reader.skip_ws(self.pos)
        found = [(k, m) for m in self.parser.markers if (k := text.find(m, self.pos)) >= 0]
        if found:
            k, marker = min(found)
            content = text[self.pos:k].rstrip(WHITESPACE)
            out.content += content
            self.framing = self.pos + len(content)
            self.section = self.pos = k + len(marker)
            self.sent_args = []
            return True
        end = len(text) if final else self._settled(self.pos)
        if end == self.pos:
            return False
        out.content += text[self.pos:end]
        self.pos, self.after_call = end, False
        return True

    def _settled(self, start: int) -> int:
        """The end of the text from `start` that can no longer turn into a marker or its framing."""
        text = self.reader.text
        held = max((n for m in self.parser.markers for n in range(1, len(m))
                    if n <= len(text) - start and text.endswith(m[:n])), default=0)
        return start + len(text[start:len(text) - held].rstrip(WHITESPACE))

    def _calls(self, out: StreamDelta, final: bool) -> bool:
        assert self.section is not None
        try:
            section = self.parser.scan(self.reader, self.section, final)
            if final and section.end is None:
                raise Malformed(len(self.reader.text))
        except Malformed as e:
            return self._broken(out, e.at)
        for i, call in enumerate(section.calls):
            if call.name is None or not call.arguments:  # sent once its arguments have begun as an object
                break
            if i == len(self.sent_args):
                self.sent_args.append(0)
                out.tool_calls.append(ToolCallDelta(self.calls_before + i, self.parser.new_id(), call.name))
            new = call.arguments[self.sent_args[i]:]
            if new:
                self.sent_args[i] = len(call.arguments)
                _delta_for(out, self.calls_before + i).arguments += new
        if section.end is None:
            self.scanned = len(self.reader.text)
            return False
        self._close(section.end, len(section.calls))
        self.after_call = True
        return True

    def _broken(self, out: StreamDelta, at: int) -> bool:
        """A section that cannot be read: if nothing of it was sent, its marker (and the framing before it) is
        content and reading goes on after the marker; else reading goes on where it broke, or past what the
        sent calls already took."""
        assert self.section is not None
        if self.sent_args:
            self._close(max(at, self.scanned), len(self.sent_args))
        else:
            out.content += self.reader.text[self.framing:self.section]
            self._close(self.section, 0)
        self.after_call = False
        return True

    def _close(self, end: int, calls: int) -> None:
        self.pos, self.section = end, None
        self.calls_before += calls
        self.sent_args = []


def _delta_for(out: StreamDelta, index: int) -> ToolCallDelta:
    for delta in out.tool_calls:
        if delta.index == index:
            return delta
    out.tool_calls.append(ToolCallDelta(index))
    return out.tool_calls[-1]
