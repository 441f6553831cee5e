"""Verification of drafted tokens by rejection sampling (Leviathan et al. 2023, Chen et al. 2023).

The target scored a sequence's last token and its k drafts in one step: k + 1 rows of logits, row j being the
distribution p_j of the token after the j-th draft. Draft d_j, drawn from the draft's q_j, is accepted with
probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection the token is drawn from normalize(max(0, p_j - q_j))
instead and the rest are dropped; when every draft is accepted a bonus token is drawn from p_k. Every token then
follows the target's distribution exactly, whatever the draft. A certain draft (n-gram lookup) has a one-hot q:
accepted with probability p_j(d_j), replaced by a draw from p_j without d_j.

p_j is the Sampler's own distribution for the row (logit_bias, penalties, min_tokens, temperature, top-k/p, min-p),
computed as if the drafts before it had been accepted; greedy rows accept a draft exactly when it is the argmax,
so greedy output is the one decoding without speculation gives.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from localmoe.engine.sampler import Sampler
from localmoe.engine.sequence import Sequence
from localmoe.layers.cpu_kernels import argmax


@dataclass
class Draft:
    token_ids: list[int]
    probs: torch.Tensor | None = None  # [k, V] the distribution each draft token was drawn from; None: one-hot


def with_drafts(seq: Sequence, drafts: list[int]) -> Sequence:
    """`seq` as the sampler sees it once `drafts` are accepted: a copy with them appended where its settings read
    the tokens so far (penalties, min_tokens), else `seq` itself."""
    p = seq.params
    if drafts and (p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty or p.min_tokens):
        return replace(seq, token_ids=seq.token_ids + drafts)
    return seq


class RejectionSampler:
    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[Draft]) -> list[list[int]]:
        """logits: float32 [sum(k_i + 1), V], each sequence's k_i + 1 rows in turn. Returns per sequence its accepted
        drafts followed by one drawn token."""
        rows = [with_drafts(seq, d.token_ids[:j]) for seq, d in zip(seqs, drafts) for j in range(len(d.token_ids) + 1)]
        adjusted = self.sampler.adjusted_logits(logits, rows)
        target = argmax(adjusted).tolist()
        sampled = [not s.params.greedy for s in seqs]
        probs = Sampler.probs(adjusted, [r.params for r in rows]) if any(sampled) else None

        starts, row = [], 0
        for d in drafts:
            starts.append(row)
            row += len(d.token_ids) + 1
        accepted = self._accepted(probs, target, seqs, drafts, starts, sampled)

        final_rows = [start + n for start, n in zip(starts, accepted)]
        tokens = [target[r] for r in final_rows]
        if probs is not None:
            final = probs[final_rows].clone()
            for i, (d, n) in enumerate(zip(drafts, accepted)):
                if n < len(d.token_ids):  # rejected: the part of p the draft did not cover
                    if d.probs is None:
                        final[i, d.token_ids[n]] = 0.0
                    else:
                        final[i] = (final[i] - d.probs[n].to(final.device)).clamp_(min=0.0)
                    if not final[i].sum() > 0:  # p == q up to rounding: nothing left to correct
                        final[i] = probs[final_rows[i]]
            drawn = Sampler.draw(final, seqs).tolist()
            tokens = [drawn[i] if sampled[i] else tokens[i] for i in range(len(seqs))]
        return [d.token_ids[:n] + [t] for d, n, t in zip(drafts, accepted, tokens)]

    @staticmethod
    def _accepted(probs: torch.Tensor | None, target: list[int], seqs: list[Sequence], drafts: list[Draft],
                  starts: list[int], sampled: list[bool]) -> list[int]:
        """How many leading drafts of each sequence pass the acceptance test."""
        tests = [(i, j) for i, d in enumerate(drafts) if sampled[i] for j in range(len(d.token_ids))]
        passed: dict[tuple[int, int], bool] = {}
        if tests:
            draft_rows = torch.tensor([starts[i] + j for i, j in tests], device=probs.device)
            tokens = torch.tensor([drafts[i].token_ids[j] for i, j in tests], device=probs.device)
            p = probs[draft_rows, tokens]
            q = torch.tensor([1.0 if drafts[i].probs is None else float(drafts[i].probs[j, drafts[i].token_ids[j]])
                              for i, j in tests], device=probs.device)
            uniform = Sampler.uniforms([seqs[i] for i, _ in tests], probs.device)
            passed = dict(zip(tests, (uniform * q < p).tolist()))
        accepted = []
        for i, d in enumerate(drafts):
            n = 0
            while n < len(d.token_ids) and (passed[i, n] if sampled[i] else d.token_ids[n] == target[starts[i] + n]):
                n += 1
            accepted.append(n)
        return accepted
