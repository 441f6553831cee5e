"""Sampling rules checked on hand-made logits, where the right answer is known."""

from __future__ import annotations

import torch

from localmoe.engine.sampler import Sampler
from localmoe.engine.sequence import Request, Sequence
from localmoe.sampling_params import SamplingParams


def seqs_for(params: list[SamplingParams], outputs: list[list[int]] | None = None) -> list[Sequence]:
    seqs = []
    for i, p in enumerate(params):
        request = Request(str(i), None, [0], p)
        if p.seed is not None:
            request.generator = torch.Generator().manual_seed(p.seed)
        seq = Sequence(request, 0, [0] + (outputs[i] if outputs else []), 1)
        seqs.append(seq)
    return seqs


def draw_many(logits: torch.Tensor, params: SamplingParams, n: int = 400) -> set[int]:
    sampler = Sampler({2})
    rows = logits.repeat(n, 1)
    return set(sampler(rows, seqs_for([params] * n)).token_ids)


LOGITS = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]]))


def test_greedy_picks_argmax():
    assert Sampler(set())(LOGITS, seqs_for([SamplingParams(temperature=0)])).token_ids == [0]


def test_top_k_top_p_min_p_restrict_the_support():
    assert draw_many(LOGITS, SamplingParams(top_k=2)) == {0, 1}
    assert draw_many(LOGITS, SamplingParams(top_p=0.65)) == {0, 1}  # 0.4 + 0.3 covers 0.65
    assert draw_many(LOGITS, SamplingParams(min_p=0.3)) == {0, 1, 2}  # keeps p >= 0.12
    assert draw_many(LOGITS, SamplingParams()) == {0, 1, 2, 3, 4}


def test_seeded_rows_repeat_and_differ_by_seed():
    logits = torch.zeros(1, 1000)
    a = Sampler(set())(logits.repeat(8, 1), seqs_for([SamplingParams(seed=1)] * 8)).token_ids
    b = Sampler(set())(logits.repeat(8, 1), seqs_for([SamplingParams(seed=1)] * 8)).token_ids
    c = Sampler(set())(logits.repeat(8, 1), seqs_for([SamplingParams(seed=2)] * 8)).token_ids
    assert a == b and a != c


def test_penalties_change_the_choice():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=1.2),
              SamplingParams(temperature=0, frequency_penalty=0.1), SamplingParams(temperature=0, presence_penalty=0.2)]
    tokens = Sampler(set())(logits.repeat(4, 1), seqs_for(params, [[0]] * 4)).token_ids
    assert tokens == [0, 1, 0, 1]  # frequency 0.1 * 1 is not enough to flip 2.0 vs 1.9


def test_min_tokens_blocks_eos():
    logits = torch.tensor([[0.0, 0.0, 9.0]])
    sampler = Sampler({2})
    assert sampler(logits, seqs_for([SamplingParams(temperature=0, min_tokens=1)])).token_ids == [0]
    assert sampler(logits, seqs_for([SamplingParams(temperature=0)])).token_ids == [2]


def test_logprobs_are_the_raw_distribution():
    result = Sampler(set())(LOGITS, seqs_for([SamplingParams(temperature=0, logprobs=2)]))
    assert abs(result.logprobs[0] - torch.log(torch.tensor(0.4)).item()) < 1e-6
    assert [t for t, _ in result.top_logprobs[0]] == [0, 1]


def test_draws_follow_the_distribution():
    """Frequencies over many draws match the probabilities (and a zero-probability token never comes)."""
    probs = torch.tensor([0.4, 0.3, 0.0, 0.2, 0.1])
    torch.manual_seed(0)
    n = 20000
    tokens = Sampler(set())(probs.log().repeat(n, 1), seqs_for([SamplingParams()] * n)).token_ids
    freq = torch.bincount(torch.tensor(tokens), minlength=5).float() / n
    assert freq[2] == 0
    assert torch.allclose(freq, probs, atol=0.015), freq
