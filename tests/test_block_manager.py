from localmoe.engine.block_manager import BlockManager
from localmoe.engine.sequence import Request, Sequence
from localmoe.sampling_params import SamplingParams


def seq_of(tokens: list[int]) -> Sequence:
    request = Request("r", None, tokens, SamplingParams())
    return Sequence(request, 0, list(tokens), len(tokens))


def compute(bm: BlockManager, seq: Sequence) -> None:
    """Pretend a step computed the whole sequence."""
    bm.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    seq = seq_of(list(range(10)))
    assert bm.can_allocate(seq, 10)
    bm.allocate(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    bm.allocate(seq, 12)  # still fits in three blocks
    assert len(seq.block_table) == 3
    bm.free_sequence(seq)
    assert bm.num_free_blocks == 8 and bm.usage == 0


def test_prefix_hit_shares_full_blocks_only_after_they_are_computed():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = seq_of(list(range(10)))
    b = seq_of(list(range(9)) + [99, 100])
    bm.allocate_cached_prefix(a)
    assert a.num_cached_tokens == 0
    compute(bm, a)
    bm.allocate_cached_prefix(b)
    assert b.num_cached_tokens == 8 and b.block_table == a.block_table[:2]
    assert bm.blocks[a.block_table[0]].ref_count == 2


def test_last_token_block_is_never_taken_from_cache():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = seq_of(list(range(8)))
    compute(bm, a)
    again = seq_of(list(range(8)))
    bm.allocate_cached_prefix(again)
    assert again.num_cached_tokens == 4  # the block with the last token is recomputed


def test_freed_blocks_stay_findable_until_reused_lru():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = seq_of([1, 2, 3, 4, 5])
    compute(bm, a)
    bm.free_sequence(a)
    assert bm.usage == 0  # cached-but-free blocks count as free
    b = seq_of([1, 2, 3, 4, 5])
    bm.allocate_cached_prefix(b)
    assert b.num_cached_tokens == 4
    bm.free_sequence(b)
    c = seq_of([7, 8, 9, 10, 11, 12, 13, 14])  # needs all four blocks: evicts the cached ones
    bm.allocate(c, 8)
    d = seq_of([1, 2, 3, 4, 5])
    bm.allocate_cached_prefix(d)
    assert d.num_cached_tokens == 0
