"""An elastic cap over vLLM's BlockPool.

vLLM sizes its BlockPool once. We create it at the largest capacity MorphServe can reach
and hide the blocks above the current capacity by taking them out of the free queue, so
vLLM cannot hand them out. Block ids 1..committed are backed by memory; the null block
(id 0) is vLLM's and never moves.

State and invariants (checked by `check()`, exercised by tests/test_elastic_pool.py):
- `committed`: usable ids 1..committed are backed by memory. Ids above it are hidden.
- `limit` <= `committed`: the capacity we are shrinking to. Free blocks in
  (limit, committed] are hidden as soon as we see them (`drain`); blocks there still in
  use stay with their requests until they are freed, preempted or migrated. Only when
  none is left does `committed` drop to `limit` and the memory may be released.
- Every usable block is in exactly one of: the free queue, in use (ref_cnt > 0), hidden.
- A hidden block is never in use and never in the prefix cache.
- No block above `committed` is ever in use: growing happens before vLLM can use a block,
  and shrinking never hides a block that is in use.

vLLM returns freed blocks to the free queue itself; a freed block in the draining range
is hidden at the next step boundary, before the next schedule().
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DrainResult:
    done: bool  # committed == limit: the range above limit may be released
    newly_hidden: int
    busy: tuple[int, ...]  # in-use block ids still above limit


class ElasticBlockPool:
    def __init__(self, pool, committed: int):
        """`pool` is a vLLM BlockPool sized for the maximum capacity, all blocks free."""
        self.pool = pool
        self.max_usable = len(pool.blocks) - 1
        if not 0 < committed <= self.max_usable:
            raise ValueError(f"committed {committed} outside 1..{self.max_usable}")
        self.hidden: set[int] = set()
        self.committed = self.max_usable
        self.limit = self.max_usable
        self.set_limit(committed)
        result = self.drain()
        assert result.done, "a fresh pool has no block in use"

    # -- resizing --------------------------------------------------------------------
    def grow(self, target: int) -> int:
        """Make ids 1..target usable; the caller has committed their memory first."""
        if not self.limit <= target <= self.max_usable:
            raise ValueError(f"grow target {target} outside {self.limit}..{self.max_usable}")
        revived = sorted(i for i in self.hidden if i <= target)
        for i in revived:
            self.hidden.remove(i)
        # Appended at the back: vLLM hands out free blocks from the front, so recently
        # freed (cache-warm) blocks are still reused first.
        self.pool.free_block_queue.append_n([self.pool.blocks[i] for i in revived])
        self.committed = max(self.committed, target)
        self.limit = target
        self._sync_vllm_view()
        return len(revived)

    def set_limit(self, target: int) -> None:
        """Start shrinking to `target` usable blocks; call drain() to make progress."""
        if not 0 < target <= self.committed:
            raise ValueError(f"shrink target {target} outside 1..{self.committed}")
        if target >= self.limit:  # a smaller shrink than the pending one: give blocks back
            self.grow(target)
            return
        self.limit = target

    def drain(self) -> DrainResult:
        """Hide every free block above `limit`; report the ones still in use."""
        hidden_now = 0
        busy: list[int] = []
        for i in range(self.limit + 1, self.committed + 1):
            if i in self.hidden:
                continue
            block = self.pool.blocks[i]
            if block.ref_cnt > 0:
                busy.append(i)
                continue
            # Evict first: a hidden block must not be found by a prefix-cache lookup.
            self.pool._maybe_evict_cached_block(block)
            self.pool.free_block_queue.remove(block)
            self.hidden.add(i)
            hidden_now += 1
        if not busy:
            self.committed = self.limit
        self._sync_vllm_view()
        return DrainResult(not busy, hidden_now, tuple(busy))

    def hide_detached(self, ids) -> None:
        """Hide blocks that left their requests without passing through the free queue
        (the source blocks of a migration)."""
        for i in ids:
            block = self.pool.blocks[i]
            assert i > self.limit and block.ref_cnt == 0 and block.prev_free_block is None, i
            self.pool._maybe_evict_cached_block(block)
            self.hidden.add(i)

    # -- views -----------------------------------------------------------------------
    @property
    def visible(self) -> int:
        """Usable blocks vLLM can see: committed, minus those already hidden while draining."""
        # Hidden ids all lie above `limit`, so only a draining range (limit, committed] can
        # hold hidden blocks below `committed`: O(draining blocks), not O(hidden), per step.
        if self.limit == self.committed:
            return self.committed
        return self.committed - sum(1 for i in range(self.limit + 1, self.committed + 1) if i in self.hidden)

    def free_low_blocks(self) -> list:
        """Free blocks at or below `limit`, in the queue's eviction order (migration targets)."""
        return [b for b in self.pool.free_block_queue.get_all_free_blocks() if b.block_id <= self.limit]

    def _sync_vllm_view(self) -> None:
        # BlockPool.get_usage() divides by num_gpu_blocks - 1, and reset_prefix_cache()
        # compares against it: both must count only blocks vLLM can see.
        self.pool.num_gpu_blocks = self.visible + 1

    def check(self) -> None:
        """Assert the invariants in the module docstring (tests and debug runs)."""
        free = {b.block_id for b in self.pool.free_block_queue.get_all_free_blocks()}
        used = {b.block_id for b in self.pool.blocks[1:] if b.ref_cnt > 0}
        assert not (free & used), f"blocks both free and used: {sorted(free & used)[:5]}"
        assert not (self.hidden & free), "hidden block in the free queue"
        assert not (self.hidden & used), "hidden block in use"
        assert free | used | self.hidden == set(range(1, self.max_usable + 1)), "a block was lost"
        assert all(i > self.limit for i in self.hidden), "a block below the limit is hidden"
        assert set(range(self.committed + 1, self.max_usable + 1)) <= self.hidden, "uncommitted block visible"
        assert max(used, default=0) <= self.committed, "a block beyond capacity is in use"
        for i in self.hidden:
            assert self.pool.blocks[i].block_hash is None, "hidden block still in the prefix cache"
        assert self.pool.num_gpu_blocks == 1 + self.committed - sum(1 for i in self.hidden if i <= self.committed)
