"""Schemathesis fuzzes a real `localmoe serve` against its own OpenAPI schema: no request may get a 5xx,
and every answer must have a documented status, media type and body.

The server runs with a short context (--max-model-len 64) so no generated request can run long, and
the fuzzer is seeded and deterministic so CI sees the same requests every time.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis

from server_process import SMALL_KV, auth, serve

MAX_MODEL_LEN = 64  # a chat completion without max_tokens generates up to this many tokens
EXAMPLES_PER_OPERATION = 50
SEED = 20240601


@pytest.fixture(scope="module")
def fuzz_url(tmp_path_factory) -> Iterator[str]:
    """`localmoe serve` on its defaults (the built-in model, bf16, the CPU kernels) with an API key and a short
    context."""
    with serve(tmp_path_factory.mktemp("fuzz-server"), "--max-model-len", str(MAX_MODEL_LEN), *SMALL_KV) as server:
        yield server.url


@pytest.fixture(scope="module")
def api_schema(fuzz_url: str) -> schemathesis.BaseSchema:
    """The schema the server itself serves, and the fuzzer's settings (as a schemathesis.toml would give them)."""
    config = schemathesis.Config.from_dict({
        "seed": SEED,
        "headers": auth(),
        "request-timeout": 60,
        "suppress-health-check": ["too_slow", "filter_too_much"],
        "generation": {"max-examples": EXAMPLES_PER_OPERATION, "deterministic": True, "database": "none"},
        "output": {"sanitization": {"enabled": False}},  # it hides every field named *token*: max_tokens, ...
        # A schema-valid request may still be out of range for the model (context length, vocabulary,
        # chat template): the schema documents that 400, which the fuzzer should accept as an answer; the admin
        # routes are closed (403) on a server without an admin key.
        "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "400", "401", "403", "404"]}},
    })
    return schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json", config=config, headers=auth())


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_server_answers_as_its_schema_says(case) -> None:
    case.call_and_validate()
