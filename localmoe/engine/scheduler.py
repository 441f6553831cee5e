"""Continuous batching: which sequences run in the next step, and how many tokens each computes.

Every step has a token budget (max_num_batched_tokens) and a sequence cap (max_num_seqs).
Running sequences go first, most urgent first: decodes take one token, unfinished prompts take a
chunk (chunked prefill), so a long prompt never stalls decodes. Waiting sequences are then
admitted while budget, cap and blocks allow. When blocks run out, the least urgent running
sequence (largest priority value, newest) is preempted and recomputed later.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from localmoe.config import EngineConfig
from localmoe.engine.block_manager import BlockManager
from localmoe.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens each sequence computes this step

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(n)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.chunked_prefill = config.enable_chunked_prefill
        self.max_chunk = config.max_chunked_prefill_tokens or config.max_num_batched_tokens
        self.block_manager = block_manager
        self.waiting: list[Sequence] = []  # kept sorted by Sequence.priority
        self.running: list[Sequence] = []  # kept sorted by Sequence.priority
        self.num_preemptions = 0
        self.num_prefill_chunks = 0  # prompt pieces computed in a step that did not finish the prompt

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.priority)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, budget)
            while not self.block_manager.can_allocate(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.block_manager.allocate(seq, seq.num_computed_tokens + n)
                batch.add(seq, n)
                budget -= n
                i += 1

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            self.block_manager.allocate_cached_prefix(seq)
            n = self._chunk(seq, budget)
            needed = seq.num_tokens - seq.num_computed_tokens
            if (n < needed and not self.chunked_prefill) or not self.block_manager.can_allocate(
                    seq, seq.num_computed_tokens + n):
                self.block_manager.free_sequence(seq)
                break
            self.block_manager.count_prefix_lookup(seq)
            self.block_manager.allocate(seq, seq.num_computed_tokens + n)
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.priority)
            batch.add(seq, n)
            budget -= n
        self.num_prefill_chunks += sum(
            1 for s, n in zip(batch.seqs, batch.num_tokens) if s.num_computed_tokens + n < s.num_tokens)
        return batch

    def _chunk(self, seq: Sequence, budget: int) -> int:
        return min(seq.num_tokens - seq.num_computed_tokens, budget, self.max_chunk)

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the sequence's blocks; it re-enters the waiting queue."""
        self.running.remove(seq)
        self.block_manager.free_sequence(seq)
        self.num_preemptions += 1
        self.add(seq)
