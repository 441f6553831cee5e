"""Structured output: grammars compiled from a request's schema, regex, choice or grammar (xgrammar, on CPU), one
matcher per sequence, and the token mask each step applies to the constrained rows of the batch.

A grammar is compiled when the request is made (so one that does not compile is refused before it is queued) and
xgrammar's compiler keeps it, keyed by its text and options, within a byte budget: a schema sent again is not
compiled again. The matcher of a sequence follows its sampled tokens; once the grammar is complete it allows only
the end-of-sequence tokens, so the output ends there with finish_reason "stop" (or "length" at max_tokens).
"""

from __future__ import annotations

import json
import re
import threading

import torch
import xgrammar as xgr
from transformers import PreTrainedTokenizerBase

from localmoe.engine.sequence import Sequence
from localmoe.sampling_params import StructuredOutputsParams

JSON_MAX_WHITESPACE = 2  # whitespace characters between two JSON tokens: a space, or a newline and an indent
CACHE_LIMIT_BYTES = 256 * 2**20  # compiled grammars kept for reuse; the least recently used go past it
# the classes xgrammar writes for a character of a JSON string (see json_grammar), and JSON's own
_LENIENT_STRING_CHARS = (r'[^\"\\\r\n]', r'[^\0-\x1f\"\\\r\n]')
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\\uD800-\uDFFF]'


class GrammarError(ValueError):
    """A schema, regex or grammar that does not compile."""


class StructuredOutputs:
    """Compiles constraints for one model's tokenizer and keeps the matcher of each constrained sequence.

    The tokenizer's vocabulary is read for xgrammar on the first constrained request, so engines that never see
    one do not pay for it. compile() runs on the threads that make requests (the server's worker threads, so its
    event loop never waits on a compile); the rest on the engine's thread.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width, which the mask covers
        self.eos_token_ids = sorted(eos_token_ids)
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()
        self.matchers: dict[int, xgr.GrammarMatcher] = {}  # seq_id -> matcher of a constrained sequence

    @property
    def compiler(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                self._compiler = xgr.GrammarCompiler(self._tokenizer_info(), cache_limit_bytes=CACHE_LIMIT_BYTES)
            return self._compiler

    def _tokenizer_info(self) -> xgr.TokenizerInfo:
        """The vocabulary as xgrammar reads it, with the special tokens (<s>, <|user|>, ...) written empty, which
        xgrammar never allows inside a grammar: xgrammar would otherwise read "<s>" as three characters, while
        the detokenizer skips it, and the text would not be what the grammar matched."""
        tokenizer = self.tokenizer
        detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.eos_token_ids or None)
        special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
        vocab = [""] * self.vocab_size
        for token, i in tokenizer.get_vocab().items():
            if i < self.vocab_size and i not in special:
                vocab[i] = token
        return xgr.TokenizerInfo(vocab, detected.vocab_type, vocab_size=self.vocab_size,
                                 stop_token_ids=detected.stop_token_ids, add_prefix_space=detected.add_prefix_space)

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """The constraint's grammar, from the compiler's cache when it was compiled before; raises GrammarError."""
        kind = params.kind
        try:
            grammar = self._compile(params)
        except (RuntimeError, ValueError) as error:
            raise GrammarError(f"invalid {_NAMES[kind]}: {_message(error)}") from None
        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        xgr.GrammarMatcher(grammar).fill_next_token_bitmask(bitmask)
        if not bitmask.any():  # `root ::= root`, {"anyOf": []}: no output could ever be sampled
            raise GrammarError(f"invalid {_NAMES[kind]}: it matches no text")
        return grammar

    def _compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        compiler = self.compiler
        if params.kind in ("json", "json_object"):
            return compiler.compile_grammar(json_grammar(params))
        if params.kind == "regex":
            return compiler.compile_regex(params.regex)
        if params.kind == "choice":
            return compiler.compile_grammar(
                "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice))
        if "::=" in params.grammar:  # EBNF (GBNF), as vLLM takes it; otherwise Lark
            return compiler.compile_grammar(params.grammar)
        return compiler.compile_lark(params.grammar)

    def add(self, seq: Sequence, grammar: xgr.CompiledGrammar) -> None:
        self.matchers[seq.seq_id] = xgr.GrammarMatcher(grammar)

    def release(self, seq: Sequence) -> None:
        self.matchers.pop(seq.seq_id, None)

    def accept(self, seq: Sequence, token: int) -> bool:
        """Advance the sequence's matcher by its sampled token; True once the grammar has ended (it took an
        end-of-sequence token), which ends the output even where ignore_eos would not."""
        matcher = self.matchers.get(seq.seq_id)
        if matcher is None:
            return False
        if not matcher.accept_token(token):
            raise RuntimeError(f"token {token} does not match the request's grammar")
        return matcher.is_terminated()

    def mask(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The logits with every token the grammar of its row forbids at -inf: a new tensor where any row is
        constrained, else `logits`. Rows of unconstrained sequences are left as they are."""
        rows = [i for i, seq in enumerate(seqs) if seq.seq_id in self.matchers]
        if not rows:
            return logits
        bitmask = xgr.allocate_token_bitmask(len(seqs), self.vocab_size)
        for i in rows:
            self.matchers[seqs[i].seq_id].fill_next_token_bitmask(bitmask, i)
            if not bitmask[i].any():  # `root ::= "a" x  x ::= x`: the batch is drawn again row by row, this one fails
                raise GrammarError("the grammar allows no next token here: the output cannot be completed")
        logits = logits.clone()
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=self.vocab_size, indices=rows)
        return logits


def json_grammar(params: StructuredOutputsParams) -> str:
    r"""The EBNF grammar of a JSON schema (any object for json_object), whitespace bounded unless disabled.

    The class xgrammar 0.2.8 writes for the characters of a string lets through what JSON text cannot hold: control
    characters (a tab, \x02) in a string with minLength or maxLength, which json.loads refuses, and in any string
    the three bytes of a UTF-16 surrogate, which decode to three U+FFFD (past a maxLength). It is narrowed to
    JSON's own before compiling.
    """
    whitespace = ({"any_whitespace": False} if params.disable_any_whitespace
                  else {"any_whitespace": True, "max_whitespace_cnt": JSON_MAX_WHITESPACE})
    if params.json_object:
        grammar = xgr.Grammar.from_json_schema('{"type": "object"}', strict_mode=False, **whitespace)
    else:
        schema = params.json if isinstance(params.json, str) else json.dumps(params.json)
        grammar = xgr.Grammar.from_json_schema(schema, **whitespace)
    ebnf = str(grammar)
    for lenient in _LENIENT_STRING_CHARS:
        ebnf = ebnf.replace(lenient, _JSON_STRING_CHAR)
    return ebnf


_NAMES = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex", "choice": "choice",
          "grammar": "grammar"}


def _message(error: Exception) -> str:
    """xgrammar's message without the C++ source location and check it starts with ("[12:44:13] /project/cpp/x.cc:83:
    Check failed: (...) is false: ")."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: (Check failed: .* is false: )?", "", str(error).strip())
