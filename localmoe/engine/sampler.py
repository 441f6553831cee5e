"""Batched sampling over requests with different settings.

Per row: logit_bias, penalties (repetition, presence, frequency), min_tokens masking and the structured-output
grammar's token mask (constrained and free rows share the step), then greedy argmax or
temperature / top-k / top-p / min-p filtering and a draw. Rows with a `seed` draw from their
request's own torch.Generator so their output does not depend on what else is batched.
Logprobs are those of the model's raw distribution, as vLLM reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from localmoe.engine.sequence import Sequence
from localmoe.engine.structured_output import StructuredOutputs
from localmoe.layers.cpu_kernels import argmax
from localmoe.sampling_params import SamplingParams


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float | None]  # logprob of the sampled token, where requested
    top_logprobs: list[list[tuple[int, float]] | None]  # the top-N alternatives, where requested


class Sampler:
    def __init__(self, eos_token_ids: set[int], structured: StructuredOutputs | None = None) -> None:
        self.eos_token_ids = eos_token_ids
        self.structured = structured

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """logits: float32 [S, V], one row per sequence."""
        params = [s.params for s in seqs]
        raw = logits
        logits = self.adjusted_logits(logits, seqs)
        tokens = argmax(logits)
        if not all(p.greedy for p in params):
            greedy = torch.tensor([p.greedy for p in params], device=logits.device)
            drawn = self.draw(self.probs(logits, params), seqs)
            tokens = torch.where(greedy, tokens, drawn)
        token_list = tokens.tolist()
        return SampleResult(token_list, *self.logprobs(raw, token_list, params))

    @staticmethod
    def logprobs(logits: torch.Tensor, tokens: list[int], params: list[SamplingParams]
                 ) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
        """Per row where asked: the raw logprob of its token and the top-N alternatives (the model's distribution,
        before any sampling setting)."""
        chosen: list[float | None] = [None] * len(tokens)
        top: list[list[tuple[int, float]] | None] = [None] * len(tokens)
        if all(p.logprobs is None for p in params):
            return chosen, top
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        for i, p in enumerate(params):
            if p.logprobs is None:
                continue
            chosen[i] = float(raw_logprobs[i, tokens[i]])
            if p.logprobs > 0:
                values, ids = raw_logprobs[i].topk(p.logprobs)
                top[i] = list(zip(ids.tolist(), values.tolist()))
        return chosen, top

    def adjusted_logits(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The logits as the request's settings leave them before temperature: logit_bias, penalties, min_tokens
        and the grammar's mask applied (greedy takes their argmax)."""
        logits = self._apply_penalties(self._apply_logit_bias(logits, seqs), seqs)
        return self.structured.mask(logits, seqs) if self.structured is not None else logits

    @classmethod
    def probs(cls, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """The distribution each row draws from: adjusted logits at the row's temperature, filtered by top-k, top-p
        and min-p (greedy rows at temperature 1: their draw is not used)."""
        temps = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=logits.device)
        return cls._filtered_probs(logits / temps[:, None], params)

    @staticmethod
    def _apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The logits plus each request's logit_bias (OpenAI's): a new tensor where any applies, else `logits`."""
        if not any(seq.params.logit_bias for seq in seqs):
            return logits
        logits = logits.clone()
        for i, seq in enumerate(seqs):
            bias = seq.params.logit_bias
            if bias:
                ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
                logits[i].index_add_(0, ids, torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device))
        return logits

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The logits with penalties and min_tokens applied: a new tensor where any applies, else `logits`."""
        rows, vocab = logits.shape
        if any(seq.num_output_tokens < seq.params.min_tokens for seq in seqs):
            logits = logits.clone()
        for i, seq in enumerate(seqs):  # min_tokens: end-of-sequence tokens are not yet allowed
            p = seq.params
            if seq.num_output_tokens < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
                logits[i, [t for t in banned if t < vocab]] = float("-inf")
        if not any(s.params.repetition_penalty != 1 or s.params.presence_penalty or s.params.frequency_penalty
                   for s in seqs):
            return logits
        counts = torch.zeros(rows, vocab, device=logits.device)
        seen = torch.zeros(rows, vocab, dtype=torch.bool, device=logits.device)
        for i, seq in enumerate(seqs):
            out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
            counts[i].index_add_(0, out, torch.ones(len(out), device=logits.device))
            seen[i, torch.tensor(seq.token_ids, dtype=torch.long, device=logits.device)] = True
        rep = torch.tensor([s.params.repetition_penalty for s in seqs], device=logits.device)[:, None]
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
        freq = torch.tensor([s.params.frequency_penalty for s in seqs], device=logits.device)[:, None]
        pres = torch.tensor([s.params.presence_penalty for s in seqs], device=logits.device)[:, None]
        return logits - freq * counts - pres * (counts > 0).float()

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Apply top-k, top-p and min-p over one descending sort, return renormalised probs."""
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        min_p = [p.min_p for p in params]
        if all(k == 0 for k in top_k) and all(x == 1 for x in top_p) and all(x == 0 for x in min_p):
            return torch.softmax(logits, dim=-1)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        ks = torch.tensor([k if k > 0 else vocab for k in top_k], device=logits.device)[:, None]
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        remove = ranks >= ks
        sorted_probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability mass ahead of each token
        remove |= before > torch.tensor(top_p, device=logits.device)[:, None]
        remove |= sorted_probs < torch.tensor(min_p, device=logits.device)[:, None] * sorted_probs[:, :1]
        remove[:, 0] = False
        filtered = sorted_logits.masked_fill(remove, float("-inf"))
        return torch.softmax(torch.empty_like(filtered).scatter_(1, order, filtered), dim=-1)

    @staticmethod
    def uniforms(seqs: list[Sequence], device: torch.device) -> torch.Tensor:
        """[S] uniforms in [0, 1), a row with a `seed` from its request's own generator."""
        uniform = torch.rand(len(seqs), device=device)
        for i, seq in enumerate(seqs):
            if seq.request.generator is not None:
                generator = seq.request.generator
                uniform[i] = torch.rand(1, generator=generator, device=generator.device)
        return uniform

    @classmethod
    def draw(cls, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Inverse-CDF draw: one uniform per row, located in the row's cumulative distribution (which need not sum
        to 1). It needs one random number per row where an exponential race needs one per vocabulary entry (which
        costs ~10 ms a step for 16 rows of 32000 on CPU). `right=True` never lands on a zero-probability token."""
        uniform = cls.uniforms(seqs, probs.device)[:, None]
        cdf = probs.cumsum(dim=-1)
        tokens = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)
        return tokens.squeeze(1).clamp_(max=probs.shape[-1] - 1)
