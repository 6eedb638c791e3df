"""The cold tail over vLLM's real BlockPool (pure Python, no engine): blocks above the rest
capacity are handed out last, hold no cached prefix, and only free ones are released."""

from __future__ import annotations

import random

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from kv_resize.cold_tail import ColdTail, runs
from kv_resize.elastic_pool import ElasticBlockPool

MAX_USABLE = 24
WARM = 8


def _pool(committed: int = MAX_USABLE):
    from vllm.v1.core.block_pool import BlockPool

    from morphserve.vllm.scheduler import VllmBlockStore

    pool = BlockPool(num_gpu_blocks=MAX_USABLE + 1, enable_caching=True, hash_block_size=16)
    return ElasticBlockPool(VllmBlockStore(pool), committed)


def _cache(vllm_pool, block, salt: int) -> None:
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

    vllm_pool._insert_block_hash(make_block_hash_with_group_id(salt.to_bytes(8, "little"), 0), block, None)


def test_runs_are_inclusive_and_sorted():
    assert runs([5, 3, 4, 9, 11, 10, 1]) == [(1, 1), (3, 5), (9, 11)]
    assert runs([]) == []


def test_cold_blocks_are_handed_out_only_when_no_warm_block_is_free():
    elastic = _pool()
    pool, cold = elastic.store.vllm_pool, ColdTail(WARM)
    # a burst takes 20 blocks (cold ones included); vLLM returns them to the back of its queue
    burst = pool.get_new_blocks(20)
    pool.free_blocks(reversed(burst))
    cold.order(elastic.store, elastic.limit)
    for _ in range(5):  # light load from now on: a few blocks at a time, many rounds
        held = pool.get_new_blocks(3)
        assert all(b.block_id <= WARM for b in held), [b.block_id for b in held]
        pool.free_blocks(reversed(held))
        cold.order(elastic.store, elastic.limit)
    elastic.check()


def test_moving_a_cold_block_drops_its_cached_prefix_and_leaves_warm_ones_cached():
    elastic = _pool()
    pool, cold = elastic.store.vllm_pool, ColdTail(WARM)
    blocks = pool.get_new_blocks(MAX_USABLE)
    warm_block, cold_block = blocks[0], blocks[-1]
    _cache(pool, warm_block, 1)
    _cache(pool, cold_block, 2)
    pool.free_blocks(reversed(blocks))
    moved = cold.order(elastic.store, elastic.limit)
    assert cold_block.block_id in moved and cold_block.block_hash is None
    assert warm_block.block_hash is not None
    elastic.check()


def test_release_gives_free_cold_runs_only_when_due():
    elastic = _pool()
    pool, cold = elastic.store.vllm_pool, ColdTail(WARM, release_every_s=2.0)
    held = pool.get_new_blocks(12)  # 1..12: warm 1..8, cold 9..12 in use
    cold.order(elastic.store, elastic.limit)
    assert cold.to_release(elastic.store, elastic.limit, now=100.0) == [(13, MAX_USABLE)]
    assert cold.to_release(elastic.store, elastic.limit, now=101.0) == []  # not due yet
    pool.free_blocks(reversed(held))
    cold.order(elastic.store, elastic.limit)
    assert cold.to_release(elastic.store, elastic.limit, now=102.0) == [(WARM + 1, MAX_USABLE)]
    # nothing cold used since: no release, however long it has been (an idle boundary)
    cold.order(elastic.store, elastic.limit)
    assert cold.to_release(elastic.store, elastic.limit, now=200.0) == []
    # at rest the pool holds no cold block at all
    assert ColdTail(MAX_USABLE).to_release(elastic.store, elastic.limit, now=0.0) == []


def test_with_a_grace_a_free_cold_block_keeps_its_prefix_until_released():
    """A preempted request's blocks, freed with their prefix hashes: behind every warm block,
    still cached, so a resume within the grace hits them; released (and uncached) after it."""
    elastic = _pool()
    pool, cold = elastic.store.vllm_pool, ColdTail(WARM, release_every_s=2.0, cache_grace_s=10.0)
    blocks = pool.get_new_blocks(MAX_USABLE)
    preempted = blocks[-1]
    _cache(pool, preempted, 7)
    pool.free_blocks(reversed(blocks))
    moved = cold.order(elastic.store, elastic.limit, now=100.0)
    assert preempted.block_id in moved and preempted.block_hash is not None  # kept
    free = elastic.store.free_ids()
    assert all(i <= WARM for i in free[:WARM]) and free[WARM:] == sorted(free[WARM:])  # cold still last
    # released every 2 s: the uncached cold blocks go, the cached one stays within the grace
    ranges = cold.to_release(elastic.store, elastic.limit, now=102.0)
    ids = {i for a, b in ranges for i in range(a, b + 1)}
    assert preempted.block_id not in ids and ids == set(range(WARM + 1, MAX_USABLE))
    assert preempted.block_hash is not None and cold.dirty  # still owed a release
    cold.order(elastic.store, elastic.limit, now=105.0)
    assert cold.to_release(elastic.store, elastic.limit, now=111.0) == [(WARM + 1, MAX_USABLE)]  # grace over
    assert preempted.block_hash is None  # out of the prefix cache before its pages go
    elastic.check()


def test_with_a_grace_a_resumed_request_hits_its_cold_blocks():
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

    elastic = _pool()
    pool, cold = elastic.store.vllm_pool, ColdTail(WARM, cache_grace_s=10.0)
    blocks = pool.get_new_blocks(MAX_USABLE)
    _cache(pool, blocks[-1], 9)
    pool.free_blocks(reversed(blocks))
    cold.order(elastic.store, elastic.limit, now=0.0)
    key = make_block_hash_with_group_id((9).to_bytes(8, "little"), 0)
    hit = pool.cached_block_hash_to_block.get_one_block(key)  # what vLLM's prefix lookup finds
    assert hit is not None and hit.block_id == MAX_USABLE
    elastic.check()


ops = st.lists(st.tuples(st.sampled_from(["alloc", "free", "cache", "grow", "shrink", "cold"]),
                         st.integers(1, MAX_USABLE), st.integers(0, 10**6)), min_size=1, max_size=120)


@settings(max_examples=200, deadline=None)
@given(start=st.integers(WARM, MAX_USABLE), steps=ops)
@pytest.mark.parametrize("grace", [0.0, 5.0])
def test_random_interleavings_never_release_a_block_in_use_or_cached(grace, start, steps):
    elastic = _pool(start)
    pool, cold = elastic.store.vllm_pool, ColdTail(WARM, release_every_s=0.0, cache_grace_s=grace)
    held: list[list] = []
    for op, n, salt in steps:
        rng = random.Random(salt)
        if op == "alloc":
            n = min(n, pool.get_num_free_blocks())
            if n:
                free_warm = sum(1 for i in elastic.store.free_ids() if i <= WARM)
                # Any id above WARM counts, the limit's too: while a shrink drains, a block above
                # the new limit freed since the last drain is back in vLLM's queue (the cold tail
                # is not run then; the drain takes it out at the next boundary).
                ordered = not any(i > WARM for i in elastic.store.free_ids()[:free_warm])
                blocks = pool.get_new_blocks(n)
                if ordered:  # after `order`, cold blocks come only once the warm ones are gone
                    assert sum(b.block_id > WARM for b in blocks) <= max(0, n - free_warm)
                held.append(blocks)
        elif op == "free" and held:
            pool.free_blocks(reversed(held.pop(rng.randrange(len(held)))))
        elif op == "cache" and held:
            block = rng.choice(rng.choice(held))
            if block.block_hash is None:
                _cache(pool, block, salt)
        elif op == "grow":
            elastic.grow(max(n, elastic.limit))
        elif op == "shrink":
            elastic.set_limit(max(WARM, min(n, elastic.committed)))
            elastic.drain()
        elif op == "cold" and elastic.limit == elastic.committed:
            cold.order(elastic.store, elastic.limit, now=float(salt))
            for first, last in cold.to_release(elastic.store, elastic.limit, now=float(salt)):
                for i in range(first, last + 1):
                    assert WARM < i <= elastic.limit, i
                    assert pool.blocks[i].ref_cnt == 0 and pool.blocks[i].block_hash is None, i
        elastic.check()
