"""N-gram prompt lookup: drafts copied from where the sequence's latest tokens appeared before.

Text that quotes, edits or repeats its prompt (code, summaries, retrieval answers) continues the way it did
the last time the same few tokens occurred. The draft is what followed the latest earlier occurrence of the
sequence's last n tokens (n from prompt_lookup_max down to prompt_lookup_min) in its prompt and output. No model
runs: the draft is certain (a one-hot draft distribution), so verification accepts a draft token with the target's
probability of it.
"""

from __future__ import annotations

from array import array

from localmoe.engine.rejection_sampler import Draft
from localmoe.engine.sequence import Sequence
from localmoe.engine.speculative_config import SpeculativeConfig

WIDTH = array("i").itemsize


class NgramProposer:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        return [Draft(self.lookup(seq.token_ids, k)) for seq, k in zip(seqs, ks)]

    def lookup(self, token_ids: list[int], k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the longest matching suffix; [] if none.
        The search runs over the tokens as bytes (bytes.rfind, in C): a match at an offset that is not a whole
        token is skipped."""
        if k < 1 or len(token_ids) <= self.min_n:
            return []
        data = array("i", token_ids).tobytes()
        for n in range(min(self.max_n, len(token_ids) - 1), self.min_n - 1, -1):
            pattern = data[-n * WIDTH:]
            end = len(data) - WIDTH  # an occurrence must end before the last token: the suffix itself is not one
            while (at := data.rfind(pattern, 0, end)) != -1:
                if at % WIDTH == 0:
                    start = at // WIDTH + n
                    return token_ids[start:start + k]
                end = at + len(pattern) - 1
        return []
