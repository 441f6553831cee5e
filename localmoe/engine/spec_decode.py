"""Speculative decoding in the engine's step: who may speculate, proposing drafts, verifying them, counting.

A decoding sequence that may speculate gets room for up to num_speculative_tokens drafts from the scheduler
(budget and blocks); the proposer (n-gram lookup or a draft model) fills what it can; the target computes the
last token and the drafts in the same flat batch as every other sequence, and the rejection sampler keeps the
accepted drafts plus one token of its own. The engine then advances the sequence's computed tokens over the
accepted ones only, so K/V of rejected drafts is overwritten by the next step and never reaches the prefix cache.

Not speculated, decoded plainly in the same step: requests with structured outputs (the grammar would have to
advance over drafts that may be rejected), and every sequence in a step whose batch has more running sequences
than disable_by_batch_size (a large batch is bound by compute, and drafts only add to it). Logprobs of verified
tokens are read from their rows, as a plain step reads them. A seeded request stays reproducible, but its samples
are not those it draws without speculation: verification uses its generator differently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol
import torch

from localmoe.engine.rejection_sampler import Draft, RejectionSampler
from localmoe.engine.sampler import Sampler
from localmoe.engine.scheduler import ScheduledBatch
from localmoe.engine.sequence import Sequence
from localmoe.engine.speculative_config import SpeculativeConfig
from localmoe.engine.stats import SpecDecodeStats

log = logging.getLogger(__name__)


class Proposer(Protocol):
    """NgramProposer (engine/ngram_proposer.py) or DraftModelProposer (engine/draft_proposer.py)."""

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        """Up to ks[i] draft tokens for each decoding sequence."""


class SpecDecoder:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer, sampler: Sampler, max_model_len: int) -> None:
        self.config = config
        self.proposer = proposer
        self.rejection = RejectionSampler(sampler)
        self.max_model_len = max_model_len
        self.drafts: dict[int, Draft] = {}  # seq_id -> the draft this step verifies
        self.num_drafts = self.num_draft_tokens = self.num_accepted_tokens = 0
        self.accepted_per_pos = [0] * config.num_speculative_tokens

    def lookahead(self, seq: Sequence, num_running: int) -> int:
        """Drafts a decoding sequence may verify this step: none where it may not speculate, never more than the
        tokens it may still produce, less the one verification adds."""
        limit = self.config.disable_by_batch_size
        p = seq.params
        if (limit is not None and num_running > limit) or seq.request.grammar is not None:
            return 0
        left = self.max_model_len - seq.num_tokens
        if p.max_tokens is not None:
            left = min(left, p.max_tokens - seq.num_output_tokens)
        return max(0, min(self.config.num_speculative_tokens, left - 1))

    def propose(self, batch: ScheduledBatch) -> None:
        """Drafts for the batch's sequences with lookahead; each one's step tokens grow by its draft's length. A
        proposer that fails leaves the step without drafts."""
        self.drafts = {}
        if not batch.lookahead:
            return
        index = list(batch.lookahead)
        seqs = [batch.seqs[i] for i in index]
        ks = [batch.lookahead[i] for i in index]
        try:
            drafts = self.proposer.propose(seqs, ks)
        except Exception:  # noqa: BLE001 -- drafts are an optimisation: the step runs without them
            log.exception("proposing drafts failed; this step decodes without them")
            return
        for i, seq, draft in zip(index, seqs, drafts):
            if draft.token_ids:
                self.drafts[seq.seq_id] = draft
                seq.spec_token_ids = draft.token_ids
                batch.num_tokens[i] += len(draft.token_ids)

    def tokens(self, logits: torch.Tensor, seqs: list[Sequence],
               sample: Callable[[torch.Tensor, list[Sequence]], list[tuple | Exception]]) -> list[list[tuple] | Exception]:
        """The step's (token, logprob, top logprobs) of each sampling sequence, or the error that fails it: the
        sequences without drafts drawn by `sample` from their one row, the others verified over their 1 + k."""
        results: list[list[tuple] | Exception] = [[] for _ in seqs]
        first = [0]
        for s in seqs:
            first.append(first[-1] + 1 + len(s.spec_token_ids))
        plain = [i for i, s in enumerate(seqs) if not s.spec_token_ids]
        speculated = [i for i, s in enumerate(seqs) if s.spec_token_ids]
        if plain:
            for i, row in zip(plain, sample(logits[[first[i] for i in plain]], [seqs[i] for i in plain])):
                results[i] = row if isinstance(row, Exception) else [row]
        rows = [r for i in speculated for r in range(first[i], first[i + 1])]
        for i, tokens in zip(speculated, self.verify(logits[rows], [seqs[i] for i in speculated])):
            if isinstance(tokens, Exception):
                results[i] = tokens
                continue
            # row j scored the token after the j-th draft: the logprobs of the j-th token kept
            chosen, top = Sampler.logprobs(logits[first[i]:first[i] + len(tokens)], tokens,
                                           [seqs[i].params] * len(tokens))
            results[i] = list(zip(tokens, chosen, top))
        return results

    def verify(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[list[int] | Exception]:
        """logits: each sequence's 1 + k rows in turn. Per sequence the accepted drafts and one more token, or the
        error that fails it (should the batch fail, each sequence is verified alone)."""
        drafts = [self.drafts.pop(s.seq_id) for s in seqs]
        try:
            results: list[list[int] | Exception] = list(self.rejection(logits, seqs, drafts))
        except Exception:  # noqa: BLE001 -- retried sequence by sequence below
            log.exception("verifying drafts of %d sequences failed; verifying each alone", len(seqs))
            results, row = [], 0
            for seq, draft in zip(seqs, drafts):
                rows = len(draft.token_ids) + 1
                try:
                    results.append(self.rejection(logits[row:row + rows], [seq], [draft])[0])
                except Exception as error:  # noqa: BLE001 -- this sequence's request fails
                    results.append(error)
                row += rows
        for draft, result in zip(drafts, results):
            if isinstance(result, list):
                self._count(len(draft.token_ids), len(result) - 1)
        return results

    def _count(self, proposed: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        for position in range(accepted):
            self.accepted_per_pos[position] += 1

    @property
    def stats(self) -> SpecDecodeStats:
        return SpecDecodeStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                               tuple(self.accepted_per_pos))
