"""KV blocks above the rest capacity kept cold: used last, never cached, their pages handed back.

A rung that frees weight memory shows vLLM more KV blocks. vLLM hands out free blocks from
the front of its free queue and returns them to the back, so over a long enough window it
writes every block it can see, even at light load, and an anonymous mapping keeps every
page once written: the whole capacity of the rung becomes resident whether or not the load
ever needed it at once (measured on a 60 s light window resting on all-W8A8: 53 of 54
blocks resident, +96 MiB of KV over plain FP16's 19 blocks). So the blocks are split:

- **warm**, ids 1..`warm` (the capacity at rest, level 0): vLLM's own behaviour, cached
  prefixes included;
- **cold**, ids above `warm` up to the pool's limit: in the free queue they stay behind
  every warm block, so vLLM takes one only when no warm block is free; moving one back
  evicts its prefix-cache entry, so a cold block never holds a prefix anyone could hit;
  and the pages of every free cold block are released at most every `release_every_s`.

Resident KV then follows what the load held at once, not what it cycled through. The price:
prefixes are cached in the warm blocks only (as many as the rest capacity holds), and a
cold block's pages fault in again when it is next used (about a millisecond a block here).

That first price falls on preempted requests too. When vLLM preempts a request it frees its
blocks with their prefix hashes, and when it resumes the request it computes again only what
no cached block still holds (vLLM counts those hits apart from new requests',
`PrefixCacheStats.preempted_hits`, which its Prometheus counters leave out). A cold block that
loses its prefix at the next boundary makes a resumed request compute those tokens again. With
`cache_grace_s` > 0 a free cold block keeps its cached prefix while it is ordered (it still
goes behind every warm block, so vLLM takes it last), and loses it only when its pages are
released, once it has been free and cached for `cache_grace_s` (a free, uncached cold block is
released as before). 0 (the default) drops it at once, as before.

Pure logic over `BlockStore` ids; the caller releases the pages (a worker call) and calls
this only while the elastic pool is not shrinking (the draining range belongs to it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kv_resize.elastic_pool import BlockStore


def runs(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted ids as inclusive [first, last] runs of consecutive ids."""
    out: list[tuple[int, int]] = []
    for i in sorted(ids):
        if out and i == out[-1][1] + 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


@dataclass
class ColdTail:
    warm: int  # ids 1..warm behave as vLLM's own
    release_every_s: float = 2.0
    last_release: float | None = None
    # A cold block may hold pages written since the last release: one was seen in use, or
    # came back out of order. Idle boundaries then cost no worker call (a worker spins for a
    # while after each). The one use this misses -- the only free cold block taken and freed
    # within one step, so it returns to the same place -- leaves that block resident until
    # the next release.
    dirty: bool = False
    cache_grace_s: float = 0.0  # see the module's docstring
    # when each free cold block was first seen free and cached (cache_grace_s > 0 only)
    cached_since: dict[int, float] = field(default_factory=dict)

    def order(self, store: BlockStore, limit: int, now: float = 0.0) -> list[int]:
        """Put every free cold block behind every free warm one (in id order, so use piles up
        on the lowest cold ids); return the cold ids moved. Moving evicts any cached prefix,
        unless `cache_grace_s` > 0 (then `to_release` evicts it, with the pages)."""
        self.dirty |= any(store.ref_cnt(i) > 0 for i in range(self.warm + 1, limit + 1))
        free = store.free_ids()
        last_warm = max((k for k, i in enumerate(free) if i <= self.warm), default=-1)
        cold_free = [i for i in free if self.warm < i <= limit]
        misplaced = any(self.warm < i <= limit for i in free[:last_warm])
        cached = [i for i in cold_free if store.cached_hash(i) is not None]
        keep_cached = self.cache_grace_s > 0
        if keep_cached:
            self.cached_since = {i: self.cached_since.get(i, now) for i in cached}
        if not misplaced and (keep_cached or not cached) and cold_free == sorted(cold_free):
            return []
        self.dirty = True
        cold_free.sort()
        if keep_cached:
            store.move_back(cold_free)
        else:
            for i in cold_free:
                store.take_free(i)  # out of the prefix cache, then out of the queue
            store.give_back(cold_free)
        return cold_free

    def due(self, now: float) -> bool:
        return self.last_release is None or now - self.last_release >= self.release_every_s

    def to_release(self, store: BlockStore, limit: int, now: float) -> list[tuple[int, int]]:
        """When due and a cold block may have been written: the runs of free cold blocks
        whose pages may go (none is in use; none cached: `order` ran first, or, with a grace,
        a block cached for less than it is kept and one cached for longer loses its prefix
        here). All of them, not only those written: releasing a page that was never written
        costs nothing."""
        if self.warm >= limit or not self.dirty or not self.due(now):
            return []
        ids = [i for i in range(self.warm + 1, limit + 1) if store.ref_cnt(i) == 0 and store.in_free_queue(i)]
        kept = False
        if self.cache_grace_s > 0:
            released = []
            for i in ids:
                if store.cached_hash(i) is None:
                    released.append(i)
                elif now - self.cached_since.get(i, now) >= self.cache_grace_s:
                    store.forget_cached(i)
                    self.cached_since.pop(i, None)
                    released.append(i)
                else:
                    kept = True  # still a resumable prefix: released at a later round
            ids = released
        assert all(store.cached_hash(i) is None for i in ids), "a cold block still in the prefix cache"
        self.last_release, self.dirty = now, kept
        return runs(ids)
