"""Tool-call parsers (hermes, mistral) on samples written from the formats' published descriptions, whole and
streamed in random chunkings; the bundled tool chat templates, and the choice between them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jsonschema
import pytest
import torch
import xgrammar as xgr
from openai.types.chat.chat_completion_chunk import ChoiceDeltaToolCall
from transformers import AutoTokenizer

from localmoe.server.chat_template import PARSER_TEMPLATES, TEMPLATES_DIR, ChatTemplates, load_chat_template
from localmoe.server.tool_parsers import TOOL_PARSERS, StreamDelta, ToolParser, get_tool_parser
from localmoe.server.tool_parsers.forced import NamedToolCall, RequiredToolCalls, parameters, required_schema

BUILTIN = Path(__file__).resolve().parent.parent / "localmoe" / "data" / "localmoe-builtin"

Calls = list[tuple[str, str]]

# Qwen2.5's function-calling guide: two calls, name first, one per <tool_call> block, newline between.
QWEN_TWO_CALLS = (
    '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_temperature_date", "arguments": {"location": "San Francisco, CA, '
    'USA", "date": "2024-10-01"}}\n</tool_call>')
# Hermes 2 Pro's prompt asks for the arguments first.
HERMES_ARGS_FIRST = '<tool_call>\n{"arguments": {"symbol": "TSLA"}, "name": "get_stock_fundamentals"}\n</tool_call>'

HERMES_VALID: list[tuple[str, str | None, Calls]] = [
    (QWEN_TWO_CALLS, None, [("get_current_temperature", '{"location": "San Francisco, CA, USA"}'),
                            ("get_temperature_date", '{"location": "San Francisco, CA, USA", "date": "2024-10-01"}')]),
    (HERMES_ARGS_FIRST, None, [("get_stock_fundamentals", '{"symbol": "TSLA"}')]),
    ("Let me look that up.\n\n" + HERMES_ARGS_FIRST, "Let me look that up.",
     [("get_stock_fundamentals", '{"symbol": "TSLA"}')]),
    # generation stopped before the closing tag: the JSON is complete, so the call counts
    ('<tool_call>\n{"name": "get_time", "arguments": {}}\n', None, [("get_time", "{}")]),
    ('<tool_call>{"name": "get_time"}</tool_call>', None, [("get_time", "{}")]),
    # strings may hold braces, quotes and the closing tag itself
    ('<tool_call>{"name": "run", "arguments": {"code": "print(\\"}</tool_call>\\") # {["}}</tool_call>', None,
     [("run", '{"code": "print(\\"}</tool_call>\\") # {["}')]),
    ('<tool_call>{"name": "translate", "arguments": {"text": "naïve café ☕", "to": ["de", "ja"], "n": -1.5e3, '
     '"deep": {"a": [true, false, null]}}}</tool_call>\nDone.', "Done.",
     [("translate", '{"text": "naïve café ☕", "to": ["de", "ja"], "n": -1.5e3, "deep": {"a": [true, false, null]}}')]),
    ("No tools needed: 3 < 4 and x<tool is not a tag.", "No tools needed: 3 < 4 and x<tool is not a tag.", []),
    ("", None, []),
]

# Text that is no call at all: all of it is content, exactly as written.
HERMES_MALFORMED = [
    '<tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call>',  # not JSON
    'Sure.\n<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>',  # no name
    '<tool_call>{"name": "", "arguments": {}}</tool_call>',  # empty name
    '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',  # arguments as text, not an object
    "<tool_call></tool_call>",
    "<tool_call>\n[1, 2]\n</tool_call>",
    "The tag is <tool_ca",  # a marker's beginning at the end
]

MISTRAL_VALID: list[tuple[str, str | None, Calls]] = [
    # mistral-common's tokenizer v3 (Mixtral 8x22B): one JSON list after [TOOL_CALLS]
    ('[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": "Paris, France", "format": '
     '"celsius"}}]', None, [("get_current_weather", '{"location": "Paris, France", "format": "celsius"}')]),
    ('[TOOL_CALLS][{"name": "a", "arguments": {"x": [1, {"y": "]"}]}}, {"name": "b", "arguments": {}, '
     '"id": "VvvODy9mT"}]', None, [("a", '{"x": [1, {"y": "]"}]}'), ("b", "{}")]),
    ('I will check both.[TOOL_CALLS] {"name": "get_current_weather", "arguments": {"location": "Tokyo"}}',
     "I will check both.", [("get_current_weather", '{"location": "Tokyo"}')]),
    # tokenizer v11 and later: name, [ARGS], arguments; v11 may carry [CALL_ID]
    ('[TOOL_CALLS]get_current_weather[ARGS]{"location": "Paris, France", "format": "celsius"}', None,
     [("get_current_weather", '{"location": "Paris, France", "format": "celsius"}')]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[CALL_ID]VvvODy9mT[ARGS]{}', None,
     [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]),
    ("Plain [answer] with [TOOL brackets.", "Plain [answer] with [TOOL brackets.", []),
]

MISTRAL_MALFORMED = [
    "[TOOL_CALLS] []",
    "[TOOL_CALLS] I cannot call a tool here.",
    '[TOOL_CALLS]get weather[ARGS]{"city": "Paris"}',  # a space in the name
    '[TOOL_CALLS]get_weather[ARGS]"Paris"',  # arguments not an object
    '[TOOL_CALLS]get_weather{"city": "Paris"}',  # no [ARGS]
]

# Text that breaks only after a call's name could be streamed: whole, it is content; streamed, it is not
# (a sent name cannot be taken back), and the stream must still never fail.
BREAKS_LATE = [
    ("hermes", 'Calling <tool_call>{"name": "get_weather", "arguments": {"city": "Par'),  # cut off
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1}} and more</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": [1}}</tool_call>'),
    ("mistral", '[TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}}, oops]'),
    ("mistral", 'Let me see [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": '),  # cut off
]

SAMPLES = [("hermes", text, content, calls) for text, content, calls in HERMES_VALID] + [
    ("mistral", text, content, calls) for text, content, calls in MISTRAL_VALID]
BROKEN = [("hermes", text) for text in HERMES_MALFORMED] + [("mistral", text) for text in MISTRAL_MALFORMED]
BROKEN_EARLY = list(BROKEN)
BROKEN += BREAKS_LATE


def _names_and_arguments(parser: ToolParser, text: str) -> tuple[str | None, Calls]:
    result = parser.extract(text)
    return result.content, [(c.name, c.arguments) for c in result.tool_calls]


def _chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def _reassemble(deltas: list[StreamDelta]) -> tuple[str | None, Calls, list[str]]:
    """What an OpenAI client makes of the deltas: content joined, each call's arguments joined by index; every
    entry must parse as the openai library's own delta type."""
    content, names, arguments, ids = "", {}, {}, {}
    for delta in deltas:
        content += delta.content
        for entry in delta.tool_calls:
            call = ChoiceDeltaToolCall.model_validate(entry.openai())
            assert call.function is not None
            if call.index not in names:
                assert call.id and call.type == "function" and call.function.name, "a call opens with id and name"
                names[call.index], arguments[call.index], ids[call.index] = call.function.name, "", call.id
            else:
                assert call.id is None and call.function.name is None, "id and name come once"
            arguments[call.index] += call.function.arguments or ""
    assert sorted(names) == list(range(len(names)))
    return content or None, [(names[i], arguments[i]) for i in sorted(names)], [ids[i] for i in sorted(ids)]


def _stream(parser: ToolParser, chunks: list[str]) -> list[StreamDelta]:
    stream = parser.stream()
    return [stream.feed(chunk) for chunk in chunks] + [stream.feed("", final=True)]


@pytest.mark.parametrize("name,text,content,calls", SAMPLES)
def test_whole_text(name: str, text: str, content: str | None, calls: Calls) -> None:
    parser = get_tool_parser(name)
    assert _names_and_arguments(parser, text) == (content, calls)
    for _, arguments in calls:
        assert isinstance(json.loads(arguments), dict)


@pytest.mark.parametrize("name,text", BROKEN)
def test_malformed_is_content(name: str, text: str) -> None:
    assert _names_and_arguments(get_tool_parser(name), text) == (text, [])


def _chunkings(text: str) -> list[list[str]]:
    rng = random.Random(text)
    return [[text], list(text)] + [_chunks(text, rng) for _ in range(20)]


@pytest.mark.parametrize("name,text", [(n, t) for n, t, _, _ in SAMPLES] + BROKEN_EARLY)
def test_streams_reassemble_to_the_whole_text_result(name: str, text: str) -> None:
    parser = get_tool_parser(name)
    expected = _names_and_arguments(parser, text)
    for chunks in _chunkings(text):
        content, calls, ids = _reassemble(_stream(parser, chunks))
        assert (content, calls) == expected, chunks
        assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("name,text", BREAKS_LATE)
def test_a_call_that_breaks_late_keeps_what_was_streamed(name: str, text: str) -> None:
    """Where the break arrives after the call was sent: what came before the call is content, the call keeps
    its name and the arguments it had, and the text from where the call broke is content again. Where it
    arrives with the call's start, the whole text is content, as when read at once."""
    parser = get_tool_parser(name)
    assert _names_and_arguments(parser, text) == (text, [])
    before = text[:text.index(parser.markers[0])].rstrip()
    late = 0
    for chunks in _chunkings(text):
        content, calls, _ = _reassemble(_stream(parser, chunks))
        if not calls:
            assert content == text, chunks
            continue
        late += 1
        assert all(name in text and arguments in text for name, arguments in calls)
        content = content or ""
        assert content.startswith(before) and text.endswith(content[len(before):]), chunks
    assert late > 0


def test_arguments_stream_as_they_are_generated() -> None:
    arguments = json.dumps({"query": "mixture of experts " * 10, "limit": 5})
    text = f'<tool_call>\n{{"name": "search", "arguments": {arguments}}}\n</tool_call>'
    stream = get_tool_parser("hermes").stream()
    sent, name_seen_at = [], None
    for i, char in enumerate(text):
        for entry in stream.feed(char).tool_calls:
            if entry.name is not None:
                name_seen_at = i
            if entry.arguments:
                sent.append(entry.arguments)
    assert name_seen_at == text.index('{"query"')  # with the arguments' first character
    assert len(sent) > 50 and "".join(sent) == arguments


def test_text_that_may_open_a_call_is_held_back_until_it_cannot() -> None:
    stream = get_tool_parser("hermes").stream()
    assert stream.feed("Hello <tool_").content == "Hello"
    assert stream.feed("box> is not a call").content == " <tool_box> is not a call"
    stream = get_tool_parser("mistral").stream()
    assert stream.feed("Answer: \n[TOOL").content == "Answer:"
    delta = stream.feed('_CALLS]f[ARGS]{"a": 1}')
    assert delta.content == "" and [(d.name, d.arguments) for d in delta.tool_calls] == [("f", '{"a": 1}')]


def test_ids() -> None:
    mistral = get_tool_parser("mistral").extract('[TOOL_CALLS] [{"name": "a", "arguments": {}}, '
                                                 '{"name": "b", "arguments": {}}]').tool_calls
    assert all(len(c.id) == 9 and c.id.isalnum() for c in mistral) and mistral[0].id != mistral[1].id
    hermes = get_tool_parser("hermes").extract(QWEN_TWO_CALLS).tool_calls
    assert all(c.id.startswith("call_") for c in hermes) and hermes[0].id != hermes[1].id


def test_parser_names_are_vllms() -> None:
    assert set(TOOL_PARSERS) == {"hermes", "mistral"} == set(PARSER_TEMPLATES)
    with pytest.raises(ValueError, match="hermes, mistral"):
        get_tool_parser("llama3_json")


# ---- chat templates -----------------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
                   "required": ["city"]}}}]
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call_0123456789", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_0123456789", "name": "get_weather", "content": "22 C"},
    {"role": "assistant", "content": "It is 22 C in Paris."},
    {"role": "user", "content": "And in London?"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(BUILTIN)


@pytest.mark.parametrize("parser_name", sorted(PARSER_TEMPLATES))
def test_tool_template_renders_tools_and_calls_the_parser_reads_back(tokenizer, parser_name: str) -> None:
    """The built-in model's template ignores tools, so requests with tools get the parser's published
    template: the tools are in the prompt, and the earlier call is written the way the parser reads it."""
    assert "tools" not in tokenizer.chat_template
    templates = ChatTemplates.choose(tokenizer.chat_template, None, parser_name)
    prompt = templates.render(tokenizer, CONVERSATION, TOOLS, add_generation_prompt=True)
    assert "Get the current weather in a city" in prompt and "And in London?" in prompt
    calls = get_tool_parser(parser_name).extract(prompt).tool_calls
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    plain = templates.render(tokenizer, CONVERSATION[:1], None, add_generation_prompt=True)
    assert plain == tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)


def test_chat_template_choice() -> None:
    own_with_tools = "{% for m in messages %}{{ m.content }}{% endfor %}{{ tools | tojson }}"
    assert ChatTemplates.choose(own_with_tools, None, "hermes") == ChatTemplates(None, None)
    assert ChatTemplates.choose("{{ messages }}", None, None) == ChatTemplates(None, None)
    hermes = (TEMPLATES_DIR / "tool_chat_template_hermes.jinja").read_text()
    # vLLM's command line names the template under its examples/ folder; ours is found by its file name
    assert ChatTemplates.choose(own_with_tools, "examples/tool_chat_template_hermes.jinja", None) == ChatTemplates(
        hermes, hermes)
    assert load_chat_template(own_with_tools) == own_with_tools
    with pytest.raises(ValueError, match="tool_chat_template_mistral.jinja"):
        load_chat_template("no_such_template.jinja")


def test_bundled_templates_say_where_they_come_from() -> None:
    for path in TEMPLATES_DIR.glob("*.jinja"):
        head = path.read_text().split("-#}")[0]
        assert "vllm-project/vllm" in head and "Apache-2.0" in head


# ---- tool_choice "required" and a named function: outputs constrained by a JSON schema ------------------------

FORCED_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["unit"]}}},
    {"type": "function", "function": {"name": "now"}},
]


def _constrained_outputs(tokenizer, schema: dict, count: int) -> list[str]:
    """What a model sampling at random under the schema's token masks writes (xgrammar, as structured output
    constrains it), without extra whitespace so random sampling ends."""
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    grammar = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(schema), any_whitespace=False)
    generator = torch.Generator().manual_seed(0)
    texts = []
    for _ in range(count):
        matcher, mask, ids = xgr.GrammarMatcher(grammar), xgr.allocate_token_bitmask(1, info.vocab_size), []
        while not matcher.is_terminated():
            assert len(ids) < 400
            matcher.fill_next_token_bitmask(mask)
            logits = torch.randn(1, info.vocab_size, generator=generator)
            xgr.apply_token_bitmask_inplace(logits, mask)
            ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)))
            assert matcher.accept_token(ids[-1])
        texts.append(tokenizer.decode([i for i in ids if i not in info.stop_token_ids]))
    return texts


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_choice_output_always_parses(tokenizer, parallel: bool) -> None:
    schema = required_schema(FORCED_TOOLS, parallel_tool_calls=parallel)
    by_name = {tool["function"]["name"]: parameters(tool) for tool in FORCED_TOOLS}
    counts = set()
    for text in _constrained_outputs(tokenizer, schema, 12):
        result = RequiredToolCalls().extract(text)
        assert result.content is None and result.tool_calls
        counts.add(len(result.tool_calls))
        for call in result.tool_calls:
            jsonschema.validate(json.loads(call.arguments), by_name[call.name])
        for chunks in _chunkings(text)[:5]:
            assert _reassemble(_stream(RequiredToolCalls(), chunks))[:2] == _names_and_arguments(
                RequiredToolCalls(), text)
    if parallel:
        assert max(counts) > 1
    else:
        assert counts == {1}


def test_required_schema_refuses_what_is_no_call() -> None:
    schema = required_schema(FORCED_TOOLS, parallel_tool_calls=False)
    for bad in ([], [{"name": "now", "arguments": {}}] * 2, [{"name": "other", "arguments": {}}],
                [{"name": "get_weather", "arguments": {"unit": "kelvin"}}], [{"name": "now"}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_named_tool_choice_output_is_the_arguments(tokenizer) -> None:
    weather = FORCED_TOOLS[0]
    for text in _constrained_outputs(tokenizer, parameters(weather), 6):
        [call] = NamedToolCall("get_weather").extract(text).tool_calls
        assert call.name == "get_weather" and call.arguments == text
        jsonschema.validate(json.loads(call.arguments), parameters(weather))
        for chunks in _chunkings(text)[:5]:
            assert _reassemble(_stream(NamedToolCall("get_weather"), chunks))[1] == [("get_weather", text)]
    cut_off = NamedToolCall("now").extract('{"a": ')  # max_tokens reached inside the arguments
    assert (cut_off.content, cut_off.tool_calls) == ('{"a": ', [])
