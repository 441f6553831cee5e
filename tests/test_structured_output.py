"""Structured output end to end: 30 JSON schemas of rising difficulty, regexes and choices, answered by the built-in
model and by a random one at temperature 0 and 1, all in one batch with unconstrained requests; then the HTTP
fields (OpenAI's response_format, vLLM's structured_outputs and guided_*) through the official client, streamed
and not, and the 400s.

Every value a schema allows is bounded (strings by maxLength, enum or pattern, numbers by minimum and maximum,
arrays by maxItems), so even a random model's answer completes within max_tokens: the answers must all end with
finish_reason "stop" and validate.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from transformers.convert_slow_tokenizer import bytes_to_unicode

from localmoe import LLM, SamplingParams
from localmoe.sampling_params import StructuredOutputsParams
from server_process import API_KEY, SMALL_KV, auth, serve

NAME = {"type": "string", "minLength": 1, "maxLength": 8}
AGE = {"type": "integer", "minimum": 0, "maximum": 130}
SCORE = {"type": "number", "minimum": -1.5, "maximum": 2.5}
COLOR = {"enum": ["red", "green", "blue"]}
PERSON = {"type": "object", "properties": {"name": NAME, "age": AGE}, "required": ["name", "age"]}

SCHEMAS: list[dict] = [
    {"type": "boolean"},
    {"type": "integer", "minimum": 0, "maximum": 9},
    AGE,
    SCORE,
    NAME,
    COLOR,
    {"enum": [1, "two", None, True]},
    {"const": "fixed"},
    {"type": "string", "pattern": "^[a-z]{2,6}-[0-9]{1,3}$"},
    {"type": "null"},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    PERSON,
    {"type": "object", "properties": {"name": NAME, "nickname": NAME}, "required": ["name"]},
    {"type": "object", "properties": {"a": AGE, "b": SCORE, "c": COLOR, "d": {"type": "boolean"}}},
    {"type": "array", "items": AGE, "minItems": 1, "maxItems": 3},
    {"type": "array", "items": COLOR, "minItems": 2, "maxItems": 2},
    {"type": "array", "items": NAME, "maxItems": 4},
    {"type": "array", "prefixItems": [NAME, AGE], "items": False},
    {"type": "object", "properties": {"owner": PERSON, "pets": {"type": "array", "items": NAME, "maxItems": 2}},
     "required": ["owner", "pets"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": COLOR, "minItems": 1, "maxItems": 3},
                                      "count": AGE}, "required": ["tags"]},
    {"anyOf": [AGE, NAME]},
    {"anyOf": [{"type": "null"}, PERSON]},
    {"type": "object", "properties": {"value": {"anyOf": [SCORE, COLOR, {"type": "boolean"}]}},
     "required": ["value"]},
    {"type": "array", "items": PERSON, "minItems": 1, "maxItems": 2},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 9}, "minItems": 1, "maxItems": 3}}},
     "required": ["matrix"]},
    {"type": "object", "properties": {"level1": {"type": "object", "properties": {"level2": {
        "type": "object", "properties": {"level3": COLOR}, "required": ["level3"]}}, "required": ["level2"]}},
     "required": ["level1"]},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"}, "score": SCORE,
                                      "extra": {"anyOf": [{"type": "null"}, AGE]}}, "required": ["id", "score"]},
    {"$defs": {"person": PERSON}, "type": "object",
     "properties": {"lead": {"$ref": "#/$defs/person"},
                    "team": {"type": "array", "items": {"$ref": "#/$defs/person"}, "maxItems": 2}},
     "required": ["lead"]},
    {"type": "object", "properties": {
        "event": {"enum": ["start", "stop"]},
        "at": {"type": "object", "properties": {"h": {"type": "integer", "minimum": 0, "maximum": 23},
                                                "m": {"type": "integer", "minimum": 0, "maximum": 59}},
               "required": ["h", "m"]},
        "notes": {"type": "array", "items": {"anyOf": [NAME, {"type": "null"}]}, "maxItems": 2}},
     "required": ["event", "at"]},
    {"type": "object", "properties": {
        "order": {"type": "object", "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 99999},
            "lines": {"type": "array", "minItems": 1, "maxItems": 2, "items": {"type": "object", "properties": {
                "sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
                "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                "price": {"type": "number", "minimum": 0, "maximum": 999}}, "required": ["sku", "qty"]}},
            "customer": {"anyOf": [PERSON, {"type": "null"}]},
            "status": {"enum": ["new", "paid", "shipped"]}}, "required": ["id", "lines", "status"]}},
     "required": ["order"]},
]
REGEX = r"[a-z]{2,8}@[a-z]{2,6}\.(com|org)"
CHOICES = ["positive", "negative", "neutral"]
MAX_TOKENS = 400  # far more than any bounded answer takes, whitespace included
PROMPT = "Answer in JSON:"


def constraints() -> list[tuple[StructuredOutputsParams, object]]:
    """(constraint, what checks an answer): the schemas, the regex and the choice."""
    return ([(StructuredOutputsParams(json=schema), schema) for schema in SCHEMAS]
            + [(StructuredOutputsParams(regex=REGEX), REGEX), (StructuredOutputsParams(choice=CHOICES), CHOICES)])


def check_answer(text: str, expected: object) -> None:
    if isinstance(expected, dict):
        jsonschema.validate(json.loads(text), expected)
    elif isinstance(expected, str):
        assert re.fullmatch(expected, text), text
    else:
        assert text in expected


FREE = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=1, seed=11, max_tokens=24, ignore_eos=True)]
FREE_PROMPTS = ["Once upon a time", "The quick brown fox"]


@pytest.fixture(scope="module", params=["builtin", "random"])
def llm(request, tiny_mixtral_dir: Path) -> LLM:
    model = None if request.param == "builtin" else str(tiny_mixtral_dir)
    return LLM(model=model, dtype="float32", kv_cache_memory=2**27, max_num_seqs=128)


def test_every_answer_validates_and_free_requests_are_unchanged(llm: LLM) -> None:
    free_prompts = [p for p in FREE_PROMPTS for _ in FREE]
    free_params = FREE * len(FREE_PROMPTS)
    alone = llm.generate(free_prompts, free_params)
    cases = [(constraint, expected, temperature) for temperature in (0, 1) for constraint, expected in constraints()]
    params = [SamplingParams(temperature=t, seed=i, max_tokens=MAX_TOKENS, structured_outputs=constraint)
              for i, (constraint, _, t) in enumerate(cases)]
    mixed = llm.generate(free_prompts + [PROMPT] * len(cases), free_params + params)
    assert [o.outputs[0].token_ids for o in mixed[:len(free_prompts)]] == [o.outputs[0].token_ids for o in alone]
    for output, (_, expected, temperature) in zip(mixed[len(free_prompts):], cases):
        answer = output.outputs[0]
        assert answer.finish_reason == "stop", (expected, temperature, answer.text)
        check_answer(answer.text, expected)
    assert llm.engine.structured.matchers == {}  # every finished sequence gave its matcher back


def test_an_answer_cut_by_max_tokens_finishes_with_length(llm: LLM) -> None:
    schema = SCHEMAS[-1]
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=5,
                                              structured_outputs=StructuredOutputsParams(json=schema)))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    assert llm.engine.structured.matchers == {}


def test_ignore_eos_still_ends_at_the_end_of_the_grammar(llm: LLM) -> None:
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, structured_outputs=(
        StructuredOutputsParams(choice=CHOICES))))[0].outputs[0]
    assert out.finish_reason == "stop" and out.text in CHOICES


def test_disable_any_whitespace_gives_json_dumps_spacing(llm: LLM) -> None:
    schema = SCHEMAS[18]
    out = llm.generate(PROMPT, SamplingParams(temperature=1, seed=3, max_tokens=MAX_TOKENS, structured_outputs=(
        StructuredOutputsParams(json=schema, disable_any_whitespace=True))))[0].outputs[0]
    assert out.text == json.dumps(json.loads(out.text), ensure_ascii=False)  # separators ", " and ": ", nothing more
    jsonschema.validate(json.loads(out.text), schema)


def test_json_strings_hold_only_what_json_allows(llm: LLM) -> None:
    """Pushed toward them (logit_bias +100), a string still never takes a control character, the bytes of a
    UTF-16 surrogate (they decode to three U+FFFD, past a maxLength) or a special token: the mask forbids them."""
    tokenizer = llm.get_tokenizer()
    byte_token = {b: tokenizer.convert_tokens_to_ids(char) for b, char in bytes_to_unicode().items()}
    pushed = [byte_token[ord("\t")], byte_token[2], byte_token[0xED], *(byte_token[b] for b in range(0xA0, 0xC0)),
              tokenizer.bos_token_id]
    bias = {token: 100.0 for token in pushed}
    bounded = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 6}}, "required": ["a"]}
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=60, logit_bias=bias, structured_outputs=(
        StructuredOutputsParams(json=bounded))))[0].outputs[0]
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), bounded)
    unbounded = StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "string"}},
                                                   "required": ["a"]})
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=30, logit_bias=bias, skip_special_tokens=False,
                                              structured_outputs=unbounded))[0].outputs[0]
    # cut by max_tokens: the string so far, less its last character (its bytes may be cut, a U+FFFD)
    string = re.search(r':\s*"(.*).$', out.text, re.DOTALL).group(1)
    assert string and not set(string) & {"\t", "\x02", "\ufffd"} and tokenizer.bos_token not in string


def test_a_grammar_compiles_once_and_an_aborted_request_releases_its_matchers(llm: LLM) -> None:
    engine = llm.engine
    constraint = StructuredOutputsParams(grammar='root ::= "yes" | "no" | "maybe " [0-9]')
    engine.add_request("aborted", PROMPT, None, SamplingParams(n=2, max_tokens=8, structured_outputs=constraint))
    cached = engine.structured.compiler.get_cache_size_bytes()
    assert len(engine.structured.matchers) == 2
    engine.abort_request("aborted")
    assert engine.structured.matchers == {}
    again = llm.generate(PROMPT, SamplingParams(max_tokens=8, structured_outputs=constraint))[0].outputs[0]
    assert re.fullmatch(r"yes|no|maybe [0-9]", again.text)
    assert engine.structured.compiler.get_cache_size_bytes() == cached


def test_a_grammar_that_dead_ends_fails_only_its_request(llm: LLM) -> None:
    engine = llm.engine
    dead_end = StructuredOutputsParams(grammar='root ::= "a" rest\nrest ::= rest')  # "a", then nothing can follow
    engine.add_request("dead end", PROMPT, None, SamplingParams(max_tokens=8, structured_outputs=dead_end))
    engine.add_request("free", FREE_PROMPTS[0], None, FREE[0])
    finished, failures = {}, {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
        failures.update(engine.take_failures())
    assert list(failures) == ["dead end"] and "cannot be completed" in str(failures["dead end"])
    assert finished["free"].outputs[0].token_ids == llm.generate(FREE_PROMPTS[0], FREE[0])[0].outputs[0].token_ids
    assert engine.structured.matchers == {}


# ---- the HTTP API ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_url(tmp_path_factory) -> Iterator[str]:
    """`localmoe serve` of the built-in model."""
    with serve(tmp_path_factory.mktemp("structured-server"), "--max-num-seqs", "128", *SMALL_KV) as server:
        yield server.url


@pytest.fixture(scope="module")
def random_url(tiny_mixtral_dir: Path, tmp_path_factory) -> Iterator[str]:
    """`localmoe serve` of a random model."""
    with serve(tmp_path_factory.mktemp("structured-random-server"), "--model", str(tiny_mixtral_dir), "--dtype",
               "float32", "--max-num-seqs", "128", *SMALL_KV) as server:
        yield server.url


def client_of(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return client_of(base_url)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def streamed_completion(client: openai.OpenAI, model: str, **body) -> tuple[str, str]:
    text, finish = "", None
    for chunk in client.completions.create(model=model, prompt=PROMPT, stream=True, **body):
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    return text, finish


@pytest.mark.parametrize("server", ["base_url", "random_url"])
def test_every_streamed_answer_validates(request, server: str) -> None:
    """Every constraint at temperature 0 and 1, all streamed at the same time, from the built-in model's server
    and a random model's."""
    client = client_of(request.getfixturevalue(server))
    model = client.models.list().data[0].id
    cases = [(constraint, expected, t) for t in (0, 1) for constraint, expected in constraints()]

    def run(case: tuple) -> tuple[str, str]:
        constraint, _, temperature = case
        field = {constraint.kind: getattr(constraint, constraint.kind)}
        return streamed_completion(client, model, max_tokens=MAX_TOKENS, temperature=temperature, seed=1,
                                   extra_body={"structured_outputs": field})

    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(run, cases))
    for (text, finish), (_, expected, _) in zip(answers, cases):
        assert finish == "stop", text
        check_answer(text, expected)


def test_response_format_json_schema_in_a_chat(client: openai.OpenAI, model: str) -> None:
    schema = PERSON
    result = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Who are you?"}],
        max_tokens=MAX_TOKENS, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
    assert result.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(result.choices[0].message.content), schema)

    streamed = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Who are you?"}],
        max_tokens=MAX_TOKENS, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == result.choices[0].message.content


def test_response_format_json_object(client: openai.OpenAI, model: str, base_url: str) -> None:
    """The built-in model writes prose into a JSON string for as long as it is let; a bias toward closing the
    object keeps the answer short, and the grammar keeps it an object."""
    close = str(httpx.post(f"{base_url}/tokenize", json={"prompt": "}", "add_special_tokens": False},
                           headers=auth()).json()["tokens"][0])
    free = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0, logit_bias={close: 100})
    assert free.choices[0].message.content == "}}}}"
    result = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=20, temperature=0, logit_bias={close: 100},
                                            response_format={"type": "json_object"})
    assert result.choices[0].finish_reason == "stop"
    assert json.loads(result.choices[0].message.content) == {}


@pytest.mark.parametrize("field, value, check", [
    ("guided_json", SCHEMAS[11], SCHEMAS[11]),
    ("guided_json", json.dumps(SCHEMAS[19]), SCHEMAS[19]),
    ("guided_regex", REGEX, REGEX),
    ("guided_choice", CHOICES, CHOICES),
    ("guided_grammar", 'root ::= "(" [0-9]+ ("+" [0-9]+)* ")"', r"\([0-9]+(\+[0-9]+)*\)"),
    ("guided_grammar", 'start: "ab" ("c" | "d")~1..3', r"ab[cd]{1,3}"),
])
def test_guided_fields(client: openai.OpenAI, model: str, field: str, value: object, check: object) -> None:
    result = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                       temperature=0, extra_body={field: value})
    assert result.choices[0].finish_reason == "stop"
    check_answer(result.choices[0].text, check)


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "structured_outputs"),
    ({"guided_json": '{"type": "object", '}, "structured_outputs"),
    ({"guided_regex": "([a-z]"}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "root ::= root"}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"json": SCHEMAS[0], "whitespace_pattern": " "}}, "structured_outputs"),  # not served
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"guided_regex": "a", "min_tokens": 2}, "min_tokens"),
])
def test_an_invalid_constraint_is_a_400_and_fails_alone(client: openai.OpenAI, model: str, body: dict,
                                                         param: str) -> None:
    with ThreadPoolExecutor(1) as pool:  # a request running beside the refused one is not disturbed
        running = pool.submit(client.completions.create, model=model, prompt=PROMPT, max_tokens=30,
                              temperature=0, extra_body={"guided_choice": CHOICES})
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=model, prompt=PROMPT, max_tokens=8, extra_body=body)
        assert running.result().choices[0].text in CHOICES
    assert refused.value.status_code == 400
    assert refused.value.body["param"] == param
