"""Property tests of the elastic cap over vLLM's real BlockPool (pure Python, no engine).

Random interleavings of allocate, free, cache, grow, shrink-and-drain; after every step the
pool must never hand out a block beyond capacity, never lose a block, and never hide
(release) a block in use or still in the prefix cache.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kv_resize.elastic_pool import ElasticBlockPool

MAX_USABLE = 24


def _new_pool(committed: int):
    from vllm.v1.core.block_pool import BlockPool

    from morphserve.vllm.scheduler import VllmBlockStore

    pool = BlockPool(num_gpu_blocks=MAX_USABLE + 1, enable_caching=True, hash_block_size=16)
    return ElasticBlockPool(VllmBlockStore(pool), committed)


ops = st.lists(
    st.tuples(st.sampled_from(["alloc", "free", "cache", "grow", "shrink", "drain"]),
              st.integers(1, MAX_USABLE), st.integers(0, 10**6)),
    min_size=1, max_size=120)


@settings(max_examples=300, deadline=None)
@given(start=st.integers(1, MAX_USABLE), steps=ops)
def test_random_interleavings_keep_the_invariants(start, steps):
    elastic = _new_pool(start)
    pool = elastic.store.vllm_pool
    held: list[list] = []  # allocations still owned by "requests"
    released_ranges: list[tuple[int, int]] = []
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

    for op, n, salt in steps:
        rng = random.Random(salt)
        if op == "alloc":
            n = min(n, pool.get_num_free_blocks())
            if n:
                blocks = pool.get_new_blocks(n)
                assert all(b.block_id <= elastic.committed for b in blocks)
                held.append(blocks)
        elif op == "free" and held:
            blocks = held.pop(rng.randrange(len(held)))
            pool.free_blocks(reversed(blocks))
        elif op == "cache" and held:
            block = rng.choice(rng.choice(held))
            if block.block_hash is None:
                key = make_block_hash_with_group_id(salt.to_bytes(8, "little"), 0)
                pool._insert_block_hash(key, block, None)
        elif op == "grow":
            target = max(n, elastic.limit)
            before = elastic.committed
            elastic.grow(target)
            assert elastic.committed == max(before, target)
        elif op == "shrink":
            target = min(n, elastic.committed)
            before = elastic.committed
            elastic.set_limit(target)
            result = elastic.drain()
            if result.done:
                released_ranges.append((target + 1, before))
            else:
                assert all(pool.blocks[i].ref_cnt > 0 for i in result.busy)
                assert elastic.committed == before, "capacity dropped while blocks were busy"
        elif op == "drain":
            elastic.drain()
        elastic.check()
        # Nothing in a released range may be in use.
        for lo, hi in released_ranges:
            for i in range(max(lo, elastic.committed + 1), hi + 1):
                assert pool.blocks[i].ref_cnt == 0

    # Everything freed: a shrink to 1 must then complete and hide every other block.
    for blocks in held:
        pool.free_blocks(blocks)
    elastic.set_limit(1)
    assert elastic.drain().done
    elastic.check()
    assert pool.get_num_free_blocks() == 1
    assert elastic.store.vllm_pool.get_usage() == 0.0


def test_shrink_waits_for_a_busy_tail_block_and_completes_when_it_is_freed():
    elastic = _new_pool(MAX_USABLE)
    pool = elastic.store.vllm_pool
    blocks = pool.get_new_blocks(MAX_USABLE)  # ids 1..24 in order
    tail = [b for b in blocks if b.block_id > 8]
    pool.free_blocks([b for b in blocks if b.block_id <= 8])
    elastic.set_limit(8)
    result = elastic.drain()
    assert not result.done and len(result.busy) == MAX_USABLE - 8
    assert elastic.committed == MAX_USABLE
    pool.free_blocks(tail)
    result = elastic.drain()
    assert result.done and result.newly_hidden == MAX_USABLE - 8
    assert elastic.committed == 8 and pool.get_num_free_blocks() == 8
    elastic.check()


def test_usage_counts_only_visible_blocks():
    elastic = _new_pool(10)
    pool = elastic.store.vllm_pool
    pool.get_new_blocks(5)
    assert pool.get_usage() == pytest.approx(0.5)
    elastic.grow(20)
    assert pool.get_usage() == pytest.approx(0.25)


def test_cached_blocks_in_the_tail_are_evicted_before_hiding():
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

    elastic = _new_pool(MAX_USABLE)
    pool = elastic.store.vllm_pool
    blocks = pool.get_new_blocks(MAX_USABLE)
    key = make_block_hash_with_group_id(b"prefix!!", 0)
    pool._insert_block_hash(key, blocks[-1], None)
    pool.free_blocks(blocks)
    assert pool.get_cached_block(b"prefix!!", [0]) is not None
    elastic.set_limit(4)
    assert elastic.drain().done
    assert pool.get_cached_block(b"prefix!!", [0]) is None
    elastic.check()
