"""Tool calling end to end: a real `localmoe serve --enable-auto-tool-choice --tool-call-parser hermes` of a random
model, and the official openai client, streamed and not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from server_process import API_KEY, SMALL_KV, serve

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city over the next days",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
TOOLS = [WEATHER, TIME]
PARAMETERS = {"get_weather": WEATHER["function"]["parameters"], "get_time": {"type": "object", "properties": {}}}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris this week?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
# the random model cannot call tools by itself: a regex has it write a call in Hermes' format, which "auto" reads
HERMES_CALL = r'Sure\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Oslo)", "days": [1-7]\}\}</tool_call>'


@pytest.fixture(scope="module")
def client(tiny_mixtral_dir: Path, tmp_path_factory) -> Iterator[openai.OpenAI]:
    with serve(tmp_path_factory.mktemp("tools"), "--model", str(tiny_mixtral_dir), "--dtype", "float32", *SMALL_KV,
               "--enable-auto-tool-choice", "--tool-call-parser", "hermes") as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=2)


def _create(client: openai.OpenAI, **kwargs):
    kwargs.setdefault("max_tokens", 300)
    return client.chat.completions.create(model=client.models.list().data[0].id, messages=MESSAGES, tools=TOOLS,
                                          **kwargs)


def _streamed(client: openai.OpenAI, **kwargs) -> tuple[str | None, list[tuple[str, str]], str | None]:
    """Content, calls (name, arguments) and finish reason, put together from the chunks as a client does."""
    content, calls, finish = "", {}, None
    for chunk in _create(client, stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                if delta.id is not None:
                    assert delta.index not in calls and delta.type == "function" and delta.function.name
                    calls[delta.index] = [delta.function.name, ""]
                calls[delta.index][1] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    return content or None, [tuple(calls[i]) for i in sorted(calls)], finish


def _calls(message) -> list[tuple[str, str]]:
    return [(call.function.name, call.function.arguments) for call in message.tool_calls or []]


def _valid(calls: list[tuple[str, str]]) -> None:
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), PARAMETERS[name])


@pytest.mark.parametrize("parallel", [True, False])
def test_required_returns_valid_tool_calls(client: openai.OpenAI, parallel: bool) -> None:
    for seed in range(2):
        choice = _create(client, tool_choice="required", parallel_tool_calls=parallel, temperature=1.0,
                         seed=seed).choices[0]
        calls = _calls(choice.message)
        assert calls and choice.finish_reason == "tool_calls" and choice.message.content is None
        assert all(call.id and call.type == "function" for call in choice.message.tool_calls)
        assert parallel or len(calls) == 1
        _valid(calls)


def test_named_function_returns_its_call(client: openai.OpenAI) -> None:
    for seed in range(2):
        choice = _create(client, tool_choice=NAMED, temperature=1.0, seed=seed).choices[0]
        [(name, arguments)] = _calls(choice.message)
        assert name == "get_weather" and choice.finish_reason == "stop"
        _valid([(name, arguments)])


@pytest.mark.parametrize("tool_choice", ["required", NAMED, "auto"])
def test_streamed_calls_reassemble_to_the_response(client: openai.OpenAI, tool_choice) -> None:
    extra = {"extra_body": {"structured_outputs": {"regex": HERMES_CALL}}} if tool_choice == "auto" else {}
    whole = _create(client, tool_choice=tool_choice, temperature=0, **extra).choices[0]
    content, calls, finish = _streamed(client, tool_choice=tool_choice, temperature=0, **extra)
    assert calls and calls == _calls(whole.message) and finish == whole.finish_reason
    assert content == whole.message.content
    _valid(calls)


def test_auto_reads_the_models_tool_call_format(client: openai.OpenAI) -> None:
    choice = _create(client, tool_choice="auto", temperature=1.0, seed=3,
                     extra_body={"structured_outputs": {"regex": HERMES_CALL}}).choices[0]
    assert choice.message.content == "Sure." and choice.finish_reason == "tool_calls"
    [(name, arguments)] = _calls(choice.message)
    assert name == "get_weather" and json.loads(arguments)["city"] in ("Paris", "Oslo")


def test_auto_with_the_mistral_parser(tiny_mixtral_dir: Path, tmp_path_factory) -> None:
    """The model's text in Mistral's v3 format ([TOOL_CALLS] and a JSON list), read by --tool-call-parser mistral,
    whose calls get the nine-character ids Mistral's template requires."""
    regex = r'\[TOOL_CALLS\] \[\{"name": "get_weather", "arguments": \{"city": "Lima", "days": [1-7]\}\}\]'
    with serve(tmp_path_factory.mktemp("mistral"), "--model", str(tiny_mixtral_dir), "--dtype", "float32", *SMALL_KV,
               "--enable-auto-tool-choice", "--tool-call-parser", "mistral") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=2)
        extra = {"extra_body": {"structured_outputs": {"regex": regex}}}
        choice = _create(client, temperature=0, **extra).choices[0]
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "Lima"
        assert len(call.id) == 9 and call.id.isalnum() and choice.finish_reason == "tool_calls"
        assert _streamed(client, temperature=0, **extra) == (None, _calls(choice.message), "tool_calls")


def test_tool_choice_none_answers_in_text(client: openai.OpenAI) -> None:
    choice = _create(client, tool_choice="none", max_tokens=8).choices[0]
    assert not choice.message.tool_calls and choice.message.content is not None


def test_refusals(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="get_news"):
        _create(client, tool_choice={"type": "function", "function": {"name": "get_news"}})
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model=client.models.list().data[0].id, messages=MESSAGES,
                                       tool_choice="required")
