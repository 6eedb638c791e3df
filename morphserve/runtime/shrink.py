"""The three ways a restore gets its KV blocks back when some above the new capacity are
in use (`shrink_strategy`): wait for them to free, preempt their requests (vLLM's own
recompute preemption), or migrate them to free blocks below the capacity.
"""

from __future__ import annotations

import logging
from typing import Callable

from kv_resize.elastic_pool import DrainResult, ElasticBlockPool
from morphserve.errors import MorphServeError

log = logging.getLogger("morphserve")


def preemption_order(busy: list[int], owners: dict[int, list[str]], progress: dict[str, int]) -> list[str]:
    """Every request holding a busy tail block must go; least progress first loses least work."""
    victims = {r for b in busy for r in owners.get(b, ())}
    return sorted(victims, key=lambda r: (progress.get(r, 0), r))


def shrink_kv(pool: ElasticBlockPool, scheduler, rpc: Callable, target: int, strategy: str) -> dict:
    """Shrink the pool to `target` usable blocks; release the pages of what it gave up.
    `scheduler` is the boundary's SchedulerView, `rpc(method, *args)` the worker call."""
    committed_before = pool.committed
    pool.set_limit(target)
    result = pool.drain()
    action: dict = {}
    if not result.done and strategy == "preempt":
        result, action = _preempt_tail(pool, scheduler, result)
    elif not result.done and strategy == "migrate":
        result, action = _migrate_tail(pool, scheduler, rpc, result)
    out = {"done": result.done, "busy": len(result.busy), "busy_top": max(result.busy, default=0), "strategy": strategy,
           **action}
    if result.done and committed_before > pool.committed:
        rels = rpc("morphserve_kv_release", pool.committed + 1, committed_before)  # one per rank
        out.update(released_blocks=committed_before - pool.committed,
                   released_bytes=sum(r["advised"] for r in rels), kv_rss_delta=sum(r["rss_delta"] for r in rels))
    return out


def _preempt_tail(pool: ElasticBlockPool, scheduler, result: DrainResult) -> tuple[DrainResult, dict]:
    owners = scheduler.block_owners()
    victims = preemption_order(list(result.busy), owners,
                               scheduler.request_progress({r for b in result.busy for r in owners[b]}))
    preempted = scheduler.preempt(victims)
    log.info("MorphServe: preempted %d request(s) holding %d KV blocks above the new capacity",
             len(preempted), len(result.busy))
    return pool.drain(), {"preempted": preempted}


def _migrate_tail(pool: ElasticBlockPool, scheduler, rpc: Callable, result: DrainResult) -> tuple[DrainResult, dict]:
    busy = list(result.busy)
    free_low = pool.free_low_blocks()
    if len(free_low) < len(busy):
        msg = (f"migrate does not fit: {len(busy)} KV blocks in use above the new capacity, "
               f"{len(free_low)} free below it; waiting instead")
        log.info("MorphServe: %s", msg)
        return result, {"migrate_fit": False, "note": msg}
    dst = free_low[: len(busy)]
    moves = dict(zip(busy, dst))
    scheduler.take_free_blocks(dst)
    scheduler.remap_blocks(moves)
    try:
        rpc("morphserve_kv_migrate", list(moves.items()))
    except Exception as e:
        scheduler.remap_blocks({d: s for s, d in moves.items()})
        scheduler.return_free_blocks(dst)
        raise MorphServeError(f"KV block migration failed, nothing moved: {e}") from e
    pool.hide_detached(moves.keys())
    return pool.drain(), {"migrate_fit": True, "migrated": len(moves)}
