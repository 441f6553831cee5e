"""`speculative_config`: vLLM's JSON for speculative decoding, parsed into a frozen dataclass.

Accepted as vLLM accepts it: `{"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4,
"prompt_lookup_min": 1}` or `{"method": "draft_model", "model": PATH, "num_speculative_tokens": k}`; a "model"
without a "method" means a draft model ("ngram" or "[ngram]" as the model name mean n-gram lookup, vLLM's older
spelling). Either prompt_lookup bound given alone sets the other; neither gives vLLM's 5.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "draft_model")
DEFAULT_PROMPT_LOOKUP = 5  # vLLM's, when neither bound is given


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    model: str | None = None  # the draft checkpoint (draft_model)
    prompt_lookup_max: int | None = None  # longest n-gram matched (ngram)
    prompt_lookup_min: int | None = None  # shortest n-gram matched (ngram)
    # speculation is off for a step whose running sequences exceed this: a large batch is bound by compute
    disable_by_batch_size: int | None = None


def parse_speculative_config(value: str | dict[str, Any] | SpeculativeConfig | None) -> SpeculativeConfig | None:
    """The JSON text (the flag), a mapping (the config file, LLM(...)) or a config; raises ValueError naming what
    is wrong."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"not valid JSON ({error.msg}): {value!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object such as {{\"method\": \"ngram\", \"num_speculative_tokens\": 4}}, "
                         f"got {value!r}")
    known = {f.name for f in fields(SpeculativeConfig)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    values = dict(value)
    method, model = values.get("method"), values.get("model")
    if model in ("ngram", "[ngram]") and method in (None, "ngram", "[ngram]"):
        values["method"], values["model"] = "ngram", None
    elif method == "[ngram]":
        values["method"] = "ngram"
    elif method is None and model is not None:
        values["method"] = "draft_model"
    _check_types(values)
    if values.get("method") not in METHODS:
        raise ValueError(f"method {values.get('method')!r} is not available (available: {', '.join(METHODS)}; "
                         "a draft model may also be given as \"model\" alone)")
    if values.get("num_speculative_tokens") is None:
        raise ValueError("num_speculative_tokens is required")
    if values["num_speculative_tokens"] < 1:
        raise ValueError(f"num_speculative_tokens must be at least 1, got {values['num_speculative_tokens']}")
    if values["method"] == "draft_model":
        if not values.get("model"):
            raise ValueError("method draft_model needs \"model\": the draft checkpoint's directory")
        for key in ("prompt_lookup_max", "prompt_lookup_min"):
            if values.get(key) is not None:
                raise ValueError(f"{key} is an n-gram setting; method draft_model does not use it")
    else:
        _ngram_bounds(values)
    size = values.get("disable_by_batch_size")
    if size is not None and size < 1:
        raise ValueError(f"disable_by_batch_size must be at least 1, got {size}")
    return SpeculativeConfig(**values)


def _check_types(values: dict[str, Any]) -> None:
    for key in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size"):
        v = values.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{key} must be an integer, got {v!r}")
    for key in ("method", "model"):
        v = values.get(key)
        if v is not None and not isinstance(v, str):
            raise ValueError(f"{key} must be a string, got {v!r}")


def _ngram_bounds(values: dict[str, Any]) -> None:
    if values.get("model") is not None:
        raise ValueError("method ngram takes no \"model\" (n-gram lookup needs none)")
    low, high = values.get("prompt_lookup_min"), values.get("prompt_lookup_max")
    if low is None and high is None:
        low = high = DEFAULT_PROMPT_LOOKUP
    low, high = (high if low is None else low), (low if high is None else high)
    if low < 1:
        raise ValueError(f"prompt_lookup_min must be at least 1, got {low}")
    if low > high:
        raise ValueError(f"prompt_lookup_min {low} must be at most prompt_lookup_max {high}")
    values["prompt_lookup_min"], values["prompt_lookup_max"] = low, high
