"""Continuous batching: which sequences run in the next step, and how many tokens each computes.

Every step has a token budget (max_num_batched_tokens) and a sequence cap (max_num_seqs).
Running sequences go first, most urgent first: decodes take one token, unfinished prompts take a
chunk (chunked prefill), so a long prompt never stalls decodes. Waiting sequences are then
admitted while budget, cap and blocks allow. When blocks run out, the least urgent running
sequence (largest priority value, newest) is preempted and recomputed later.

With speculative decoding a decode may also take room for draft tokens (its lookahead, engine/spec_decode.py says
how many): budgeted and given blocks here, when they are free without preempting anyone; the engine then proposes
at most that many drafts, verified in the same step.

With LoRA adapters the running sequences use at most max_loras distinct adapters (the slots the model holds); a
waiting sequence whose adapter would be one too many waits, and those behind it may go first.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

from localmoe.config import EngineConfig
from localmoe.engine.block_manager import BlockManager
from localmoe.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens each sequence computes this step
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host block) copies
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host block, device block) copies
    lookahead: dict[int, int] = field(default_factory=dict)  # batch index -> most drafts it has room for

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(n)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager,
                 lookahead: Callable[[Sequence, int], int] | None = None) -> None:
        """`lookahead(seq, num_running)`: how many draft tokens a decoding sequence may verify in a step."""
        self.lookahead = lookahead
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.chunked_prefill = config.enable_chunked_prefill
        self.max_chunk = config.max_chunked_prefill_tokens or config.max_num_batched_tokens
        self.block_manager = block_manager
        self.max_loras = config.max_loras if config.enable_lora else None
        self.waiting: list[Sequence] = []  # kept sorted by Sequence.priority
        self.running: list[Sequence] = []  # kept sorted by Sequence.priority
        self.swapped: list[Sequence] = []  # preempted with their KV in host memory, sorted by priority
        self.num_preemptions = 0
        self.num_swapped_out = 0
        self.num_prefill_chunks = 0  # prompt pieces computed in a step that did not finish the prompt

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.priority)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.swapped:
            self.swapped.remove(seq)
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
            extra = self._lookahead(seq, n, budget - n)
            while not self.block_manager.can_allocate(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim, batch)
                preempted = True
                if victim is seq:
                    break
            else:
                self.block_manager.allocate(seq, seq.num_computed_tokens + n + extra)
                if extra:
                    batch.lookahead[len(batch.seqs)] = extra
                batch.add(seq, n)
                budget -= n + extra
                i += 1

        while self.swapped and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.swapped[0]
            n = self._chunk(seq, budget)
            covered = max(len(seq.swap_table) * self.block_manager.block_size, seq.num_computed_tokens + n)
            if not self.block_manager.can_allocate(seq, covered) or not self._lora_fits(seq):  # no device blocks now
                break
            batch.swap_in += self.block_manager.swap_in(seq)
            self.block_manager.allocate(seq, seq.num_computed_tokens + n)
            self.swapped.pop(0)
            self._run(seq, batch, n)
            budget -= n

        i = 0
        while (i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs and not preempted
               and not self.swapped):
            seq = self.waiting[i]
            if not self._lora_fits(seq):
                i += 1
                continue
            self.block_manager.allocate_cached_prefix(seq)
            n = self._chunk(seq, budget)
            needed = seq.num_tokens - seq.num_computed_tokens
            if (n < needed and not self.chunked_prefill) or not self.block_manager.can_allocate(
                    seq, seq.num_computed_tokens + n):
                self.block_manager.free_sequence(seq)
                break
            self.block_manager.count_prefix_lookup(seq)
            self.block_manager.allocate(seq, seq.num_computed_tokens + n)
            self.waiting.pop(i)
            self._run(seq, batch, n)
            budget -= n
        self.num_prefill_chunks += sum(
            1 for s, n in zip(batch.seqs, batch.num_tokens) if s.num_computed_tokens + n < s.num_tokens)
        return batch

    def _lora_fits(self, seq: Sequence) -> bool:
        """Its adapter (if any) is one a running sequence uses already, or a slot is left for it."""
        lora = seq.request.lora_int_id
        if self.max_loras is None or not lora:
            return True
        held = {s.request.lora_int_id for s in self.running} - {0}
        return lora in held or len(held) < self.max_loras

    def _lookahead(self, seq: Sequence, n: int, room: int) -> int:
        """Draft tokens a decode may add: within the budget's room, on blocks that are free now."""
        if self.lookahead is None or room < 1 or seq.num_computed_tokens + n != seq.num_tokens or n != 1:
            return 0
        extra = min(self.lookahead(seq, len(self.running)), room)
        return extra if extra and self.block_manager.can_allocate(seq, seq.num_tokens + extra) else 0

    def _run(self, seq: Sequence, batch: ScheduledBatch, n: int) -> None:
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.priority)
        batch.add(seq, n)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        return min(seq.num_tokens - seq.num_computed_tokens, budget, self.max_chunk)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        """Swap the sequence's KV to host memory when the swap pool has room (swap_space > 0);
        otherwise drop its blocks, and it is recomputed from the waiting queue."""
        self.running.remove(seq)
        self.num_preemptions += 1
        copies = self.block_manager.swap_out(seq)
        if copies is None:
            self.block_manager.free_sequence(seq)
            self.add(seq)
            return
        batch.swap_out += copies
        self.num_swapped_out += 1
        seq.status = SequenceStatus.SWAPPED
        bisect.insort(self.swapped, seq, key=lambda s: s.priority)
