"""The controller leaves the cold tail alone while requests wait: a preempted request's
prefix cached in a cold block stays cached until the queue is gone. vLLM's real BlockPool,
a controller stand-in (pure Python, no engine)."""

from __future__ import annotations

from types import SimpleNamespace

from kv_resize.cold_tail import ColdTail
from tests.test_cold_tail import MAX_USABLE, WARM, _cache, _pool


def _controller(waiting: int):
    from morphserve.runtime.controller import MorphController

    released = []
    c = object.__new__(MorphController)
    c.pool = _pool()
    c.cold = ColdTail(WARM, release_every_s=0.0)
    c.moves = SimpleNamespace(restoring=None, recovery_shrink_from=None)
    c.loop = SimpleNamespace(sample=SimpleNamespace(waiting=waiting))
    c.engine = SimpleNamespace(rpc=lambda method, *args: released.append((method, args)))
    return c, released


def _preempted_prefix_in_a_cold_block(c):
    pool = c.pool.store.vllm_pool
    blocks = pool.get_new_blocks(MAX_USABLE)
    cold_block = blocks[-1]
    _cache(pool, cold_block, 7)
    pool.free_blocks(reversed(blocks))  # preempted: its blocks free, their hashes kept
    return cold_block


def test_while_requests_wait_a_cold_block_keeps_its_cached_prefix():
    c, released = _controller(waiting=3)
    block = _preempted_prefix_in_a_cold_block(c)
    c.keep_tail_cold(now=100.0)
    assert block.block_hash is not None and released == []
    c.loop.sample.waiting = 0  # the queue is gone: the tail goes cold again
    c.keep_tail_cold(now=101.0)
    assert block.block_hash is None
    assert released and released[0][0] == "morphserve_kv_release_runs"
    c.pool.check()


def test_without_a_sample_the_tail_is_kept_cold_as_before():
    c, _ = _controller(waiting=0)
    c.loop = SimpleNamespace(sample=None)  # no sampler: nothing says requests wait
    block = _preempted_prefix_in_a_cold_block(c)
    c.keep_tail_cold(now=100.0)
    assert block.block_hash is None
