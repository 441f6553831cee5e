"""Where JSON that a model is still writing ends, before it is complete.

A tool call is streamed while its JSON grows, so the parsers need to know how far each value reaches and
whether the text can still become valid; json.loads answers only for complete text. The reader tracks
strings and bracket nesting, and hands every complete value to json.loads, which has the last word.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

WHITESPACE = " \t\n\r"
_CLOSERS = {"{": "}", "[": "]"}
_SCALAR_CHARS = frozenset("0123456789+-.eEtrufalsn")
_STRING_BODY = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)
_PLAIN = re.compile(r'[^"{}\[\]]*')


class Malformed(Exception):
    """The text cannot be (the start of) what was expected; `at` is where it went wrong."""

    def __init__(self, at: int) -> None:
        super().__init__(f"malformed at {at}")
        self.at = at


@dataclass
class Member:
    """One `"key": value` of an object: the value's text is text[start:end] (end None: not complete yet)."""

    key: str
    start: int
    end: int | None


@dataclass
class ObjectScan:
    members: list[Member]
    end: int | None  # just past the closing brace; None while the object is open


class JsonReader:
    """JSON in a text that only grows (a generation being streamed). Each delta has the open call read again,
    so the reader remembers how far it got into every string and container still open: reading again costs
    only the new text."""

    def __init__(self) -> None:
        self.text = ""
        self._strings: dict[int, int] = {}  # open string's start -> where its body was read to
        self._containers: dict[int, tuple[int, list[str]]] = {}  # open container's start -> (read to, closers)

    def skip_ws(self, i: int) -> int:
        text = self.text
        while i < len(text) and text[i] in WHITESPACE:
            i += 1
        return i

    def load(self, start: int, end: int) -> Any:
        try:
            return json.loads(self.text[start:end])
        except ValueError:
            raise Malformed(start) from None

    def value_end(self, i: int) -> int | None:
        """The index just past the JSON value that starts at text[i], or None while the text ends inside it."""
        text = self.text
        if i >= len(text):
            return None
        first = text[i]
        if first in _CLOSERS:
            end = self._container_end(i)
        elif first == '"':
            end = self._string_end(i)
        elif first in _SCALAR_CHARS:
            end = i
            while end < len(text) and text[end] in _SCALAR_CHARS:
                end += 1
            if end == len(text):  # a number may go on
                return None
        else:
            raise Malformed(i)
        if end is not None:
            self.load(i, end)
        return end

    def _string_end(self, i: int) -> int | None:
        j = _STRING_BODY.match(self.text, self._strings.get(i, i + 1)).end()  # type: ignore[union-attr]
        if j < len(self.text) and self.text[j] == '"':
            return j + 1
        self._strings[i] = j
        return None

    def _container_end(self, i: int) -> int | None:
        text = self.text
        j, expected = self._containers.get(i, (i + 1, [_CLOSERS[text[i]]]))
        expected = list(expected)
        while (j := _PLAIN.match(text, j).end()) < len(text):  # type: ignore[union-attr]
            c = text[j]
            if c == '"':
                end = self._string_end(j)
                if end is None:
                    break
                j = end
                continue
            if c in _CLOSERS:
                expected.append(_CLOSERS[c])
            elif c != expected.pop():
                raise Malformed(j)
            elif not expected:
                return j + 1
            j += 1
        self._containers[i] = (j, expected)
        return None

    def scan_object(self, i: int) -> ObjectScan:
        """The members of the object that starts at text[i], as far as the text goes."""
        text = self.text
        if text[i] != "{":
            raise Malformed(i)
        members: list[Member] = []
        j = self.skip_ws(i + 1)
        if j < len(text) and text[j] == "}":
            return ObjectScan(members, j + 1)
        while j < len(text):
            if text[j] != '"':
                raise Malformed(j)
            key_end = self.value_end(j)
            if key_end is None:
                break
            key = json.loads(text[j:key_end])
            j = self.skip_ws(key_end)
            if j == len(text):
                break
            if text[j] != ":":
                raise Malformed(j)
            j = self.skip_ws(j + 1)
            if j == len(text):
                break
            end = self.value_end(j)
            members.append(Member(key, j, end))
            if end is None:
                break
            j = self.skip_ws(end)
            if j == len(text):
                break
            if text[j] == "}":
                return ObjectScan(members, j + 1)
            if text[j] != ",":
                raise Malformed(j)
            j = self.skip_ws(j + 1)
        return ObjectScan(members, None)
