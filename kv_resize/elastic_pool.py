"""An elastic cap over vLLM's BlockPool.

It sees the pool only through `BlockStore` (block ids in, block ids out), which the vLLM
boundary implements over vLLM's BlockPool (morphserve.vllm.scheduler.VllmBlockStore).
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
from typing import Protocol


@dataclass(frozen=True)
class DrainResult:
    done: bool  # committed == limit: the range above limit may be released
    newly_hidden: int
    busy: tuple[int, ...]  # in-use block ids still above limit


class BlockStore(Protocol):
    """The block pool as the elastic cap needs it; ids 1..num_usable (0 is the null block)."""

    num_usable: int

    def ref_cnt(self, block_id: int) -> int: ...
    def cached_hash(self, block_id: int): ...  # None unless the block is in the prefix cache
    def in_free_queue(self, block_id: int) -> bool: ...
    def take_free(self, block_id: int) -> None: ...  # out of the prefix cache and the free queue
    def forget_cached(self, block_id: int) -> None: ...  # out of the prefix cache only
    def give_back(self, block_ids: list[int]) -> None: ...  # to the back of the free queue
    def move_back(self, block_ids: list[int]) -> None: ...  # free blocks to the back, cached prefixes kept
    def free_ids(self) -> list[int]: ...  # in the free queue's eviction order
    def num_free(self) -> int: ...
    def set_visible_total(self, num_blocks: int) -> None: ...  # the pool size the engine reports
    def visible_total(self) -> int: ...


class ElasticBlockPool:
    def __init__(self, store: BlockStore, committed: int):
        """`store` is the engine's block pool sized for the maximum capacity, all blocks free."""
        self.store = store
        self.max_usable = store.num_usable
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
        self.store.give_back(revived)
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
            if self.store.ref_cnt(i) > 0:
                busy.append(i)
                continue
            self.store.take_free(i)  # evicted from the prefix cache first
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
            assert i > self.limit and self.store.ref_cnt(i) == 0 and not self.store.in_free_queue(i), i
            self.store.forget_cached(i)
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

    def free_low_blocks(self) -> list[int]:
        """Free block ids at or below `limit`, in the queue's eviction order (migration targets)."""
        return [i for i in self.store.free_ids() if i <= self.limit]

    def _sync_vllm_view(self) -> None:
        self.store.set_visible_total(self.visible + 1)

    def check(self) -> None:
        """Assert the invariants in the module docstring (tests and debug runs)."""
        free = set(self.store.free_ids())
        used = {i for i in range(1, self.max_usable + 1) if self.store.ref_cnt(i) > 0}
        assert not (free & used), f"blocks both free and used: {sorted(free & used)[:5]}"
        assert not (self.hidden & free), "hidden block in the free queue"
        assert not (self.hidden & used), "hidden block in use"
        assert free | used | self.hidden == set(range(1, self.max_usable + 1)), "a block was lost"
        assert all(i > self.limit for i in self.hidden), "a block below the limit is hidden"
        assert set(range(self.committed + 1, self.max_usable + 1)) <= self.hidden, "uncommitted block visible"
        assert max(used, default=0) <= self.committed, "a block beyond capacity is in use"
        for i in self.hidden:
            assert self.store.cached_hash(i) is None, "hidden block still in the prefix cache"
        assert self.store.visible_total() == 1 + self.committed - sum(1 for i in self.hidden if i <= self.committed)
