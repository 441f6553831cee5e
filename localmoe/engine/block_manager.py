"""The paged KV cache's bookkeeping: which blocks each sequence owns, and the prefix cache.

A full block is identified by a hash chained over (parent hash, its token ids); a sequence's first block chains
from its LoRA adapter's number (vLLM hashes the adapter in too), so K/V computed under one adapter is never
found by another, or by the base model. When its last
owner lets go it returns to the free list but stays findable by hash until it is handed out
again, oldest-freed first (LRU).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from localmoe.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool,
                 num_swap_blocks: int = 0) -> None:
        self.num_swap_blocks = num_swap_blocks
        self.free_swap_blocks = list(range(num_swap_blocks))  # host blocks for swapped-out sequences
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_cache_queries = 0  # tokens looked up in the prefix cache
        self.prefix_cache_hits = 0  # of those, tokens found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (blocks kept only for prefix reuse count as free)."""
        return 1.0 - len(self.free) / len(self.blocks)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def allocate_cached_prefix(self, seq: Sequence) -> None:
        """On admission, take the cached blocks matching the sequence's leading tokens.

        The block holding the last token is never taken from the cache, so at least one token is
        always computed and there is a position to sample from.
        """
        if not self.enable_prefix_caching or seq.block_table or seq.params.prompt_logprobs is not None:
            return
        usable = (seq.num_tokens - 1) // self.block_size
        parent = _root(seq)
        for i in range(usable):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = hash((parent, tokens))
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * self.block_size

    def count_prefix_lookup(self, seq: Sequence) -> None:
        """Record an admitted sequence's prefix-cache lookup (in tokens, as vLLM counts)."""
        if self.enable_prefix_caching:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += seq.num_cached_tokens

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self.free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow the block table so it covers the first `num_tokens` tokens."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids, block.ref_count = None, (), 1
            seq.block_table.append(block_id)

    def free_sequence(self, seq: Sequence) -> None:
        self._release_device_blocks(seq)
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0
        self.free_swap_blocks += seq.swap_table
        seq.swap_table = []

    def swap_out(self, seq: Sequence) -> list[tuple[int, int]] | None:
        """Move the sequence's blocks to host swap blocks; returns (device, host) copies, or None if
        the swap pool is too small. The computed tokens stay computed."""
        if not self.free_swap_blocks or len(seq.block_table) > len(self.free_swap_blocks):
            return None
        seq.swap_table = [self.free_swap_blocks.pop() for _ in seq.block_table]
        copies = list(zip(seq.block_table, seq.swap_table))
        self._release_device_blocks(seq)
        return copies

    def swap_in(self, seq: Sequence) -> list[tuple[int, int]]:
        """Give the swapped sequence device blocks again; returns (host, device) copies."""
        self.allocate(seq, len(seq.swap_table) * self.block_size)
        copies = list(zip(seq.swap_table, seq.block_table))
        self.free_swap_blocks += seq.swap_table
        seq.swap_table = []
        return copies

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the blocks past the first `num_tokens` tokens (taken for drafts that were rejected or never
        proposed); they hold nothing findable, so they are handed out again first."""
        keep = -(-num_tokens // self.block_size)
        for block_id in reversed(seq.block_table[keep:]):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                self.free.move_to_end(block_id, last=False)
        del seq.block_table[keep:]

    def _release_device_blocks(self, seq: Sequence) -> None:
        # tail blocks first, so a prompt's leading blocks are the last to be evicted
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table.clear()
        seq.num_draft_computed = 0  # the draft model's K/V went with the blocks

    def reset(self) -> None:
        """Every block free and the prefix cache empty: after a failure left the engine's bookkeeping in doubt,
        the pool is whole again and no block can be found by a hash whose K/V may be half written."""
        for block in self.blocks:
            block.ref_count, block.hash, block.token_ids = 0, None, ()
        self.free = OrderedDict((i, None) for i in range(len(self.blocks)))
        self.hash_to_block.clear()
        self.free_swap_blocks = list(range(self.num_swap_blocks))

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Make blocks whose K/V are now computed findable by later requests."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        for i in range(len(seq.block_hashes), full):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = hash((seq.block_hashes[-1] if seq.block_hashes else _root(seq), tokens))
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if h not in self.hash_to_block:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block[h] = block.block_id


def _root(seq: Sequence) -> tuple[str, int] | None:
    """What a sequence's first block hash chains from: None under the base model, else its adapter."""
    return None if seq.request.lora is None else ("lora", seq.request.lora_int_id)
