"""Per-request sampling settings, with vLLM's names, defaults and ranges.

Every value is checked here, before a request is queued: a value the sampler cannot honour (a
non-finite penalty, a seed beyond 64 bits, a stop list that would slow every step) is refused
with the field's name rather than failing the step that batches it with other requests. Limits
that depend on the model (vocabulary, --max-logprobs, --max-num-seqs) are checked by the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 1024
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a bias value: [-100, 100]


@dataclass
class StructuredOutputsParams:
    """A constraint on a request's output (vLLM's StructuredOutputsParams): exactly one of `json` (a JSON schema,
    as text or parsed), `regex`, `choice` (the output is one of these strings), `grammar` (EBNF with `root ::=`,
    or Lark with `start:`) or `json_object` (any JSON object). The engine compiles it (engine/structured_output.py);
    a schema or grammar that does not compile is refused there, before the request is queued.

    Whitespace inside JSON is bounded by default, so a weak model cannot pad an answer until max_tokens;
    `disable_any_whitespace` allows none but the separators ", " and ": "."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    KINDS = ("json", "regex", "choice", "grammar", "json_object")

    def __post_init__(self) -> None:
        given = [kind for kind in self.KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise SamplingParamsError(
                f"structured outputs take exactly one of {', '.join(self.KINDS)}; got "
                f"{', '.join(given) if given else 'none'}", "structured_outputs")
        if self.choice is not None and not (self.choice and all(isinstance(c, str) for c in self.choice)):
            raise SamplingParamsError("choice must be a non-empty list of strings", "structured_outputs")

    @property
    def kind(self) -> str:
        return next(kind for kind in self.KINDS if getattr(self, kind) not in (None, False))


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return beside the sampled token
    prompt_logprobs: int | None = None  # logprobs of the prompt's own tokens (plus top-N); bypasses the prefix cache
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit before sampling
    structured_outputs: StructuredOutputsParams | None = None  # the output must match this schema / regex / grammar

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if self.top_k == -1:
            self.top_k = 0
        # NaN fails every comparison, so it is refused too
        checks = [
            (self.n >= 1, "n", f"n must be at least 1, got {self.n}"),
            (0 <= self.temperature < math.inf, "temperature",
             f"temperature must be non-negative and finite, got {self.temperature}"),
            (0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, "top_k", f"top_k must be -1 (disable), 0 (disable) or at least 1, got {self.top_k}"),
            (0 <= self.min_p <= 1, "min_p", f"min_p must be in [0, 1], got {self.min_p}"),
            (0 < self.repetition_penalty <= 2, "repetition_penalty",
             f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty",
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty",
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.seed is None or INT64_MIN <= self.seed <= INT64_MAX, "seed",
             f"seed must be a 64-bit signed integer, got {self.seed}"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
             f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.min_tokens >= 0, "min_tokens", f"min_tokens must be non-negative, got {self.min_tokens}"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
             f"min_tokens must be at most max_tokens ({self.max_tokens}), got {self.min_tokens}"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs",
             f"logprobs must be non-negative, got {self.logprobs}"),
            (self.prompt_logprobs is None or self.prompt_logprobs >= 0, "prompt_logprobs",
             f"prompt_logprobs must be non-negative, got {self.prompt_logprobs}"),
            (len(self.stop) <= MAX_STOP_STRINGS, "stop",
             f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}"),
            (all(len(s) <= MAX_STOP_STRING_CHARS for s in self.stop), "stop",
             f"a stop string may have at most {MAX_STOP_STRING_CHARS} characters"),
            (len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids",
             f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed, got {len(self.stop_token_ids)}"),
            (len(self.logit_bias) <= MAX_LOGIT_BIAS, "logit_bias",
             f"logit_bias may have at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}"),
            (all(-LOGIT_BIAS_LIMIT <= b <= LOGIT_BIAS_LIMIT for b in self.logit_bias.values()), "logit_bias",
             f"logit_bias values must be in [{-LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}]"),
            # the grammar decides where a constrained output ends; it may allow nothing but the end
            (self.structured_outputs is None or self.min_tokens == 0, "min_tokens",
             "min_tokens cannot be combined with structured outputs: the grammar decides where the output ends"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise SamplingParamsError(message, param)

    def token_ids(self) -> list[tuple[str, list[int]]]:
        """(field, ids) of every token id the request names, for the engine to check against the vocabulary."""
        return [("stop_token_ids", self.stop_token_ids), ("logit_bias", list(self.logit_bias))]

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1


class SamplingParamsError(ValueError):
    """An invalid sampling setting; `param` names the offending field (for OpenAI error JSON)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param
